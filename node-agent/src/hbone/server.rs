//! Inbound HBONE: the listener on 15008 inside a pod's network namespace.
//!
//! Each connection must complete a TLS 1.3 handshake with a client certificate that
//! chains to the trust bundle; the peer's identity is its one SPIFFE URI SAN. The
//! server presents the pod's own SVID (the current one at each handshake, so a
//! renewal takes effect without a restart). Then HTTP/2: every stream must be a
//! `CONNECT` to one of this pod's addresses on a port that is not the mesh's own;
//! authorization policy decides on the proven identity, the connection's source
//! address and the port; then the agent connects to the application inside the
//! namespace and answers 200, or 400 (bad request) / 401 (denied by policy) / 503
//! (the application refused) without touching anything.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Method, Request, Response, StatusCode};
use rustls::{server::ResolvesServerCert, sign::CertifiedKey};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};
use weft_common::INBOUND_HBONE_PORT;

use super::{HANDSHAKE_TIMEOUT, stream};
use crate::{
    certs::CertManager,
    identity::SpiffeId,
    proxy::{
        AccessLog, Direction, Shared, accept_loop,
        admit::{Refused, Served, admit},
        canonical,
        copy::Side,
        listen_any, stopped,
    },
    tls,
};

pub struct HboneListener {
    served: Arc<Served>,
    listener: std::net::TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
}

/// Resolves the pod's current SVID at each handshake.
#[derive(Debug)]
struct PodCert {
    certs: CertManager,
    id: SpiffeId,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertManager")
    }
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
    pub fn new(served: Arc<Served>, shared: Arc<Shared>) -> std::io::Result<Self> {
        let listener = listen_any(&served.pod.netns, INBOUND_HBONE_PORT)?;
        let resolver = Arc::new(PodCert {
            certs: shared.certs.clone(),
            id: served.pod.identity.clone(),
        });
        let config =
            tls::server_config(resolver, &shared.bundle()).map_err(std::io::Error::other)?;
        Ok(HboneListener {
            served,
            listener,
            acceptor: TlsAcceptor::from(config),
            shared,
        })
    }

    /// Accepts until `stop`; run it with [`crate::workers::spawn_listener`].
    pub async fn run(self, stop: watch::Receiver<bool>) {
        let HboneListener {
            served,
            listener,
            acceptor,
            shared,
        } = self;
        let conns_stop = stop.clone();
        accept_loop(
            vec![listener],
            stop,
            &served.pod.workload,
            Direction::Inbound,
            "HBONE",
            |stream, peer| {
                let conn = Conn {
                    served: served.clone(),
                    shared: shared.clone(),
                    peer: canonical(peer),
                };
                let (acceptor, stop) = (acceptor.clone(), conns_stop.clone());
                crate::workers::serve(stream, move |stream| async move {
                    conn.serve(acceptor, stream, stop).await
                });
            },
        )
        .await;
    }
}

struct Conn {
    served: Arc<Served>,
    shared: Arc<Shared>,
    peer: SocketAddr,
}

