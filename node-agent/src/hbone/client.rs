//! Outbound HBONE: a pool of mutual-TLS HTTP/2 connections, one `CONNECT` stream
//! per proxied connection.
//!
//! Connections are keyed by (worker, source pod, source identity, destination
//! identity, destination address): a connection proves exactly one pair of
//! identities, its socket lives in the source pod's namespace (it leaves with the
//! pod's own address), and its task runs on the worker thread of the streams it
//! carries (`crate::workers`: concurrent transfers between two pods spread over
//! the workers, and so over cores). For each key the pool picks the connection
//! with the fewest streams, and opens another when
//! - every connection has `max_streams_per_connection` streams, or
//! - the least busy one already has a stream and there are fewer than `spread`
//!   connections: a bulk transfer then never shares its TLS record stream and
//!   TCP send buffer with small exchanges until all `spread` connections are
//!   busy.
//!
//! Connections being made count toward `spread`, and a handshake is made
//! outside the key's lock: a stream that an existing connection can carry never
//! waits for another stream's handshake, and a burst of streams to a new
//! destination makes `spread` connections, not one each.
//!
//! A connection made with a certificate that has since been renewed takes no new
//! streams; it finishes the ones it has and is closed when idle. Unused connections
//! are closed after `idle_timeout`.
//!
//! Dead peers: every connection sends an HTTP/2 PING each `ping_interval`, and
//! one not answered within `ping_timeout` closes it (counted, and logged as
//! `HBONE connection closed: no answer to PING`): it leaves the pool at once, the
//! streams it carries fail, and the next stream to that peer makes a fresh
//! connection. Without this a silently black-holed connection kept taking new
//! streams, each failing after the connect timeout, until TCP's retransmissions
//! got through or gave up (minutes). Idle pooled connections are pinged too:
//! that is where the next stream would go, and a dead one should be gone before
//! a client waits on it. The sockets also carry TCP keepalive and
//! `TCP_USER_TIMEOUT` (`net::socket::keepalive`), a floor for both ends.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use bytes::{Bytes, BytesMut};
use h2::{Ping, PingPong, RecvStream, SendStream, client::SendRequest};
use http::{HeaderValue, StatusCode};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, warn};

use super::{HANDSHAKE_TIMEOUT, PoolSettings, headers::connect_request, stream::h2_io};
use crate::{
    certs::{self, CertManager},
    identity::SpiffeId,
    net::{
        Netns,
        socket::{connect_from, keepalive},
    },
    tls::{self, TrustBundle},
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Certificate(#[from] certs::Error),
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("TLS with {addr}: {source}")]
    Tls { addr: SocketAddr, source: io::Error },
    #[error("HTTP/2 with {addr}: {source}")]
    H2 { addr: SocketAddr, source: io::Error },
    #[error("the peer answered {0}")]
    Status(StatusCode),
    #[error("the client's connection failed while opening: {0}")]
    Downstream(io::Error),
    #[error("bad trust setup: {0}")]
    Setup(#[from] tls::Error),
}

impl Error {
    /// Whether the failure is this side's own (no certificate of the source's
    /// yet, a broken trust setup): no fault of the destination, and nothing
    /// another destination would do better.
    pub fn is_local(&self) -> bool {
        matches!(self, Error::Certificate(_) | Error::Setup(_))
    }

    /// Whether the destination refused on policy (a final answer).
    pub fn is_denied(&self) -> bool {
        matches!(self, Error::Status(s) if *s == StatusCode::UNAUTHORIZED || *s == StatusCode::FORBIDDEN)
    }
}

/// Where a stream goes and on whose behalf.
pub struct Target<'a> {
    /// The source pod's namespace: the connection's socket is made there.
    pub netns: &'a Netns,
    pub src: &'a SpiffeId,
    pub dst: &'a SpiffeId,
    /// The destination pod's HBONE address (`ip:15008`).
    pub hbone: SocketAddr,
    /// What the stream asks for (`CONNECT ip:port`).
    pub authority: SocketAddr,
    /// The original source, for the `forwarded` header.
    pub source_ip: Option<IpAddr>,
    /// The source workload, for the `baggage` header.
    pub baggage: Option<HeaderValue>,
}

