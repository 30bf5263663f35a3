//! HBONE: each proxied TCP connection is one HTTP/2 `CONNECT` stream inside a mutual
//! TLS 1.3 connection between the source pod's agent and the destination pod's
//! port 15008, the way Istio ambient's ztunnel speaks it (ALPN `h2`, SPIFFE URI
//! SANs, `:authority` = destination `ip:port`, `forwarded` and `traceparent`
//! headers, 200 on success).
//!
//! A protocol module, reused by every role that speaks HBONE: `client` is the
//! outbound side (a pool of connections keyed by local identity, peer identity and
//! address), `server` takes a connection through TLS and HTTP/2 and hands each
//! stream to a handler, `headers` reads and writes the CONNECT's headers, and
//! `stream` copies bytes between a socket and a stream. Nothing here knows pods,
//! policy or services: those are the handler's and the caller's.

pub mod client;
pub mod headers;
pub mod io;
pub mod server;
pub mod stream;

use std::time::Duration;

/// HTTP/2 sizes for both sides.
///
/// The stream window bounds what one stream may have in flight (and what a stalled
/// reader can pin in memory): 1 MiB covers the bandwidth-delay product of 10 Gbit/s
/// at 800 µs of round trip. The connection window is 8 stream windows, so one stalled
/// or bulk stream never starves the others that share its connection.
pub const STREAM_WINDOW: u32 = 1 << 20;
pub const CONNECTION_WINDOW: u32 = 8 << 20;
/// Larger frames than h2's 16 KiB default: fewer frame headers and wakeups per byte.
pub const MAX_FRAME: u32 = 256 << 10;
/// Headers of a CONNECT are small; anything bigger is not HBONE.
pub const MAX_HEADER_LIST: u32 = 16 << 10;
/// How long a peer has to complete the TLS and HTTP/2 handshakes, together.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Streams one inbound connection may carry at once; h2 refuses the next with
/// `REFUSED_STREAM`.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// An inbound connection with no stream is closed after this long: twice the
/// pool's idle timeout, so a well-behaved client closes first and never loses a
/// stream to the race.
pub const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// After a GOAWAY of ours for idleness, how long the peer has before the
/// connection is dropped whatever it does.
pub const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// Rapid reset (CVE-2023-44487): streams a peer may open and reset before the
/// server has even taken them; one more and the connection gets GOAWAY
/// `ENHANCE_YOUR_CALM`. Streams the server has taken count in the listener's
/// stream cap however briefly they live.
pub const MAX_PENDING_RESETS: usize = 20;
/// Streams this side may reset for protocol errors before it gives up on the
/// connection (a peer that provokes errors on purpose).
pub const MAX_LOCAL_ERROR_RESETS: usize = 256;

/// The HTTP/2 client side of an HBONE connection, with the sizes above.
pub fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    b
}

/// The HTTP/2 server side of an HBONE connection (15008), with the sizes above.
pub fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        // CONTINUATION floods are bounded by the header list size: h2 (since
        // 0.4.4) stops decoding a header block past it and answers GOAWAY. What
        // a stream may buffer is bounded by the windows above (receiving) and
        // h2's send buffer (400 KiB, sending).
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS));
    b
}

/// A pooled connection's PING period (see `client`): one 17-byte frame (in one
/// TLS record) each way per connection every 10 s costs nothing measurable, and
/// bounds how long a dead peer keeps taking streams to `PING_INTERVAL +
/// PING_TIMEOUT`.
pub const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long a PING may wait for its answer. The answer queues behind what the
/// peer is already sending on that connection (at most its 8 MiB window plus
/// the socket buffers): 5 s covers that down to a few tens of Mbit/s, far below
/// any link between nodes, so a busy live connection is not taken for dead.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Pool limits (see `client`).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    /// Streams one connection carries at most; past that a new one is opened.
    pub max_streams_per_connection: usize,
    /// Up to this many connections per key (and worker) are opened *before* any
    /// carries a second stream, so a bulk transfer does not fill the one TCP send
    /// buffer that small exchanges wait behind.
    pub spread: usize,
    /// An unused connection is closed after this long.
    pub idle_timeout: Duration,
    pub connect_timeout: Duration,
    /// Every connection sends an HTTP/2 PING this often (zero: never)...
    pub ping_interval: Duration,
    /// ...and is closed, failing the streams it carries, when the answer takes
    /// longer than this: the peer is gone or the path to it is black-holed.
    pub ping_timeout: Duration,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            max_streams_per_connection: 100,
            spread: 2,
            idle_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            ping_interval: PING_INTERVAL,
            ping_timeout: PING_TIMEOUT,
        }
    }
}
