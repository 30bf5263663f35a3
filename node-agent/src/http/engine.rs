//! The L7 engine: a request, what is known of its source, and the service it
//! was sent to, in; a response out. It knows nothing of how the request
//! arrived (an HBONE stream at the waypoint, TLS at the edge gateway later).
//!
//! Phases, in order: route match → request filters → backend (weighted) →
//! endpoint (the backend service's balancer, per request) → upstream with
//! timeouts and retries → response filters → telemetry.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU32, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use http_body::Body as _;
use http_body_util::{BodyExt as _, Limited};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, Version, header};
use hyper::body::Incoming;
use tracing::{debug, warn};

use super::{
    Body, authz, jwt, ratelimit,
    route::{Backend, RouteTable, Selection},
    telemetry::{self, Record},
    upstream::{self, Endpoint, Protocol, Upstreams, full},
};
use crate::{
    identity::SpiffeId,
    model::{AppProtocol, Service, ServiceKey, ServicePort},
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
    /// Where its requests go when no route says otherwise (the service
    /// itself), made once per connection rather than per request.
    pub default_backend: Backend,
}

impl Context {
    pub fn new(
        peer: Option<SpiffeId>,
        source_ip: IpAddr,
        service: Arc<Service>,
        port: ServicePort,
    ) -> Context {
        let default_backend = Backend {
            service: service.key(),
            port: port.port,
            weight: 1,
            request_filters: Vec::new(),
            response_filters: Vec::new(),
            valid: Ok(()),
        };
        Context {
            peer,
            source_ip,
            service,
            port,
            default_backend,
        }
    }
}

/// The engine's compiled configuration: the mesh view (services, their
/// balancers, workloads) and what is compiled from it. Swapped whole on a
/// model change; a change of workloads alone keeps the compiled parts
/// ([`Config::with_view`]).
pub struct Config {
    pub view: Arc<View>,
    /// Each bound service's routes, by port (a map of maps, so a request
    /// looks its table up by reference, with no key to build).
    pub routes: Arc<HashMap<ServiceKey, HashMap<u16, RouteTable>>>,
    /// Each bound service's JWT rules (its request authentications), if any.
    pub authn: Arc<HashMap<ServiceKey, Arc<jwt::Policy>>>,
    /// The authorization policies attached to waypoints.
    pub authz: Arc<authz::Authz>,
    /// The rate limits (their buckets live in the engine, across configs).
    pub ratelimit: Arc<ratelimit::Policies>,
}

impl Config {
    /// Compiles the routes and policies of every service bound to a
    /// waypoint; `jwks` keeps the JWKS URLs' keys across configs.
    pub fn new(view: Arc<View>, jwks: &jwt::Jwks) -> Config {
        let mesh = view.config();
        let mut routes = HashMap::new();
        let mut authn = HashMap::new();
        for svc in mesh.services.iter() {
            let Some(waypoint) = view.waypoint_of(svc).map(|(w, _)| w.key()) else {
                continue;
            };
            if let Some(policy) = jwt::Policy::compile(mesh, svc, Some(&waypoint), jwks) {
                authn.insert(svc.key(), policy);
            }
            for p in &svc.ports {
                let table = RouteTable::compile(mesh, svc, p.port);
                for note in &table.notes {
                    warn!(service = %format!("{}/{}", svc.namespace, svc.name), port = p.port, note = %note, "route left out");
                }
                if !table.is_empty() {
                    routes
                        .entry(svc.key())
                        .or_insert_with(HashMap::new)
                        .insert(p.port, table);
                }
            }
        }
        let authz = authz::Authz::new(mesh);
        let ratelimit = ratelimit::Policies::new(&view);
        Config {
            view,
            routes: Arc::new(routes),
            authn: Arc::new(authn),
            authz: Arc::new(authz),
            ratelimit: Arc::new(ratelimit),
        }
    }

