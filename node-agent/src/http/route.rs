//! A parent Service's routes, compiled once per model change into a table that
//! picks the rule a request matches.
//!
//! What the Gateway API leaves to us, decided here (docs/l7.md has the list):
//!
//! - Attachment (GEP-1294): a route applies to a Service named in its
//!   parentRefs (`group: ""`, `kind: Service`; namespace defaults to the
//!   route's), on every port, or only on `port` when given. A route in the
//!   Service's namespace is a producer route and applies to every client; a
//!   route in another namespace is a consumer route and applies only to clients
//!   of its own namespace ([`RouteTable::select_from`]), which then see only
//!   their namespace's routes.
//! - Hostnames are ignored: GEP-1294 says meshes SHOULD NOT infer anything from
//!   them, and the mesh conformance test `MeshFrontendHostname` routes by the
//!   Service, not the Host header.
//! - HTTPRoute and GRPCRoute on one Service and port: GEP-1294 applies one route
//!   type only, GRPCRoute first; the HTTPRoutes are then not used at all (listed
//!   in [`RouteTable::notes`]), whatever a request's content-type.
//! - Precedence is a sort key (see [`Precedence`]): HTTPRoute matches by the
//!   spec's order (exact path, longest prefix, method, most headers, most query
//!   parameters); RegularExpression paths, whose rank the spec leaves open, come
//!   after exact paths and before prefixes (longest pattern first), so a
//!   catch-all prefix `/` does not shadow them. GRPCRoute: the longest matching
//!   service, then method (Exact before RegularExpression), then most headers.
//!   Ties go to the route first by `{namespace}/{name}` (we have no creation
//!   timestamps, the spec's first criterion), then to the first rule and match.
//! - Paths match as the client sent them (no percent-decoding or dot-segment
//!   normalisation); query parameters are percent-decoded only when they carry a
//!   `%` or `+`, and the first occurrence of a name counts.

use std::{borrow::Cow, collections::BTreeMap, fmt, time::Duration};

use http::{HeaderMap, Response, request::Parts};
use regex::Regex;

use super::filter::{self, Cors, HeaderModifier, Redirect, UrlRewrite};
use crate::model::{
    Mesh, Service, ServiceKey,
    route::{self, HeaderMatchType, PathMatchType},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

/// Which route a request matched: for logs, metrics and access lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteName {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        };
        write!(f, "{kind} {}/{}", self.namespace, self.name)
    }
}

/// One parent's routes, compiled.
#[derive(Debug, Default)]
pub struct RouteTable {
    names: Vec<RouteName>,
    rules: Vec<CompiledRule>,
    /// Producer routes, in precedence order.
    producer: Vec<Entry>,
    /// Consumer routes by the namespace whose clients they apply to.
    consumers: BTreeMap<String, Vec<Entry>>,
    /// What compiling left out, for the log: conflicting route types, mirrors to
    /// nowhere.
    pub notes: Vec<String>,
}

/// What a request gets.
#[derive(Debug)]
pub enum Selection<'a> {
    /// The Service has no routes: its traffic goes to the Service itself, as
    /// without a waypoint (GAMMA).
    Default,
    /// It has routes and none matches: 404.
    NotFound,
    Matched(Matched<'a>),
}

#[derive(Debug)]
pub struct Matched<'a> {
    pub route: &'a RouteName,
    pub rule: &'a CompiledRule,
    /// The PathPrefix value that matched, for ReplacePrefixMatch.
    pub matched_prefix: Option<&'a str>,
}

/// A rule, ready for requests.
#[derive(Debug)]
pub struct CompiledRule {
    pub name: Option<String>,
    /// In the order written (the spec asks for it where possible).
    pub request_filters: Vec<RequestFilter>,
    pub response_filters: Vec<HeaderModifier>,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    pub retry: Option<RetryPolicy>,
    /// Only those whose backend resolved: the spec drops the others.
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
    total_weight: u64,
}

#[derive(Debug)]
pub enum RequestFilter {
    HeaderModifier(HeaderModifier),
    /// Answers the request: nothing is forwarded.
    Redirect(Redirect),
    Rewrite(UrlRewrite),
}

/// A rule's timeouts. `None`: the route sets none, the waypoint's default
/// applies; `Some(ZERO)`: the route disables it (the spec's `0s`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Statuses that are retried (connect errors always are).
    pub codes: Vec<u16>,
    /// Retries after the first attempt; 1 when the route gives none (the spec
    /// leaves it to us).
    pub attempts: u32,
    pub backoff: Option<Duration>,
}

/// A backend a rule sends to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    pub service: ServiceKey,
    pub port: u16,
    pub weight: u32,
    pub request_filters: Vec<HeaderModifier>,
    pub response_filters: Vec<HeaderModifier>,
    /// Why requests picked for it get a 500 instead (an unknown service, a kind
    /// other than Service, a port the service does not have).
    pub valid: Result<(), String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Mirror {
    pub backend: Backend,
    /// Share of requests mirrored, 0 to 100.
    pub percent: f64,
}

/// One match of one rule.
#[derive(Debug)]
struct Entry {
    route: usize,
    rule: usize,
    matcher: Matcher,
}

#[derive(Debug)]
enum Matcher {
    Http {
        path: PathMatcher,
        method: Option<&'static str>,
        headers: Vec<ValueMatcher>,
        query: Vec<ValueMatcher>,
    },
    Grpc {
        service: Option<StrMatcher>,
        method: Option<StrMatcher>,
        headers: Vec<ValueMatcher>,
    },
}