/// One open stream, with the bookkeeping that frees its slot when dropped.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Which pooled connection carries it (for logs and tests).
    pub connection: u64,
    _slot: Slot,
}

/// At most this much of what a client sends is forwarded before the peer
/// answers the `CONNECT` (and kept for a retry); the rest waits for the answer.
pub const EARLY_LIMIT: usize = 64 << 10;

/// What the client sent while its stream was being opened: forwarded ahead of
/// the answer and kept, so a retry on another endpoint can send it again.
#[derive(Debug, Default)]
pub struct Early {
    chunks: Vec<Bytes>,
    len: usize,
    /// The client closed its side (FIN) before the answer came.
    eof: bool,
}

impl Early {
    /// Bytes read from the client so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the client's side is already closed (its FIN was read).
    pub fn eof(&self) -> bool {
        self.eof
    }

    /// The bytes, in order.
    pub fn chunks(&self) -> &[Bytes] {
        &self.chunks
    }

    fn wants_more(&self) -> bool {
        !self.eof && self.len < EARLY_LIMIT
    }

    /// Reads what `down` has ready without waiting (up to the limit), keeps it,
    /// and returns it with whether it ends the client's side; `None` when there
    /// was nothing to read.
    ///
    /// Reads go through a stack buffer and are kept at their exact size: a
    /// typical first request is a few hundred bytes, and a connection should not
    /// carry a mostly empty 16 KiB allocation for it (nor allocate at all when
    /// nothing is waiting).
    fn read_ready(&mut self, down: &TcpStream) -> io::Result<Option<(Bytes, bool)>> {
        let mut buf = BytesMut::new();
        let mut stack = [0u8; 16 << 10];
        while self.wants_more() {
            let room = (EARLY_LIMIT - self.len).min(stack.len());
            match down.try_read(&mut stack[..room]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    buf.extend_from_slice(&stack[..n]);
                    self.len += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if buf.is_empty() && !self.eof {
            return Ok(None);
        }
        let data = buf.freeze();
        if !data.is_empty() {
            self.chunks.push(data.clone());
        }
        Ok(Some((data, self.eof)))
    }

    /// Sends everything kept so far on a new stream (and its end, if the client
    /// has closed).
    fn replay(&self, send: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        let last = self.chunks.len();
        for (i, chunk) in self.chunks.iter().enumerate() {
            send.send_data(chunk.clone(), self.eof && i + 1 == last)?;
        }
        if self.eof && self.chunks.is_empty() {
            send.send_data(Bytes::new(), true)?;
        }
        Ok(())
    }
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct Key {
    /// Connections are per worker: a stream and the connection carrying it run
    /// on the same thread (see `crate::workers`).
    worker: usize,
    netns_cookie: u64,
    src: SpiffeId,
    dst: SpiffeId,
    addr: SocketAddr,
}

struct Conn {
    id: u64,
    send: SendRequest<Bytes>,
    /// Serial of the certificate the connection was made with.
    serial: String,
    active: AtomicUsize,
    closed: Arc<AtomicBool>,
    /// The peer said GOAWAY: it takes no new streams.
    going_away: AtomicBool,
    idle_since: Mutex<Instant>,
}

/// A stream's claim on a connection.
struct Slot(Arc<Conn>);

impl Drop for Slot {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Relaxed) == 1 {
            *self.0.idle_since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        }
    }
}

/// One key's connections, and how many are being made for it now.
#[derive(Default)]
struct KeyConns {
    state: Mutex<Made>,
    /// Told when a connection being made is done (made or failed).
    done: tokio::sync::Notify,
}

#[derive(Default)]
struct Made {
    conns: Vec<Arc<Conn>>,
    connecting: usize,
}

type Conns = Arc<KeyConns>;

/// A connection being made for a key: counted while it lasts, and the streams
/// waiting for it are told when it is gone (made, failed, or given up).
struct Connecting<'a>(&'a KeyConns);

impl Drop for Connecting<'_> {
    fn drop(&mut self) {
        self.0
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .connecting -= 1;
        self.0.done.notify_waiters();
    }
}

