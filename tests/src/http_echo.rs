//! The HTTP echo server behind `weft-tk http-echo`: the upstream the L7 tests and
//! the bench put behind a waypoint, modelled on the Gateway API conformance
//! suite's `echo-basic`.
//!
//! Every request is answered `200` with a JSON description of what arrived (pod,
//! method, path, query, host, protocol, headers, request body size), and the same
//! JSON, plus the status, is printed as one line on stdout, so a test can count
//! which replica served what. HTTP/1.1 and HTTP/2 with prior knowledge (h2c) are
//! told apart per connection; `h2c_only` refuses HTTP/1.1.
//!
//! Requests steer the answer, so tests can provoke behaviour:
//!
//! - path `/status/NNN`: answer with status `NNN`;
//! - query `delay_ms=N`: wait `N` ms before answering;
//! - query `body_bytes=N`: answer with `N` bytes of `x` instead of the JSON,
//!   streamed in chunks as the peer takes them;
//! - query `fail=NNN`: answer `NNN` (a failing request for retry tests);
//! - [`Config::fail_every`] `K`: every `K`-th request answers `503` (a flaky
//!   replica);
//! - header `x-echo-set-<name>: v`: the answer carries `<name>: v`;
//! - an HTTP/1.1 `Upgrade: websocket`: `101` with the RFC 6455 accept key, then
//!   every text and binary frame is sent back, pings answered, a close returned.
//!
//! Request bodies are counted as they stream in, never held whole. Every answer
//! also carries `x-echo-pod: <name>`, so a client that asked for filler can still
//! tell who served it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONNECTION, CONTENT_TYPE, HOST, HeaderName, HeaderValue, UPGRADE};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Prefix of the request headers that set a response header.
const SET_HEADER_PREFIX: &str = "x-echo-set-";

/// What a filler body is made of, and the largest chunk it is sent in.
static FILLER: [u8; 64 * 1024] = [b'x'; 64 * 1024];

/// The largest WebSocket frame echoed: a frame is held whole to unmask it.
const MAX_WS_FRAME: u64 = 16 << 20;

/// The GUID RFC 6455 §1.3 appends to a client's key before hashing it.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// How the server behaves beyond echoing.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Reported as `pod` in every answer and line.
    pub name: String,
    /// Speak HTTP/2 with prior knowledge only.
    pub h2c_only: bool,
    /// Every this-many-th request (counted over all connections) answers 503.
    pub fail_every: Option<u64>,
}

struct State {
    config: Config,
    requests: AtomicU64,
}

/// Serves `listener` until the process ends; each connection on its own task.
pub async fn serve(listener: TcpListener, config: Config) -> io::Result<()> {
    let state = Arc::new(State {
        config,
        requests: AtomicU64::new(0),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // E.g. EMFILE: keep serving the connections there are.
                eprintln!("http-echo: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let builder = auto::Builder::new(TokioExecutor::new());
            let io = TokioIo::new(stream);
            let service = service_fn(|req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(handle(&state, peer, req).await) }
            });
            // `http2_only` has no effect on a connection served with upgrades;
            // HTTP/2 has no upgrades to serve anyway.
            let served = if state.config.h2c_only {
                builder.http2_only().serve_connection(io, service).await
            } else {
                builder.serve_connection_with_upgrades(io, service).await
            };
            if let Err(e) = served {
                eprintln!("http-echo: connection from {peer}: {e}");
            }
        });
    }
}

