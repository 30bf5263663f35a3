//! Export of the waypoint's spans to an OpenTelemetry collector: OTLP over
//! HTTP with JSON bodies (`POST /v1/traces`), the one encoding every
//! collector takes without a protobuf dependency here.
//!
//! A request's end only queues its span (`try_send` on a bounded channel: a
//! slow or absent collector never slows a request; a full queue drops the
//! span and counts it). One task sends the queue in batches of up to
//! [`MAX_BATCH`], at most [`BATCH_DELAY`] after the first span of a batch, on
//! a new connection per batch (at most a few per second, so keeping one open
//! is not worth its reconnect logic).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use http::{Request, Uri, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{Value as Json, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::telemetry::Hex;

/// Spans waiting to be sent; past it they are dropped.
pub const QUEUE: usize = 4096;
pub const MAX_BATCH: usize = 512;
pub const BATCH_DELAY: Duration = Duration::from_secs(1);
/// For connecting and for the collector's answer.
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--otlp-endpoint {0:?} is not an http:// URL with a host (TLS is not supported)")]
    Endpoint(String),
    #[error("connecting to the collector at {0}: {1}")]
    Connect(String, String),
    #[error("the collector at {0}: {1}")]
    Send(String, String),
}

/// An attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
}

impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::Str(s)
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Self {
        Value::Int(n)
    }
}

/// The waypoint's span of one request.
#[derive(Debug, Clone)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    /// The route, or `host:port/path`.
    pub name: String,
    pub start: SystemTime,
    pub end: SystemTime,
    pub error: bool,
    pub attributes: Vec<(&'static str, Value)>,
}

/// The sending end of the export queue.
#[derive(Debug)]
pub struct Exporter {
    queue: mpsc::Sender<Span>,
    counts: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    exported: AtomicU64,
    dropped: AtomicU64,
}

/// Where the collector is.
#[derive(Debug, Clone)]
struct Target {
    /// `host:port`, to connect to and for `host`.
    authority: String,
    path: String,
}

fn target(endpoint: &str) -> Result<Target, Error> {
    let bad = || Error::Endpoint(endpoint.to_owned());
    let uri: Uri = endpoint.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("http") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?;
    let port = authority.port_u16().unwrap_or(4318);
    let path = match uri.path() {
        "" | "/" => "/v1/traces".to_owned(),
        p => p.to_owned(),
    };
    Ok(Target {
        authority: format!("{}:{port}", authority.host()),
        path,
    })
}

impl Exporter {
    /// Starts the export task (on the current tokio runtime) for the
    /// collector at `endpoint` (`http://host:4318`; the path defaults to
    /// `/v1/traces`). `service`: the resource's `service.name`.
    pub fn spawn(endpoint: &str, service: &str) -> Result<Exporter, Error> {
        let target = target(endpoint)?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let counts = Arc::new(Counts::default());
        tokio::spawn(run(rx, target, service.to_owned(), counts.clone()));
        Ok(Exporter { queue, counts })
    }

    /// Queues a span; drops it (counted) when the queue is full.
    pub fn push(&self, span: Span) {
        if self.queue.try_send(span).is_err() {
            self.counts.dropped.fetch_add(1, Relaxed);
        }
    }
}

/// Spans exported and dropped so far (zeros without an exporter).
pub fn counts(exporter: Option<&Exporter>) -> (u64, u64) {
    exporter.map_or((0, 0), |e| {
        (
            e.counts.exported.load(Relaxed),
            e.counts.dropped.load(Relaxed),
        )
    })
}

async fn run(mut rx: mpsc::Receiver<Span>, target: Target, service: String, counts: Arc<Counts>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::sleep(BATCH_DELAY);
        tokio::pin!(deadline);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                span = rx.recv() => match span {
                    Some(s) => batch.push(s),
                    None => break,
                },
                _ = &mut deadline => break,
            }
        }
        let n = batch.len() as u64;
        let body = encode(&service, &batch);
        batch.clear();
        match post(&target, body).await {
            Ok(()) => {
                counts.exported.fetch_add(n, Relaxed);
                warned = false;
            }
            Err(e) => {
                counts.dropped.fetch_add(n, Relaxed);
                // Once per outage, not once per batch.
                if !warned {
                    warn!(error = %e, "span export failed; spans are dropped until the collector answers");
                    warned = true;
                } else {
                    debug!(error = %e, "span export failed");
                }
            }
        }
    }
}

