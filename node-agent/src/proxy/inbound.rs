//! Inbound plaintext: `sk_lookup` steers TCP arriving at the pod from outside to this
//! listener (15006, `[::]` inside the pod's namespace, IPv4 too). The accepted
//! socket's local address is the address the client dialed; the agent connects to
//! it from inside the namespace, over the pod's loopback, which `sk_lookup` leaves
//! alone.

use std::{net::SocketAddr, sync::Arc};

use tokio::{net::TcpListener, sync::watch};
use tracing::debug;
use weft_common::INBOUND_PLAINTEXT_PORT;

use super::{
    AcceptBackoff, AccessLog, Direction, INBOUND_SOURCE_V4, INBOUND_SOURCE_V6, Pod, Shared,
    accept_next, canonical, forward, listen, reset,
};

pub struct InboundListener {
    pod: Arc<Pod>,
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl InboundListener {
    pub fn new(pod: Arc<Pod>, shared: Arc<Shared>) -> std::io::Result<Self> {
        let any6 = SocketAddr::new(
            std::net::Ipv6Addr::UNSPECIFIED.into(),
            INBOUND_PLAINTEXT_PORT,
        );
        let listener = match listen(&pod.netns, any6) {
            Ok(l) => l,
            // A pod without IPv6 gets an IPv4-only listener.
            Err(_) => listen(
                &pod.netns,
                SocketAddr::new(
                    std::net::Ipv4Addr::UNSPECIFIED.into(),
                    INBOUND_PLAINTEXT_PORT,
                ),
            )?,
        };
        Ok(InboundListener {
            pod,
            listener,
            shared,
        })
    }

    /// The listening socket, for `sk_lookup`'s map.
    pub fn socket(&self) -> &TcpListener {
        &self.listener
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut backoff = AcceptBackoff::default();
        while let Some((stream, peer)) = accept_next(
            &self.listener,
            &mut stop,
            &mut backoff,
            &self.pod.workload,
            Direction::Inbound,
        )
        .await
        {
            let pod = self.pod.clone();
            let settings = self.shared.settings;
            tokio::spawn(async move { handle(pod, settings, stream, peer).await });
        }
        debug!(workload = %self.pod.workload, "inbound listener stopped");
    }
}

async fn handle(
    pod: Arc<Pod>,
    settings: super::Settings,
    down: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let mut log = AccessLog::new(Direction::Inbound, pod.clone(), canonical(peer));
    let dst = match down.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => {
            log.fail("refused", e);
            reset(down);
            return;
        }
    };
    let source = if dst.is_ipv4() {
        INBOUND_SOURCE_V4
    } else {
        INBOUND_SOURCE_V6
    };
    forward(log, down, dst, Some(source), settings).await;
}
