//! The waypoint's front: HBONE in, the L7 engine behind it.
//!
//! A source pod's agent sends each connection to a service bound to this
//! waypoint as an HBONE stream (`CONNECT vip:port`, the source workload's
//! certificate). Each stream is checked (a service of this waypoint, one of its
//! ports), then read as HTTP/1.1 or HTTP/2 (prior knowledge) and served by the
//! engine request by request; a stream that does not speak HTTP is carried to
//! an endpoint as bytes, as the agent would carry it.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt as _;
use tracing::{debug, info};

use crate::{
    hbone::{
        headers::forwarded_for,
        io::{Rewind, StreamIo},
        server::{Handler, Refusal, Request},
    },
    http::engine::{Context, Engine},
    model::{AppProtocol, ServiceKey},
    net::limit::Refused,
};

/// How long a stream of a port that does not declare its protocol may stay
/// silent before it is taken for a server-first protocol and carried as bytes.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

/// HTTP sizes the front accepts from a client.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;

/// What the waypoint's 15008 does with each stream.
pub struct Front {
    pub engine: Arc<Engine>,
    /// The waypoint services this waypoint is a replica of: streams for a
    /// service bound to another are refused.
    pub serves: Arc<dyn Fn(&ServiceKey) -> bool + Send + Sync>,
}

impl Handler for Front {
    fn refused(&self, why: Refused) {
        BAD.count(Bad::of_refusal(why));
    }

    fn idle_closed(&self) {}

    async fn handle(self: Arc<Self>, request: Request) {
        let peer = request.peer.clone();
        let source = request
            .head
            .headers
            .get("forwarded")
            .and_then(forwarded_for)
            .map_or(peer.addr.ip(), |a| a.ip());
        let dst = match request.target() {
            Ok(dst) => dst,
            Err(refusal) => return request.refuse(&refusal),
        };
        let ctx = match self.context(dst, peer.identity.clone(), source) {
            Ok(ctx) => ctx,
            Err(refusal) => {
                info!(peer = %peer.identity, %dst, reason = %refusal, "waypoint stream refused");
                return request.refuse(&refusal);
            }
        };
        let Ok(stream) = request.accept() else {
            return;
        };
        let io = StreamIo::new(stream.send, stream.recv);
        match ctx.port.protocol() {
            AppProtocol::Tcp => tcp(&self.engine, ctx, io).await,
            AppProtocol::Http1 | AppProtocol::H2c => serve_http(self.engine.clone(), ctx, io).await,
            AppProtocol::Detect => {
                let mut io = io;
                match sniff(&mut io).await {
                    Some((head, true)) => {
                        serve_http(self.engine.clone(), ctx, Rewind::new(head, io)).await
                    }
                    Some((head, false)) => tcp(&self.engine, ctx, Rewind::new(head, io)).await,
                    None => {}
                }
            }
        }
    }
}

impl Front {
    fn context(
        &self,
        dst: SocketAddr,
        peer: crate::identity::SpiffeId,
        source_ip: std::net::IpAddr,
    ) -> Result<Context, Refusal> {
        let config = self.engine.config();
        let view = &config.view;
        let Some((svc, _)) = view.service_by_vip(dst.ip()) else {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!("{} is not a service address", dst.ip()),
            ));
        };
        let bound = view.waypoint_of(svc).map(|(w, _)| w.key());
        if !bound.as_ref().is_some_and(|k| (self.serves)(k)) {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "service {}/{} is not bound to this waypoint",
                    svc.namespace, svc.name
                ),
            ));
        }
        let Some(port) = svc.ports.iter().find(|p| p.port == dst.port()) else {
            return Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                format!(
                    "port {} is not a port of {}/{}",
                    dst.port(),
                    svc.namespace,
                    svc.name
                ),
            ));
        };
        Ok(Context::new(
            Some(peer),
            source_ip,
            svc.clone(),
            port.clone(),
        ))
    }
}

/// Reads a stream's first bytes and says whether they start HTTP: the HTTP/2
/// preface, or an HTTP/1.1 request line's method. `None`: the stream ended or
/// failed before saying anything. A stream silent for [`DETECT_TIMEOUT`] is
/// taken for a server-first protocol (not HTTP).
async fn sniff(io: &mut StreamIo) -> Option<(Bytes, bool)> {
    let mut head = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        if let Some(http) = looks_like_http(&head) {
            return Some((head.freeze(), http));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut head)).await {
            Ok(Ok(0)) => return (!head.is_empty()).then(|| (head.freeze(), false)),
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return None,
            Err(_) => return Some((head.freeze(), false)),
        }
    }
}