#[derive(Debug)]
enum PathMatcher {
    Exact(String),
    /// Without its trailing `/` (the spec ignores it); `written` is the value
    /// as written.
    Prefix {
        trimmed: String,
        written: String,
    },
    Regex(Regex),
}

#[derive(Debug)]
enum StrMatcher {
    Exact(String),
    Regex(Regex),
}

impl StrMatcher {
    fn compile(kind: HeaderMatchType, value: &str) -> Option<Self> {
        Some(match kind {
            HeaderMatchType::Exact => StrMatcher::Exact(value.to_owned()),
            HeaderMatchType::RegularExpression => {
                StrMatcher::Regex(route::compile_regex(value).ok()?)
            }
        })
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            StrMatcher::Exact(e) => e == v,
            StrMatcher::Regex(r) => r.is_match(v),
        }
    }
}

/// A header (lowercase name) or query parameter condition.
#[derive(Debug)]
struct ValueMatcher {
    name: String,
    value: StrMatcher,
}

/// The Gateway API's precedence as a sort key: greater sorts first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Precedence {
    /// HTTP: 3 exact, 2 regex, 1 prefix. gRPC: service (class, length).
    a: (u8, usize),
    /// HTTP: method given. gRPC: method (class, length).
    b: (u8, usize),
    headers: usize,
    query: usize,
}

impl Matcher {
    fn precedence(&self) -> Precedence {
        match self {
            Matcher::Http {
                path,
                method,
                headers,
                query,
            } => Precedence {
                a: match path {
                    PathMatcher::Exact(p) => (3, p.len()),
                    PathMatcher::Regex(r) => (2, r.as_str().len()),
                    PathMatcher::Prefix { trimmed, .. } => (1, trimmed.len()),
                },
                b: (u8::from(method.is_some()), 0),
                headers: headers.len(),
                query: query.len(),
            },
            Matcher::Grpc {
                service,
                method,
                headers,
            } => {
                let rank = |m: &Option<StrMatcher>| match m {
                    Some(StrMatcher::Exact(s)) => (2, s.len()),
                    Some(StrMatcher::Regex(r)) => (1, r.as_str().len()),
                    None => (0, 0),
                };
                Precedence {
                    a: rank(service),
                    b: rank(method),
                    headers: headers.len(),
                    query: 0,
                }
            }
        }
    }

    /// Whether `req` matches; the prefix that matched, if the path was one.
    fn matches<'m>(&'m self, req: &Parts) -> Option<Option<&'m str>> {
        match self {
            Matcher::Http {
                path,
                method,
                headers,
                query,
            } => {
                let p = req.uri.path();
                let prefix = match path {
                    PathMatcher::Exact(e) => (e == p).then_some(None)?,
                    PathMatcher::Prefix { trimmed, written } => {
                        let rest = p.strip_prefix(trimmed.as_str())?;
                        (rest.is_empty() || rest.starts_with('/'))
                            .then_some(Some(written.as_str()))?
                    }
                    PathMatcher::Regex(r) => r.is_match(p).then_some(None)?,
                };
                if method.is_some_and(|m| m != req.method.as_str()) {
                    return None;
                }
                if !headers.iter().all(|h| header_matches(&req.headers, h)) {
                    return None;
                }
                if !query.iter().all(|q| {
                    query_param(req.uri.query(), &q.name).is_some_and(|v| q.value.matches(&v))
                }) {
                    return None;
                }
                Some(prefix)
            }
            Matcher::Grpc {
                service,
                method,
                headers,
            } => {
                // `/package.Service/Method`
                let (svc, m) = req.uri.path().strip_prefix('/')?.split_once('/')?;
                if service.as_ref().is_some_and(|s| !s.matches(svc))
                    || method.as_ref().is_some_and(|x| !x.matches(m))
                    || !headers.iter().all(|h| header_matches(&req.headers, h))
                {
                    return None;
                }
                Some(None)
            }
        }
    }
}

/// A header's values, joined by `,` as RFC 9110 reads repeated lines; joined
/// only when it is repeated.
fn header_matches(headers: &HeaderMap, m: &ValueMatcher) -> bool {
    let mut values = headers.get_all(m.name.as_str()).iter();
    let Some(first) = values.next() else {
        return false;
    };
    let Ok(first) = first.to_str() else {
        return false;
    };
    let rest: Vec<&str> = values.filter_map(|v| v.to_str().ok()).collect();
    if rest.is_empty() {
        return m.value.matches(first);
    }
    let mut joined = first.to_owned();
    for v in rest {
        joined.push(',');
        joined.push_str(v);
    }
    m.value.matches(&joined)
}

/// The first value of query parameter `name`, percent-decoded (and `+` read as
/// a space) only when it needs it.
fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
                continue;
            }
            (b'+', _) => out.push(b' '),
            (b, _) => out.push(b),
        }
        i += 1;
    }
    // Not UTF-8 once decoded: compare it as it was sent.
    String::from_utf8(out).map_or(Cow::Borrowed(s), Cow::Owned)
}

