//! The accept loop every pod listener runs on a worker, and the caps it applies.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::access::Direction;
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
#[derive(Debug)]
pub(crate) struct Admission {
    _node: Permit,
    _listener: Permit,
}

/// Where an accept loop checks its caps: the node's budget, then the listener's
/// own (total and per peer), counted as `kind` in metrics.
pub(crate) struct Gate<'a> {
    pub node: &'a Limit,
    pub listener: Limit,
    pub kind: stats::Listener,
}

impl Gate<'_> {
    fn admit(
        &self,
        peer: SocketAddr,
        throttle: &Throttle,
        workload: &WorkloadKey,
    ) -> Option<Admission> {
        let ip = canonical(peer).ip();
        let refused = match self.node.admit(ip) {
            Ok(node) => match self.listener.admit(ip) {
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
        STATS.refused(self.kind, refused);
        if let Some(suppressed) = throttle.allow() {
            warn!(%workload, listener = self.kind.as_str(), %peer, reason = refused.as_str(), suppressed, "connection refused: over a limit");
        }
        None
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

/// A pod listener's accept loop, until `stop` says so: registers `listeners`
/// (one or two) with the runtime this runs on (a worker's, see
/// [`crate::workers::spawn_listener`]), takes connections from whichever is
/// ready, paces failures, and gives each connection to `accepted`. `name` says
/// which listener stopped, in the log.
pub(crate) async fn accept_loop(
    listeners: Vec<std::net::TcpListener>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    workload: &WorkloadKey,
    direction: Direction,
    name: &'static str,
    gate: Gate<'_>,
    mut accepted: impl FnMut(TcpStream, SocketAddr, Admission),
) {
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
                    match gate.admit(peer, &throttle, workload) {
                        Some(admission) => accepted(stream, peer, admission),
                        // Reset at once: the peer learns now, and no state is kept.
                        None => reset(stream),
                    }
                }
                Err(e) => backoff.failed(workload, direction, e).await,
            },
        }
    }
    tracing::debug!(%workload, "{name} listener stopped");
}

/// Waits until `stop` says so (or its sender is gone).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