    /// This config on `view`, which differs from its own only in workloads
    /// (routes, policies and limits name services, never workloads): what is
    /// compiled is shared, not compiled again.
    /// The one exception: limits divided among a waypoint's replicas are
    /// made again when their number changed.
    pub fn with_view(&self, view: Arc<View>) -> Config {
        let ratelimit = if self.ratelimit.hold_for(&view) {
            self.ratelimit.clone()
        } else {
            Arc::new(ratelimit::Policies::new(&view))
        };
        Config {
            routes: self.routes.clone(),
            authn: self.authn.clone(),
            authz: self.authz.clone(),
            ratelimit,
            view,
        }
    }
}

pub struct Engine {
    config: RwLock<Arc<Config>>,
    upstreams: Arc<Upstreams>,
    budgets: Mutex<HashMap<ServiceKey, Arc<Budget>>>,
    /// Per attempt, when the route sets none.
    default_timeout: Duration,
    settings: authz::Settings,
    limiter: ratelimit::Limiter,
}

impl Engine {
    pub fn new(config: Config, upstreams: Upstreams, default_timeout: Duration) -> Self {
        Engine {
            config: RwLock::new(Arc::new(config)),
            upstreams: Arc::new(upstreams),
            budgets: Mutex::new(HashMap::new()),
            default_timeout,
            settings: authz::Settings::default(),
            limiter: ratelimit::Limiter::default(),
        }
    }

    /// Global rate limits ask the Redis server at `addr` (`host:port`).
    pub fn with_redis(mut self, addr: Option<String>) -> Self {
        self.limiter = ratelimit::Limiter::new(addr);
        self
    }

