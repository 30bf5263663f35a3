//! Inbound HBONE: a pod's listener on 15008, inside its network namespace.
//!
//! [`crate::hbone::server`] takes each connection through mutual TLS (the pod's
//! current SVID at each handshake, so a renewal takes effect without a restart;
//! a client certificate that chains to the trust bundle) and HTTP/2; this module
//! is the handler of its streams: every stream must be a `CONNECT` to one of
//! this pod's addresses on a port that is not the mesh's own, and is then
//! [`admit`]ted (policy on the proven identity, the connection's source address
//! and the port) and connected to the application inside the namespace. The
//! answer is 200, or 400 (bad request) / 401 (denied by policy) / 503 (the
//! application refused) without touching anything.

use std::sync::Arc;

use rustls::{server::ResolvesServerCert, sign::CertifiedKey};
use tokio_rustls::TlsAcceptor;
use tracing::warn;
use weft_common::INBOUND_HBONE_PORT;

use super::{
    Pod, Shared,
    access::{AccessLog, Direction, End, MUTUAL_TLS},
    admit::admit,
    listener::accept_loop,
};
use crate::{
    certs::CertManager,
    hbone::{
        headers::forwarded_for,
        server::{Handler, Limits, Request, Server},
        stream,
    },
    identity::SpiffeId,
    net::{
        limit::{Limit, Refused},
        socket::listen_any,
    },
    stats::{self, STATS},
    tls,
};

pub struct HboneListener {
    pod: Arc<Pod>,
    listener: std::net::TcpListener,
    server: Server,
    shared: Arc<Shared>,
}

/// Resolves the pod's current SVID at each handshake.
#[derive(Debug)]
struct PodCert {
    certs: CertManager,
    id: SpiffeId,
}

impl ResolvesServerCert for PodCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let svid = self.certs.current(&self.id);
        if svid.is_none() {
            warn!(identity = %self.id, "HBONE handshake refused: no certificate for this pod yet");
        }
        svid.map(|s| s.certified_key())
    }
}

impl HboneListener {
    /// Binds 15008 (IPv6 and IPv4) inside the pod's namespace.
    pub fn new(pod: Arc<Pod>, shared: Arc<Shared>) -> std::io::Result<Self> {
        let listener = listen_any(&pod.netns, INBOUND_HBONE_PORT)?;
        let resolver = Arc::new(PodCert {
            certs: shared.certs.clone(),
            id: pod.identity.clone(),
        });
        let config = tls::server_config(resolver, &shared.bundle).map_err(std::io::Error::other)?;
        let caps = shared.settings.caps;
        let server = Server::new(
            TlsAcceptor::from(config),
            pod.identity.trust_domain(),
            &pod.key.to_string(),
            Limits {
                handshakes: Limit::new(caps.handshakes, caps.handshakes_per_peer),
                streams: Limit::new(caps.per_listener, caps.streams_per_peer),
                handshake_timeout: caps.handshake_timeout,
                idle_timeout: caps.hbone_idle,
            },
        );
        Ok(HboneListener {
            pod,
            listener,
            server,
            shared,
        })
    }

    /// Accepts until the pod stops; run it with [`crate::workers::spawn_listener`].
    pub async fn run(self) {
        let HboneListener {
            pod,
            listener,
            server,
            shared,
        } = self;
        let handler = Arc::new(Inbound {
            pod: pod.clone(),
            shared: shared.clone(),
        });
        let caps = shared.settings.caps;
        let stopped = pod.clone();
        accept_loop(
            vec![listener],
            &pod,
            &shared.budget,
            stats::Listener::Hbone,
            Limit::new(caps.per_listener, caps.per_peer),
            move |tcp, peer| {
                let (server, handler, stop) = (server.clone(), handler.clone(), stopped.stopped());
                async move { server.serve(tcp, peer, handler, stop).await }
            },
        )
        .await;
    }
}

/// What a pod's 15008 does with each stream.
struct Inbound {
    pod: Arc<Pod>,
    shared: Arc<Shared>,
}

impl Handler for Inbound {
    fn refused(&self, why: Refused) {
        STATS.refused(stats::Listener::Hbone, why);
    }

    fn idle_closed(&self) {
        STATS.idle_closed();
    }

    async fn handle(self: Arc<Self>, request: Request) {
        let peer = request.peer.clone();
        let mut log = AccessLog::new(Direction::Inbound, self.pod.clone(), peer.addr);
        log.src_identity = Some(peer.identity.to_string());
        log.dst_identity = Some(self.pod.identity.to_string());
        log.security = MUTUAL_TLS;
        // What the peer says the original client was: kept beside the address
        // the connection really came from, never in its place.
        log.forwarded = request
            .head
            .headers
            .get("forwarded")
            .and_then(forwarded_for);
        let dst = match request.target() {
            Ok(dst) => dst,
            Err(refusal) => {
                log.fail(End::of_status(refusal.status), &refusal.why);
                return request.refuse(&refusal);
            }
        };
        let admitted = match admit(
            &self.shared,
            &self.pod,
            &peer.identity,
            peer.addr,
            dst,
            &mut log,
        )
        .await
        {
            Ok(a) => a,
            Err(refusal) => {
                log.fail(End::of_status(refusal.status), &refusal.why);
                return request.refuse(&refusal);
            }
        };
        let (mut up, kill, _socket) = (admitted.up, admitted.kill, admitted.socket);
        let tunnel = match request.accept() {
            Ok(tunnel) => tunnel,
            Err(e) => {
                log.fail(End::DownstreamError, e);
                return;
            }
        };
        // Here the socket is the application (upstream) and the stream the client.
        let t = tokio::select! {
            t = stream::bidirectional(&mut up, tunnel.send, tunnel.recv, false) => t,
            reason = kill.killed() => {
                log.fail(End::Denied, reason);
                let _ = up.set_zero_linger();
                return;
            }
        };
        log.finish(&t, true);
    }
}