/// `down`'s readiness; never, without a downstream socket.
async fn readable(down: Option<&TcpStream>) -> io::Result<()> {
    match down {
        Some(d) => d.readable().await,
        None => std::future::pending().await,
    }
}

/// What a stream does with a key's connections.
enum Choice {
    Use(Arc<Conn>),
    Connect,
    Wait,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

struct Inner {
    certs: CertManager,
    bundle: Arc<RwLock<TrustBundle>>,
    settings: PoolSettings,
    keys: Mutex<HashMap<Key, Conns>>,
    next_id: AtomicU64,
    /// Connections closed because a PING went unanswered.
    unanswered: Arc<AtomicU64>,
    /// Streams made again because the peer did not process them.
    remade: AtomicU64,
}

impl Pool {
    /// A pool that takes certificates from `certs` and trusts what `bundle` holds
    /// at the time each connection is made.
    pub fn new(
        certs: CertManager,
        bundle: Arc<RwLock<TrustBundle>>,
        settings: PoolSettings,
    ) -> Self {
        let inner = Arc::new(Inner {
            certs,
            bundle,
            settings,
            keys: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            unanswered: Arc::default(),
            remade: AtomicU64::new(0),
        });
        tokio::spawn(reap(Arc::downgrade(&inner)));
        Pool { inner }
    }

