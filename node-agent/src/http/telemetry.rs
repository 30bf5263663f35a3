//! Request telemetry: the W3C trace context, Istio's request metrics
//! (`reporter="waypoint"`) and one access-log line per request.
//!
//! [`start`] runs before a request is routed (it reads or starts the trace
//! context, puts the waypoint's span in `traceparent`, and notes the time),
//! [`finish`] when its response head is ready: the metrics and the log line
//! are written when the response body ends (or is dropped unfinished: the
//! client went away, flag `DC`), so durations and byte counts cover the whole
//! exchange.
//!
//! Cost per request, kept low on purpose (see `benches/telemetry.rs`): the
//! labels are not built per request. Who talked to whom (source, destination,
//! service) is interned once into a [`Pair`], found by a hash of borrowed
//! strings (no allocation); a request holds the pair by one refcount and, at
//! its end, finds its series (by status, gRPC status and flags) in the pair's
//! short list. The label text is rendered once, when a series is made.

use std::{
    cell::Cell,
    collections::HashMap,
    fmt::{self, Write as _},
    hash::{BuildHasher, Hash, RandomState},
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, LazyLock, OnceLock, RwLock,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context as Cx, Poll},
    time::{Instant, SystemTime},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, header};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt as _;
use tracing::info;

use super::{Body, BoxError, engine::Context, otlp};
use crate::{
    identity::SpiffeId,
    metrics::label,
    model::{Service, Workload},
    stats::{self, Peer, Present, ServiceName},
    telemetry::ACCESS_LOG,
    view::View,
};

/// What the engine learnt while serving a request, for its telemetry.
#[derive(Default)]
pub struct Record {
    /// The route that matched (`<namespace>/<name>`), if any.
    pub route: Option<String>,
    /// The service the request was sent to (a backend of the route).
    pub backend: Option<Arc<Service>>,
    /// The endpoint that served it.
    /// (Shared with the view: a refcount per request, not a copy.)
    pub endpoint: Option<Arc<Workload>>,
    pub upstream: Option<std::net::SocketAddr>,
    /// Why the policies refused it (`flags` is then `RBAC` or `UAEX`).
    pub denied: Option<String>,
    /// Attempts beyond the first.
    pub retries: u32,
    /// The `RateLimit` fields of an allowed request's answer (the rate limit
    /// phase writes them; the engine adds them to the response).
    pub rate_limit_headers: Vec<(http::HeaderName, http::HeaderValue)>,
    /// Envoy's response flags: `-`, `UH` (no healthy upstream), `UF`
    /// (upstream connect failure), `UT` (timeout), `UC` (upstream reset),
    /// `NR` (no route), `URX` (retries exhausted). `DC` (the client went
    /// away before the response ended) is set here, at the end.
    pub flags: &'static str,
    /// The mesh view the request was served with: the source workload is
    /// named from it (by the source's address).
    pub view: Option<Arc<View>>,
    /// Bytes of the request body read so far; shared with the body, which
    /// may still stream when the response ends (a gRPC stream).
    request_bytes: Option<Arc<AtomicU64>>,
}

impl Record {
    /// The endpoint that served the request.
    pub fn endpoint(&self) -> Option<&Workload> {
        self.endpoint.as_deref()
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("route", &self.route)
            .field("backend", &self.backend.as_ref().map(|s| s.key()))
            .field("endpoint", &self.endpoint().map(|w| w.key()))
            .field("upstream", &self.upstream)
            .field("retries", &self.retries)
            .field("flags", &self.flags)
            .finish_non_exhaustive()
    }
}

impl Record {
    /// The request body of an attempt, counting its bytes as it streams
    /// upstream (for `istio_request_bytes`). Each attempt's body replaces the
    /// count of the one before: a retry that replays a kept copy counts the
    /// body once, not once per attempt.
    pub fn count_request(&mut self, body: Body) -> Body {
        let n = Arc::new(AtomicU64::new(0));
        self.request_bytes = Some(n.clone());
        CountedRequest { inner: body, n }.boxed()
    }
}

// ---------------------------------------------------------------------------
// W3C trace context

/// The waypoint's span of one request, in W3C trace-context terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trace {
    pub trace_id: [u8; 16],
    /// The waypoint's own span: the parent the upstream sees.
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a valid `traceparent`.
    pub parent: Option<[u8; 8]>,
    /// `trace-flags`: only `sampled` (bit 0) is defined by version 00, and the
    /// others must be sent as zero.
    pub flags: u8,
}