async fn post(target: &Target, body: Bytes) -> Result<(), Error> {
    let fail = |e: &dyn std::fmt::Display| Error::Send(target.authority.clone(), e.to_string());
    let tcp = tokio::time::timeout(
        TIMEOUT,
        tokio::net::TcpStream::connect(target.authority.as_str()),
    )
    .await
    .map_err(|_| Error::Connect(target.authority.clone(), "timed out".into()))?
    .map_err(|e| Error::Connect(target.authority.clone(), e.to_string()))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(&e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = Request::post(target.path.as_str())
        .header(header::HOST, target.authority.as_str())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .map_err(|e| fail(&e))?;
    let resp = tokio::time::timeout(TIMEOUT, send.send_request(req))
        .await
        .map_err(|_| fail(&"no answer in time"))?
        .map_err(|e| fail(&e))?;
    if !resp.status().is_success() {
        return Err(fail(&format!("answered {}", resp.status())));
    }
    Ok(())
}

fn nanos(t: SystemTime) -> String {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .to_string()
}

fn attribute(key: &str, v: &Value) -> Json {
    let value = match v {
        Value::Str(s) => json!({ "stringValue": s }),
        // OTLP/JSON writes 64-bit integers as strings.
        Value::Int(n) => json!({ "intValue": n.to_string() }),
    };
    json!({ "key": key, "value": value })
}

/// An `ExportTraceServiceRequest` in OTLP's JSON mapping (ids in hex).
pub fn encode(service: &str, spans: &[Span]) -> Bytes {
    const SERVER: u8 = 2;
    const STATUS_ERROR: u8 = 2;
    let spans: Vec<Json> = spans
        .iter()
        .map(|s| {
            let mut span = json!({
                "traceId": Hex(&s.trace_id).to_string(),
                "spanId": Hex(&s.span_id).to_string(),
                "name": s.name,
                "kind": SERVER,
                "startTimeUnixNano": nanos(s.start),
                "endTimeUnixNano": nanos(s.end),
                "attributes": s.attributes.iter().map(|(k, v)| attribute(k, v)).collect::<Vec<_>>(),
                "status": if s.error { json!({ "code": STATUS_ERROR }) } else { json!({}) },
            });
            if let Some(p) = &s.parent {
                span["parentSpanId"] = Hex(p).to_string().into();
            }
            span
        })
        .collect();
    let doc = json!({
        "resourceSpans": [{
            "resource": { "attributes": [attribute("service.name", &Value::Str(service.to_owned()))] },
            "scopeSpans": [{ "scope": { "name": "weft-waypoint" }, "spans": spans }],
        }]
    });
    Bytes::from(serde_json::to_vec(&doc).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    fn span(parent: Option<[u8; 8]>) -> Span {
        Span {
            trace_id: [1; 16],
            span_id: [2; 8],
            parent,
            name: "shop/web".into(),
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(1),
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(1500),
            error: true,
            attributes: vec![("http.response.status_code", 503.into())],
        }
    }

    #[test]
    fn spans_encode_as_otlp_json() {
        let doc: Json =
            serde_json::from_slice(&encode("default/wp", &[span(Some([3; 8]))])).unwrap();
        let rs = &doc["resourceSpans"][0];
        assert_eq!(
            rs["resource"]["attributes"][0]["value"]["stringValue"],
            "default/wp"
        );
        let s = &rs["scopeSpans"][0]["spans"][0];
        assert_eq!(s["traceId"], "01".repeat(16));
        assert_eq!(s["spanId"], "02".repeat(8));
        assert_eq!(s["parentSpanId"], "03".repeat(8));
        assert_eq!(s["startTimeUnixNano"], "1000000000");
        assert_eq!(s["endTimeUnixNano"], "1500000000");
        assert_eq!(s["status"]["code"], 2);
        assert_eq!(s["attributes"][0]["value"]["intValue"], "503");
        let root: Json = serde_json::from_slice(&encode("x", &[span(None)])).unwrap();
        assert!(
            root["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
                .get("parentSpanId")
                .is_none()
        );
    }

    #[test]
    fn endpoints_must_be_plain_http() {
        assert_eq!(target("http://otel:4318").unwrap().path, "/v1/traces");
        assert_eq!(target("http://otel").unwrap().authority, "otel:4318");
        assert_eq!(target("http://otel:1/x/traces").unwrap().path, "/x/traces");
        assert!(target("https://otel:4318").is_err());
        assert!(target("otel:4318").is_err());
    }

    /// Reads one HTTP/1.1 request (its head and a `content-length` body).
    async fn read_request(conn: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
        let mut buf = Vec::new();
        loop {
            let mut chunk = [0; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed early");
            buf.extend_from_slice(&chunk[..n]);
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                return (head, buf[end + 4..end + 4 + len].to_vec());
            }
        }
    }

    #[tokio::test]
    async fn spans_are_posted_in_a_batch_and_overflow_is_counted() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exporter = Exporter::spawn(&format!("http://{addr}"), "default/wp").unwrap();
        for _ in 0..3 {
            exporter.push(span(None));
        }
        let (mut conn, _) = listener.accept().await.unwrap();
        let (head, body) = read_request(&mut conn).await;
        conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        assert!(head.starts_with("post /v1/traces http/1.1"), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        let doc: Json = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            doc["resourceSpans"][0]["scopeSpans"][0]["spans"]
                .as_array()
                .unwrap()
                .len(),
            3
        );
        let mut patience = 100;
        while counts(Some(&exporter)).0 < 3 && patience > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            patience -= 1;
        }
        assert_eq!(counts(Some(&exporter)), (3, 0));
        // Past the queue's bound, spans are dropped and counted, never waited for.
        for _ in 0..QUEUE + MAX_BATCH + 10 {
            exporter.push(span(None));
        }
        assert!(counts(Some(&exporter)).1 >= 10);
    }
}
