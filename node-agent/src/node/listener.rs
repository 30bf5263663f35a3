//! The accept loop every pod listener runs on a worker, and the caps it applies.

use std::{future::Future, io, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{Pod, access::Direction};
use crate::{
    model::WorkloadKey,
    net::{
        limit::{Full, Limit, Permit, Refused, Throttle},
        socket::{canonical, reset},
    },
    stats::{self, STATS},
};

/// The slots an accepted connection holds (the node's budget, its listener's
/// cap); dropping it gives them back.
struct Admission {
    _node: Permit,
    _listener: Permit,
}

/// Takes the connection's slots: the node's budget, then the listener's own
/// cap (total and per peer); or counts and logs (at a bounded rate) the
/// refusal, as `kind`.
fn admit(
    budget: &Limit,
    cap: &Limit,
    kind: stats::Listener,
    peer: SocketAddr,
    throttle: &Throttle,
    workload: &WorkloadKey,
) -> Option<Admission> {
    let ip = canonical(peer).ip();
    let refused = match budget.admit(ip) {
        Ok(node) => match cap.admit(ip) {
            Ok(listener) => {
                return Some(Admission {
                    _node: node,
                    _listener: listener,
                });
            }
            Err(Full::Total) => Refused::ListenerLimit,
            Err(Full::Peer) => Refused::PeerLimit,
        },
        Err(_) => Refused::NodeLimit,
    };
    STATS.refused(kind, refused);
    if let Some(suppressed) = throttle.allow() {
        warn!(%workload, listener = kind.as_str(), %peer, reason = refused.as_str(), suppressed, "connection refused: over a limit");
    }
    None
}

/// Which way a listener's connections go.
fn direction_of(kind: stats::Listener) -> Direction {
    match kind {
        stats::Listener::Outbound => Direction::Outbound,
        _ => Direction::Inbound,
    }
}

/// Pacing for an accept loop whose `accept` fails (typically out of file
/// descriptors): waits 10 ms, doubling up to 1 s while failures continue, and warns
/// once per run of failures rather than on every retry.
#[derive(Default)]
pub(crate) struct AcceptBackoff {
    delay: Duration,
}

impl AcceptBackoff {
    pub async fn failed(&mut self, workload: &WorkloadKey, direction: Direction, e: io::Error) {
        if self.delay.is_zero() {
            warn!(%workload, direction = direction.as_str(), error = %e, "accept failed; backing off");
            self.delay = Duration::from_millis(10);
        } else {
            self.delay = (self.delay * 2).min(Duration::from_secs(1));
        }
        tokio::time::sleep(self.delay).await;
    }

    pub fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// A pod listener's accept loop, until the pod stops: registers `listeners`
/// (one or two) with the runtime this runs on (a worker's, see
/// [`crate::workers::spawn_listener`]), takes connections from whichever is
/// ready, paces failures, admits each under the node's `budget` and the
/// listener's `cap` (counted as `kind`), and serves it on a worker with
/// `serve`, holding its slots until that is done.
pub(crate) async fn accept_loop<F, Fut>(
    listeners: Vec<std::net::TcpListener>,
    pod: &Pod,
    budget: &Limit,
    kind: stats::Listener,
    cap: Limit,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (workload, direction) = (&pod.key, direction_of(kind));
    let mut stop = pod.stopped();
    let listeners = match listeners
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<io::Result<Vec<_>>>()
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%workload, ?direction, error = %e, "cannot accept on this listener: its connections will wait and time out");
            return;
        }
    };
    let accept_any = async |ls: &[TcpListener]| match ls {
        // At most two listeners: poll both, take whichever is ready.
        [a] => a.accept().await,
        [a, b, ..] => tokio::select! {
            r = a.accept() => r,
            r = b.accept() => r,
        },
        [] => std::future::pending().await,
    };
    let mut backoff = AcceptBackoff::default();
    let throttle = Throttle::default();
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            r = accept_any(&listeners) => match r {
                Ok((stream, peer)) => {
                    backoff.succeeded();
                    match admit(budget, &cap, kind, peer, &throttle, workload) {
                        Some(admission) => {
                            let serve = serve.clone();
                            crate::workers::serve(stream, move |stream| {
                                let connection = serve(stream, peer);
                                async move {
                                    connection.await;
                                    drop(admission);
                                }
                            });
                        }
                        // Reset at once: the peer learns now, and no state is kept.
                        None => reset(stream),
                    }
                }
                Err(e) => backoff.failed(workload, direction, e).await,
            },
        }
    }
    tracing::debug!(%workload, listener = kind.as_str(), "listener stopped");
}

/// Waits until `stop` says so (or its sender is gone).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