    /// With these policy settings (the front's: trusted `X-Forwarded-For`
    /// hops, path normalization).
    pub fn with_settings(mut self, settings: authz::Settings) -> Self {
        self.settings = settings;
        self
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
        let (_, balancer) = config.view.service(&ctx.default_backend.service)?.clone();
        let mut tried = Vec::new();
        while let Some(pick) = balancer.pick(ctx.source_ip, &tried, Instant::now()) {
            tried.push(pick.workload.clone());
            let Some(ep) = endpoint(
                &config.view,
                &pick.workload,
                ctx.port.target_port,
                ctx.source_ip,
            ) else {
                continue;
            };
            if let Some(why) = denied(&config.view, ctx, &pick.workload, ctx.port.target_port) {
                debug!(endpoint = %pick.workload.key(), reason = %why, "TCP stream denied by the endpoint's L4 policy");
                continue;
            }
            match self.upstreams.connect(&ep).await {
                Ok(conn) => {
                    balancer.report(&pick.workload, true, Instant::now());
                    return Some(conn);
                }
                Err(e) => {
                    if e.blames_endpoint() {
                        balancer.report(&pick.workload, false, Instant::now());
                    }
                    debug!(endpoint = %pick.workload.key(), error = %e, "TCP upstream connect failed");
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
        let head = req.method() == http::Method::HEAD;
        let mut response = self.serve(ctx, req, &mut record).await;
        for (name, value) in std::mem::take(&mut record.rate_limit_headers) {
            if !response.headers().contains_key(&name) {
                response.headers_mut().insert(name, value);
            }
        }
        if head {
            // A response to HEAD has no content (RFC 9110 9.3.2). hyper's
            // HTTP/1.1 server leaves it out, its HTTP/2 server sends the body
            // it is given: the engine's own answers (404, 5xx) have one, and
            // the client resets the stream. The headers stay as they are.
            *response.body_mut() = full(bytes::Bytes::new());
        }
        telemetry::finish(info, ctx, record, response)
    }

    async fn serve(
        &self,
        ctx: &Context,
        mut req: Request<Incoming>,
        record: &mut Record,
    ) -> Response<Body> {
        let config = self.config();
        record.view = Some(config.view.clone());
        let downstream_upgrade = is_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        // Routing, the policies and the upstream all see the normalized path.
        if let Err(e) = super::normalize::uri(&mut parts.uri, self.settings.normalization) {
            debug!(error = %e, "path refused");
            return error(StatusCode::BAD_REQUEST, "bad path");
        }
        let table = config
            .routes
            .get(&ctx.default_backend.service)
            .and_then(|ports| ports.get(&ctx.port.port));
        let client_ns = ctx.peer.as_ref().map(|p| p.namespace());
        let selection = match table {
            Some(t) => t.select_from(client_ns, &parts),
            None => Selection::Default,
        };
        let (rule, matched_prefix) = match selection {
            Selection::NotFound => {
                record.flags = "NR";
                return error(StatusCode::NOT_FOUND, "no route matched");
            }
            Selection::Default => (None, None),
            Selection::Matched(m) => {
                // `kind/namespace/name`, and the rule's name when it has one
                // (GEP-995), so logs and counts can tell the rules apart.
                record.route = Some(match &m.rule.name {
                    Some(rule) => format!("{}#{rule}", m.route),
                    None => m.route.to_string(),
                });
                (Some(m.rule), m.matched_prefix.map(str::to_owned))
            }
        };
        // The policy phases, in Istio's order: request authentication (JWT),
        // authorization (CUSTOM, DENY, ALLOW), rate limit. A refusal answers here.
        if let Err(refusal) = self.admit(&config, ctx, &mut parts, record).await {
            return *refusal;
        }
        let origin = rule
            .and_then(|r| r.cors.as_ref())
            .map(|_| parts.headers.get(header::ORIGIN).cloned());
        if let Some(rule) = rule {
            if let Some(cors) = &rule.cors
                && let Some(answer) = cors.preflight(&parts)
            {
                return answer.map(|()| full(bytes::Bytes::new()));
            }
            if let Some(answer) =
                rule.apply_request(&mut parts, matched_prefix.as_deref(), ctx.port.port)
            {
                return answer.map(|()| full(bytes::Bytes::new()));
            }
        }
        let backend = match rule {
            // Without routes, the service itself (GAMMA: as if no waypoint).
            None => &ctx.default_backend,
            Some(rule) => match rule.pick_backend(crate::lb::random()) {
                Some(b) => b,
                None => {
                    record.flags = "NR";
                    return error(StatusCode::INTERNAL_SERVER_ERROR, "the rule has no backend");
                }
            },
        };
        if let Err(why) = &backend.valid {
            debug!(reason = %why, "request for an invalid backend");
            record.flags = "NR";
            return error(StatusCode::INTERNAL_SERVER_ERROR, "invalid backend");
        }
        let Some((svc, balancer)) = config.view.service(&backend.service).cloned() else {
            record.flags = "NR";
            return error(StatusCode::INTERNAL_SERVER_ERROR, "backend service is gone");
        };
        let Some(port) = svc.ports.iter().find(|p| p.port == backend.port).cloned() else {
            record.flags = "NR";
            return error(StatusCode::INTERNAL_SERVER_ERROR, "backend port is gone");
        };
        record.backend = Some(svc.clone());
        let proto = match port.protocol() {
            _ if downstream_upgrade.is_some() => Protocol::Http1,
            AppProtocol::H2c => Protocol::H2c,
            AppProtocol::Http1 => Protocol::Http1,
            // The client's: HTTP/2 prior knowledge stays HTTP/2 (gRPC).
            _ if parts.version == Version::HTTP_2 => Protocol::H2c,
            _ => Protocol::Http1,
        };
        let timeouts = rule.map(|r| r.timeouts).unwrap_or_default();
        let overall = effective(timeouts.request, Some(self.default_timeout));
        let per_attempt = effective(timeouts.backend_request, None);
        let retry = rule.and_then(|r| r.retry.as_ref());
        let mirrors = rule.map_or(&[][..], |r| &r.mirrors[..]);

        // The body is kept (up to a bound) only when something needs it again:
        // a retry or a mirror. Otherwise it streams through untouched. No body
        // at all is kept for free: a failed connect is then always tried again.
        let wants_copy = retry.is_some() || !mirrors.is_empty();
        let body = if body.is_end_stream() && downstream_upgrade.is_none() {
            Replay::Kept(bytes::Bytes::new())
        } else if wants_copy && fits(&body) {
            match Limited::new(body, MAX_REPLAY_BODY).collect().await {
                Ok(b) => Replay::Kept(b.to_bytes()),
                Err(_) => {
                    return error(StatusCode::BAD_REQUEST, "request body ended early");
                }
            }
        } else {
            Replay::Stream(Some(body))
        };
        let mut head = Request::from_parts(parts, ());
        prepare(&mut head, proto, ctx, downstream_upgrade.is_some());
        if let Replay::Kept(bytes) = &body {
            for m in mirrors {
                if (crate::lb::random() % 10_000) as f64 >= m.percent * 100.0 {
                    continue;
                }
                self.mirror(&config, ctx, &m.backend, proto, &head, bytes.clone());
            }
        }

        let budget = self.budget(&backend.service);
        let _active = budget.enter();
        let attempts = 1 + retry.map_or(0, |r| r.attempts);
        let connect_attempts = 1 + svc.load_balancing.retries;
        let mut tried: Vec<Arc<crate::model::Workload>> = Vec::new();
        let mut body = body;
        let deadline = overall.map(|d| tokio::time::Instant::now() + d);
        let mut attempt = 0;
        let outcome = loop {
            attempt += 1;
            let pick = balancer
                .pick(ctx.source_ip, &tried, Instant::now())
                .or_else(|| balancer.pick(ctx.source_ip, crate::lb::UNTRIED, Instant::now()));
            let Some(pick) = pick else {
                record.flags = "UH";
                break Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                ));
            };
            tried.push(pick.workload.clone());
            let Some(ep) = endpoint(
                &config.view,
                &pick.workload,
                port.target_port,
                ctx.source_ip,
            ) else {
                record.flags = "UH";
                break Err(error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no healthy upstream",
                ));
            };
            record.endpoint = config.view.workload_arc(&pick.workload);
            record.upstream = Some(ep.addr);
            if let Some(why) = denied(&config.view, ctx, &pick.workload, port.target_port) {
                debug!(endpoint = %pick.workload.key(), reason = %why, "denied by the endpoint's L4 policy");
                record.flags = "RBAC";
                break Err(error(StatusCode::FORBIDDEN, "RBAC: access denied"));
            }
            let Some(b) = body.take_for_attempt().map(|b| record.count_request(b)) else {
                break Err(error(StatusCode::BAD_GATEWAY, "upstream reset"));
            };
            // The head is copied only while another attempt may need it.
            let mut up = if attempt < attempts && body.replayable() {
                let mut up = Request::new(b);
                *up.method_mut() = head.method().clone();
                *up.uri_mut() = head.uri().clone();
                *up.version_mut() = head.version();
                *up.headers_mut() = head.headers().clone();
                up
            } else {
                let (parts, ()) = std::mem::take(&mut head).into_parts();
                Request::from_parts(parts, b)
            };
            // The backend's own filters go on its attempts only: `head` is
            // what the mirrors copy, and they must not get them.
            for m in &backend.request_filters {
                m.apply(up.headers_mut());
            }
            let started = Instant::now();
            let send = self.upstreams.send(&ep, proto, up);
            let sent = match (per_attempt, deadline) {
                (Some(t), Some(d)) => {
                    tokio::time::timeout_at(d.min(tokio::time::Instant::now() + t), send).await
                }
                (Some(t), None) => tokio::time::timeout(t, send).await,
                (None, Some(d)) => tokio::time::timeout_at(d, send).await,
                (None, None) => Ok(send.await),
            };
            // A connection that failed before the request went out is safe to
            // try on another endpoint whatever the route says, as the agent
            // does at L4 (up to the service's `retries`); other failures only
            // as the route's retry policy says.
            let (retryable, limit) = match &sent {
                Ok(Ok(r)) => (
                    retry.is_some_and(|p| p.codes.contains(&r.status().as_u16())),
                    attempts,
                ),
                Ok(Err(e)) if e.before_request() && e.blames_endpoint() => {
                    (true, attempts.max(connect_attempts))
                }
                Ok(Err(_)) | Err(_) => (retry.is_some(), attempts),
            };
            match &sent {
                Ok(Ok(_)) => pick.observe(started.elapsed()),
                // A failure weighs as a very slow answer: least request then
                // steers away at once, before outlier detection ejects it.
                Ok(Err(e)) if e.blames_endpoint() => pick.observe(FAILURE_PENALTY),
                Err(_) => pick.observe(FAILURE_PENALTY),
                Ok(Err(_)) => {}
            }
            let failed = match &sent {
                Ok(Ok(r)) => r.status().is_server_error(),
                Ok(Err(e)) => e.blames_endpoint(),
                Err(_) => true,
            };
            if let Some(ej) = balancer.report(&pick.workload, !failed, Instant::now()) {
                warn!(endpoint = %pick.workload.key(), ejected_for_ms = ej.duration.as_millis() as u64, "endpoint ejected");
            }
            let past_deadline = deadline.is_some_and(|d| tokio::time::Instant::now() >= d);
            let may_retry = retryable
                && attempt < limit
                && body.replayable()
                && !past_deadline
                && budget.allow_retry();
            if !may_retry {
                if retryable && attempt >= limit && limit > 1 {
                    record.flags = "URX";
                }
                break match sent {
                    Ok(Ok(r)) => Ok((r, pick)),
                    Ok(Err(e)) => {
                        debug!(error = %e, "upstream request failed");
                        record.flags = if e.before_request() { "UF" } else { "UC" };
                        Err(upstream_error(&e))
                    }
                    Err(_) => {
                        record.flags = "UT";
                        Err(error(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream request timeout",
                        ))
                    }
                };
            }
            record.retries += 1;
            let _retrying = budget.retrying();
            let base = retry.and_then(|r| r.backoff).unwrap_or(DEFAULT_BACKOFF);
            let backoff = base * 2u32.saturating_pow(attempt - 1).min(MAX_BACKOFF_FACTOR);
            let jitter = Duration::from_micros(crate::lb::random() % (base.as_micros() as u64 + 1));
            tokio::time::sleep(backoff + jitter).await;
        };
        let (response, pick) = match outcome {
            Ok(r) => r,
            Err(r) => return r,
        };
        let (mut head_out, body) = response.into_parts();
        if head_out.status == StatusCode::SWITCHING_PROTOCOLS
            && let Some(down) = downstream_upgrade
        {
            let up = hyper::upgrade::on(Response::from_parts(head_out.clone(), ()));
            tokio::spawn(splice(down, up));
            strip_hop_by_hop(&mut head_out.headers, true);
            return Response::from_parts(head_out, full(bytes::Bytes::new()));
        }
        strip_hop_by_hop(&mut head_out.headers, false);
        for m in &backend.response_filters {
            m.apply(&mut head_out.headers);
        }
        if let Some(rule) = rule {
            for m in &rule.response_filters {
                m.apply(&mut head_out.headers);
            }
            if let (Some(cors), Some(origin)) = (&rule.cors, origin) {
                let mut probe = Request::new(());
                if let Some(o) = origin {
                    probe.headers_mut().insert(header::ORIGIN, o);
                }
                let (probe, ()) = probe.into_parts();
                cors.apply_response(&probe, &mut head_out.headers);
            }
        }
        // The pick counts as an active request of its endpoint until the
        // response body is done (least request sees streaming responses).
        Response::from_parts(head_out, body_of(body, Some(pick)))
    }

