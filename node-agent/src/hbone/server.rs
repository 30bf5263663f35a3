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

use std::{
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream, server::SendResponse};
use http::{Method, Response, StatusCode, request::Parts};
use tokio::{sync::watch, time::Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{CLOSE_GRACE, HANDSHAKE_TIMEOUT};
use crate::{
    identity::SpiffeId,
    net::{
        limit::{Limit, Permit, Refused, Throttle},
        socket::canonical,
    },
    tls,
};

/// HBONE connections past their handshake and not closed yet, in this
/// process: a stopping agent waits for them ([`open_connections`]).
static OPEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many HBONE connections this process serves now. A stopping agent
/// waits (within its drain) until they have said GOAWAY, finished their
/// streams and closed: a process that exits first resets them, and a stream
/// the peer sent meanwhile then fails with nothing to tell it was never
/// processed (so the peer cannot make it again elsewhere).
pub fn open_connections() -> usize {
    OPEN.load(std::sync::atomic::Ordering::Relaxed)
}

/// One connection counted in [`OPEN`] while it lives.
struct Open;

impl Open {
    fn new() -> Open {
        OPEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

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

    /// A connection or stream was refused by the listener's [`Limits`] (for
    /// metrics; the server has already logged it, at a bounded rate).
    fn refused(&self, _why: Refused) {}

    /// A connection was closed for carrying no stream for the idle timeout.
    fn idle_closed(&self) {}
}

/// What one listener lets its peers hold. Every cap is on things held at once,
/// in total and per peer address (see [`crate::net::limit`]); the timeouts are
/// fixed deadlines that no amount of trickled bytes extends.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Connections still in their TLS or HTTP/2 handshake: what a peer holds
    /// before it has proved anything.
    pub handshakes: Limit,
    /// Streams being served (each holds a connection to the application).
    pub streams: Limit,
    /// The TLS handshake, the client's certificate check and the HTTP/2
    /// preface, all together.
    pub handshake_timeout: Duration,
    /// A connection that carries no stream for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshakes: Limit::new(256, 32),
            streams: Limit::new(4096, 1024),
            handshake_timeout: HANDSHAKE_TIMEOUT,
            idle_timeout: super::SERVER_IDLE_TIMEOUT,
        }
    }
}

/// The HBONE protocol for one listener: its TLS acceptor (our certificate,
/// client certificates checked against the bundle), the trust domain peers
/// must belong to, and its limits.
#[derive(Clone)]
pub struct Server {
    acceptor: TlsAcceptor,
    trust_domain: Arc<str>,
    /// Names the listener in logs (a workload, a waypoint).
    name: Arc<str>,
    limits: Limits,
    /// Refusals by a listener's limits are logged at most once per second;
    /// metrics count every one.
    throttle: Arc<Throttle>,
    /// Connections refused for what they sent: up to 20 lines a second.
    refusals: Arc<Throttle>,
}

impl Server {
    pub fn new(acceptor: TlsAcceptor, trust_domain: &str, name: &str, limits: Limits) -> Self {
        Server {
            acceptor,
            trust_domain: trust_domain.into(),
            name: name.into(),
            limits,
            throttle: Default::default(),
            refusals: Arc::new(Throttle::new(20)),
        }
    }