    /// The pool's counters, in Prometheus text.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP weft_hbone_ping_timeouts_total Pooled HBONE connections closed because the peer did not answer a PING in time.\n\
             # TYPE weft_hbone_ping_timeouts_total counter\n\
             weft_hbone_ping_timeouts_total {}\n\
             # HELP weft_hbone_streams_remade_total HBONE streams the peer did not process because it said GOAWAY (as an agent stopping beside its successor does) and that were made again on another connection.\n\
             # TYPE weft_hbone_streams_remade_total counter\n\
             weft_hbone_streams_remade_total {}\n",
            self.inner.unanswered.load(Relaxed),
            self.inner.remade.load(Relaxed)
        )
    }

    /// Opens a stream to `t`, over a pooled connection or a new one, and waits
    /// for the peer's answer.
    ///
    /// It does not wait idly: what `down` (the client's socket) sends before the
    /// answer goes out behind the `CONNECT` straight away, up to
    /// [`EARLY_LIMIT`] bytes, and what is already waiting goes out in the same
    /// TLS record as the `CONNECT` itself. A new connection's first request thus
    /// costs no extra round trip between the agents. Everything sent this way is
    /// kept in `early`; a later `open` with the same `early` (a retry on another
    /// endpoint) sends it again first.
    pub async fn open(
        &self,
        t: Target<'_>,
        down: Option<&TcpStream>,
        early: &mut Early,
    ) -> Result<Tunnel, Error> {
        let s = &self.inner.settings;
        let svid = self.inner.certs.get(t.src, s.connect_timeout).await?;
        let key = Key {
            worker: crate::workers::current(),
            netns_cookie: t.netns.cookie(),
            src: t.src.clone(),
            dst: t.dst.clone(),
            addr: t.hbone,
        };
        let conns = self
            .inner
            .keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default()
            .clone();
        // A stream the peer did not process because its connection is going
        // away is made again on another connection: HTTP/2 says a stream
        // above the last one a GOAWAY counts had no effect. An agent stopping beside its
        // successor (`app::succession`) says GOAWAY on all its connections,
        // and the successor then takes the stream.
        let mut retries = 0;
        loop {
            let slot = self.slot(&conns, &t, &svid).await?;
            match self.stream(slot, &t, down, early).await {
                Err(Attempt::Unprocessed(conn, source)) if retries < UNPROCESSED_RETRIES => {
                    debug!(connection = conn.id, dst.addr = %t.hbone, error = %source, "HBONE stream not processed by the peer: made again on another connection");
                    conn.going_away.store(true, Relaxed);
                    self.inner.remade.fetch_add(1, Relaxed);
                    retries += 1;
                }
                Err(Attempt::Unprocessed(_, source)) => {
                    return Err(Error::H2 {
                        addr: t.hbone,
                        source: h2_io(source),
                    });
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Ok(tunnel) => return Ok(tunnel),
            }
        }
    }

    /// A pooled connection for one more stream of `t`: the least busy one
    /// made with the current certificate, or a new one (see [`choose`]).
    async fn slot(
        &self,
        conns: &KeyConns,
        t: &Target<'_>,
        svid: &tls::Svid,
    ) -> Result<Slot, Error> {
        // The choice is made under the key's lock, but a new connection is made
        // outside it: a stream that an existing connection can carry never
        // waits for another stream's handshake.
        loop {
            let done = conns.done.notified();
            let choice = {
                let mut made = conns.state.lock().unwrap_or_else(|e| e.into_inner());
                let choice = choose(&mut made, &svid.serial, &self.inner.settings);
                if let Choice::Connect = choice {
                    made.connecting += 1;
                }
                choice
            };
            match choice {
                Choice::Use(conn) => return Ok(Slot(conn)),
                Choice::Wait => done.await,
                Choice::Connect => {
                    let _connecting = Connecting(conns);
                    let conn = Arc::new(self.connect(t, svid).await?);
                    conn.active.fetch_add(1, Relaxed);
                    let mut made = conns.state.lock().unwrap_or_else(|e| e.into_inner());
                    made.conns.push(conn.clone());
                    return Ok(Slot(conn));
                }
            }
        }
    }

    /// One stream on `slot`'s connection, up to the peer's answer.
    async fn stream(
        &self,
        slot: Slot,
        t: &Target<'_>,
        down: Option<&TcpStream>,
        early: &mut Early,
    ) -> Result<Tunnel, Attempt> {
        let s = &self.inner.settings;
        let conn = &slot.0;
        let h2_err = |source: h2::Error| {
            Attempt::Failed(Error::H2 {
                addr: t.hbone,
                source: h2_io(source),
            })
        };
        // Nothing is sent before the request is: a failure up to it leaves the
        // stream unprocessed whatever it was.
        let unprocessed = |source: h2::Error| Attempt::Unprocessed(conn.clone(), source);
        let mut send = conn.send.clone().ready().await.map_err(unprocessed)?;
        let req = connect_request(t.authority, t.source_ip, t.baggage.clone());
        // Take what the client has already sent before the request goes out, so
        // the connection's task writes both in one go.
        if let Some(down) = down {
            early
                .read_ready(down)
                .map_err(|e| Attempt::Failed(Error::Downstream(e)))?;
        }
        let (response, mut stream) = send.send_request(req, false).map_err(unprocessed)?;
        // A failed send means the stream is already gone: the answer says why.
        let _ = early.replay(&mut stream);
        let answer = async {
            tokio::pin!(response);
            loop {
                tokio::select! {
                    biased;
                    r = &mut response => return r.map_err(|e| if not_processed(&e) { unprocessed(e) } else { h2_err(e) }),
                    ready = readable(down), if down.is_some() && early.wants_more() => {
                        ready.map_err(|e| Attempt::Failed(Error::Downstream(e)))?;
                        let Some(down) = down else { continue };
                        if let Some((data, end)) = early.read_ready(down).map_err(|e| Attempt::Failed(Error::Downstream(e)))? {
                            let _ = stream.send_data(data, end);
                        }
                    }
                }
            }
        };
        let response = match tokio::time::timeout(s.connect_timeout, answer).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(Attempt::Failed(Error::H2 {
                    addr: t.hbone,
                    source: io::Error::new(io::ErrorKind::TimedOut, "no answer to CONNECT"),
                }));
            }
        };
        if response.status() != StatusCode::OK {
            return Err(Attempt::Failed(Error::Status(response.status())));
        }
        Ok(Tunnel {
            send: stream,
            recv: response.into_body(),
            connection: conn.id,
            _slot: slot,
        })
    }

    async fn connect(&self, t: &Target<'_>, svid: &tls::Svid) -> Result<Conn, Error> {
        let s = &self.inner.settings;
        let bundle = self
            .inner
            .bundle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let config = tls::client_config(svid, &bundle, t.dst.clone())?;
        let tcp = connect_from(t.netns, t.hbone, None, s.connect_timeout)
            .await
            .map_err(|source| Error::Connect {
                addr: t.hbone,
                source,
            })?;
        // Best effort: a socket without it is still served, and PINGs notice a
        // dead peer anyway.
        let _ = keepalive(&tcp);
        let name = ServerName::IpAddress(t.hbone.ip().into());
        let tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(source)) => {
                return Err(Error::Tls {
                    addr: t.hbone,
                    source: readable_tls_error(source),
                });
            }
            Err(_) => {
                return Err(Error::Tls {
                    addr: t.hbone,
                    source: io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"),
                });
            }
        };
        let handshake = super::client_builder().handshake::<_, Bytes>(tls);
        let (send, connection) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                return Err(Error::H2 {
                    addr: t.hbone,
                    source: h2_io(e),
                });
            }
            Err(_) => {
                return Err(Error::H2 {
                    addr: t.hbone,
                    source: io::Error::new(io::ErrorKind::TimedOut, "HTTP/2 handshake timed out"),
                });
            }
        };
        let id = self.inner.next_id.fetch_add(1, Relaxed);
        let closed = Arc::new(AtomicBool::new(false));
        let flag = closed.clone();
        let (src, dst, addr) = (t.src.to_string(), t.dst.to_string(), t.hbone);
        info!(connection = id, src.identity = %src, dst.identity = %dst, dst.addr = %addr, serial = %svid.serial, "HBONE connection opened");
        let (interval, timeout) = (s.ping_interval, s.ping_timeout);
        let unanswered = self.inner.unanswered.clone();
        tokio::spawn(async move {
            // The streams' tasks run on this worker too, so none sees the
            // connection gone before `closed` says so.
            let ended = drive(connection, interval, timeout).await;
            flag.store(true, Relaxed);
            match ended {
                Ended::Closed(result) => {
                    debug!(connection = id, dst.addr = %addr, result = ?result.err(), "HBONE connection closed");
                }
                Ended::Silent => {
                    unanswered.fetch_add(1, Relaxed);
                    warn!(connection = id, dst.addr = %addr, timeout = ?timeout, "HBONE connection closed: no answer to PING");
                }
            }
        });
        Ok(Conn {
            id,
            send,
            serial: svid.serial.clone(),
            active: AtomicUsize::new(0),
            closed,
            going_away: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        })
    }
}