impl RouteTable {
    /// Compiles the routes of `service` on `port` from `mesh` (see the module
    /// documentation for attachment, conflicts and precedence).
    pub fn compile(mesh: &Mesh, service: &Service, port: u16) -> RouteTable {
        let attached = |route_ns: &str, parents: &[route::ParentReference]| {
            parents.iter().any(|p| {
                p.is_service()
                    && p.name == service.name
                    && p.namespace.as_deref().unwrap_or(route_ns) == service.namespace
                    && p.port.is_none_or(|p| p == port)
                    && p.section_name.is_none()
            })
        };
        let mut http: Vec<&route::HttpRoute> = mesh
            .http_routes
            .iter()
            .filter(|r| attached(&r.namespace, &r.spec.parent_refs))
            .collect();
        let mut grpc: Vec<&route::GrpcRoute> = mesh
            .grpc_routes
            .iter()
            .filter(|r| attached(&r.namespace, &r.spec.parent_refs))
            .collect();
        let mut table = RouteTable::default();
        if !grpc.is_empty() && !http.is_empty() {
            for r in http.drain(..) {
                table.notes.push(format!(
                    "HTTPRoute {}/{} is not used on {}/{} port {port}: a GRPCRoute attaches there too, and GEP-1294 applies GRPCRoutes only",
                    r.namespace, r.name, service.namespace, service.name
                ));
            }
        }
        // The tie-break between routes: `{namespace}/{name}`.
        http.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        grpc.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        let mut entries: Vec<(String, Precedence, Entry)> = Vec::new();
        for r in http {
            let route = table.names.len();
            table.names.push(RouteName {
                kind: RouteKind::Http,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            });
            for rule in &r.spec.rules {
                let rule_ix = table.rules.len();
                table.rules.push(compile_http_rule(
                    mesh,
                    &r.namespace,
                    rule,
                    &mut table.notes,
                ));
                let matches: Vec<_> = if rule.matches.is_empty() {
                    vec![route::HttpRouteMatch::default()]
                } else {
                    rule.matches.clone()
                };
                for m in &matches {
                    if let Some(matcher) = compile_http_match(m) {
                        entries.push((
                            r.namespace.clone(),
                            matcher.precedence(),
                            Entry {
                                route,
                                rule: rule_ix,
                                matcher,
                            },
                        ));
                    }
                }
            }
        }
        for r in grpc {
            let route = table.names.len();
            table.names.push(RouteName {
                kind: RouteKind::Grpc,
                namespace: r.namespace.clone(),
                name: r.name.clone(),
            });
            for rule in &r.spec.rules {
                let rule_ix = table.rules.len();
                table.rules.push(compile_grpc_rule(
                    mesh,
                    &r.namespace,
                    rule,
                    &mut table.notes,
                ));
                let matches: Vec<_> = if rule.matches.is_empty() {
                    vec![route::GrpcRouteMatch::default()]
                } else {
                    rule.matches.clone()
                };
                for m in &matches {
                    if let Some(matcher) = compile_grpc_match(m) {
                        entries.push((
                            r.namespace.clone(),
                            matcher.precedence(),
                            Entry {
                                route,
                                rule: rule_ix,
                                matcher,
                            },
                        ));
                    }
                }
            }
        }
        // Stable: equal precedence keeps route order, then rule, then match.
        entries.sort_by_key(|e| std::cmp::Reverse(e.1));
        for (ns, _, entry) in entries {
            if ns == service.namespace {
                table.producer.push(entry);
            } else {
                table.consumers.entry(ns).or_default().push(entry);
            }
        }
        table
    }

    /// The rule for a request, from producer routes only.
    pub fn select(&self, req: &Parts) -> Selection<'_> {
        self.select_from(None, req)
    }

    /// The rule for a request from a client in `client_namespace`: that
    /// namespace's consumer routes if it has any, else the producer routes.
    pub fn select_from(&self, client_namespace: Option<&str>, req: &Parts) -> Selection<'_> {
        let entries = client_namespace
            .and_then(|ns| self.consumers.get(ns))
            .unwrap_or(&self.producer);
        if entries.is_empty() {
            return Selection::Default;
        }
        for e in entries {
            if let Some(matched_prefix) = e.matcher.matches(req) {
                return Selection::Matched(Matched {
                    route: &self.names[e.route],
                    rule: &self.rules[e.rule],
                    matched_prefix,
                });
            }
        }
        Selection::NotFound
    }

    /// Whether no route attaches at all (producer or consumer).
    pub fn is_empty(&self) -> bool {
        self.producer.is_empty() && self.consumers.is_empty()
    }
}

impl CompiledRule {
    /// Picks a backend by weight with `r`, a random number from the caller.
    /// `None` when there is none or every weight is 0: the caller answers 500,
    /// as it does when the pick is a backend whose `valid` is an error.
    pub fn pick_backend(&self, r: u64) -> Option<&Backend> {
        if self.total_weight == 0 {
            return None;
        }
        let mut x = r % self.total_weight;
        for b in &self.backends {
            let w = u64::from(b.weight);
            if x < w {
                return Some(b);
            }
            x -= w;
        }
        None
    }

    /// Runs the request filters in order: header modifiers and rewrites change
    /// `req`; a redirect answers it, and its response is returned (nothing is
    /// forwarded). `listener_port` is the service port the request came to.
    pub fn apply_request(
        &self,
        req: &mut Parts,
        matched_prefix: Option<&str>,
        listener_port: u16,
    ) -> Option<Response<()>> {
        for f in &self.request_filters {
            match f {
                RequestFilter::HeaderModifier(m) => m.apply(&mut req.headers),
                RequestFilter::Rewrite(r) => filter::rewrite(r, req, matched_prefix),
                RequestFilter::Redirect(r) => {
                    return Some(filter::redirect(r, req, matched_prefix, listener_port));
                }
            }
        }
        None
    }
}

fn compile_http_match(m: &route::HttpRouteMatch) -> Option<Matcher> {
    let path = match m.path.kind {
        PathMatchType::Exact => PathMatcher::Exact(m.path.value.clone()),
        PathMatchType::PathPrefix => PathMatcher::Prefix {
            trimmed: m.path.value.trim_end_matches('/').to_owned(),
            written: m.path.value.clone(),
        },
        PathMatchType::RegularExpression => {
            PathMatcher::Regex(route::compile_regex(&m.path.value).ok()?)
        }
    };
    Some(Matcher::Http {
        path,
        method: m.method.map(route::HttpMethod::as_str),
        headers: value_matchers(&m.headers, true)?,
        query: value_matchers(&m.query_params, false)?,
    })
}

