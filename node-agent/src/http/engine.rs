//! The L7 engine: a request, what is known of its source, and the service it
//! was sent to, in; a response out. It knows nothing of how the request
//! arrived (an HBONE stream at the waypoint, TLS at the edge gateway later).
//!
//! Phases, in order: route match → request filters → backend (weighted) →
//! endpoint (the backend service's balancer, per request) → upstream with
//! timeouts and retries → response filters → telemetry.

use std::{
    net::IpAddr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{
    Body,
    telemetry::{self, Record},
    upstream::{self, Endpoint, Protocol, Upstreams, full},
};
use crate::{
    identity::SpiffeId,
    model::{AppProtocol, Service, ServiceKey, ServicePort, WorkloadKey},
    view::View,
};

/// What the front knows of a request's source and destination.
pub struct Context {
    /// The identity the source proved (mutual TLS), if any.
    pub peer: Option<SpiffeId>,
    /// The original client's address.
    pub source_ip: IpAddr,
    /// The service and port the client connected to.
    pub service: Arc<Service>,
    pub port: ServicePort,
}

/// The engine's compiled configuration: the mesh view (services, their
/// balancers, workloads). Swapped whole on a model change.
pub struct Config {
    pub view: Arc<View>,
}

pub struct Engine {
    config: RwLock<Arc<Config>>,
    upstreams: Upstreams,
    /// Per attempt, when the route sets none.
    default_timeout: Duration,
}

impl Engine {
    pub fn new(config: Config, upstreams: Upstreams, default_timeout: Duration) -> Self {
        Engine {
            config: RwLock::new(Arc::new(config)),
            upstreams,
            default_timeout,
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_config(&self, config: Config) {
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// A byte stream to an endpoint of the context's service, for a stream
    /// that is not HTTP; `None` when none can be reached (logged).
    pub async fn connect_tcp(&self, ctx: &Context) -> Option<upstream::Conn> {
        let config = self.config();
        let (_, balancer) = config.view.service(&ctx.service.key())?.clone();
        let mut tried = Vec::new();
        while let Some(pick) = balancer.pick(ctx.source_ip, &tried, Instant::now()) {
            tried.push(pick.key.clone());
            let Some(ep) = endpoint(&config.view, &pick.key, ctx.port.target_port, ctx.source_ip)
            else {
                continue;
            };
            match self.upstreams.connect(&ep).await {
                Ok(conn) => {
                    balancer.report(&pick.key, true, Instant::now());
                    return Some(conn);
                }
                Err(e) => {
                    if e.blames_endpoint() {
                        balancer.report(&pick.key, false, Instant::now());
                    }
                    debug!(endpoint = %pick.key, error = %e, "TCP upstream connect failed");
                }
            }
        }
        warn!(service = %ctx.service.name, "no endpoint could take a TCP stream");
        None
    }

    /// Serves one request to its end (the response's head; its body streams),
    /// with its telemetry: the trace context, the metrics and the access-log
    /// line (written when the response body ends).
    pub async fn handle(&self, ctx: &Context, mut req: Request<Incoming>) -> Response<Body> {
        let info = telemetry::start(ctx, &mut req);
        let mut record = Record::default();
        let response = self.serve(ctx, req, &mut record).await;
        telemetry::finish(info, ctx, record, response)
    }

    async fn serve(
        &self,
        ctx: &Context,
        mut req: Request<Incoming>,
        record: &mut Record,
    ) -> Response<Body> {
        let config = self.config();
        let downstream_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (parts, body) = req.into_parts();
        let backend = (ctx.service.key(), ctx.port.port);
        let Some((svc, balancer)) = config.view.service(&backend.0).cloned() else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "backend service is gone");
        };
        let Some(port) = svc.ports.iter().find(|p| p.port == backend.1).cloned() else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "backend port is gone");
        };
        let proto = match port.protocol() {
            AppProtocol::H2c => Protocol::H2c,
            AppProtocol::Http1 => Protocol::Http1,
            // The client's: HTTP/2 prior knowledge stays HTTP/2 (gRPC).
            _ if parts.version == Version::HTTP_2 => Protocol::H2c,
            _ => Protocol::Http1,
        };
        // An upgrade (WebSocket) is an HTTP/1.1 affair, whatever the port says.
        let proto = if downstream_upgrade.is_some() {
            Protocol::Http1
        } else {
            proto
        };
        record.backend = Some(svc.clone());
        let Some(pick) = balancer.pick(ctx.source_ip, &[], Instant::now()) else {
            record.flags = "UH";
            return error(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        let Some(ep) = endpoint(&config.view, &pick.key, port.target_port, ctx.source_ip) else {
            record.flags = "UH";
            return error(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream");
        };
        record.endpoint = config.view.workload(&pick.key).cloned();
        record.upstream = Some(ep.addr);
        let mut up = Request::from_parts(parts, body_of(body));
        prepare(&mut up, proto, ctx, downstream_upgrade.is_some());
        let sent = tokio::time::timeout(self.default_timeout, self.upstreams.send(&ep, proto, up));
        let response = match sent.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                if e.blames_endpoint()
                    && let Some(ej) = balancer.report(&pick.key, false, Instant::now())
                {
                    warn!(endpoint = %pick.key, ejected_for_ms = ej.duration.as_millis() as u64, "endpoint ejected");
                }
                debug!(error = %e, "upstream request failed");
                record.flags = if e.before_request() { "UF" } else { "UC" };
                return upstream_error(&e);
            }
            Err(_) => {
                record.flags = "UT";
                return error(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout");
            }
        };
        let ok = !response.status().is_server_error();
        balancer.report(&pick.key, ok, Instant::now());
        let (mut head, body) = response.into_parts();
        if head.status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(down) = downstream_upgrade
        {
            let up = hyper::upgrade::on(Response::from_parts(head.clone(), ()));
            tokio::spawn(splice(down, up));
            strip_hop_by_hop(&mut head.headers, true);
            return Response::from_parts(head, full(bytes::Bytes::new()));
        }
        strip_hop_by_hop(&mut head.headers, false);
        drop(pick);
        Response::from_parts(head, body_of(body))
    }
}

/// Whether `req` asks to switch protocols (HTTP/1.1 `Upgrade`).
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// Copies both ways between the upgraded client and server connections.
async fn splice(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (down.await, up.await) else {
        return;
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
}

/// The endpoint's application address and how it is reached.
fn endpoint(view: &View, key: &WorkloadKey, port: u16, like: IpAddr) -> Option<Endpoint> {
    let w = view.workload(key)?;
    let ip = w
        .addresses
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or_else(|| w.addresses.first().copied())?;
    let identity = if w.enrolled || w.native_tunnel {
        Some(w.identity(view.trust_domain()).ok()?)
    } else {
        None
    };
    Some(Endpoint {
        addr: std::net::SocketAddr::new(ip, port),
        identity,
    })
}

/// Headers that describe one hop's connection, not the message (RFC 9110
/// 7.6.1): never forwarded. An upgrade keeps `connection: upgrade` and
/// `upgrade`, which the next hop needs.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<_> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| header::HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(upgrade && *n == header::UPGRADE))
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
    ] {
        headers.remove(n);
    }
    headers.remove(header::TRANSFER_ENCODING);
    if !upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // `te: trailers` is the one value that may pass (gRPC asks for it).
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Makes a downstream request fit to send upstream: hop-by-hop headers off,
/// the URI in the form the upstream protocol wants, and the source named in
/// `forwarded`.
fn prepare(req: &mut Request<Body>, proto: Protocol, ctx: &Context, upgrade: bool) {
    strip_hop_by_hop(req.headers_mut(), upgrade);
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    match proto {
        Protocol::H2c => {
            *req.version_mut() = Version::HTTP_2;
            let authority = host.unwrap_or_else(|| ctx.service.name.clone());
            if let Ok(uri) = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path)
                .build()
            {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
        }
        Protocol::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if let Some(h) = host
                && let Ok(v) = HeaderValue::try_from(h)
            {
                req.headers_mut().insert(header::HOST, v);
            }
            if let Ok(uri) = path.parse() {
                *req.uri_mut() = uri;
            }
        }
    }
    let value = match ctx.source_ip {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    if let Ok(v) = HeaderValue::try_from(value) {
        req.headers_mut().append("forwarded", v);
    }
}

/// The streaming body of a request or response, boxed as the engine's body.
fn body_of(body: Incoming) -> Body {
    use http_body_util::BodyExt as _;
    body.map_err(|e| Box::new(e) as super::BoxError).boxed()
}

/// A response the engine makes itself, with the reason in the body.
pub fn error(status: StatusCode, reason: &'static str) -> Response<Body> {
    let mut r = Response::new(full(reason));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r
}

fn upstream_error(e: &upstream::Error) -> Response<Body> {
    match e {
        upstream::Error::Timeout { .. } => {
            error(StatusCode::SERVICE_UNAVAILABLE, "upstream connect timeout")
        }
        upstream::Error::Request { .. } => error(StatusCode::BAD_GATEWAY, "upstream reset"),
        upstream::Error::Hbone { source, .. } if source.is_denied() => {
            error(StatusCode::FORBIDDEN, "denied by the endpoint's policy")
        }
        _ => error(StatusCode::SERVICE_UNAVAILABLE, "upstream connect error"),
    }
}

/// Which service and port a request goes to when no route says otherwise.
pub fn default_backend(svc: &Service, port: &ServicePort) -> (ServiceKey, u16) {
    (svc.key(), port.port)
}