impl Conn {
    async fn serve(
        self,
        acceptor: TlsAcceptor,
        tcp: tokio::net::TcpStream,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = tcp.set_nodelay(true);
        let (workload, peer) = (self.served.pod.workload.clone(), self.peer);
        let refuse = move |reason: &dyn std::fmt::Display| {
            warn!(
                %workload,
                %peer,
                reason = %reason,
                "HBONE connection refused"
            );
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return refuse(&format_args!("TLS handshake failed: {e}")),
            Err(_) => return refuse(&"TLS handshake timed out"),
        };
        let peer_id = match tls::peer_identity(tls.get_ref().1.peer_certificates()) {
            // A root of the bundle may also sign for other trust domains
            // (federation, a root shared during migration): only ours are peers.
            Ok(id) if id.trust_domain() != self.served.pod.identity.trust_domain() => {
                return refuse(&format_args!(
                    "peer {id} is not in trust domain {}",
                    self.served.pod.identity.trust_domain()
                ));
            }
            Ok(id) => Arc::new(id),
            Err(e) => return refuse(&e),
        };
        let handshake = super::server_builder().handshake::<_, Bytes>(tls);
        let mut h2 = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => return refuse(&format_args!("HTTP/2 handshake failed: {e}")),
            Err(_) => return refuse(&"HTTP/2 handshake timed out"),
        };
        debug!(workload = %self.served.pod.workload, peer = %self.peer, peer_identity = %peer_id, "HBONE connection accepted");
        let this = Arc::new(self);
        let mut draining = false;
        loop {
            let next = tokio::select! {
                _ = stopped(&mut stop), if !draining => {
                    // Finish the streams in flight, take no new ones.
                    h2.graceful_shutdown();
                    draining = true;
                    continue;
                }
                next = h2.accept() => next,
            };
            match next {
                Some(Ok((req, respond))) => {
                    let this = this.clone();
                    let peer_id = peer_id.clone();
                    tokio::spawn(async move { this.stream(peer_id, req, respond).await });
                }
                Some(Err(e)) => {
                    if !e.is_go_away() && !e.is_io() {
                        refuse(&format_args!("HTTP/2 error: {e}"));
                    }
                    break;
                }
                None => break,
            }
        }
    }

    async fn stream(
        &self,
        peer_id: Arc<SpiffeId>,
        req: Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let mut log = AccessLog::new(Direction::Inbound, self.served.pod.clone(), self.peer);
        log.src_identity = Some(peer_id.to_string());
        log.dst_identity = Some(self.served.pod.identity.to_string());
        log.security = "mutual_tls";
        // The outer connection comes from the source pod's own address (the agent
        // dials from inside its namespace), so `self.peer` already names it; the
        // `forwarded` header says the same for peers that dial from elsewhere.
        if let Some(src) = forwarded_for(&req)
            && src.ip() != self.peer.ip()
        {
            log.src = src;
        }
        let mut reply = |log: &mut AccessLog, refused: Refused| {
            log.fail(refused.end(), &refused.why);
            let resp = Response::builder()
                .status(refused.status)
                .body(())
                .unwrap_or_default();
            let _ = respond.send_response(resp, true);
        };
        if req.method() != Method::CONNECT {
            return reply(
                &mut log,
                Refused::new(
                    StatusCode::BAD_REQUEST,
                    format!("method {} is not CONNECT", req.method()),
                ),
            );
        }
        let Some(dst) = req
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .map(canonical)
        else {
            return reply(
                &mut log,
                Refused::new(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "authority {:?} is not ip:port",
                        req.uri().authority().map(|a| a.as_str())
                    ),
                ),
            );
        };
        let peer = self.peer;
        let admitted = match admit(&self.shared, &self.served, &peer_id, peer, dst, &mut log).await
        {
            Ok(a) => a,
            Err(refused) => return reply(&mut log, refused),
        };
        let (mut up, kill) = (admitted.up, admitted.kill);
        let send = match respond.send_response(Response::new(()), false) {
            Ok(send) => send,
            Err(e) => {
                log.fail("downstream_error", e);
                return;
            }
        };
        // Here the socket is the application (upstream) and the stream the client.
        let t = tokio::select! {
            t = stream::bidirectional(&mut up, send, req.into_body(), false) => t,
            reason = kill.killed() => {
                log.fail("denied", reason);
                let _ = up.set_zero_linger();
                return;
            }
        };
        log.sent = t.received;
        log.received = t.sent;
        match t.result {
            Ok(()) => log.end = "closed",
            Err((Side::Downstream, e)) => log.fail("upstream_error", e),
            Err((Side::Upstream, e)) => log.fail("downstream_error", e),
        }
    }
}

/// The original source from a `forwarded: for=<ip>` header (RFC 7239), if any.
pub fn forwarded_for<B>(req: &Request<B>) -> Option<SocketAddr> {
    let value = req.headers().get("forwarded")?.to_str().ok()?;
    value.split([';', ',']).find_map(|part| {
        let v = part.trim().strip_prefix("for=")?.trim_matches('"');
        let v = v.trim_start_matches('[');
        let ip = v.split(']').next()?;
        let ip: IpAddr = ip.parse().ok()?;
        Some(SocketAddr::new(ip.to_canonical(), 0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(forwarded: &str) -> Request<()> {
        Request::builder()
            .header("forwarded", forwarded)
            .body(())
            .unwrap()
    }

    #[test]
    fn reads_forwarded_for() {
        assert_eq!(
            forwarded_for(&req("for=10.1.1.2")),
            Some("10.1.1.2:0".parse().unwrap())
        );
        assert_eq!(
            forwarded_for(&req("for=\"[fd00::2]\"")),
            Some("[fd00::2]:0".parse().unwrap())
        );
        assert_eq!(forwarded_for(&req("for=unknown")), None);
    }
}