/// `Some(true)` for HTTP, `Some(false)` for not HTTP, `None` to read more.
fn looks_like_http(head: &[u8]) -> Option<bool> {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    if head.is_empty() {
        return None;
    }
    let n = head.len().min(PREFACE.len());
    if head[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(true);
    }
    // A method token (RFC 9110: tchar, in practice upper-case letters) then a
    // space; methods longer than 16 are not worth waiting for.
    match head.iter().position(|&b| b == b' ') {
        Some(i) => Some(i > 0 && head[..i].iter().all(u8::is_ascii_uppercase)),
        None if head.len() > 16 || !head.iter().all(u8::is_ascii_uppercase) => Some(false),
        None => None,
    }
}

/// Serves HTTP/1.1 or HTTP/2 on one stream until the client is done.
async fn serve_http<I>(engine: Arc<Engine>, ctx: Context, io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ctx = Arc::new(ctx);
    let service = hyper::service::service_fn(move |req| {
        let (engine, ctx) = (engine.clone(), ctx.clone());
        async move { Ok::<_, std::convert::Infallible>(engine.handle(&ctx, req).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(MAX_HEADER_BYTES)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .initial_stream_window_size(crate::hbone::STREAM_WINDOW)
        .initial_connection_window_size(crate::hbone::CONNECTION_WINDOW);
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
    {
        // hyper has already answered what deserved an answer (400 for a
        // malformed or smuggling request, 431 for oversized headers) or reset
        // the HTTP/2 connection with the right code; here it is counted.
        let reason = e
            .downcast_ref::<hyper::Error>()
            .map_or(Bad::Protocol, Bad::of_hyper);
        BAD.count(reason);
        debug!(error = %e, reason = reason.as_str(), "downstream HTTP connection ended with an error");
    }
}

/// Why a client's connection or stream was refused or cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bad {
    /// Not valid HTTP/1.1 (bad request line or header, conflicting framing
    /// such as `Content-Length` with `Transfer-Encoding`, obs-fold): 400.
    Malformed,
    /// Headers over the limit: 431.
    TooLarge,
    /// Headers not complete within the read timeout.
    HeaderTimeout,
    /// An HTTP/2 protocol error (an invalid frame, a flood): the connection
    /// is reset with the error's code.
    Protocol,
    /// Over the HBONE listener's limits, or its TLS handshake failed.
    Refused,
}

impl Bad {
    pub const ALL: [Bad; 5] = [
        Bad::Malformed,
        Bad::TooLarge,
        Bad::HeaderTimeout,
        Bad::Protocol,
        Bad::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Bad::Malformed => "malformed",
            Bad::TooLarge => "too_large",
            Bad::HeaderTimeout => "header_timeout",
            Bad::Protocol => "protocol",
            Bad::Refused => "refused",
        }
    }

    fn of_hyper(e: &hyper::Error) -> Bad {
        if e.is_parse_too_large() {
            Bad::TooLarge
        } else if e.is_parse() || e.is_parse_status() {
            Bad::Malformed
        } else if e.is_timeout() {
            Bad::HeaderTimeout
        } else {
            Bad::Protocol
        }
    }

    fn of_refusal(_: Refused) -> Bad {
        Bad::Refused
    }
}

/// Bad input counted, by kind.
pub struct BadCounts([std::sync::atomic::AtomicU64; Bad::ALL.len()]);

pub static BAD: BadCounts = BadCounts([const { std::sync::atomic::AtomicU64::new(0) }; 5]);

impl BadCounts {
    fn count(&self, why: Bad) {
        let i = Bad::ALL.iter().position(|b| *b == why).unwrap_or(0);
        self.0[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// `weft_waypoint_bad_requests_total`, in Prometheus text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP weft_waypoint_bad_requests_total Client connections or streams the waypoint refused or cut for bad input, by reason.\n\
             # TYPE weft_waypoint_bad_requests_total counter\n",
        );
        for (i, b) in Bad::ALL.iter().enumerate() {
            let n = self.0[i].load(std::sync::atomic::Ordering::Relaxed);
            out.push_str(&format!(
                "weft_waypoint_bad_requests_total{{reason=\"{}\"}} {n}\n",
                b.as_str()
            ));
        }
        out
    }
}

/// Carries a stream that is not HTTP to an endpoint of its service, as bytes.
async fn tcp<I>(engine: &Engine, ctx: Context, mut io: I)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Some(mut up) = engine.connect_tcp(&ctx).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut io, &mut up).await;
}

#[cfg(test)]
mod tests {
    use super::looks_like_http;

    #[test]
    fn detects_http_by_its_first_bytes() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"POST"), None);
        assert_eq!(
            looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
            Some(true)
        );
        assert_eq!(looks_like_http(b"PRI * HT"), None);
        assert_eq!(looks_like_http(b"\x16\x03\x01"), Some(false));
        assert_eq!(looks_like_http(b"*1\r\n$4\r\nPING\r\n"), Some(false));
        assert_eq!(looks_like_http(b"get / HTTP/1.1"), Some(false));
    }
}