/// How a pooled connection's task ended.
#[derive(Debug)]
enum Ended {
    /// The connection ended by itself: closed by either side, or failed.
    Closed(Result<(), h2::Error>),
    /// A PING went unanswered for the timeout: the connection was dropped,
    /// which fails the streams it carried and closes the socket.
    Silent,
}

/// Runs a pooled connection until it ends or its peer falls silent.
async fn drive<T>(
    mut connection: h2::client::Connection<T, Bytes>,
    interval: Duration,
    timeout: Duration,
) -> Ended
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let pings = connection.ping_pong();
    tokio::select! {
        result = &mut connection => Ended::Closed(result),
        () = silence(pings, interval, timeout) => Ended::Silent,
    }
}

/// Sends a PING every `interval` (none when it is zero) and returns when one has
/// waited `timeout` for its answer. Pending forever while the peer answers, and
/// once the connection has failed on its own (its future then says how).
///
/// One PING at a time, whether or not streams are in flight: a busy
/// connection's answer may queue behind data, which `timeout` allows for (see
/// `PING_TIMEOUT`), and an idle one is where the next stream would go.
async fn silence(pings: Option<PingPong>, interval: Duration, timeout: Duration) {
    let Some(mut pings) = pings.filter(|_| !interval.is_zero()) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// Picks the connection with the fewest streams among those made with the
/// current certificate (`serial`) and not full; it takes the stream when it is
/// idle or when `spread` connections exist or are being made. Otherwise another
/// connection is made, unless none can take the stream, `spread` are already
/// counted and some are being made: then the stream waits for those. A chosen
/// connection has the stream counted before the lock is let go.
fn choose(made: &mut Made, serial: &str, s: &PoolSettings) -> Choice {
    made.conns
        .retain(|c| !c.closed.load(Relaxed) && !c.going_away.load(Relaxed));
    let current = made.conns.iter().filter(|c| c.serial == serial);
    let count = current.clone().count() + made.connecting;
    let best = current
        .filter(|c| c.active.load(Relaxed) < s.max_streams_per_connection)
        .min_by_key(|c| c.active.load(Relaxed));
    match best {
        Some(c) if c.active.load(Relaxed) == 0 || count >= s.spread => {
            c.active.fetch_add(1, Relaxed);
            Choice::Use(c.clone())
        }
        None if made.connecting > 0 && count >= s.spread => Choice::Wait,
        _ => Choice::Connect,
    }
}

/// How many times a stream the peer did not process is made again.
const UNPROCESSED_RETRIES: usize = 2;

/// How one attempt at a stream failed.
enum Attempt {
    /// The peer did not process it (see [`not_processed`]): it may be made
    /// again on another connection than this one.
    Unprocessed(Arc<Conn>, h2::Error),
    Failed(Error),
}

/// Whether a stream's error says the peer never processed it because the
/// connection is going away: cut by the peer's GOAWAY, which h2 reports only
/// to the streams above the last one the GOAWAY counts. (A `REFUSED_STREAM`
/// is unprocessed too, but ours says the peer is over its stream limit for
/// this client: another connection to it would be refused the same way, at
/// the price of a handshake, so it fails as before.)
fn not_processed(e: &h2::Error) -> bool {
    e.is_remote() && e.is_go_away()
}

/// rustls shows a custom certificate error in debug form; say it plainly.
fn readable_tls_error(e: io::Error) -> io::Error {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e;
    };
    if let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = inner {
        let text = match other.0.downcast_ref::<tls::WrongIdentity>() {
            Some(w) => w.to_string(),
            None => other.0.to_string(),
        };
        return io::Error::new(e.kind(), format!("invalid peer certificate: {text}"));
    }
    e
}

