//! Inbound plaintext: `sk_lookup` steers TCP arriving at the pod from outside to this
//! listener (15006, `[::]` inside the pod's namespace, IPv4 too). The accepted
//! socket's local address is the address the client dialed; the agent connects to
//! it from inside the namespace, over the pod's loopback, which `sk_lookup` leaves
//! alone.
//!
//! Plaintext carries no identity: a `STRICT` peer authentication refuses it, and
//! authorization policies decide on the source address and port alone.

use std::{net::SocketAddr, sync::Arc};

use weft_common::INBOUND_PLAINTEXT_PORT;

use super::{
    Pod, Shared,
    access::{AccessLog, Direction, End},
    forward,
    listener::accept_loop,
    live::Facts,
};
use crate::{
    net::{
        limit::Limit,
        socket::{canonical, listen_any, reset},
    },
    stats::{self, Flags, Peer, Reporter, TcpLabels},
};

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

    /// Accepts until the pod stops; run it with [`crate::workers::spawn_listener`].
    pub async fn run(self) {
        let InboundListener {
            pod,
            listener,
            shared,
        } = self;
        let caps = shared.settings.caps;
        let (p, s) = (pod.clone(), shared.clone());
        accept_loop(
            vec![listener],
            &pod,
            &shared.budget,
            stats::Listener::Inbound,
            Limit::new(caps.per_listener, caps.per_peer),
            move |stream, peer| handle(p.clone(), s.clone(), stream, peer),
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
            log.fail(End::Refused, e);
            reset(down);
            return;
        }
    };
    log.set_dst(dst);
    let view = shared.view();
    let Some(me) = view.workload(&pod.key) else {
        log.fail(End::Refused, "this pod is no longer in the config");
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
        workload: pod.key.clone(),
        src_identity: None,
        src_ip: peer.ip(),
        dst_port: dst.port(),
    };
    drop(view);
    let kill = match shared.authorize(facts) {
        Ok(kill) => kill,
        Err(reason) => {
            log.fail(End::Denied, reason);
            reset(down);
            return;
        }
    };
    forward(log, down, dst, Some(peer.ip()), &shared, Some(kill)).await;
}