    /// Sends a copy of a request to `backend` and forgets it: its answer is
    /// read and dropped, its failure only logged.
    fn mirror(
        &self,
        config: &Arc<Config>,
        ctx: &Context,
        backend: &Backend,
        proto: Protocol,
        head: &Request<()>,
        body: bytes::Bytes,
    ) {
        let Some((svc, balancer)) = config.view.service(&backend.service).cloned() else {
            return;
        };
        let Some(port) = svc.ports.iter().find(|p| p.port == backend.port) else {
            return;
        };
        let Some(pick) = balancer.pick(ctx.source_ip, crate::lb::UNTRIED, Instant::now()) else {
            return;
        };
        let Some(ep) = endpoint(
            &config.view,
            &pick.workload,
            port.target_port,
            ctx.source_ip,
        ) else {
            return;
        };
        let mut up = Request::new(full(body));
        *up.method_mut() = head.method().clone();
        *up.uri_mut() = head.uri().clone();
        *up.version_mut() = head.version();
        *up.headers_mut() = head.headers().clone();
        for m in &backend.request_filters {
            m.apply(up.headers_mut());
        }
        let upstreams = self.upstreams.clone();
        tokio::spawn(async move {
            let sent = tokio::time::timeout(MIRROR_TIMEOUT, upstreams.send(&ep, proto, up)).await;
            match sent {
                Ok(Ok(r)) => {
                    // Read to the end so the connection can be reused.
                    let _ = r.into_body().collect().await;
                }
                Ok(Err(e)) => debug!(error = %e, "mirrored request failed"),
                Err(_) => debug!("mirrored request timed out"),
            }
            drop(pick);
        });
    }