async fn handle(state: &State, peer: SocketAddr, mut req: Request<Incoming>) -> Response<EchoBody> {
    let n = state.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let query = req.uri().query().unwrap_or_default().to_owned();
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_owned())
    };
    let websocket = websocket_accept(&req);
    let upgrade = websocket.is_some().then(|| hyper::upgrade::on(&mut req));
    let (parts, mut body) = req.into_parts();
    let mut body_bytes = 0u64;
    let mut body_error = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_bytes += frame.data_ref().map_or(0, |d| d.len() as u64),
            Err(e) => {
                body_error = Some(e.to_string());
                break;
            }
        }
    }
    if let Some(ms) = param("delay_ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    let mut headers: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.to_string())
            .or_default()
            .push(value.into());
    }
    let host = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            let h = parts.headers.get(HOST)?;
            Some(String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .unwrap_or_default();
    let status = parts
        .uri
        .path()
        .strip_prefix("/status/")
        .or(param("fail").as_deref())
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .or_else(|| {
            let k = state.config.fail_every.filter(|&k| k > 0)?;
            n.is_multiple_of(k)
                .then_some(StatusCode::SERVICE_UNAVAILABLE)
        })
        .unwrap_or(StatusCode::OK);
    let status = if websocket.is_some() {
        StatusCode::SWITCHING_PROTOCOLS
    } else {
        status
    };
    let mut echo = Map::new();
    echo.insert("pod".into(), state.config.name.clone().into());
    echo.insert("method".into(), parts.method.as_str().into());
    echo.insert("path".into(), parts.uri.path().into());
    echo.insert("query".into(), query.clone().into());
    echo.insert("host".into(), host.into());
    echo.insert("protocol".into(), protocol(parts.version).into());
    echo.insert("headers".into(), json!(headers));
    echo.insert("body_bytes".into(), body_bytes.into());
    let answer = Value::Object(echo.clone());
    echo.insert("request".into(), n.into());
    echo.insert("peer".into(), peer.to_string().into());
    echo.insert("status".into(), status.as_u16().into());
    if let Some(e) = body_error {
        echo.insert("body_error".into(), e.into());
    }
    println_flushed(&Value::Object(echo));

    let filler = param("body_bytes").and_then(|v| v.parse::<u64>().ok());
    let mut resp = match (&websocket, filler) {
        (Some(_), _) => Response::new(EchoBody::full(Bytes::new())),
        (None, Some(len)) => {
            let mut r = Response::new(EchoBody::filler(len));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            r
        }
        (None, None) => {
            let mut r = Response::new(EchoBody::full(Bytes::from(answer.to_string())));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
    };
    *resp.status_mut() = status;
    let out = resp.headers_mut();
    if let Ok(pod) = HeaderValue::from_str(&state.config.name) {
        out.insert("x-echo-pod", pod);
    }
    for (name, value) in &parts.headers {
        let Some(set) = name.as_str().strip_prefix(SET_HEADER_PREFIX) else {
            continue;
        };
        if let Ok(set) = HeaderName::from_bytes(set.as_bytes()) {
            out.append(set, value.clone());
        }
    }
    if let (Some(accept), Some(upgrade)) = (websocket, upgrade) {
        out.insert(UPGRADE, HeaderValue::from_static("websocket"));
        out.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&accept) {
            out.insert("sec-websocket-accept", accept);
        }
        tokio::spawn(async move {
            let result = match upgrade.await {
                Ok(upgraded) => websocket_echo(TokioIo::new(upgraded)).await,
                Err(e) => Err(io::Error::other(e)),
            };
            if let Err(e) = result {
                eprintln!("http-echo: websocket from {peer}: {e}");
            }
        });
    }
    resp
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "unknown",
    }
}

/// One JSON line on stdout, flushed at once so a test sees it through a pipe.
fn println_flushed(value: &Value) {
    let mut out = io::stdout().lock();
    // Nothing sensible to do if stdout is gone.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

/// A response body: the JSON echo in one piece, or `len` filler bytes made up
/// as the connection asks for them, so a 10 GB answer costs no memory.
pub struct EchoBody {
    whole: Option<Bytes>,
    filler: u64,
}

impl EchoBody {
    fn full(bytes: Bytes) -> EchoBody {
        EchoBody {
            whole: Some(bytes),
            filler: 0,
        }
    }

    fn filler(len: u64) -> EchoBody {
        EchoBody {
            whole: None,
            filler: len,
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if let Some(whole) = self.whole.take() {
            return Poll::Ready(Some(Ok(Frame::data(whole))));
        }
        if self.filler == 0 {
            return Poll::Ready(None);
        }
        let n = self.filler.min(FILLER.len() as u64);
        self.filler -= n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
            &FILLER[..n as usize],
        )))))
    }

    fn is_end_stream(&self) -> bool {
        self.whole.is_none() && self.filler == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.whole.as_ref().map_or(0, |b| b.len() as u64) + self.filler)
    }
}

