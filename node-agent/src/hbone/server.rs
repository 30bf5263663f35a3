//! The server side of HBONE, as a protocol: what a 15008 listener does with a
//! connection before anything of the mesh is decided.
//!
//! [`Server::serve`] takes an accepted TCP connection through a TLS 1.3 handshake
//! that requires a client certificate chaining to the trust bundle, reads the
//! peer's identity (its one SPIFFE URI SAN, which must be of our trust domain),
//! speaks HTTP/2 with the sizes and limits of [`super`], and hands every stream
//! to a [`Handler`] as a [`Request`]: who the peer is, where it connected from,
//! and what it asks for. The handler decides: [`Request::target`] parses the
//! `CONNECT ip:port`, [`Request::refuse`] answers with a status, and
//! [`Request::accept`] answers 200 and returns the stream.
//!
//! The node agent's pod listeners are one handler (admit, connect to the
//! application, copy); the waypoint will be another (read HTTP from the stream).

use std::{future::Future, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use h2::{RecvStream, SendStream, server::SendResponse};
use http::{Method, Response, StatusCode, request::Parts};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::HANDSHAKE_TIMEOUT;
use crate::{identity::SpiffeId, net::socket::canonical, tls};

/// Why a stream is refused: the status the peer gets, and the reason kept for
/// logs (never sent).
#[derive(Debug, Clone)]
pub struct Refusal {
    pub status: StatusCode,
    pub why: String,
}

impl Refusal {
    pub fn new(status: StatusCode, why: impl Into<String>) -> Self {
        Refusal {
            status,
            why: why.into(),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.why, self.status)
    }
}

/// The peer of an HBONE connection: the identity it proved and the address the
/// connection came from.
#[derive(Debug)]
pub struct Peer {
    pub identity: SpiffeId,
    pub addr: SocketAddr,
}

/// One stream of an HBONE connection, not yet answered.
pub struct Request {
    pub peer: Arc<Peer>,
    /// Method, URI and headers (`forwarded`, `baggage`, `traceparent`...).
    pub head: Parts,
    body: RecvStream,
    respond: SendResponse<Bytes>,
}

/// An accepted stream: bytes to the peer, bytes from it.
pub struct Stream {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

impl Request {
    /// What the stream asks for: a `CONNECT` to `ip:port` (IPv4-mapped
    /// addresses as IPv4), or the 400 it earns.
    pub fn target(&self) -> Result<SocketAddr, Refusal> {
        if self.head.method != Method::CONNECT {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("method {} is not CONNECT", self.head.method),
            ));
        }
        let authority = self.head.uri.authority().map(|a| a.as_str());
        authority
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .map(canonical)
            .ok_or_else(|| {
                Refusal::new(
                    StatusCode::BAD_REQUEST,
                    format!("authority {authority:?} is not ip:port"),
                )
            })
    }

    /// Answers `refusal.status` and ends the stream.
    pub fn refuse(mut self, refusal: &Refusal) {
        let resp = Response::builder()
            .status(refusal.status)
            .body(())
            .unwrap_or_default();
        let _ = self.respond.send_response(resp, true);
    }

    /// Answers 200: the stream now carries bytes both ways.
    pub fn accept(mut self) -> Result<Stream, h2::Error> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(Stream {
            send,
            recv: self.body,
        })
    }
}

/// What a listener does with each stream.
pub trait Handler: Send + Sync + 'static {
    fn handle(self: Arc<Self>, request: Request) -> impl Future<Output = ()> + Send;
}

/// The HBONE protocol for one listener: its TLS acceptor (our certificate,
/// client certificates checked against the bundle) and the trust domain peers
/// must belong to.
#[derive(Clone)]
pub struct Server {
    acceptor: TlsAcceptor,
    trust_domain: Arc<str>,
    /// Names the listener in logs (a workload, a waypoint).
    name: Arc<str>,
}

impl Server {
    pub fn new(acceptor: TlsAcceptor, trust_domain: &str, name: &str) -> Self {
        Server {
            acceptor,
            trust_domain: trust_domain.into(),
            name: name.into(),
        }
    }

    /// Serves one connection from `peer` until it ends, or until `stop` says
    /// so: then the streams in flight finish and no new ones are taken.
    pub async fn serve<H: Handler>(
        &self,
        tcp: tokio::net::TcpStream,
        peer: SocketAddr,
        handler: Arc<H>,
        mut stop: watch::Receiver<bool>,
    ) {
        let _ = tcp.set_nodelay(true);
        let peer = canonical(peer);
        let refuse = |reason: &dyn std::fmt::Display| {
            warn!(
                workload = %self.name,
                %peer,
                reason = %reason,
                "HBONE connection refused"
            );
        };
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return refuse(&format_args!("TLS handshake failed: {e}")),
            Err(_) => return refuse(&"TLS handshake timed out"),
        };
        let identity = match tls::peer_identity(tls.get_ref().1.peer_certificates()) {
            // A root of the bundle may also sign for other trust domains
            // (federation, a root shared during migration): only ours are peers.
            Ok(id) if id.trust_domain() != &*self.trust_domain => {
                return refuse(&format_args!(
                    "peer {id} is not in trust domain {}",
                    self.trust_domain
                ));
            }
            Ok(id) => id,
            Err(e) => return refuse(&e),
        };
        let handshake = super::server_builder().handshake::<_, Bytes>(tls);
        let mut h2 = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => return refuse(&format_args!("HTTP/2 handshake failed: {e}")),
            Err(_) => return refuse(&"HTTP/2 handshake timed out"),
        };
        debug!(workload = %self.name, %peer, peer_identity = %identity, "HBONE connection accepted");
        let peer = Arc::new(Peer {
            identity,
            addr: peer,
        });
        let mut draining = false;
        loop {
            let next = tokio::select! {
                _ = stop.wait_for(|s| *s), if !draining => {
                    // Finish the streams in flight, take no new ones.
                    h2.graceful_shutdown();
                    draining = true;
                    continue;
                }
                next = h2.accept() => next,
            };
            match next {
                Some(Ok((req, respond))) => {
                    let (head, body) = req.into_parts();
                    let request = Request {
                        peer: peer.clone(),
                        head,
                        body,
                        respond,
                    };
                    tokio::spawn(handler.clone().handle(request));
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
}