    /// The policy phases of a request: request authentication, then
    /// authorization, then rate limiting; `Err` is the answer that refuses it
    /// (401, 403, 429).
    async fn admit(
        &self,
        config: &Config,
        ctx: &Context,
        parts: &mut http::request::Parts,
        record: &mut Record,
    ) -> Result<(), Box<Response<Body>>> {
        // Request authentication: a bad token ends here (401); a good one is
        // handed to authorization in the request's extensions.
        if let Some(policy) = config.authn.get(&ctx.default_backend.service)
            && let Some(a) = policy.authenticate(parts).await.map_err(Box::new)?
        {
            let audiences = match &a.claims["aud"] {
                serde_json::Value::String(s) => vec![s.clone()],
                serde_json::Value::Array(list) => list
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            };
            let presenter = a.claims["azp"].as_str().map(str::to_owned);
            parts.extensions.insert(authz::RequestAuth {
                principal: a.principal,
                audiences,
                presenter,
                claims: a.claims,
            });
        }
        authz::admit(
            &config.authz,
            &config.view,
            &self.upstreams,
            &self.settings,
            ctx,
            parts,
            record,
        )
        .await
        .map_err(Box::new)?;
        self.limiter
            .admit(&config.ratelimit, ctx, parts, record)
            .await
            .map_err(Box::new)
    }

