//! Inbound plaintext: `sk_lookup` steers TCP arriving at the pod from outside to this
//! listener (15006, `[::]` inside the pod's namespace, IPv4 too). The accepted
//! socket's local address is the address the client dialed; the agent connects to
//! it from inside the namespace, over the pod's loopback, which `sk_lookup` leaves
//! alone.
//!
//! Plaintext carries no identity: a `STRICT` peer authentication refuses it, and
//! authorization policies decide on the source address and port alone.

use std::{net::SocketAddr, sync::Arc};

use tokio::sync::watch;
use weft_common::INBOUND_PLAINTEXT_PORT;

use super::{
    AccessLog, Direction, Pod, Shared, accept_loop, canonical, forward, inbound_source, listen_any,
    live::Facts, reset,
};
use crate::stats::{Flags, Peer, Reporter, TcpLabels};

pub struct InboundListener {
    pod: Arc<Pod>,
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
}

impl InboundListener {
    pub fn new(pod: Arc<Pod>, shared: Arc<Shared>) -> std::io::Result<Self> {
        let listener = listen_any(&pod.netns, INBOUND_PLAINTEXT_PORT)?;
        Ok(InboundListener {
            pod,
            listener,
            shared,
        })
    }

    /// The listening socket, for `sk_lookup`'s map.
    pub fn socket(&self) -> &std::net::TcpListener {
        &self.listener
    }

    /// Accepts until `stop`; run it with [`crate::workers::spawn_listener`].
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let InboundListener {
            pod,
            listener,
            shared,
        } = self;
        accept_loop(
            vec![listener],
            stop,
            &pod.workload,
            Direction::Inbound,
            "inbound",
            |stream, peer| {
                let (pod, shared) = (pod.clone(), shared.clone());
                crate::workers::serve(stream, move |stream| handle(pod, shared, stream, peer));
            },
        )
        .await;
    }
}

async fn handle(pod: Arc<Pod>, shared: Arc<Shared>, down: tokio::net::TcpStream, peer: SocketAddr) {
    let peer = canonical(peer);
    let mut log = AccessLog::new(Direction::Inbound, pod.clone(), peer);
    let dst = match down.local_addr() {
        Ok(a) => canonical(a),
        Err(e) => {
            log.fail("refused", e);
            reset(down);
            return;
        }
    };
    log.set_dst(dst);
    let view = shared.view();
    let Some(me) = view.workload(&pod.workload) else {
        log.fail("refused", "this pod is no longer in the config");
        reset(down);
        return;
    };
    log.opened(TcpLabels {
        reporter: Reporter::Destination,
        source: view
            .workload_by_address(peer.ip())
            .map(|w| Peer::of(w, None))
            .unwrap_or_default(),
        destination: Peer::of(me, Some(pod.identity.to_string())),
        service: None,
        mutual_tls: false,
        flags: Flags::None,
    });
    // Plaintext has no identity: peer authentication and policy decide on the
    // source address and the port alone.
    let facts = Facts {
        workload: pod.workload.clone(),
        src_identity: None,
        src_ip: peer.ip(),
        dst_port: dst.port(),
    };
    let kill = match shared.live.authorize(facts, &view) {
        Ok(kill) => kill,
        Err(reason) => {
            log.fail("denied", reason);
            reset(down);
            return;
        }
    };
    drop(view);
    let source = inbound_source(dst);
    forward(log, down, dst, Some(source), shared.settings, Some(kill)).await;
}