    fn over_limit<H: Handler>(&self, handler: &H, peer: SocketAddr, why: Refused, what: &str) {
        handler.refused(why);
        if let Some(suppressed) = self.throttle.allow() {
            warn!(
                workload = %self.name,
                %peer,
                reason = why.as_str(),
                suppressed,
                "HBONE {what} refused: over the listener's limit"
            );
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
        let _ = crate::net::socket::keepalive(&tcp);
        let peer = canonical(peer);
        // Counted every time; logged up to 20 times a second per listener, so
        // a flood of garbage costs a line a refusal only while it is small.
        let refuse = |why: Refused, reason: &dyn std::fmt::Display| {
            handler.refused(why);
            if let Some(suppressed) = self.refusals.allow() {
                warn!(
                    workload = %self.name,
                    %peer,
                    reason = %reason,
                    suppressed,
                    "HBONE connection refused"
                );
            }
        };
        let handshake = match self.limits.handshakes.admit(peer.ip()) {
            Ok(permit) => permit,
            Err(_) => {
                self.over_limit(&*handler, peer, Refused::HandshakeLimit, "connection");
                return crate::net::socket::reset(tcp);
            }
        };
        // One deadline for everything a peer does before it has proved who it
        // is: trickling bytes into the handshake does not extend it.
        let deadline = Instant::now() + self.limits.handshake_timeout;
        let tls = match tokio::time::timeout_at(deadline, self.acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return refuse(
                    Refused::HandshakeFailed,
                    &format_args!("TLS handshake failed: {e}"),
                );
            }
            Err(_) => return refuse(Refused::HandshakeTimeout, &"TLS handshake timed out"),
        };
        let identity = match tls::peer_identity(tls.get_ref().1.peer_certificates()) {
            // A root of the bundle may also sign for other trust domains
            // (federation, a root shared during migration): only ours are peers.
            Ok(id) if id.trust_domain() != &*self.trust_domain => {
                return refuse(
                    Refused::HandshakeFailed,
                    &format_args!("peer {id} is not in trust domain {}", self.trust_domain),
                );
            }
            Ok(id) => id,
            Err(e) => return refuse(Refused::HandshakeFailed, &e),
        };
        let h2_handshake = super::server_builder().handshake::<_, Bytes>(tls);
        let mut h2 = match tokio::time::timeout_at(deadline, h2_handshake).await {
            Ok(Ok(h2)) => h2,
            Ok(Err(e)) => {
                return refuse(
                    Refused::HandshakeFailed,
                    &format_args!("HTTP/2 handshake failed: {e}"),
                );
            }
            Err(_) => return refuse(Refused::HandshakeTimeout, &"HTTP/2 handshake timed out"),
        };
        drop(handshake);
        let _open = Open::new();
        debug!(workload = %self.name, %peer, peer_identity = %identity, "HBONE connection accepted");
        let peer = Arc::new(Peer {
            identity,
            addr: peer,
        });
        let streams = Arc::new(Streams::default());
        let idle = self.limits.idle_timeout;
        let mut idle_check = Instant::now() + idle;
        let mut draining = false;
        // Once closed for idleness, the connection gets `CLOSE_GRACE` to say
        // goodbye; a peer that never answers the GOAWAY cannot stretch it.
        let mut closing: Option<Instant> = None;
        loop {
            let next = tokio::select! {
                _ = stop.wait_for(|s| *s), if !draining => {
                    // Finish the streams in flight, take no new ones.
                    h2.graceful_shutdown();
                    draining = true;
                    continue;
                }
                () = tokio::time::sleep_until(idle_check), if closing.is_none() && !draining => {
                    match streams.idle_since() {
                        Some(since) if since.elapsed() >= idle => {
                            debug!(workload = %self.name, peer = %peer.addr, "HBONE connection idle: closing");
                            handler.idle_closed();
                            h2.graceful_shutdown();
                            closing = Some(Instant::now() + CLOSE_GRACE);
                        }
                        Some(since) => idle_check = since + idle,
                        None => idle_check = Instant::now() + idle,
                    }
                    continue;
                }
                () = async { tokio::time::sleep_until(closing.unwrap_or_else(Instant::now)).await }, if closing.is_some() => {
                    debug!(workload = %self.name, peer = %peer.addr, "HBONE connection closed without waiting for the peer");
                    break;
                }
                next = h2.accept() => next,
            };
            match next {
                Some(Ok((req, mut respond))) => {
                    let permit = match self.limits.streams.admit(peer.addr.ip()) {
                        Ok(p) => p,
                        Err(_) => {
                            self.over_limit(&*handler, peer.addr, Refused::StreamLimit, "stream");
                            // Not processed: the peer may retry it elsewhere.
                            respond.send_reset(Reason::REFUSED_STREAM);
                            continue;
                        }
                    };
                    let (head, body) = req.into_parts();
                    let request = Request {
                        peer: peer.clone(),
                        head,
                        body,
                        respond,
                    };
                    let active = streams.start(permit);
                    let handler = handler.clone();
                    tokio::spawn(async move {
                        handler.handle(request).await;
                        drop(active);
                    });
                }
                Some(Err(e)) => {
                    if !e.is_go_away() && !e.is_io() {
                        refuse(Refused::ProtocolError, &format_args!("HTTP/2 error: {e}"));
                    }
                    break;
                }
                None => break,
            }
        }
    }
}

/// The streams of one connection being served, and since when it has had none.
struct Streams {
    active: AtomicUsize,
    /// When the connection last went from some streams to none (or was made).
    idle_from: std::sync::Mutex<Instant>,
}

impl Default for Streams {
    fn default() -> Self {
        Streams {
            active: AtomicUsize::new(0),
            idle_from: std::sync::Mutex::new(Instant::now()),
        }
    }
}

/// One stream being served: holds its slot in the listener's [`Limits`] and
/// marks the connection busy until dropped.
struct Active {
    streams: Arc<Streams>,
    _permit: Permit,
}

impl Streams {
    fn start(self: &Arc<Self>, permit: Permit) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active {
            streams: self.clone(),
            _permit: permit,
        }
    }

    /// Since when no stream has run, or `None` while one does.
    fn idle_since(&self) -> Option<Instant> {
        (self.active.load(Ordering::Acquire) == 0)
            .then(|| *self.idle_from.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        // The lock is taken before the count drops, so `idle_since` never sees
        // zero streams with the previous idle start.
        let mut from = self
            .streams
            .idle_from
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if self.streams.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *from = Instant::now();
        }
    }
}