    fn budget(&self, key: &ServiceKey) -> Arc<Budget> {
        let mut budgets = self.budgets.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = budgets.get(key) {
            return b.clone();
        }
        budgets.entry(key.clone()).or_default().clone()
    }
}

/// A request body as the attempts see it: kept whole (small, and needed again
/// by a retry or a mirror) or streamed once.
enum Replay {
    Kept(bytes::Bytes),
    Stream(Option<Incoming>),
}

impl Replay {
    fn take_for_attempt(&mut self) -> Option<Body> {
        match self {
            Replay::Kept(b) => Some(full(b.clone())),
            Replay::Stream(b) => b.take().map(|b| body_of(b, None)),
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, Replay::Kept(_))
    }
}

/// Whether a body may be kept for a replay: its length is known to be within
/// [`MAX_REPLAY_BODY`] (an unknown length is streamed, and then not retried).
fn fits(body: &Incoming) -> bool {
    body.is_end_stream()
        || body
            .size_hint()
            .upper()
            .is_some_and(|n| n <= MAX_REPLAY_BODY as u64)
}

/// A route timeout as applied: `Some(0)` (the spec's `0s`) disables it; `None`
/// takes `default`.
fn effective(set: Option<Duration>, default: Option<Duration>) -> Option<Duration> {
    match set {
        Some(d) if d.is_zero() => None,
        Some(d) => Some(d),
        None => default,
    }
}