/// The `Sec-WebSocket-Accept` for an HTTP/1.1 WebSocket upgrade request, or
/// `None` if `req` is not one.
fn websocket_accept<B>(req: &Request<B>) -> Option<String> {
    let upgrade = req.headers().get(UPGRADE)?;
    if req.version() != Version::HTTP_11 || !upgrade.as_bytes().eq_ignore_ascii_case(b"websocket") {
        return None;
    }
    let key = req.headers().get("sec-websocket-key")?;
    Some(accept_key(key.as_bytes()))
}

/// RFC 6455 §4.2.2: base64(SHA-1(key ++ GUID)).
fn accept_key(key: &[u8]) -> String {
    let mut input = key.to_vec();
    input.extend_from_slice(WS_GUID.as_bytes());
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, &input);
    base64(digest.as_ref())
}

/// Standard base64 with padding (RFC 4648 §4).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Echoes WebSocket frames (RFC 6455 §5) until the client closes: text, binary
/// and continuation frames go back unmasked with their opcode and FIN bit, a
/// ping is answered with a pong, a close with a close carrying the same code.
async fn websocket_echo<S: AsyncRead + AsyncWrite + Unpin>(mut io: S) -> io::Result<()> {
    loop {
        let mut head = [0u8; 2];
        io.read_exact(&mut head).await?;
        let (fin_opcode, opcode) = (head[0] & 0x8f, head[0] & 0x0f);
        let masked = head[1] & 0x80 != 0;
        let len = match head[1] & 0x7f {
            126 => u64::from(io.read_u16().await?),
            127 => io.read_u64().await?,
            n => u64::from(n),
        };
        if len > MAX_WS_FRAME {
            return Err(io::Error::other(format!(
                "a {len}-byte frame is over the echo's {MAX_WS_FRAME}"
            )));
        }
        let mut mask = [0u8; 4];
        if masked {
            io.read_exact(&mut mask).await?;
        }
        let mut payload = vec![0u8; len as usize];
        io.read_exact(&mut payload).await?;
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
        let reply = match opcode {
            0x8 => 0x88,
            0x9 => 0x8a,
            0xa => continue,
            _ => fin_opcode,
        };
        io.write_all(&ws_frame_header(reply, payload.len())).await?;
        io.write_all(&payload).await?;
        io.flush().await?;
        if opcode == 0x8 {
            return Ok(());
        }
    }
}

/// The header of an unmasked (server-to-client) frame.
fn ws_frame_header(fin_opcode: u8, len: usize) -> Vec<u8> {
    let mut h = vec![fin_opcode];
    match len {
        0..=125 => h.push(len as u8),
        126..=0xffff => {
            h.push(126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            h.push(127);
            h.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_6455() {
        // The example of RFC 6455 §1.3.
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn base64_pads() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input:?}");
        }
    }

    /// A client frame as RFC 6455 §5.2 has it: FIN, `opcode`, masked.
    fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut f = ws_frame_header(0x80 | opcode, payload.len());
        f[1] |= 0x80;
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    #[tokio::test]
    async fn websocket_echo_unmasks_answers_pings_and_returns_the_close() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let echo = tokio::spawn(websocket_echo(server));
        let big = vec![7u8; 70_000];
        for (opcode, payload) in [(0x1, &b"Hello"[..]), (0x2, &big), (0x9, b"p")] {
            client
                .write_all(&client_frame(opcode, payload))
                .await
                .unwrap();
        }
        client
            .write_all(&client_frame(0x8, &[0x03, 0xe8]))
            .await
            .unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        echo.await.unwrap().unwrap();
        let mut want = Vec::new();
        for (fin_opcode, payload) in [(0x81, &b"Hello"[..]), (0x82, &big), (0x8a, b"p")] {
            want.extend(ws_frame_header(fin_opcode, payload.len()));
            want.extend_from_slice(payload);
        }
        want.extend([0x88, 2, 0x03, 0xe8]);
        assert_eq!(got.len(), want.len());
        assert!(got == want, "the echo differs from what was sent");
    }

    #[test]
    fn frame_headers_use_the_shortest_length() {
        assert_eq!(ws_frame_header(0x81, 5), [0x81, 5]);
        assert_eq!(ws_frame_header(0x82, 126), [0x82, 126, 0, 126]);
        assert_eq!(
            ws_frame_header(0x82, 70_000),
            [0x82, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
    }
}