impl Trace {
    /// The span for a request that carried `traceparent` values `values`:
    /// a child of the caller's span when there is exactly one valid value, else
    /// the root of a new trace (`sampled` as `sample_new` says).
    pub fn of<'a>(mut values: impl Iterator<Item = &'a [u8]>, sample_new: bool) -> Trace {
        let parsed = match (values.next(), values.next()) {
            (Some(one), None) => parse_traceparent(one),
            // Two `traceparent` fields: which one is the caller's is unknowable.
            _ => None,
        };
        match parsed {
            Some((trace_id, parent, flags)) => Trace {
                trace_id,
                span_id: new_id(),
                parent: Some(parent),
                flags: flags & 1,
            },
            None => Trace {
                trace_id: new_trace_id(),
                span_id: new_id(),
                parent: None,
                flags: u8::from(sample_new),
            },
        }
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` that names this span (version 00).
    pub fn traceparent(&self) -> [u8; 55] {
        let mut out = [b'-'; 55];
        out[..2].copy_from_slice(b"00");
        write_hex(&self.trace_id, &mut out[3..35]);
        write_hex(&self.span_id, &mut out[36..52]);
        write_hex(&[self.flags], &mut out[53..55]);
        out
    }
}

/// Parses one `traceparent` value: `version-traceid-parentid-flags`, lowercase
/// hex. Version `ff` is invalid; a version above 00 may carry more after the
/// flags (behind a `-`), as the spec asks future versions to be read; version
/// 00 is exactly 55 characters. All-zero ids are invalid.
pub fn parse_traceparent(v: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_byte(&v[..2])?;
    match version {
        0xff => return None,
        0 if v.len() != 55 => return None,
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    let mut trace_id = [0; 16];
    let mut parent = [0; 8];
    read_hex(&v[3..35], &mut trace_id)?;
    read_hex(&v[36..52], &mut parent)?;
    let flags = hex_byte(&v[53..55])?;
    if trace_id == [0; 16] || parent == [0; 8] {
        return None;
    }
    Some((trace_id, parent, flags))
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(two: &[u8]) -> Option<u8> {
    Some(hex_digit(two[0])? << 4 | hex_digit(two[1])?)
}

fn read_hex(text: &[u8], out: &mut [u8]) -> Option<()> {
    for (o, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *o = hex_byte(pair)?;
    }
    Some(())
}

fn write_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

/// Bytes as lowercase hex, for log fields (no allocation).
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// A random u64 from a per-thread wyrand generator seeded from the system's
/// random source: trace ids need to be unique, not secret, and a system call
/// per request would cost more than the rest of the telemetry.
fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new(seed());
    }
    STATE.with(|s| {
        let x = s.get().wrapping_add(0xa076_1d64_78bd_642f);
        s.set(x);
        let t = u128::from(x) * u128::from(x ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    })
}

fn seed() -> u64 {
    use ring::rand::SecureRandom as _;
    let mut b = [0; 8];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No system randomness: the clock still differs per thread and start.
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        return now.as_nanos() as u64 ^ (&b as *const _ as u64);
    }
    u64::from_le_bytes(b)
}

fn new_id() -> [u8; 8] {
    loop {
        let v = random();
        if v != 0 {
            return v.to_be_bytes();
        }
    }
}

fn new_trace_id() -> [u8; 16] {
    let mut id = [0; 16];
    id[..8].copy_from_slice(&random().to_be_bytes());
    id[8..].copy_from_slice(&new_id());
    id
}

/// How the waypoint traces: set once at start ([`configure`]).
#[derive(Debug, Default)]
pub struct Tracing {
    /// Whether a trace the waypoint starts (no valid `traceparent` came) is
    /// marked sampled.
    pub sample_new: bool,
    /// Where sampled spans go; none: spans are not built at all.
    pub exporter: Option<otlp::Exporter>,
}

static TRACING: OnceLock<Tracing> = OnceLock::new();

/// Sets how requests are traced (once; later calls are ignored).
pub fn configure(tracing: Tracing) {
    let _ = TRACING.set(tracing);
}

fn tracing_settings() -> &'static Tracing {
    static NONE: Tracing = Tracing {
        sample_new: false,
        exporter: None,
    };
    TRACING.get().unwrap_or(&NONE)
}

// ---------------------------------------------------------------------------
// A request's life

/// What is known of a request when it arrives.
#[derive(Debug)]
pub struct Started {
    pub at: Instant,
    pub method: Method,
    pub authority: String,
    pub path: String,
    /// `content-type: application/grpc...`: counted as `request_protocol="grpc"`
    /// with its `grpc-status`.
    pub grpc: bool,
    pub trace: Trace,
}

/// Notes a request's arrival, and makes the waypoint's span its
/// `traceparent` (the trace id kept, a new span id; `tracestate` untouched).
pub fn start<B>(_ctx: &Context, req: &mut Request<B>) -> Started {
    let trace = Trace::of(
        req.headers()
            .get_all(TRACEPARENT)
            .iter()
            .map(HeaderValue::as_bytes),
        tracing_settings().sample_new,
    );
    if let Ok(v) = HeaderValue::from_bytes(&trace.traceparent()) {
        req.headers_mut().insert(TRACEPARENT, v);
    }
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
    Started {
        at: Instant::now(),
        method: req.method().clone(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
        grpc,
        trace,
    }
}

const TRACEPARENT: &str = "traceparent";

/// Records a request whose response head is `response`: its body is wrapped
/// to count bytes and to write the metrics and the log line when it ends.
pub fn finish(
    started: Started,
    ctx: &Context,
    record: Record,
    response: Response<Body>,
) -> Response<Body> {
    let pair = METRICS.pair(ctx, &record);
    let status = response.status().as_u16();
    let grpc_status = if started.grpc {
        grpc_status(response.headers())
    } else {
        None
    };
    let exchange = Exchange {
        started,
        pair,
        source_ip: ctx.source_ip,
        route: record.route,
        upstream: record.upstream,
        retries: record.retries,
        flags: record.flags,
        request_bytes: record.request_bytes,
        status,
        grpc_status,
        response_bytes: 0,
    };
    response.map(|inner| {
        CountedResponse {
            inner,
            exchange: Some(exchange),
        }
        .boxed()
    })
}

/// A request between its response head and the end of its response body.
struct Exchange {
    started: Started,
    pair: Arc<Pair>,
    source_ip: IpAddr,
    route: Option<String>,
    upstream: Option<SocketAddr>,
    retries: u32,
    flags: &'static str,
    request_bytes: Option<Arc<AtomicU64>>,
    status: u16,
    /// From the head (a trailers-only response) or the trailers.
    grpc_status: Option<u32>,
    response_bytes: u64,
}

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Complete,
    /// The upstream failed mid-body.
    UpstreamReset,
    /// Dropped before its end: the client went away.
    ClientGone,
}

impl Exchange {
    fn end(self, how: Ending) {
        let duration = self.started.at.elapsed();
        let flags = match (how, self.flags) {
            (Ending::ClientGone, "" | "-") => "DC",
            (Ending::UpstreamReset, "" | "-") => "UC",
            (_, "") => "-",
            (_, f) => f,
        };
        let grpc_status = self.started.grpc.then(|| {
            self.grpc_status
                .unwrap_or_else(|| grpc_of_http(self.status))
        });
        let request_bytes = self.request_bytes.as_ref().map_or(0, |n| n.load(Relaxed));
        let outcome = Outcome {
            grpc: self.started.grpc,
            code: self.status,
            grpc_status,
            flags,
        };
        self.pair.record(
            outcome,
            duration.as_micros() as u64,
            request_bytes,
            self.response_bytes,
        );
        let trace = &self.started.trace;
        let pair = &self.pair;
        info!(
            target: ACCESS_LOG,
            method = %self.started.method,
            src.addr = %self.source_ip,
            src.workload = %WorkloadName(&pair.source),
            src.identity = pair.source.principal.as_deref(),
            dst.addr = self.upstream.map(display),
            dst.workload = %WorkloadName(&pair.destination),
            dst.identity = pair.destination.principal.as_deref(),
            service = pair.service_host.as_str(),
            route = self.route.as_deref(),
            authority = self.started.authority.as_str(),
            path = self.started.path.as_str(),
            protocol = if self.started.grpc { "grpc" } else { "http" },
            status = self.status,
            grpc_status,
            response_flags = flags,
            retries = self.retries,
            request_bytes,
            response_bytes = self.response_bytes,
            duration_ms = duration.as_secs_f64() * 1e3,
            trace_id = %Hex(&trace.trace_id),
            span_id = %Hex(&trace.span_id),
            parent_span_id = trace.parent.as_ref().map(|p| display(Hex(p))),
            "request"
        );
        if trace.sampled()
            && let Some(exporter) = &tracing_settings().exporter
        {
            let name = match &self.route {
                Some(r) => r.clone(),
                None => format!(
                    "{}{}",
                    self.started.authority,
                    self.started.path.split('?').next().unwrap_or("/")
                ),
            };
            let end = SystemTime::now();
            exporter.push(otlp::Span {
                trace_id: trace.trace_id,
                span_id: trace.span_id,
                parent: trace.parent,
                name,
                start: end.checked_sub(duration).unwrap_or(end),
                end,
                error: self.status >= 500 || flags != "-" || grpc_status.is_some_and(|s| s != 0),
                attributes: vec![
                    (
                        "http.request.method",
                        self.started.method.to_string().into(),
                    ),
                    ("url.path", self.started.path.clone().into()),
                    ("server.address", self.started.authority.clone().into()),
                    ("http.response.status_code", i64::from(self.status).into()),
                    ("weft.response_flags", flags.to_owned().into()),
                    (
                        "weft.upstream",
                        self.upstream
                            .map(|a| a.to_string())
                            .unwrap_or_default()
                            .into(),
                    ),
                    (
                        "weft.source",
                        pair.source.principal.clone().unwrap_or_default().into(),
                    ),
                    ("weft.destination_service", pair.service_host.clone().into()),
                ],
            });
        }
    }
}

/// `namespace/name` of a metrics peer, or `unknown`.
struct WorkloadName<'a>(&'a Peer);

impl fmt::Display for WorkloadName<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.0.namespace, &self.0.workload) {
            (Some(ns), Some(name)) => write!(f, "{ns}/{name}"),
            _ => f.write_str("unknown"),
        }
    }
}

/// A response body that counts its bytes and, at its end, records the
/// exchange (metrics, log line, span).
struct CountedResponse {
    inner: Body,
    /// Until recorded.
    exchange: Option<Exchange>,
}

impl CountedResponse {
    fn end(&mut self, how: Ending) {
        if let Some(e) = self.exchange.take() {
            e.end(how);
        }
    }
}

impl http_body::Body for CountedResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Cx<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(e) = this.exchange.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        e.response_bytes += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref()
                        && e.started.grpc
                    {
                        e.grpc_status = grpc_status(trailers).or(e.grpc_status);
                    }
                }
                // hyper stops polling a body that says it has ended (a known
                // length all read), so its end is noted here, not at `None`.
                if this.inner.is_end_stream() {
                    this.end(Ending::Complete);
                }
            }
            Poll::Ready(Some(Err(_))) => this.end(Ending::UpstreamReset),
            Poll::Ready(None) => this.end(Ending::Complete),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedResponse {
    fn drop(&mut self) {
        // An empty body (or one whose length was all sent) is never polled to
        // its end by hyper: that is an end, not a client gone.
        let how = if self.inner.is_end_stream() {
            Ending::Complete
        } else {
            Ending::ClientGone
        };
        self.end(how);
    }
}

/// A request body that counts its bytes.
struct CountedRequest {
    inner: Body,
    n: Arc<AtomicU64>,
}

impl http_body::Body for CountedRequest {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Cx<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.n.fetch_add(data.len() as u64, Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `grpc-status` of a head (trailers-only response) or trailers.
pub fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    let v = headers.get("grpc-status")?.to_str().ok()?;
    v.trim().parse().ok()
}

/// The gRPC status a response without `grpc-status` means (gRPC's "HTTP to
/// gRPC status code mapping"), as Envoy reports it.
fn grpc_of_http(status: u16) -> u32 {
    match status {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502..=504 => 14,
        _ => 2,
    }
}

// ---------------------------------------------------------------------------
// Metrics

/// Envoy's default histogram buckets, which Istio's request metrics use (in
/// milliseconds for durations, bytes for sizes), with the `le` text Envoy
/// writes, so a waypoint's series line up with sidecars' in one query.
const BUCKETS: [(f64, &str); 19] = [
    (0.5, "0.5"),
    (1.0, "1"),
    (5.0, "5"),
    (10.0, "10"),
    (25.0, "25"),
    (50.0, "50"),
    (100.0, "100"),
    (250.0, "250"),
    (500.0, "500"),
    (1000.0, "1000"),
    (2500.0, "2500"),
    (5000.0, "5000"),
    (10000.0, "10000"),
    (30000.0, "30000"),
    (60000.0, "60000"),
    (300000.0, "300000"),
    (600000.0, "600000"),
    (1800000.0, "1.8e+06"),
    (3600000.0, "3.6e+06"),
];

/// A histogram with [`BUCKETS`]: per-bucket counts (the last is `+Inf`),
/// made cumulative when rendered, and the sum in `unit`s of the metric.
#[derive(Debug, Default)]
struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum: AtomicU64,
}

impl Histogram {
    fn observe(&self, value: f64, sum: u64) {
        let i = BUCKETS.partition_point(|(b, _)| *b < value);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(sum, Relaxed);
    }

    /// `scale`: what one unit of the sum is in the metric's unit.
    fn render(&self, out: &mut String, name: &str, labels: &str, scale: f64) {
        let mut total = 0;
        for (i, count) in self.counts.iter().enumerate() {
            total += count.load(Relaxed);
            let le = BUCKETS.get(i).map_or("+Inf", |(_, le)| le);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {total}");
        }
        let sum = self.sum.load(Relaxed) as f64 * scale;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {total}");
    }
}

/// One end of a request as the metrics key it: borrowed (`S = &str`) to look
/// a pair up, owned (`Box<str>`) in the table. Both hash alike.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Side<S> {
    namespace: Option<S>,
    workload: Option<S>,
    app: Option<S>,
    version: Option<S>,
    /// Trust domain, namespace, service account.
    principal: Option<[S; 3]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PairKey<S> {
    source: Side<S>,
    destination: Side<S>,
    /// Namespace and name.
    service: [S; 2],
}

impl<S: AsRef<str>> Side<S> {
    fn map<'a, T>(&'a self, f: impl Fn(&'a str) -> T) -> Side<T> {
        Side {
            namespace: self.namespace.as_ref().map(|s| f(s.as_ref())),
            workload: self.workload.as_ref().map(|s| f(s.as_ref())),
            app: self.app.as_ref().map(|s| f(s.as_ref())),
            version: self.version.as_ref().map(|s| f(s.as_ref())),
            principal: self
                .principal
                .as_ref()
                .map(|p| p.each_ref().map(|s| f(s.as_ref()))),
        }
    }

    /// As the TCP metrics name a peer (the label writer is shared).
    fn peer(&self) -> Peer {
        let s = |v: &Option<S>| v.as_ref().map(|s| s.as_ref().to_owned());
        Peer {
            workload: s(&self.workload),
            namespace: s(&self.namespace),
            principal: self.principal.as_ref().map(|[td, ns, sa]| {
                format!(
                    "spiffe://{}/ns/{}/sa/{}",
                    td.as_ref(),
                    ns.as_ref(),
                    sa.as_ref()
                )
            }),
            app: s(&self.app),
            version: s(&self.version),
        }
    }
}

impl<S: AsRef<str>> PairKey<S> {
    fn map<'a, T>(&'a self, f: impl Fn(&'a str) -> T + Copy) -> PairKey<T> {
        PairKey {
            source: self.source.map(f),
            destination: self.destination.map(f),
            service: self.service.each_ref().map(|s| f(s.as_ref())),
        }
    }
}

/// A workload as a key side; `principal` only when it proves one.
fn side_of<'a>(w: &'a Workload, principal: Option<[&'a str; 3]>) -> Side<&'a str> {
    Side {
        namespace: Some(&w.namespace),
        workload: Some(&w.name),
        app: Some(stats::canonical_name(w)),
        version: Some(stats::canonical_revision(&w.labels)),
        principal,
    }
}

/// The source: the workload at the source address if its identity is the
/// one the source proved (an address alone is not trusted to name a
/// workload when an identity says otherwise), else what the identity says
/// (namespace and principal).
fn source_side<'a>(
    view: Option<&'a View>,
    peer: Option<&'a SpiffeId>,
    ip: IpAddr,
) -> Side<&'a str> {
    let principal = peer.map(|p| [p.trust_domain(), p.namespace(), p.service_account()]);
    let by_ip = view.and_then(|v| v.workload_by_address(ip)).filter(|w| {
        peer.is_none_or(|p| {
            p.namespace() == w.namespace && p.service_account() == w.service_account
        })
    });
    match by_ip {
        Some(w) => side_of(w, principal),
        None => Side {
            namespace: peer.map(|p| p.namespace()),
            principal,
            ..Side::default()
        },
    }
}

/// What a request's series is told apart by, beyond its pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    grpc: bool,
    code: u16,
    grpc_status: Option<u32>,
    flags: &'static str,
}

/// One series: the three histograms and the counter of one label set.
#[derive(Debug)]
struct Series {
    outcome: Outcome,
    /// The whole label text, without braces.
    labels: String,
    requests: AtomicU64,
    /// Microseconds.
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// Who talked to whom: the labels known when a response head is ready,
/// interned (see the module's doc), with the series of each outcome.
#[derive(Debug)]
struct Pair {
    key: PairKey<Box<str>>,
    source: Peer,
    destination: Peer,
    /// `name.namespace.svc.cluster.local`.
    service_host: String,
    /// The labels of both ends and the service, rendered once.
    labels: String,
    series: RwLock<Vec<Arc<Series>>>,
    /// When a request last ended, in seconds of [`stats::clock`].
    touched: AtomicU64,
}

impl Pair {
    fn record(&self, outcome: Outcome, micros: u64, request: u64, response: u64) {
        let series = self.series(outcome);
        series.requests.fetch_add(1, Relaxed);
        series.duration.observe(micros as f64 / 1e3, micros);
        series.request_bytes.observe(request as f64, request);
        series.response_bytes.observe(response as f64, response);
        self.touched.store(stats::clock(), Relaxed);
    }

    fn series(&self, outcome: Outcome) -> Arc<Series> {
        let found = |list: &[Arc<Series>]| list.iter().find(|s| s.outcome == outcome).cloned();
        if let Some(s) = found(&self.series.read().unwrap_or_else(|e| e.into_inner())) {
            return s;
        }
        let mut list = self.series.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = found(&list) {
            return s;
        }
        let mut labels = self.labels.clone();
        let _ = write!(
            labels,
            ",request_protocol=\"{}\",response_code=\"{}\",grpc_response_status=\"{}\",response_flags=\"{}\",connection_security_policy=\"{}\"",
            if outcome.grpc { "grpc" } else { "http" },
            outcome.code,
            outcome
                .grpc_status
                .map(|s| s.to_string())
                .unwrap_or_default(),
            label(outcome.flags),
            if self.source.principal.is_some() {
                "mutual_tls"
            } else {
                "unknown"
            },
        );
        let s = Arc::new(Series {
            outcome,
            labels,
            requests: AtomicU64::new(0),
            duration: Histogram::default(),
            request_bytes: Histogram::default(),
            response_bytes: Histogram::default(),
        });
        list.push(s.clone());
        s
    }
}

/// Every request series of this process.
pub struct Metrics {
    hasher: RandomState,
    /// By the hash of the pair's key; a collision shares a bucket.
    pairs: RwLock<HashMap<u64, Vec<Arc<Pair>>>>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        Metrics {
            hasher: RandomState::new(),
            pairs: RwLock::new(HashMap::new()),
        }
    }

    /// The pair of a request: found without allocating, made on first sight.
    fn pair(&self, ctx: &Context, record: &Record) -> Arc<Pair> {
        let view = record.view.as_deref();
        let trust_domain = view.map_or_else(
            || {
                ctx.peer
                    .as_ref()
                    .map_or("cluster.local", |p| p.trust_domain())
            },
            View::trust_domain,
        );
        let destination = record.endpoint().map_or_else(Side::default, |w| {
            let proves = w.enrolled || w.native_tunnel;
            side_of(
                w,
                proves.then_some([trust_domain, &w.namespace, &w.service_account]),
            )
        });
        let service = record.backend.as_ref().unwrap_or(&ctx.service);
        let key = PairKey {
            source: source_side(view, ctx.peer.as_ref(), ctx.source_ip),
            destination,
            service: [service.namespace.as_str(), service.name.as_str()],
        };
        let hash = self.hasher.hash_one(&key);
        let found = |map: &HashMap<u64, Vec<Arc<Pair>>>| {
            map.get(&hash)?
                .iter()
                .find(|p| p.key.map(|s| s) == key)
                .cloned()
        };
        if let Some(p) = found(&self.pairs.read().unwrap_or_else(|e| e.into_inner())) {
            return p;
        }
        let mut map = self.pairs.write().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = found(&map) {
            return p;
        }
        let (source, destination) = (key.source.peer(), key.destination.peer());
        let service = ServiceName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        };
        let mut labels = String::with_capacity(1024);
        stats::write_peers(
            &mut labels,
            "waypoint",
            &source,
            &destination,
            Some(&service),
        );
        let pair = Arc::new(Pair {
            key: key.map(Box::from),
            source,
            destination,
            service_host: format!("{}.{}.svc.cluster.local", service.name, service.namespace),
            labels,
            series: RwLock::new(Vec::new()),
            touched: AtomicU64::new(stats::clock()),
        });
        map.entry(hash).or_default().push(pair.clone());
        pair
    }

    fn render(&self, out: &mut String) {
        let mut pairs: Vec<Arc<Pair>> = self
            .pairs
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .flatten()
            .cloned()
            .collect();
        pairs.sort_by(|a, b| a.labels.cmp(&b.labels));
        let series: Vec<Arc<Series>> = pairs
            .iter()
            .flat_map(|p| p.series.read().unwrap_or_else(|e| e.into_inner()).clone())
            .collect();
        let name = "istio_requests_total";
        let _ = writeln!(
            out,
            "# HELP {name} Total number of requests\n# TYPE {name} counter"
        );
        for s in &series {
            let _ = writeln!(out, "{name}{{{}}} {}", s.labels, s.requests.load(Relaxed));
        }
        type Pick = fn(&Series) -> &Histogram;
        for (name, help, pick, scale) in [
            (
                "istio_request_duration_milliseconds",
                "Duration of requests, from the request's arrival to the end of its response",
                (|s: &Series| &s.duration) as Pick,
                1e-3,
            ),
            (
                "istio_request_bytes",
                "Sizes of request bodies",
                |s| &s.request_bytes,
                1.0,
            ),
            (
                "istio_response_bytes",
                "Sizes of response bodies",
                |s| &s.response_bytes,
                1.0,
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for s in &series {
                pick(s).render(out, name, &s.labels, scale);
            }
        }
    }

    fn prune_at(&self, present: Present<'_>, quiet: u64, now: u64) -> usize {
        let departed = |p: &Peer| match (&p.namespace, &p.workload) {
            (Some(ns), Some(name)) => !present(ns, name),
            _ => false,
        };
        let mut pruned = 0;
        let mut map = self.pairs.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, pairs| {
            pairs.retain(|p| {
                // A request in flight holds its pair: keep it until it ends.
                let idle = Arc::strong_count(p) == 1 && p.touched.load(Relaxed) + quiet <= now;
                let keep = !(idle && (departed(&p.source) || departed(&p.destination)));
                if !keep {
                    pruned += p.series.read().unwrap_or_else(|e| e.into_inner()).len();
                }
                keep
            });
            !pairs.is_empty()
        });
        pruned
    }
}

/// Drops the series of workloads that have left the model once they have
/// been quiet for `quiet` seconds (scrapes saw their last values), as the
/// agent's TCP series are (`Stats::prune`): without it, every pod that ever
/// sent or served a request would keep its series. Returns how many went.
pub fn prune(present: Present<'_>, quiet: u64) -> usize {
    METRICS.prune_at(present, quiet, stats::clock())
}

/// The metrics page: the request metrics, and what the waypoint dropped.
pub fn render() -> String {
    let mut out = String::with_capacity(16 << 10);
    METRICS.render(&mut out);
    let (exported, dropped) = otlp::counts(tracing_settings().exporter.as_ref());
    let _ = writeln!(
        out,
        "# HELP weft_spans_exported_total Spans sent to the OpenTelemetry collector.\n\
         # TYPE weft_spans_exported_total counter\n\
         weft_spans_exported_total {exported}\n\
         # HELP weft_spans_dropped_total Spans dropped: the export queue was full or the collector failed.\n\
         # TYPE weft_spans_dropped_total counter\n\
         weft_spans_dropped_total {dropped}\n\
         # HELP weft_log_lines_dropped_total Log lines dropped because stdout did not take them (8 MiB were waiting).\n\
         # TYPE weft_log_lines_dropped_total counter\n\
         weft_log_lines_dropped_total {}",
        crate::telemetry::dropped_lines()
    );
    out
}

#[cfg(test)]
mod tests {
    use std::{
        net::Ipv4Addr,
        task::{Context as Cx, Poll, Waker},
    };

    use http::StatusCode;
    use http_body_util::BodyExt as _;

    use super::*;
    use crate::{
        model::{Endpoints, Mesh, ServicePort},
        view::Balancers,
    };

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn traceparent_is_read_as_the_w3c_spec_says() {
        let trace = [
            0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
            0x47, 0x36,
        ];
        let parent = [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7];
        assert_eq!(parse_traceparent(TP.as_bytes()), Some((trace, parent, 1)));
        for (bad, why) in [
            (
                "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
                "uppercase",
            ),
            (
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "version ff",
            ),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "zero trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "zero parent id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
                "00 with more",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
                "short trace id",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
                "flags not hex",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separator",
            ),
            (
                "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
                "no dash after",
            ),
            ("", "empty"),
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{why}: {bad}");
        }
        // A later version is read by its 00 fields, whatever follows a dash.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03-what-ever";
        assert_eq!(
            parse_traceparent(later.as_bytes()),
            Some((trace, parent, 3))
        );
    }

    fn ctx(service: &str) -> Context {
        let port = ServicePort {
            port: 80,
            target_port: 8080,
            app_protocol: None,
        };
        Context::new(
            Some(SpiffeId::new("cluster.local", "default", "client").unwrap()),
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            Arc::new(Service {
                name: service.into(),
                namespace: "shop".into(),
                addresses: vec![],
                ports: vec![port.clone()],
                endpoints: Endpoints::Listed(vec![]),
                load_balancing: Default::default(),
                outlier_detection: Default::default(),
                waypoint: None,
            }),
            port,
        )
    }

    #[test]
    fn start_propagates_the_trace_with_the_waypoints_span() {
        let ctx = ctx("trace");
        let mut req = Request::get("http://x/")
            .header(TRACEPARENT, TP)
            .body(())
            .unwrap();
        req.headers_mut()
            .insert("tracestate", HeaderValue::from_static("k=v"));
        let started = start(&ctx, &mut req);
        let sent = req.headers()[TRACEPARENT].to_str().unwrap().to_owned();
        assert_eq!(&sent[..36], &TP[..36], "same version and trace id");
        assert_ne!(&sent[36..52], &TP[36..52], "a new span id");
        assert_eq!(&sent[52..], "-01", "the caller's sampling kept");
        assert_eq!(sent[36..52], Hex(&started.trace.span_id).to_string());
        assert_eq!(
            started.trace.parent.map(|p| Hex(&p).to_string()).as_deref(),
            Some(&TP[36..52])
        );
        assert_eq!(req.headers()["tracestate"], "k=v");

        // No (or an invalid, or a doubled) traceparent: a new trace, not sampled
        // unless configured.
        for values in [vec![], vec!["garbage"], vec![TP, TP]] {
            let mut req = Request::get("http://x/").body(()).unwrap();
            for v in &values {
                req.headers_mut()
                    .append(TRACEPARENT, HeaderValue::from_str(v).unwrap());
            }
            let started = start(&ctx, &mut req);
            let sent = req.headers()[TRACEPARENT].to_str().unwrap().to_owned();
            let (trace, parent, flags) = parse_traceparent(sent.as_bytes()).unwrap();
            assert_eq!(trace, started.trace.trace_id);
            assert_ne!(Hex(&trace).to_string(), TP[3..35]);
            assert_eq!(parent, started.trace.span_id);
            assert_eq!((started.trace.parent, flags), (None, 0), "{values:?}");
        }
    }

    #[test]
    fn histograms_render_cumulative_buckets_in_envoys_le_text() {
        let h = Histogram::default();
        for (ms, us) in [(0.2, 200), (0.5, 500), (3.0, 3000), (4e6, 4_000_000_000)] {
            h.observe(ms, us);
        }
        let mut out = String::new();
        h.render(&mut out, "m", "a=\"b\"", 1e-3);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines[0], "m_bucket{a=\"b\",le=\"0.5\"} 2",
            "le is inclusive"
        );
        assert_eq!(lines[1], "m_bucket{a=\"b\",le=\"1\"} 2");
        assert_eq!(lines[2], "m_bucket{a=\"b\",le=\"5\"} 3");
        assert_eq!(lines[18], "m_bucket{a=\"b\",le=\"3.6e+06\"} 3");
        assert_eq!(lines[19], "m_bucket{a=\"b\",le=\"+Inf\"} 4");
        assert_eq!(lines[20], "m_sum{a=\"b\"} 4000003.7");
        assert_eq!(lines[21], "m_count{a=\"b\"} 4");
    }

    #[test]
    fn borrowed_and_owned_keys_hash_alike() {
        let borrowed = PairKey {
            source: Side {
                namespace: Some("ns"),
                workload: None,
                app: Some("a"),
                version: None,
                principal: Some(["td", "ns", "sa"]),
            },
            destination: Side::default(),
            service: ["ns", "svc"],
        };
        let owned: PairKey<Box<str>> = borrowed.map(Box::from);
        let h = RandomState::new();
        assert_eq!(h.hash_one(&borrowed), h.hash_one(&owned));
        assert_eq!(owned.map(|s| s), borrowed);
    }

    /// A view with the client at 10.0.0.1 and two servers, one with a label
    /// value that needs escaping.
    fn view() -> Arc<View> {
        let w = |name: &str, ip: [u8; 4], labels: &[(&str, &str)]| Workload {
            name: name.into(),
            namespace: if name == "client" { "default" } else { "shop" }.into(),
            service_account: name.into(),
            node: "n".into(),
            addresses: vec![IpAddr::from(ip)],
            enrolled: true,
            outside_mesh: Default::default(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            native_tunnel: false,
        };
        let mesh = Mesh {
            workloads: vec![
                w("client", [10, 0, 0, 1], &[("app", "client")]),
                w(
                    "server-v1",
                    [10, 0, 1, 1],
                    &[("app", "web"), ("version", "v1")],
                ),
                w("odd", [10, 0, 1, 2], &[("app", "we\"ird\\")]),
            ]
            .into_iter()
            .map(Arc::new)
            .collect(),
            ..Default::default()
        };
        Arc::new(View::new(mesh, "n", &Balancers::default()))
    }

    fn record(view: &Arc<View>, endpoint: &str) -> Record {
        Record {
            endpoint: view
                .workloads()
                .find(|w| w.name == endpoint)
                .map(|w| view.workload_arc(&w.key()).unwrap()),
            upstream: Some("10.0.1.1:8080".parse().unwrap()),
            view: Some(view.clone()),
            ..Record::default()
        }
    }

    /// The lines of `name` whose labels name service `svc`.
    fn lines(name: &str, svc: &str) -> Vec<String> {
        render()
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{name}{{"))
                    && l.contains(&format!("destination_service_name=\"{svc}\""))
            })
            .map(str::to_owned)
            .collect()
    }

    type Polled = Poll<Option<Result<Frame<Bytes>, BoxError>>>;

    fn poll(body: &mut Body) -> Polled {
        Pin::new(body).poll_frame(&mut Cx::from_waker(Waker::noop()))
    }

    fn drain(body: &mut Body) {
        while let Poll::Ready(Some(_)) = poll(body) {}
    }

    /// A body of `chunks`, then `trailers`, that does not know its length.
    fn streamed(chunks: &[&'static str], trailers: Option<HeaderMap>) -> Body {
        let mut frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        frames.extend(trailers.map(|t| Ok(Frame::trailers(t))));
        Iter(frames.into_iter()).boxed()
    }

    /// A ready stream of frames (no futures crate here).
    struct Iter(std::vec::IntoIter<Result<Frame<Bytes>, BoxError>>);

    impl http_body::Body for Iter {
        type Data = Bytes;
        type Error = BoxError;
        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Cx<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            Poll::Ready(self.0.next())
        }
    }

    #[test]
    fn a_request_is_counted_with_its_bytes_when_its_response_body_ends() {
        let (ctx, view) = (ctx("counted"), view());
        let mut req = Request::get("http://web/a").body(()).unwrap();
        let started = start(&ctx, &mut req);
        let mut rec = record(&view, "server-v1");
        rec.route = Some("shop/web".into());
        let mut request = rec.count_request(streamed(&["abc", "de"], None));
        drain(&mut request);
        let response = Response::new(streamed(&["hello", " world"], None));
        let mut body = finish(started, &ctx, rec, response).into_body();
        assert!(
            lines("istio_requests_total", "counted").is_empty(),
            "not before the end"
        );
        assert!(matches!(poll(&mut body), Poll::Ready(Some(Ok(_)))));
        assert!(lines("istio_requests_total", "counted").is_empty());
        drain(&mut body);
        let total = lines("istio_requests_total", "counted");
        assert_eq!(total.len(), 1, "{total:?}");
        for want in [
            "reporter=\"waypoint\"",
            "source_workload=\"client\"",
            "source_workload_namespace=\"default\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/client\"",
            "source_app=\"client\"",
            "destination_workload=\"server-v1\"",
            "destination_workload_namespace=\"shop\"",
            "destination_principal=\"spiffe://cluster.local/ns/shop/sa/server-v1\"",
            "destination_app=\"web\"",
            "destination_version=\"v1\"",
            "destination_service=\"counted.shop.svc.cluster.local\"",
            "destination_service_namespace=\"shop\"",
            "request_protocol=\"http\"",
            "response_code=\"200\"",
            "grpc_response_status=\"\"",
            "response_flags=\"-\"",
            "connection_security_policy=\"mutual_tls\"",
        ] {
            assert!(total[0].contains(want), "{want} not in {}", total[0]);
        }
        assert!(total[0].ends_with(" 1"));
        let bytes = |name: &str| {
            lines(&format!("{name}_sum"), "counted")
                .first()
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(bytes("istio_request_bytes").as_deref(), Some("5"));
        assert_eq!(bytes("istio_response_bytes").as_deref(), Some("11"));
        assert_eq!(
            lines("istio_request_duration_milliseconds_count", "counted").len(),
            1
        );
    }

    #[test]
    fn a_response_body_dropped_unfinished_is_flagged_dc_and_a_known_length_is_an_end() {
        let (ctx, view) = (ctx("dropped"), view());
        // The client goes away mid-body.
        let started = start(&ctx, &mut Request::new(()));
        let response = Response::new(streamed(&["part", "rest"], None));
        let mut body = finish(started, &ctx, record(&view, "server-v1"), response).into_body();
        let _ = poll(&mut body);
        drop(body);
        // A known length, all sent: hyper never polls for the end.
        let started = start(&ctx, &mut Request::new(()));
        let response = Response::new(super::super::upstream::full("whole"));
        let mut body = finish(started, &ctx, record(&view, "server-v1"), response).into_body();
        let _ = poll(&mut body);
        drop(body);
        // An empty body, never polled.
        let started = start(&ctx, &mut Request::new(()));
        let mut response = Response::new(super::super::upstream::full(""));
        *response.status_mut() = StatusCode::NO_CONTENT;
        drop(finish(started, &ctx, record(&view, "server-v1"), response));
        let total = lines("istio_requests_total", "dropped");
        let count = |code: &str, flags: &str| {
            total
                .iter()
                .find(|l| {
                    l.contains(&format!("response_code=\"{code}\""))
                        && l.contains(&format!("response_flags=\"{flags}\""))
                })
                .map(|l| l.rsplit(' ').next().unwrap().to_owned())
        };
        assert_eq!(count("200", "DC").as_deref(), Some("1"), "{total:#?}");
        assert_eq!(count("200", "-").as_deref(), Some("1"), "{total:#?}");
        assert_eq!(count("204", "-").as_deref(), Some("1"), "{total:#?}");
    }

    fn grpc_request() -> Request<()> {
        Request::post("http://web/pkg.Svc/Call")
            .header(header::CONTENT_TYPE, "application/grpc")
            .body(())
            .unwrap()
    }

    #[test]
    fn grpc_status_comes_from_the_trailers_or_a_trailers_only_head() {
        let (ctx, view) = (ctx("grpc"), view());
        // In trailers.
        let started = start(&ctx, &mut grpc_request());
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("5"));
        let response = Response::new(streamed(&["msg"], Some(trailers)));
        let mut body = finish(started, &ctx, record(&view, "server-v1"), response).into_body();
        drain(&mut body);
        // Trailers-only: in the head, with an empty body.
        let started = start(&ctx, &mut grpc_request());
        let mut response = Response::new(super::super::upstream::full(""));
        response
            .headers_mut()
            .insert("grpc-status", HeaderValue::from_static("14"));
        drop(finish(started, &ctx, record(&view, "server-v1"), response));
        // None at all (the upstream failed): from the HTTP status.
        let started = start(&ctx, &mut grpc_request());
        let mut response = Response::new(super::super::upstream::full(""));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        drop(finish(started, &ctx, record(&view, "server-v1"), response));
        let total = lines("istio_requests_total", "grpc");
        for status in ["5", "14"] {
            assert_eq!(
                total
                    .iter()
                    .filter(
                        |l| l.contains(&format!("grpc_response_status=\"{status}\""))
                            && l.contains("request_protocol=\"grpc\"")
                    )
                    .count(),
                if status == "14" { 2 } else { 1 },
                "{status}: {total:#?}"
            );
        }
        assert_eq!(grpc_status(&HeaderMap::new()), None);
    }

    #[test]
    fn label_values_are_escaped_and_departed_workloads_pruned() {
        let (ctx, view) = (ctx("escaped"), view());
        let started = start(&ctx, &mut Request::new(()));
        let response = Response::new(super::super::upstream::full(""));
        drop(finish(started, &ctx, record(&view, "odd"), response));
        let total = lines("istio_requests_total", "escaped");
        assert!(
            total[0].contains(r#"destination_app="we\"ird\\""#),
            "{total:?}"
        );
        // An unknown source address: the identity names the namespace.
        let other = Context::new(
            ctx.peer.clone(),
            IpAddr::from([10, 9, 9, 9]),
            ctx.service.clone(),
            ctx.port.clone(),
        );
        let started = start(&other, &mut Request::new(()));
        drop(finish(
            started,
            &other,
            record(&view, "odd"),
            Response::new(super::super::upstream::full("")),
        ));
        let total = lines("istio_requests_total", "escaped");
        assert!(
            total
                .iter()
                .any(|l| l.contains("source_workload=\"unknown\"")
                    && l.contains("source_workload_namespace=\"default\"")),
            "{total:#?}"
        );
        // "odd" leaves the model; its series go once quiet, the rest stay.
        let present = |_: &str, name: &str| name != "odd";
        let now = stats::clock();
        assert_eq!(METRICS.prune_at(&present, 300, now), 0, "not quiet yet");
        assert!(METRICS.prune_at(&present, 300, now + 300) >= 2);
        assert!(lines("istio_requests_total", "escaped").is_empty());
    }
}