/// The largest request body kept for a retry or a mirror.
pub const MAX_REPLAY_BODY: usize = 64 << 10;
/// Before the first retry, when the route gives no backoff; doubled each time
/// (up to 8 times), plus up to as much again at random.
const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
const MAX_BACKOFF_FACTOR: u32 = 8;
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);
/// The latency an endpoint's failure counts as in its moving average.
const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Envoy's retry budget: retries in flight to a service may be at most 20% of
/// its requests in flight (and always at least 3), so retries never multiply
/// an outage.
#[derive(Default)]
pub struct Budget {
    active: AtomicU32,
    retrying: AtomicU32,
}

const BUDGET_PERCENT: u32 = 20;
const BUDGET_MIN: u32 = 3;

impl Budget {
    fn enter(self: &Arc<Self>) -> Counted {
        self.active.fetch_add(1, Relaxed);
        Counted(self.clone(), false)
    }

    fn retrying(self: &Arc<Self>) -> Counted {
        self.retrying.fetch_add(1, Relaxed);
        Counted(self.clone(), true)
    }

    fn allow_retry(&self) -> bool {
        let active = self.active.load(Relaxed);
        let retrying = self.retrying.load(Relaxed);
        retrying < BUDGET_MIN.max(active * BUDGET_PERCENT / 100)
    }
}

struct Counted(Arc<Budget>, bool);

impl Drop for Counted {
    fn drop(&mut self) {
        let c = if self.1 {
            &self.0.retrying
        } else {
            &self.0.active
        };
        c.fetch_sub(1, Relaxed);
    }
}

/// Why the endpoint's own L4 policy (its authorization policies and peer
/// authentication) would refuse the original client, if it would: the
/// waypoint applies them with the client's identity, so a policy written for
/// the pods holds through the waypoint too (the endpoint's agent then sees the
/// waypoint's identity, and checks that).
fn denied(
    view: &View,
    ctx: &Context,
    key: &impl crate::model::WorkloadId,
    port: u16,
) -> Option<String> {
    let w = view.workload(key)?;
    if ctx.peer.is_none() && view.authz.peer_mode(w) == crate::model::PeerMode::Strict {
        return Some("plaintext refused: peer authentication is STRICT".into());
    }
    match view.authz.check(
        w,
        &crate::authz::Conn {
            src_identity: ctx.peer.as_ref(),
            src_ip: ctx.source_ip,
            dst_port: port,
        },
    ) {
        crate::authz::Decision::Allow => None,
        crate::authz::Decision::Deny { reason, .. } => Some(reason),
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
fn endpoint(
    view: &View,
    key: &impl crate::model::WorkloadId,
    port: u16,
    like: IpAddr,
) -> Option<Endpoint> {
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
fn prepare<B>(req: &mut Request<B>, proto: Protocol, ctx: &Context, upgrade: bool) {
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
    req.headers_mut()
        .append("forwarded", crate::hbone::headers::forwarded(ctx.source_ip));
}

/// The streaming body of a request or response, boxed as the engine's body;
/// `pick` (the endpoint's active-request count) is held until it ends.
fn body_of(body: Incoming, pick: Option<crate::lb::Pick>) -> Body {
    let body = body.map_err(|e| Box::new(e) as super::BoxError);
    match pick {
        None => body.boxed(),
        Some(pick) => Holding { body, _pick: pick }.boxed(),
    }
}

/// A body that holds something (an endpoint's pick) until it is dropped.
struct Holding<B> {
    body: B,
    _pick: crate::lb::Pick,
}

impl<B: http_body::Body + Unpin> http_body::Body for Holding<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
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