/// Closes connections idle for longer than the timeout (dropping the last
/// `SendRequest` makes h2 send GOAWAY and close), until the pool is gone.
async fn reap(pool: std::sync::Weak<Inner>) {
    let every = {
        let Some(p) = pool.upgrade() else { return };
        (p.settings.idle_timeout / 4).max(Duration::from_millis(250))
    };
    loop {
        tokio::time::sleep(every).await;
        let Some(p) = pool.upgrade() else { return };
        let idle = p.settings.idle_timeout;
        let mut keys = p.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.retain(|_, conns| {
            let mut made = conns.state.lock().unwrap_or_else(|e| e.into_inner());
            made.conns.retain(|c| {
                let unused = c.active.load(Relaxed) == 0
                    && c.idle_since
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .elapsed()
                        >= idle;
                !c.closed.load(Relaxed) && !unused
            });
            !made.conns.is_empty() || made.connecting > 0
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection over an in-memory pipe, carrying `active` streams.
    async fn conn(serial: &str, active: usize) -> Arc<Conn> {
        let (io, _peer) = tokio::io::duplex(64 * 1024);
        let (send, _connection) = h2::client::Builder::new()
            .handshake::<_, Bytes>(io)
            .await
            .unwrap();
        Arc::new(Conn {
            id: 0,
            send,
            serial: serial.to_owned(),
            active: AtomicUsize::new(active),
            closed: Arc::new(AtomicBool::new(false)),
            going_away: AtomicBool::new(false),
            idle_since: Mutex::new(Instant::now()),
        })
    }

    fn settings(spread: usize, max: usize) -> PoolSettings {
        PoolSettings {
            spread,
            max_streams_per_connection: max,
            ..PoolSettings::default()
        }
    }

    fn what(c: &Choice) -> &'static str {
        match c {
            Choice::Use(_) => "use",
            Choice::Connect => "connect",
            Choice::Wait => "wait",
        }
    }

    #[tokio::test]
    async fn a_connection_whose_peer_answers_pings_lives_and_a_silent_one_is_dropped() {
        let (interval, timeout) = (Duration::from_millis(20), Duration::from_millis(200));

        // A live peer: an h2 server that answers PINGs (h2 does so by itself
        // while its connection is polled).
        let (io, peer) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(peer).await.unwrap();
            while server.accept().await.is_some() {}
        });
        let (_send, connection) = h2::client::handshake(io).await.unwrap();
        let lived =
            tokio::time::timeout(Duration::from_secs(1), drive(connection, interval, timeout));
        assert!(lived.await.is_err(), "50 PINGs answered: still running");

        // A silent peer (nothing reads the other end, as over a black-holed
        // path), with a stream in flight.
        let (io, _peer) = tokio::io::duplex(64 * 1024);
        let (send, connection) = h2::client::handshake(io).await.unwrap();
        let request = http::Request::connect("10.0.0.1:80").body(()).unwrap();
        let (response, _stream) = send
            .ready()
            .await
            .unwrap()
            .send_request(request, false)
            .unwrap();
        let started = Instant::now();
        let ended =
            tokio::time::timeout(Duration::from_secs(5), drive(connection, interval, timeout))
                .await
                .expect("a silent peer's connection is dropped");
        assert!(matches!(ended, Ended::Silent), "{ended:?}");
        let took = started.elapsed();
        assert!(
            took >= timeout && took < interval + timeout + Duration::from_secs(1),
            "dropped after {took:?}"
        );
        // The connection is gone with `drive`: the stream learns it.
        let answer = tokio::time::timeout(Duration::from_secs(1), response).await;
        assert!(matches!(answer, Ok(Err(_))), "{answer:?}");

        // Pings off: a silent peer is left to TCP.
        let (io, _peer) = tokio::io::duplex(64 * 1024);
        let (_send, connection) = h2::client::handshake(io).await.unwrap();
        let off = tokio::time::timeout(
            Duration::from_millis(500),
            drive(connection, Duration::ZERO, timeout),
        );
        assert!(off.await.is_err());
    }

    #[tokio::test]
    async fn a_stream_never_waits_for_a_handshake_an_existing_connection_spares_it() {
        // One busy connection, a second being made (spread 2): the stream takes
        // the busy one rather than waiting for the handshake.
        let busy = conn("s1", 1).await;
        let mut made = Made {
            conns: vec![busy.clone()],
            connecting: 1,
        };
        let c = choose(&mut made, "s1", &settings(2, 100));
        assert_eq!(what(&c), "use");
        assert_eq!(
            busy.active.load(Relaxed),
            2,
            "counted before the lock is let go"
        );

        // Fewer than `spread` counted: make another, even while one is being made.
        let mut made = Made {
            conns: vec![conn("s1", 1).await],
            connecting: 0,
        };
        assert_eq!(what(&choose(&mut made, "s1", &settings(2, 100))), "connect");
        let mut made = Made {
            conns: vec![],
            connecting: 1,
        };
        assert_eq!(what(&choose(&mut made, "s1", &settings(2, 100))), "connect");

        // Nothing can take it and `spread` are being made: wait for them.
        let mut made = Made {
            conns: vec![],
            connecting: 2,
        };
        assert_eq!(what(&choose(&mut made, "s1", &settings(2, 100))), "wait");
        let mut made = Made {
            conns: vec![conn("s1", 100).await, conn("s1", 100).await],
            connecting: 1,
        };
        assert_eq!(what(&choose(&mut made, "s1", &settings(2, 100))), "wait");
    }

    #[tokio::test]
    async fn an_idle_connection_is_used_and_closed_or_renewed_ones_are_not() {
        let idle = conn("s1", 0).await;
        let mut made = Made {
            conns: vec![conn("s1", 3).await, idle.clone()],
            connecting: 0,
        };
        match choose(&mut made, "s1", &settings(8, 100)) {
            Choice::Use(c) => assert!(Arc::ptr_eq(&c, &idle)),
            other => panic!("expected the idle connection, got {}", what(&other)),
        }
        // Made with the previous certificate: takes no new streams.
        let mut made = Made {
            conns: vec![conn("old", 0).await],
            connecting: 0,
        };
        assert_eq!(what(&choose(&mut made, "s1", &settings(2, 100))), "connect");
        // Closed: dropped from the pool.
        let closed = conn("s1", 0).await;
        closed.closed.store(true, Relaxed);
        let mut made = Made {
            conns: vec![closed],
            connecting: 0,
        };
        assert_eq!(what(&choose(&mut made, "s1", &settings(2, 100))), "connect");
        assert!(made.conns.is_empty());
    }
}
