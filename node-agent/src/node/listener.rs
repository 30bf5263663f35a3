//! The accept loop every pod listener runs on a worker.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::access::Direction;
use crate::model::WorkloadKey;

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
    mut accepted: impl FnMut(TcpStream, SocketAddr),
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
    loop {
        tokio::select! {
            () = stopped(&mut stop) => break,
            r = accept_any(&listeners) => match r {
                Ok((stream, peer)) => {
                    backoff.succeeded();
                    accepted(stream, peer);
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
