//! Minimal plain-HTTP/1.1 endpoints, one request per connection: Prometheus
//! `GET /metrics` (text exposition format; the agent's 15020 and the CA's 15014),
//! the agent's readiness (15021) and admin (15000) endpoints.

use std::{io, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tracing::warn;

use crate::net::limit::{Full, Limit};

pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Connections these endpoints refused because 64 were already being served
/// (the agent reports it as `weft_listener_refusals_total{listener="endpoints"}`).
pub static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Connections refused because their peer address already held 8.
pub static PEER_REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Requests served at once, in all and per peer address: a scraper or a
/// probe is one connection at a time; a peer holding more is not one.
const MAX_AT_ONCE: usize = 64;
const MAX_PER_PEER: usize = 8;

/// What a small HTTP endpoint answers.
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }

    pub fn json(body: &impl serde::Serialize) -> Reply {
        match serde_json::to_string_pretty(body) {
            Ok(mut body) => {
                body.push('\n');
                Reply {
                    status: 200,
                    content_type: "application/json",
                    body,
                }
            }
            Err(e) => Reply::text(500, format!("cannot encode: {e}\n")),
        }
    }
}

/// One request: method, path, query string (without `?`).
pub type Handler = Arc<dyn Fn(&str, &str, &str) -> Reply + Send + Sync>;

/// Serves `GET /metrics` with what `render` returns at scrape time.
pub async fn serve(listener: TcpListener, render: Render) {
    serve_http(listener, handler(render)).await
}

/// `GET /metrics`, answered with what `render` returns at scrape time.
pub fn handler(render: Render) -> Handler {
    Arc::new(
        move |method: &str, path: &str, _: &str| match (method, path) {
            ("GET", "/metrics") => Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: render(),
            },
            _ => Reply::text(404, "not found\n"),
        },
    )
}

/// Serves small HTTP/1.1 requests (one per connection, no body) with `handler`,
/// until the task is dropped. At most 64 at once and 8 per peer address, 5 s
/// each.
pub async fn serve_http(listener: TcpListener, handler: Handler) {
    let limit = Limit::new(MAX_AT_ONCE, MAX_PER_PEER);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                warn!(error = %e, "HTTP endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over a cap: closed at once, so a peer holding slots slows no one
        // else's accept.
        let permit = match limit.admit(peer.ip().to_canonical()) {
            Ok(permit) => permit,
            Err(full) => {
                let counter = match full {
                    Full::Total => &REFUSED,
                    Full::Peer => &PEER_REFUSED,
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), request(tcp, &handler)).await;
            drop(permit);
        });
    }
}

async fn request(mut tcp: TcpStream, handler: &Handler) -> io::Result<()> {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return Ok(());
        }
        let n = tcp.read(&mut buf[len..]).await?;
        if n == 0 {
            return Ok(());
        }
        len += n;
    }
    let line = buf[..len].split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let reply = handler(method, path, query);
    let reason = match reply.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(reply.body.as_bytes()).await?;
    tcp.shutdown().await
}

/// The value of `key` in a query string (`a=1&b=2`), undecoded.
pub fn query_param<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// A blocking `GET` of `path` on a local HTTP endpoint (for `weft status`):
/// the status code and the body.
pub fn get(addr: std::net::SocketAddr, path: &str) -> io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    tcp.read_to_end(&mut out)?;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::other("no HTTP response"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other("no HTTP status"))?;
    Ok((status, body.to_owned()))
}

/// A label value, escaped as the exposition format wants.
pub fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{SocketAddr, TcpStream as StdStream},
    };

    use super::*;

    /// A connection to `to` from `from` (any loopback address).
    fn connect_from(from: [u8; 4], to: SocketAddr) -> StdStream {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from((from, 0)).into()).unwrap();
        s.connect(&to.into()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.into()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_peer_holds_at_most_eight_requests_and_others_are_still_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|_: &str, _: &str, _: &str| Reply::text(200, "ok\n"));
        tokio::spawn(serve_http(listener, handler));
        let before = PEER_REFUSED.load(std::sync::atomic::Ordering::Relaxed);
        let outcome = tokio::task::spawn_blocking(move || {
            // Eight silent connections from one address hold its slots.
            let held: Vec<StdStream> = (0..8).map(|_| connect_from([127, 0, 0, 1], addr)).collect();
            std::thread::sleep(Duration::from_millis(200));
            // The ninth is closed at once, unanswered.
            let mut ninth = connect_from([127, 0, 0, 1], addr);
            let _ = ninth.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
            let mut buf = Vec::new();
            let ninth_got = ninth.read_to_end(&mut buf).map(|_| buf.len()).unwrap_or(0);
            // Another address is served meanwhile.
            let mut other = connect_from([127, 0, 0, 2], addr);
            other.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
            let mut answer = String::new();
            other.read_to_string(&mut answer).unwrap();
            drop(held);
            (ninth_got, answer)
        })
        .await
        .unwrap();
        assert_eq!(
            outcome.0, 0,
            "the ninth connection from one peer was answered"
        );
        assert!(outcome.1.starts_with("HTTP/1.1 200"), "{}", outcome.1);
        assert!(PEER_REFUSED.load(std::sync::atomic::Ordering::Relaxed) > before);
    }
}