fn compile_grpc_match(m: &route::GrpcRouteMatch) -> Option<Matcher> {
    let (service, method) = match &m.method {
        Some(mm) => (
            match mm.service.as_deref().filter(|s| !s.is_empty()) {
                Some(s) => Some(StrMatcher::compile(mm.kind, s)?),
                None => None,
            },
            match mm.method.as_deref().filter(|s| !s.is_empty()) {
                Some(s) => Some(StrMatcher::compile(mm.kind, s)?),
                None => None,
            },
        ),
        None => (None, None),
    };
    Some(Matcher::Grpc {
        service,
        method,
        headers: value_matchers(&m.headers, true)?,
    })
}

/// The conditions, keeping only the first of equivalent names (the spec's rule);
/// `None` when a regex does not compile (validation reports it).
fn value_matchers(list: &[route::HttpHeaderMatch], header: bool) -> Option<Vec<ValueMatcher>> {
    let mut out: Vec<ValueMatcher> = Vec::new();
    for m in list {
        let name = if header {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        };
        if out.iter().any(|o| o.name == name) {
            continue;
        }
        out.push(ValueMatcher {
            name,
            value: StrMatcher::compile(m.kind, &m.value)?,
        });
    }
    Some(out)
}

/// Resolves a backend reference against the mesh; an unresolved one stays, with
/// its reason, so its share of requests gets a 500.
fn resolve(mesh: &Mesh, route_ns: &str, r: &route::BackendObjectReference, weight: u32) -> Backend {
    let namespace = r.namespace.clone().unwrap_or_else(|| route_ns.to_owned());
    let port = r.port.unwrap_or(0);
    let valid = if !(route::is_core_group(&r.group) && r.kind == "Service") {
        Err(format!(
            "backend kind {}/{} is not supported (only Service)",
            r.group, r.kind
        ))
    } else if let Some(svc) = mesh
        .services
        .iter()
        .find(|s| s.namespace == namespace && s.name == r.name)
    {
        match r.port {
            None => Err("backendRef has no port (required for a Service)".to_owned()),
            Some(p) if !svc.ports.iter().any(|sp| sp.port == p) => {
                Err(format!("service {namespace}/{} has no port {p}", r.name))
            }
            Some(_) => Ok(()),
        }
    } else {
        Err(format!("no service {namespace}/{}", r.name))
    };
    Backend {
        service: (namespace, r.name.clone()),
        port,
        weight,
        request_filters: Vec::new(),
        response_filters: Vec::new(),
        valid,
    }
}

fn mirror(
    mesh: &Mesh,
    route_ns: &str,
    m: &route::HttpRequestMirrorFilter,
    notes: &mut Vec<String>,
) -> Option<Mirror> {
    let backend = resolve(mesh, route_ns, &m.backend_ref, 1);
    if let Err(e) = &backend.valid {
        notes.push(format!("a RequestMirror is dropped: {e}"));
        return None;
    }
    let percent = match (m.percent, m.fraction) {
        (Some(p), _) => f64::from(p),
        (None, Some(f)) if f.denominator > 0 => {
            f64::from(f.numerator) * 100.0 / f64::from(f.denominator)
        }
        _ => 100.0,
    };
    Some(Mirror {
        backend,
        percent: percent.clamp(0.0, 100.0),
    })
}

fn timeout(v: &Option<String>) -> Option<Duration> {
    v.as_deref().and_then(|v| route::parse_duration(v).ok())
}

fn finish(mut rule: CompiledRule) -> CompiledRule {
    rule.total_weight = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    rule
}

fn compile_http_rule(
    mesh: &Mesh,
    ns: &str,
    rule: &route::HttpRouteRule,
    notes: &mut Vec<String>,
) -> CompiledRule {
    use route::HttpRouteFilterType as T;
    let mut out = CompiledRule {
        name: rule.name.clone(),
        request_filters: Vec::new(),
        response_filters: Vec::new(),
        backends: Vec::new(),
        timeouts: Timeouts::default(),
        retry: None,
        mirrors: Vec::new(),
        cors: None,
        total_weight: 0,
    };
    for f in &rule.filters {
        match f.kind {
            T::RequestHeaderModifier => out.request_filters.extend(
                f.request_header_modifier
                    .as_ref()
                    .map(|h| RequestFilter::HeaderModifier(HeaderModifier::compile(h))),
            ),
            T::ResponseHeaderModifier => out.response_filters.extend(
                f.response_header_modifier
                    .as_ref()
                    .map(HeaderModifier::compile),
            ),
            T::RequestRedirect => out.request_filters.extend(
                f.request_redirect
                    .as_ref()
                    .map(|r| RequestFilter::Redirect(Redirect::compile(r))),
            ),
            T::UrlRewrite => out.request_filters.extend(
                f.url_rewrite
                    .as_ref()
                    .map(|r| RequestFilter::Rewrite(UrlRewrite::compile(r))),
            ),
            T::RequestMirror => {
                if let Some(m) = &f.request_mirror {
                    out.mirrors.extend(mirror(mesh, ns, m, notes));
                }
            }
            T::Cors => out.cors = f.cors.as_ref().map(Cors::compile),
            // Refused by validation; never skipped silently at request time.
            T::ExtensionRef => {}
        }
    }
    for b in &rule.backend_refs {
        let mut backend = resolve(mesh, ns, &b.object(), b.weight);
        for f in &b.filters {
            backend.request_filters.extend(
                f.request_header_modifier
                    .as_ref()
                    .map(HeaderModifier::compile),
            );
            backend.response_filters.extend(
                f.response_header_modifier
                    .as_ref()
                    .map(HeaderModifier::compile),
            );
        }
        out.backends.push(backend);
    }
    if let Some(t) = &rule.timeouts {
        out.timeouts = Timeouts {
            request: timeout(&t.request),
            backend_request: timeout(&t.backend_request),
        };
    }
    out.retry = rule.retry.as_ref().map(|r| RetryPolicy {
        codes: r.codes.clone(),
        attempts: r.attempts.unwrap_or(1),
        backoff: timeout(&r.backoff),
    });
    finish(out)
}

fn compile_grpc_rule(
    mesh: &Mesh,
    ns: &str,
    rule: &route::GrpcRouteRule,
    notes: &mut Vec<String>,
) -> CompiledRule {
    use route::GrpcRouteFilterType as T;
    let mut out = CompiledRule {
        name: rule.name.clone(),
        request_filters: Vec::new(),
        response_filters: Vec::new(),
        backends: Vec::new(),
        timeouts: Timeouts::default(),
        retry: None,
        mirrors: Vec::new(),
        cors: None,
        total_weight: 0,
    };
    for f in &rule.filters {
        match f.kind {
            T::RequestHeaderModifier => out.request_filters.extend(
                f.request_header_modifier
                    .as_ref()
                    .map(|h| RequestFilter::HeaderModifier(HeaderModifier::compile(h))),
            ),
            T::ResponseHeaderModifier => out.response_filters.extend(
                f.response_header_modifier
                    .as_ref()
                    .map(HeaderModifier::compile),
            ),
            T::RequestMirror => {
                if let Some(m) = &f.request_mirror {
                    out.mirrors.extend(mirror(mesh, ns, m, notes));
                }
            }
            T::ExtensionRef => {}
        }
    }
    for b in &rule.backend_refs {
        let mut backend = resolve(mesh, ns, &b.object(), b.weight);
        for f in &b.filters {
            backend.request_filters.extend(
                f.request_header_modifier
                    .as_ref()
                    .map(HeaderModifier::compile),
            );
            backend.response_filters.extend(
                f.response_header_modifier
                    .as_ref()
                    .map(HeaderModifier::compile),
            );
        }
        out.backends.push(backend);
    }
    finish(out)
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::{self, ServicePort};

    fn service(ns: &str, name: &str, ports: &[u16]) -> Service {
        Service {
            name: name.into(),
            namespace: ns.into(),
            addresses: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))],
            ports: ports
                .iter()
                .map(|&p| ServicePort {
                    port: p,
                    target_port: p,
                    app_protocol: None,
                })
                .collect(),
            endpoints: model::Endpoints::Listed(vec![]),
            load_balancing: Default::default(),
            outlier_detection: Default::default(),
            waypoint: None,
        }
    }

    /// A mesh with services echo, echo-v1 and echo-v2 (port 80) in `default`, and
    /// HTTPRoutes given as `name: spec` YAML documents.
    fn mesh(http: &[(&str, &str, &str)], grpc: &[(&str, &str, &str)]) -> Mesh {
        Mesh {
            services: ["echo", "echo-v1", "echo-v2"]
                .iter()
                .map(|n| service("default", n, &[80]))
                .collect(),
            http_routes: http
                .iter()
                .map(|(ns, name, spec)| route::HttpRoute {
                    name: (*name).into(),
                    namespace: (*ns).into(),
                    spec: crate::yaml::from_str(spec).unwrap(),
                })
                .collect(),
            grpc_routes: grpc
                .iter()
                .map(|(ns, name, spec)| route::GrpcRoute {
                    name: (*name).into(),
                    namespace: (*ns).into(),
                    spec: crate::yaml::from_str(spec).unwrap(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn table(m: &Mesh) -> RouteTable {
        RouteTable::compile(m, &m.services[0], 80)
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    /// Which backend service the matched rule's first backend is ("404", "default").
    fn dest(t: &RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> String {
        match t.select(&req(method, uri, headers)) {
            Selection::Default => "default".into(),
            Selection::NotFound => "404".into(),
            Selection::Matched(m) => m.rule.backends[0].service.1.clone(),
        }
    }

    const PARENT: &str = "parentRefs: [{group: \"\", kind: Service, name: echo}]\n";

    #[test]
    fn a_service_without_routes_gets_default_and_one_with_routes_404s() {
        let m = mesh(&[], &[]);
        assert_eq!(dest(&table(&m), "GET", "/", &[]), "default");
        let m = mesh(
            &[(
                "default",
                "r",
                &format!(
                    "{PARENT}rules:\n- matches: [{{path: {{type: Exact, value: /one}}}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        assert_eq!(dest(&t, "GET", "/one", &[]), "echo-v1");
        assert_eq!(dest(&t, "GET", "/two", &[]), "404");
        // Another port of the parent, or a route on port 8080 only: no routes.
        let m = mesh(
            &[(
                "default",
                "r",
                "parentRefs: [{group: \"\", kind: Service, name: echo, port: 8080}]\n",
            )],
            &[],
        );
        assert_eq!(dest(&table(&m), "GET", "/", &[]), "default");
    }

    /// HTTPRouteExactPathMatching.
    #[test]
    fn http_route_exact_path_matching() {
        let m = mesh(
            &[(
                "default",
                "exact-matching",
                &format!(
                    "{PARENT}rules:\n\
                     - matches: [{{path: {{type: Exact, value: /one}}}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n\
                     - matches: [{{path: {{type: Exact, value: /two}}}}]\n  backendRefs: [{{name: echo-v2, port: 80}}]\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        assert_eq!(dest(&t, "GET", "/one", &[]), "echo-v1");
        assert_eq!(dest(&t, "GET", "/two", &[]), "echo-v2");
        for miss in ["/", "/one/example", "/two/", "/Two"] {
            assert_eq!(dest(&t, "GET", miss, &[]), "404", "{miss}");
        }
    }

    /// HTTPRouteMatchingAcrossRoutes and HTTPRouteMatching: longest prefix, exact
    /// before prefix, element-wise prefixes, then the `{namespace}/{name}` order.
    #[test]
    fn http_route_matching_across_routes() {
        let m = mesh(
            &[
                (
                    "default",
                    "b-route",
                    &format!(
                        "{PARENT}rules:\n- matches: [{{path: {{value: /}}}}]\n  backendRefs: [{{name: echo-v2, port: 80}}]\n"
                    ),
                ),
                (
                    "default",
                    "a-route",
                    &format!(
                        "{PARENT}rules:\n- matches: [{{path: {{value: /v2/}}}}, {{path: {{type: Exact, value: /}}}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n"
                    ),
                ),
            ],
            &[],
        );
        let t = table(&m);
        assert_eq!(
            dest(&t, "GET", "/v2", &[]),
            "echo-v1",
            "a trailing / is ignored"
        );
        assert_eq!(dest(&t, "GET", "/v2/example", &[]), "echo-v1");
        assert_eq!(
            dest(&t, "GET", "/v2example", &[]),
            "echo-v2",
            "prefixes match whole elements"
        );
        assert_eq!(dest(&t, "GET", "/", &[]), "echo-v1", "exact before prefix");
        // A tie between routes: the first by namespace/name.
        let m = mesh(
            &[
                (
                    "default",
                    "b",
                    &format!("{PARENT}rules:\n- backendRefs: [{{name: echo-v2, port: 80}}]\n"),
                ),
                (
                    "default",
                    "a",
                    &format!("{PARENT}rules:\n- backendRefs: [{{name: echo-v1, port: 80}}]\n"),
                ),
            ],
            &[],
        );
        let t = table(&m);
        assert_eq!(dest(&t, "GET", "/x", &[]), "echo-v1");
        let Selection::Matched(hit) = t.select(&req("GET", "/x", &[])) else {
            panic!()
        };
        assert_eq!(hit.route.to_string(), "HTTPRoute default/a");
        assert_eq!(hit.matched_prefix, Some("/"));
    }

    /// HTTPRouteHeaderMatching: names case-insensitive, every header must match,
    /// more headers first, regexes.
    #[test]
    fn http_route_header_matching() {
        let m = mesh(
            &[(
                "default",
                "headers",
                &format!(
                    "{PARENT}rules:\n\
                     - matches: [{{headers: [{{name: Version, value: one}}]}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n\
                     - matches: [{{headers: [{{name: version, value: one}}, {{name: color, value: orange}}]}}]\n  backendRefs: [{{name: echo-v2, port: 80}}]\n\
                     - matches: [{{headers: [{{type: RegularExpression, name: grade, value: '[ab]'}}]}}]\n  backendRefs: [{{name: echo, port: 80}}]\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        assert_eq!(dest(&t, "GET", "/", &[("version", "one")]), "echo-v1");
        assert_eq!(
            dest(&t, "GET", "/", &[("version", "one"), ("color", "orange")]),
            "echo-v2"
        );
        assert_eq!(dest(&t, "GET", "/", &[("version", "two")]), "404");
        assert_eq!(dest(&t, "GET", "/", &[("grade", "a")]), "echo");
        assert_eq!(
            dest(&t, "GET", "/", &[("grade", "ab")]),
            "404",
            "regexes match whole values"
        );
    }

    /// HTTPRouteQueryParamMatching (and MeshHTTPRouteQueryParamMatching).
    #[test]
    fn http_route_query_param_matching() {
        let m = mesh(
            &[(
                "default",
                "query",
                &format!(
                    "{PARENT}rules:\n\
                     - matches: [{{queryParams: [{{name: animal, value: whale}}]}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n\
                     - matches: [{{queryParams: [{{name: animal, value: dolphin}}, {{name: color, value: blue}}]}}, {{queryParams: [{{name: ANIMAL, value: Whale}}]}}]\n  backendRefs: [{{name: echo-v2, port: 80}}]\n\
                     - matches: [{{queryParams: [{{name: animal, value: dolphin}}]}}]\n  backendRefs: [{{name: echo, port: 80}}]\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        assert_eq!(dest(&t, "GET", "/?animal=whale", &[]), "echo-v1");
        assert_eq!(
            dest(&t, "GET", "/?animal=dolphin&color=blue", &[]),
            "echo-v2"
        );
        assert_eq!(
            dest(&t, "GET", "/?ANIMAL=Whale", &[]),
            "echo-v2",
            "names are case-sensitive"
        );
        assert_eq!(dest(&t, "GET", "/?animal=dolphin", &[]), "echo");
        assert_eq!(
            dest(&t, "GET", "/?animal=dolphin&color=yellow", &[]),
            "echo"
        );
        assert_eq!(dest(&t, "GET", "/?color=blue", &[]), "404");
        assert_eq!(
            dest(&t, "GET", "/?animal=wh%61le", &[]),
            "echo-v1",
            "percent-decoded"
        );
        assert_eq!(
            dest(&t, "GET", "/?animal=whale&animal=dolphin", &[]),
            "echo-v1",
            "the first value"
        );
    }

    /// HTTPRouteMethodMatching: a method match outranks more headers.
    #[test]
    fn http_route_method_matching() {
        let m = mesh(
            &[(
                "default",
                "method",
                &format!(
                    "{PARENT}rules:\n\
                     - matches: [{{headers: [{{name: version, value: one}}]}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n\
                     - matches: [{{method: POST}}]\n  backendRefs: [{{name: echo-v2, port: 80}}]\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        assert_eq!(dest(&t, "POST", "/", &[("version", "one")]), "echo-v2");
        assert_eq!(dest(&t, "GET", "/", &[("version", "one")]), "echo-v1");
        assert_eq!(dest(&t, "GET", "/", &[]), "404");
    }

    /// HTTPRouteWeight (and MeshHTTPRouteWeight): shares follow the weights, a
    /// weight of 0 gets nothing, no weight at all gets nothing (500).
    #[test]
    fn http_route_weight() {
        let m = mesh(
            &[(
                "default",
                "weights",
                &format!(
                    "{PARENT}rules:\n- backendRefs: [{{name: echo, port: 80, weight: 70}}, {{name: echo-v1, port: 80, weight: 30}}, {{name: echo-v2, port: 80, weight: 0}}]\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        let Selection::Matched(hit) = t.select(&req("GET", "/", &[])) else {
            panic!()
        };
        let mut counts = BTreeMap::new();
        for r in 0..1000u64 {
            *counts
                .entry(
                    hit.rule
                        .pick_backend(r.wrapping_mul(2_654_435_761))
                        .unwrap()
                        .service
                        .1
                        .clone(),
                )
                .or_insert(0) += 1;
        }
        assert_eq!(counts.get("echo-v2"), None);
        assert!((650..=750).contains(&counts["echo"]), "{counts:?}");
        let m = mesh(
            &[(
                "default",
                "zero",
                &format!("{PARENT}rules:\n- backendRefs: [{{name: echo, port: 80, weight: 0}}]\n"),
            )],
            &[],
        );
        let t = table(&m);
        let Selection::Matched(hit) = t.select(&req("GET", "/", &[])) else {
            panic!()
        };
        assert!(hit.rule.pick_backend(7).is_none());
    }

    /// HTTPRouteInvalidBackendRefUnknownKind / ...Nonexistent / ...UnknownPort:
    /// the route stays, the invalid backend's share gets a 500.
    #[test]
    fn http_route_invalid_backend_ref_unknown_kind_nonexistent_and_bad_port() {
        let m = mesh(
            &[(
                "default",
                "invalid",
                &format!(
                    "{PARENT}rules:\n- backendRefs:\n  - {{name: nowhere, port: 80}}\n  - {{group: example.org, kind: Unknown, name: echo, port: 80}}\n  - {{name: echo-v1, port: 8080}}\n  - {{name: echo-v2, port: 80}}\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        let Selection::Matched(hit) = t.select(&req("GET", "/", &[])) else {
            panic!()
        };
        let b = &hit.rule.backends;
        assert_eq!(b[0].valid, Err("no service default/nowhere".into()));
        assert!(b[1].valid.as_ref().unwrap_err().contains("not supported"));
        assert_eq!(
            b[2].valid,
            Err("service default/echo-v1 has no port 8080".into())
        );
        assert_eq!(b[3].valid, Ok(()));
        assert!(
            hit.rule.pick_backend(0).unwrap().valid.is_err(),
            "a pick lands on it: 500"
        );
        assert!(hit.rule.pick_backend(3).unwrap().valid.is_ok());
    }

    /// HTTPRouteRequestHeaderModifier, HTTPRouteRewritePath and
    /// HTTPRouteRedirectPath through the table: filters in order, the prefix
    /// that matched fed to ReplacePrefixMatch.
    #[test]
    fn http_route_filters_run_in_order_with_the_matched_prefix() {
        let m = mesh(
            &[(
                "default",
                "rewrite",
                &format!(
                    "{PARENT}rules:\n\
                 - matches: [{{path: {{value: /prefix/one}}}}]\n  filters:\n  - {{type: RequestHeaderModifier, requestHeaderModifier: {{set: [{{name: x-a, value: b}}]}}}}\n  - {{type: URLRewrite, urlRewrite: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /one}}}}}}\n  backendRefs: [{{name: echo, port: 80}}]\n\
                 - matches: [{{path: {{value: /old}}}}]\n  filters: [{{type: RequestRedirect, requestRedirect: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}}}}}]\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        let r = req("GET", "/prefix/one/two?x=1", &[]);
        let Selection::Matched(hit) = t.select(&r) else {
            panic!()
        };
        let mut r = r;
        assert!(
            hit.rule
                .apply_request(&mut r, hit.matched_prefix, 80)
                .is_none()
        );
        assert_eq!(r.uri, "/one/two?x=1");
        assert_eq!(r.headers["x-a"], "b");
        let mut r = req("GET", "/old/page", &[("host", "echo")]);
        let Selection::Matched(hit) = t.select(&r) else {
            panic!()
        };
        let resp = hit
            .rule
            .apply_request(&mut r, hit.matched_prefix, 80)
            .expect("a redirect");
        assert_eq!(resp.headers()["location"], "http://echo/new/page");
    }

    /// Timeouts, retry and mirrors compile to durations and shares.
    #[test]
    fn http_route_timeouts_retry_and_mirrors() {
        let m = mesh(
            &[(
                "default",
                "t",
                &format!(
                    "{PARENT}rules:\n- backendRefs: [{{name: echo, port: 80}}]\n  timeouts: {{request: 10s, backendRequest: 0s}}\n  retry: {{codes: [503], backoff: 100ms}}\n  filters:\n  - {{type: RequestMirror, requestMirror: {{backendRef: {{name: echo-v1, port: 80}}, fraction: {{numerator: 1, denominator: 4}}}}}}\n  - {{type: RequestMirror, requestMirror: {{backendRef: {{name: nowhere, port: 80}}}}}}\n"
                ),
            )],
            &[],
        );
        let t = table(&m);
        let Selection::Matched(hit) = t.select(&req("GET", "/", &[])) else {
            panic!()
        };
        let rule = hit.rule;
        assert_eq!(
            rule.timeouts,
            Timeouts {
                request: Some(Duration::from_secs(10)),
                backend_request: Some(Duration::ZERO)
            }
        );
        assert_eq!(
            rule.retry,
            Some(RetryPolicy {
                codes: vec![503],
                attempts: 1,
                backoff: Some(Duration::from_millis(100))
            })
        );
        assert_eq!(rule.mirrors.len(), 1, "a mirror to nowhere is dropped");
        assert_eq!(rule.mirrors[0].percent, 25.0);
        assert!(
            t.notes
                .iter()
                .any(|n| n.contains("no service default/nowhere")),
            "{:?}",
            t.notes
        );
    }

    /// MeshConsumerRoute: a route in another namespace applies only to its own
    /// namespace's clients.
    #[test]
    fn mesh_consumer_route() {
        let m = mesh(
            &[
                (
                    "default",
                    "producer",
                    &format!("{PARENT}rules:\n- backendRefs: [{{name: echo-v1, port: 80}}]\n"),
                ),
                (
                    "client",
                    "consumer",
                    "parentRefs: [{group: \"\", kind: Service, name: echo, namespace: default}]\nrules:\n- backendRefs: [{name: echo-v2, namespace: default, port: 80}]\n",
                ),
            ],
            &[],
        );
        let t = table(&m);
        let pick = |ns| match t.select_from(ns, &req("GET", "/", &[])) {
            Selection::Matched(m) => m.rule.backends[0].service.1.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(pick(Some("client")), "echo-v2");
        assert_eq!(pick(Some("other")), "echo-v1");
        assert_eq!(pick(None), "echo-v1");
    }

    const GRPC_PARENT: &str = "parentRefs: [{group: \"\", kind: Service, name: echo}]\n";

    /// GRPCRouteExactMethodMatching, and GEP-1294: GRPCRoutes win over HTTPRoutes
    /// on one service port.
    #[test]
    fn grpc_route_exact_method_matching() {
        let m = mesh(
            &[(
                "default",
                "http",
                &format!("{PARENT}rules:\n- backendRefs: [{{name: echo, port: 80}}]\n"),
            )],
            &[(
                "default",
                "exact-matching",
                &format!(
                    "{GRPC_PARENT}rules:\n\
                     - matches: [{{method: {{service: grpc.test.Echo}}}}]\n  backendRefs: [{{name: echo-v2, port: 80}}]\n\
                     - matches: [{{method: {{service: grpc.test.Echo, method: Echo}}}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n\
                     - matches: [{{method: {{type: RegularExpression, service: 'grpc\\..*', method: 'Echo.*'}}}}]\n  backendRefs: [{{name: echo, port: 80}}]\n"
                ),
            )],
        );
        let t = table(&m);
        let ct = [("content-type", "application/grpc")];
        assert_eq!(
            dest(&t, "POST", "/grpc.test.Echo/Echo", &ct),
            "echo-v1",
            "service and method before service only"
        );
        assert_eq!(
            dest(&t, "POST", "/grpc.test.Echo/EchoTwo", &ct),
            "echo-v2",
            "exact service before regex"
        );
        assert_eq!(dest(&t, "POST", "/grpc.other.Echo/EchoThree", &ct), "echo");
        assert_eq!(dest(&t, "POST", "/other.Echo/Echo", &ct), "404");
        assert_eq!(
            dest(&t, "GET", "/", &[]),
            "404",
            "the HTTPRoute is not used"
        );
        assert!(t.notes[0].contains("GEP-1294"), "{:?}", t.notes);
    }

    /// GRPCRouteHeaderMatching.
    #[test]
    fn grpc_route_header_matching() {
        let m = mesh(
            &[],
            &[(
                "default",
                "headers",
                &format!(
                    "{GRPC_PARENT}rules:\n\
                     - matches: [{{headers: [{{name: version, value: one}}]}}]\n  backendRefs: [{{name: echo-v1, port: 80}}]\n\
                     - matches: [{{headers: [{{name: version, value: two}}, {{name: color, value: orange}}]}}]\n  backendRefs: [{{name: echo-v2, port: 80}}]\n"
                ),
            )],
        );
        let t = table(&m);
        assert_eq!(
            dest(&t, "POST", "/grpc.test.Echo/Echo", &[("version", "one")]),
            "echo-v1"
        );
        assert_eq!(
            dest(
                &t,
                "POST",
                "/grpc.test.Echo/Echo",
                &[("version", "two"), ("color", "orange")]
            ),
            "echo-v2"
        );
        assert_eq!(
            dest(&t, "POST", "/grpc.test.Echo/Echo", &[("version", "two")]),
            "404"
        );
    }

    #[test]
    fn query_params_decode_only_when_needed() {
        assert!(matches!(
            query_param(Some("a=b&c=d"), "c"),
            Some(Cow::Borrowed("d"))
        ));
        assert_eq!(query_param(Some("a=x+y%21"), "a").as_deref(), Some("x y!"));
        assert_eq!(query_param(Some("a=%zz"), "a").as_deref(), Some("%zz"));
        assert_eq!(query_param(Some("flag"), "flag").as_deref(), Some(""));
        assert_eq!(query_param(None, "a"), None);
    }
}
