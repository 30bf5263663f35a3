//! L7 authorization at a waypoint, with Istio's AuthorizationPolicy semantics.
//!
//! Which policies apply to a request for service S (Istio ambient's
//! attachment, `targetRefs` only): those targeting `kind: Service` S from S's
//! namespace; those targeting `kind: Gateway` S's waypoint (by its service's
//! name, from the waypoint's namespace); those targeting `kind: GatewayClass`
//! from the root namespace (every waypoint: Weft has one class, whatever its
//! name). A policy without `target_refs` (selector or namespace-wide, root
//! namespace included) is a workload's: the destination's agent enforces it at
//! L4, and the waypoint checks it too, per endpoint, with the original
//! client's identity (`engine::denied`).
//!
//! Order, as Istio's: CUSTOM (the matching policies' providers are asked; one
//! refusal denies), then DENY (one match denies), then ALLOW (if any applies,
//! one must match), and AUDIT only logs. Denials answer 403 `RBAC: access
//! denied` (a CUSTOM one: the provider's status) with no detail; the reason
//! goes to the log and the request's [`Record`].
//!
//! What a request is matched on: the source's verified identity (principals,
//! namespaces, service accounts), its address (`ipBlocks`, `source.ip`), the
//! client's address by `X-Forwarded-For` (`remoteIpBlocks`, `remote.ip`:
//! [`Settings::xff_trusted_hops`]), the request principal and claims of
//! request authentication ([`RequestAuth`], in the request's extensions), the
//! service port, the host (case-insensitive, with or without its port), the
//! method and the normalized path without its query (`normalize`).

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Instant};

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, header};
use tracing::{info, warn};

use super::{
    Body,
    engine::{self, Context},
    normalize::Normalization,
    telemetry::Record,
    upstream::{Endpoint, Protocol, Upstreams, full},
};
use crate::{
    authz::Pattern,
    identity::SpiffeId,
    model::{self, Action, ExtensionProvider, IpNet, Mesh, ServiceKey},
    view::View,
};

/// What request authentication proved of a request: put in its extensions by
/// the authentication phase, read here.
#[derive(Debug, Clone, Default)]
pub struct RequestAuth {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// `azp`.
    pub presenter: Option<String>,
    /// The token's claims.
    pub claims: serde_json::Value,
}

/// A waypoint's settings for its policies.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settings {
    /// Proxies in front of the waypoint whose `X-Forwarded-For` entries are
    /// trusted (Envoy's `xff_num_trusted_hops`): the client is the entry this
    /// many from the right; 0 (or fewer entries): the connection's source.
    pub xff_trusted_hops: usize,
    pub normalization: Normalization,
}

/// The policies of one mesh attached to waypoints, compiled, by service.
#[derive(Debug, Default)]
pub struct Authz {
    policies: Vec<Policy>,
    /// Indices into `policies` of those that apply to each bound service, in
    /// file order.
    by_service: HashMap<ServiceKey, Box<[usize]>>,
    providers: HashMap<String, Arc<ExtensionProvider>>,
}

impl Authz {
    pub fn new(mesh: &Mesh) -> Authz {
        let mut authz = Authz {
            providers: mesh
                .extension_providers
                .iter()
                .map(|p| (p.name.clone(), Arc::new(p.clone())))
                .collect(),
            ..Authz::default()
        };
        let attached: Vec<&model::AuthorizationPolicy> = mesh
            .authorization_policies
            .iter()
            .filter(|p| p.at_waypoint())
            .collect();
        authz.policies = attached.iter().map(|p| Policy::compile(p)).collect();
        for svc in &mesh.services {
            let Some(waypoint) = mesh.waypoint_of(svc) else {
                continue;
            };
            let applies: Box<[usize]> = attached
                .iter()
                .enumerate()
                .filter(|(_, p)| {
                    p.target_refs.iter().any(|t| match t.kind.as_str() {
                        "Service" => p.namespace == svc.namespace && t.name == svc.name,
                        "Gateway" => p.namespace == waypoint.0 && t.name == waypoint.1,
                        "GatewayClass" => p.namespace == mesh.root_namespace,
                        _ => false,
                    })
                })
                .map(|(i, _)| i)
                .collect();
            if !applies.is_empty() {
                authz.by_service.insert(svc.key(), applies);
            }
        }
        authz
    }

    /// DENY then ALLOW for a request, as [`admit`] decides them but without
    /// asking the providers of CUSTOM policies (nor logging AUDIT matches):
    /// `Some(reason)` when denied. For `benches/policy.rs`, which cannot give
    /// [`admit`] the upstream pool only CUSTOM uses; not the waypoint's path.
    #[doc(hidden)]
    pub fn denied(
        &self,
        settings: &Settings,
        ctx: &Context,
        parts: &http::request::Parts,
    ) -> Option<String> {
        let attrs = Attributes::of(ctx, parts, settings.xff_trusted_hops);
        self.decide(&ctx.default_backend.service, &attrs).denied
    }

    /// The decision for `req` on the policies of `service`, CUSTOM ones
    /// aside: their providers are returned for the caller to ask.
    fn decide<'s>(&'s self, service: &ServiceKey, req: &Attributes) -> Decision<'s> {
        let mut d = Decision::default();
        let Some(applicable) = self.by_service.get(service) else {
            return d;
        };
        let mut allow_policies = 0usize;
        let mut allowed = false;
        for p in applicable.iter().map(|&i| &self.policies[i]) {
            match p.action {
                Action::Custom => {
                    if p.matches(req) {
                        let provider = p.provider.as_deref().and_then(|n| self.providers.get(n));
                        d.custom.push((&p.id, provider));
                    }
                }
                Action::Deny => {
                    if d.denied.is_none() && p.matches(req) {
                        d.denied = Some(["denied by DENY policy ", &p.id].concat());
                    }
                }
                Action::Allow => {
                    allow_policies += 1;
                    allowed = allowed || p.matches(req);
                }
                Action::Audit => {
                    if p.matches(req) {
                        d.audited.push(&p.id);
                    }
                }
            }
        }
        if d.denied.is_none() && allow_policies > 0 && !allowed {
            d.denied = Some(format!(
                "no ALLOW policy matches ({allow_policies} {})",
                if allow_policies == 1 {
                    "applies"
                } else {
                    "apply"
                }
            ));
        }
        d
    }
}

#[derive(Default)]
struct Decision<'s> {
    /// The matching CUSTOM policies and their providers (`None`: gone from
    /// the mesh, which validation prevents; such a request is denied).
    custom: Vec<(&'s str, Option<&'s Arc<ExtensionProvider>>)>,
    denied: Option<String>,
    audited: Vec<&'s str>,
}

/// The authorization phase of a request: `Err` is the answer that refuses it.
pub async fn admit(
    authz: &Authz,
    view: &View,
    upstreams: &Upstreams,
    settings: &Settings,
    ctx: &Context,
    parts: &mut http::request::Parts,
    record: &mut Record,
) -> Result<(), Response<Body>> {
    let service = &ctx.default_backend.service;
    if !authz.by_service.contains_key(service) {
        return Ok(());
    }
    let attrs = Attributes::of(ctx, parts, settings.xff_trusted_hops);
    let decision = authz.decide(service, &attrs);
    for policy in &decision.audited {
        info!(
            policy,
            path = attrs.path,
            method = attrs.method,
            "request audited"
        );
    }
    for (policy, provider) in decision.custom {
        let Some(provider) = provider else {
            return Err(refuse(
                record,
                "RBAC",
                policy,
                "its provider is not defined",
            ));
        };
        let checked = if provider.grpc {
            check_grpc(view, upstreams, provider, ctx, parts).await
        } else {
            check(view, upstreams, provider, parts).await
        };
        match checked {
            Ok(Checked::Allowed(headers)) => {
                for (name, value) in headers {
                    parts.headers.insert(name, value);
                }
            }
            Ok(Checked::Denied(status, headers)) => {
                record.flags = "UAEX";
                warn!(policy, provider = %provider.name, status = status.as_u16(), "request denied by the external authorizer");
                let mut answer = engine::error(status, "RBAC: access denied");
                answer.headers_mut().extend(headers);
                return Err(answer);
            }
            Err(why) if provider.fail_open => {
                warn!(policy, provider = %provider.name, error = %why, "external authorizer failed: allowed (fail_open)");
            }
            Err(why) => {
                record.flags = "UAEX";
                warn!(policy, provider = %provider.name, error = %why, "external authorizer failed: denied");
                let status =
                    StatusCode::from_u16(provider.status_on_error).unwrap_or(StatusCode::FORBIDDEN);
                return Err(engine::error(status, "RBAC: access denied"));
            }
        }
    }
    match decision.denied {
        Some(reason) => Err(refuse(record, "RBAC", "", &reason)),
        None => Ok(()),
    }
}

fn refuse(record: &mut Record, flags: &'static str, policy: &str, reason: &str) -> Response<Body> {
    record.flags = flags;
    record.denied = Some(reason.to_owned());
    warn!(policy, reason, "request denied");
    engine::error(StatusCode::FORBIDDEN, "RBAC: access denied")
}

/// What an external authorizer answered.
enum Checked {
    /// 200: the headers to add to the request upstream.
    Allowed(Vec<(HeaderName, HeaderValue)>),
    /// Anything else: its status and the headers to pass to the client.
    Denied(StatusCode, Vec<(HeaderName, HeaderValue)>),
}

/// Asks `provider` about a request, as Envoy's `ext_authz` `http_service`
/// does: the same method, the provider's `path_prefix` then the request's
/// path and query, the `host` and `authorization` headers and those listed,
/// no body (`content-length: 0`). A 200 allows; any other status denies with
/// it. An error or a timeout is `Err`.
async fn check(
    view: &View,
    upstreams: &Upstreams,
    provider: &ExtensionProvider,
    parts: &http::request::Parts,
) -> Result<Checked, String> {
    let http = &provider.http;
    let ep = provider_endpoint(view, http).ok_or_else(|| {
        format!(
            "no endpoint of {}:{} can be reached",
            http.service, http.port
        )
    })?;
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut req = Request::new(full(bytes::Bytes::new()));
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = format!("{}{path}", http.path_prefix.trim_end_matches('/'))
        .parse()
        .map_err(|e| format!("check path: {e}"))?;
    let headers = req.headers_mut();
    if let Some(v) = host_of(parts).and_then(|h| HeaderValue::try_from(h).ok()) {
        headers.insert(header::HOST, v);
    }
    let wanted = http
        .include_request_headers_in_check
        .iter()
        .map(String::as_str)
        .chain(["authorization"]);
    for name in wanted {
        for v in parts.headers.get_all(name) {
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                headers.append(n, v.clone());
            }
        }
    }
    for (k, v) in &http.include_additional_headers_in_check {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::try_from(v),
        ) {
            headers.insert(k, v);
        }
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    let answer = tokio::time::timeout(http.timeout, upstreams.send(&ep, Protocol::Http1, req))
        .await
        .map_err(|_| format!("no answer within {:?}", http.timeout))?
        .map_err(|e| e.to_string())?;
    let status = answer.status();
    let pick = |names: &[String]| {
        names
            .iter()
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .flat_map(|n| {
                answer
                    .headers()
                    .get_all(&n)
                    .iter()
                    .map(|v| (n.clone(), v.clone()))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>()
    };
    let checked = if status == StatusCode::OK {
        Checked::Allowed(pick(&http.headers_to_upstream_on_allow))
    } else {
        Checked::Denied(status, pick(&http.headers_to_downstream_on_deny))
    };
    // Read the (small) answer to its end, so its connection is reused.
    let _ = http_body_util::BodyExt::collect(answer.into_body()).await;
    Ok(checked)
}

/// Asks `provider` about a request with Envoy's gRPC protocol
/// ([`super::extauthz`]): the source's address and principal, the request's
/// method, path, host, scheme, protocol and headers, no body. An OK status
/// allows, with the answer's headers set on the request upstream; any other
/// denies, with the answer's HTTP status (403 if it gives none) and headers.
/// A transport error, a gRPC error status or an unreadable answer is `Err`.
async fn check_grpc(
    view: &View,
    upstreams: &Upstreams,
    provider: &ExtensionProvider,
    ctx: &Context,
    parts: &http::request::Parts,
) -> Result<Checked, String> {
    use super::extauthz::{CHECK, CheckRequest, CheckResponse, MAX_MESSAGE};
    let target = &provider.http;
    let ep = provider_endpoint(view, target).ok_or_else(|| {
        format!(
            "no endpoint of {}:{} can be reached",
            target.service, target.port
        )
    })?;
    let mut headers: Vec<(String, String)> = Vec::with_capacity(parts.headers.keys_len() + 3);
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(",");
        headers.push((name.as_str().to_owned(), joined));
    }
    let host = host_of(parts).unwrap_or_default().to_owned();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    headers.push((":method".into(), parts.method.as_str().to_owned()));
    headers.push((":path".into(), path.clone()));
    headers.push((":authority".into(), host.clone()));
    let message = CheckRequest {
        source: Some(std::net::SocketAddr::new(ctx.source_ip, 0)),
        source_principal: ctx.peer.as_ref().map(|p| p.to_string()).unwrap_or_default(),
        destination: None,
        id: String::new(),
        method: parts.method.as_str().to_owned(),
        headers,
        path,
        host,
        scheme: "http".into(),
        protocol: match parts.version {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        }
        .into(),
    }
    .encode();
    let mut req = Request::new(full(bytes::Bytes::from(crate::grpc::frame(&message))));
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = CHECK.parse().map_err(|e| format!("{e}"))?;
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    let call = async {
        let answer = upstreams
            .send(&ep, Protocol::H2c, req)
            .await
            .map_err(|e| e.to_string())?;
        let (head, body) = answer.into_parts();
        let collected =
            http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_MESSAGE + 5))
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let bytes = collected.to_bytes();
        Ok::<_, String>((head, trailers, bytes))
    };
    let (head, trailers, bytes) = tokio::time::timeout(target.timeout, call)
        .await
        .map_err(|_| format!("no answer within {:?}", target.timeout))??;
    if head.status != StatusCode::OK {
        return Err(format!("HTTP status {}", head.status));
    }
    // Trailers-only answers carry the status in the headers.
    let status = trailers
        .get("grpc-status")
        .or_else(|| head.headers.get("grpc-status"))
        .and_then(|v| crate::grpc::Code::parse(v.as_bytes()))
        .ok_or("no grpc-status")?;
    if status != crate::grpc::Code::OK {
        return Err(format!("gRPC status {status}"));
    }
    let (message, _) = crate::grpc::unframe(&bytes, MAX_MESSAGE)
        .map_err(|e| e.to_string())?
        .ok_or("an incomplete answer")?;
    let answer = CheckResponse::decode(message).map_err(|e| e.to_string())?;
    let pairs = |list: &[(String, String)]| {
        list.iter()
            .filter_map(|(k, v)| {
                Some((
                    HeaderName::from_bytes(k.as_bytes()).ok()?,
                    HeaderValue::try_from(v.as_str()).ok()?,
                ))
            })
            .collect::<Vec<_>>()
    };
    Ok(if answer.code == 0 {
        Checked::Allowed(pairs(&answer.ok_headers))
    } else {
        let status = StatusCode::from_u16(answer.denied_status)
            .ok()
            .filter(|s| s.as_u16() >= 200)
            .unwrap_or(StatusCode::FORBIDDEN);
        Checked::Denied(status, pairs(&answer.denied_headers))
    })
}

/// The request's host: its URI's authority (HTTP/2), else its `host` header.
fn host_of(parts: &http::request::Parts) -> Option<&str> {
    parts.uri.authority().map(|a| a.as_str()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

/// Where a provider's checks go: an address, or an endpoint of a mesh service
/// named `<name>.<namespace>[.svc[.<domain>]]`.
fn provider_endpoint(view: &View, http: &model::ExtAuthzHttp) -> Option<Endpoint> {
    if let Ok(ip) = http.service.parse::<IpAddr>() {
        return Some(Endpoint {
            addr: std::net::SocketAddr::new(ip, http.port),
            identity: None,
        });
    }
    let mut labels = http.service.split('.');
    let (name, namespace) = (labels.next()?, labels.next().unwrap_or("default"));
    let (svc, balancer) = view.service(&(namespace.to_owned(), name.to_owned()))?;
    let port = svc.ports.iter().find(|p| p.port == http.port)?;
    let pick = balancer.pick(
        IpAddr::from([0, 0, 0, 0]),
        crate::lb::UNTRIED,
        Instant::now(),
    )?;
    let w = view.workload(&pick.workload)?;
    let ip = *w.addresses.first()?;
    let identity = if w.enrolled || w.native_tunnel {
        w.identity(view.trust_domain()).ok()
    } else {
        None
    };
    Some(Endpoint {
        addr: std::net::SocketAddr::new(ip, port.target_port),
        identity,
    })
}

/// What the policies see of a request.
struct Attributes<'a> {
    peer: Option<&'a SpiffeId>,
    /// `<trust domain>/ns/<namespace>/sa/<account>`.
    principal: Option<String>,
    source_ip: IpAddr,
    remote_ip: IpAddr,
    port: u16,
    host: &'a str,
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
    auth: Option<&'a RequestAuth>,
}

impl<'a> Attributes<'a> {
    fn of(ctx: &'a Context, parts: &'a http::request::Parts, xff_hops: usize) -> Self {
        let host = host_of(parts).unwrap_or("");
        Attributes {
            peer: ctx.peer.as_ref(),
            principal: ctx.peer.as_ref().map(|id| {
                format!(
                    "{}/ns/{}/sa/{}",
                    id.trust_domain(),
                    id.namespace(),
                    id.service_account()
                )
            }),
            source_ip: ctx.source_ip,
            remote_ip: remote_ip(&parts.headers, xff_hops).unwrap_or(ctx.source_ip),
            port: ctx.port.port,
            host,
            method: parts.method.as_str(),
            path: parts.uri.path(),
            headers: &parts.headers,
            auth: parts.extensions.get::<RequestAuth>(),
        }
    }
}

/// The client's address by `X-Forwarded-For`, trusting `hops` proxies: the
/// entry `hops` from the right (every `X-Forwarded-For` header, in order).
fn remote_ip(headers: &HeaderMap, hops: usize) -> Option<IpAddr> {
    if hops == 0 {
        return None;
    }
    let entries: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let i = entries.len().checked_sub(hops)?;
    entries[i].parse().ok()
}

#[derive(Debug)]
struct Policy {
    id: String,
    action: Action,
    provider: Option<String>,
    rules: Vec<Rule>,
}

impl Policy {
    fn compile(p: &model::AuthorizationPolicy) -> Policy {
        let patterns = |v: &[String]| v.iter().map(|s| Pattern::parse(s)).collect();
        let lower = |v: &[String]| {
            v.iter()
                .map(|s| Pattern::parse(&s.to_ascii_lowercase()))
                .collect()
        };
        let paths = |v: &[String]| v.iter().map(|s| PathPattern::parse(s)).collect();
        let accounts = |v: &[String]| {
            v.iter()
                .map(|a| {
                    let (ns, sa) = a.split_once('/').unwrap_or((a, ""));
                    (ns.to_owned(), sa.to_owned())
                })
                .collect()
        };
        Policy {
            id: format!("{}/{}", p.namespace, p.name),
            action: p.action,
            provider: p.provider.clone(),
            rules: p
                .rules
                .iter()
                .map(|r| Rule {
                    from: r
                        .from
                        .iter()
                        .map(|s| Source {
                            principals: patterns(&s.principals),
                            not_principals: patterns(&s.not_principals),
                            request_principals: patterns(&s.request_principals),
                            not_request_principals: patterns(&s.not_request_principals),
                            namespaces: patterns(&s.namespaces),
                            not_namespaces: patterns(&s.not_namespaces),
                            service_accounts: accounts(&s.service_accounts),
                            not_service_accounts: accounts(&s.not_service_accounts),
                            ip_blocks: s.ip_blocks.clone(),
                            not_ip_blocks: s.not_ip_blocks.clone(),
                            remote_ip_blocks: s.remote_ip_blocks.clone(),
                            not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|o| Operation {
                            ports: o.ports.clone(),
                            not_ports: o.not_ports.clone(),
                            hosts: lower(&o.hosts),
                            not_hosts: lower(&o.not_hosts),
                            methods: patterns(&o.methods),
                            not_methods: patterns(&o.not_methods),
                            paths: paths(&o.paths),
                            not_paths: paths(&o.not_paths),
                        })
                        .collect(),
                    when: r.when.iter().map(Condition::compile).collect(),
                })
                .collect(),
        }
    }

    fn matches(&self, req: &Attributes) -> bool {
        self.rules.iter().any(|r| {
            (r.to.is_empty() || r.to.iter().any(|o| o.matches(req)))
                && (r.from.is_empty() || r.from.iter().any(|s| s.matches(req)))
                && r.when.iter().all(|c| c.holds(req))
        })
    }
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

/// A list field and its `not` form: some value must match (if given), none
/// of the `not` ones may.
fn field<T>(yes: &[T], no: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (yes.is_empty() || yes.iter().any(&hit)) && !no.iter().any(hit)
}

#[derive(Debug)]
struct Source {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    request_principals: Vec<Pattern>,
    not_request_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    service_accounts: Vec<(String, String)>,
    not_service_accounts: Vec<(String, String)>,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
    remote_ip_blocks: Vec<IpNet>,
    not_remote_ip_blocks: Vec<IpNet>,
}

impl Source {
    /// Absent values (a plaintext peer's principal, a request without a
    /// token's request principal) match no pattern.
    fn matches(&self, req: &Attributes) -> bool {
        let principal = |p: &Pattern| req.principal.as_deref().is_some_and(|v| p.matches(v));
        let request_principal = |p: &Pattern| req.auth.is_some_and(|a| p.matches(&a.principal));
        let namespace = |p: &Pattern| req.peer.is_some_and(|id| p.matches(id.namespace()));
        let account = |(ns, sa): &(String, String)| {
            req.peer
                .is_some_and(|id| id.namespace() == ns && id.service_account() == sa)
        };
        field(&self.principals, &self.not_principals, principal)
            && field(
                &self.request_principals,
                &self.not_request_principals,
                request_principal,
            )
            && field(&self.namespaces, &self.not_namespaces, namespace)
            && field(&self.service_accounts, &self.not_service_accounts, account)
            && field(&self.ip_blocks, &self.not_ip_blocks, |b| {
                b.contains(req.source_ip)
            })
            && field(&self.remote_ip_blocks, &self.not_remote_ip_blocks, |b| {
                b.contains(req.remote_ip)
            })
    }
}

#[derive(Debug)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
    /// Lower case.
    hosts: Vec<Pattern>,
    not_hosts: Vec<Pattern>,
    methods: Vec<Pattern>,
    not_methods: Vec<Pattern>,
    paths: Vec<PathPattern>,
    not_paths: Vec<PathPattern>,
}

impl Operation {
    fn matches(&self, req: &Attributes) -> bool {
        let host = req.host.to_ascii_lowercase();
        // `example.com` matches `example.com:8080` too (Istio).
        let bare = match host.rsplit_once(':') {
            Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => &host,
        };
        let host_hit = |p: &Pattern| p.matches(&host) || p.matches(bare);
        field(&self.ports, &self.not_ports, |p| *p == req.port)
            && field(&self.hosts, &self.not_hosts, host_hit)
            && field(&self.methods, &self.not_methods, |p| p.matches(req.method))
            && field(&self.paths, &self.not_paths, |p| p.matches(req.path))
    }
}

/// A path pattern: Istio's `*` rules (exact, `prefix*`, `*suffix`, `*`), or a
/// template of segments with `{*}` (exactly one segment) and `{**}` (what is
/// left, possibly nothing; last only).
#[derive(Debug)]
enum PathPattern {
    Plain(Pattern),
    Template(Vec<Segment>),
}

#[derive(Debug)]
enum Segment {
    Literal(String),
    One,
    Rest,
}

impl PathPattern {
    /// Validation has checked it (`model::validate::check_path_pattern`).
    fn parse(p: &str) -> PathPattern {
        if !p.contains('{') {
            return PathPattern::Plain(Pattern::parse(p));
        }
        PathPattern::Template(
            p.trim_start_matches('/')
                .split('/')
                .map(|s| match s {
                    "{*}" => Segment::One,
                    "{**}" => Segment::Rest,
                    s => Segment::Literal(s.to_owned()),
                })
                .collect(),
        )
    }

    fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Plain(p) => p.matches(path),
            PathPattern::Template(segments) => {
                let Some(mut rest) = path.strip_prefix('/') else {
                    return false;
                };
                for (i, seg) in segments.iter().enumerate() {
                    if let Segment::Rest = seg {
                        return true;
                    }
                    let (this, after) = match rest.split_once('/') {
                        Some((a, b)) => (a, Some(b)),
                        None => (rest, None),
                    };
                    let ok = match seg {
                        Segment::Literal(l) => this == l,
                        Segment::One => !this.is_empty(),
                        Segment::Rest => true,
                    };
                    if !ok {
                        return false;
                    }
                    match after {
                        Some(a) => rest = a,
                        // The path ends: so must the template, or what is
                        // left of it must be `{**}` alone... which needs a
                        // `/` before it, so no.
                        None => return i + 1 == segments.len(),
                    }
                }
                false
            }
        }
    }
}

/// A `when` condition, compiled for its key.
#[derive(Debug)]
struct Condition {
    key: Key,
    values: Values,
    not_values: Values,
}

#[derive(Debug)]
enum Key {
    Header(String),
    Claim(Vec<String>),
    RequestPrincipal,
    Audiences,
    Presenter,
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    /// Validation refuses other keys; one here holds for nothing.
    Unknown,
}

#[derive(Debug)]
enum Values {
    Patterns(Vec<Pattern>),
    Ips(Vec<IpNet>),
    Ports(Vec<u16>),
}

impl Values {
    fn is_empty(&self) -> bool {
        match self {
            Values::Patterns(v) => v.is_empty(),
            Values::Ips(v) => v.is_empty(),
            Values::Ports(v) => v.is_empty(),
        }
    }
}

/// The bracketed parts of `key` after `prefix`: `request.auth.claims[a][b]`
/// is `[a, b]`.
fn bracketed(key: &str, prefix: &str) -> Option<Vec<String>> {
    let mut rest = key.strip_prefix(prefix)?;
    let mut parts = Vec::new();
    while !rest.is_empty() {
        let (part, after) = rest.strip_prefix('[')?.split_once(']')?;
        parts.push(part.to_owned());
        rest = after;
    }
    (!parts.is_empty()).then_some(parts)
}

impl Condition {
    fn compile(c: &model::Condition) -> Condition {
        let key = match c.key.as_str() {
            "request.auth.principal" => Key::RequestPrincipal,
            "request.auth.audiences" => Key::Audiences,
            "request.auth.presenter" => Key::Presenter,
            "source.ip" => Key::SourceIp,
            "remote.ip" => Key::RemoteIp,
            "source.namespace" => Key::SourceNamespace,
            "source.principal" => Key::SourcePrincipal,
            "destination.port" => Key::DestinationPort,
            k => match (
                bracketed(k, "request.headers"),
                bracketed(k, "request.auth.claims"),
            ) {
                (Some(mut h), _) if h.len() == 1 => Key::Header(h.remove(0).to_ascii_lowercase()),
                (_, Some(path)) => Key::Claim(path),
                _ => Key::Unknown,
            },
        };
        let values = |v: &[String]| match key {
            Key::SourceIp | Key::RemoteIp => {
                Values::Ips(v.iter().filter_map(|s| s.parse().ok()).collect())
            }
            Key::DestinationPort => {
                Values::Ports(v.iter().filter_map(|s| s.parse().ok()).collect())
            }
            _ => Values::Patterns(v.iter().map(|s| Pattern::parse(s)).collect()),
        };
        Condition {
            values: values(&c.values),
            not_values: values(&c.not_values),
            key,
        }
    }

    /// Some value matches (if any are given) and no `not` value does. A value
    /// that is absent (a header not sent, a claim not in the token) matches
    /// nothing; a list (a claim that is a list, the audiences) matches if one
    /// of its items does.
    fn holds(&self, req: &Attributes) -> bool {
        let seen = self.observed(req);
        let hit = |values: &Values| match (values, &seen) {
            (Values::Ips(v), Observed::Ip(ip)) => v.iter().any(|b| b.contains(*ip)),
            (Values::Ports(v), Observed::Port(p)) => v.contains(p),
            (Values::Patterns(v), Observed::Strings(items)) => {
                items.iter().any(|s| v.iter().any(|p| p.matches(s)))
            }
            _ => false,
        };
        (self.values.is_empty() || hit(&self.values))
            && (self.not_values.is_empty() || !hit(&self.not_values))
    }

    fn observed(&self, req: &Attributes) -> Observed {
        let strings = |v: Vec<String>| Observed::Strings(v);
        match &self.key {
            Key::Header(name) => {
                let values: Vec<&str> = req
                    .headers
                    .get_all(name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                if values.is_empty() {
                    Observed::Nothing
                } else {
                    // As Envoy reads a repeated header: its values joined.
                    strings(vec![values.join(",")])
                }
            }
            Key::Claim(path) => {
                let Some(auth) = req.auth else {
                    return Observed::Nothing;
                };
                let mut v = &auth.claims;
                for part in path {
                    match v.get(part) {
                        Some(next) => v = next,
                        None => return Observed::Nothing,
                    }
                }
                strings(claim_strings(v))
            }
            Key::RequestPrincipal => match req.auth {
                Some(a) => strings(vec![a.principal.clone()]),
                None => Observed::Nothing,
            },
            Key::Audiences => match req.auth {
                Some(a) => strings(a.audiences.clone()),
                None => Observed::Nothing,
            },
            Key::Presenter => match req.auth.and_then(|a| a.presenter.clone()) {
                Some(p) => strings(vec![p]),
                None => Observed::Nothing,
            },
            Key::SourceIp => Observed::Ip(req.source_ip),
            Key::RemoteIp => Observed::Ip(req.remote_ip),
            Key::SourceNamespace => match req.peer {
                Some(id) => strings(vec![id.namespace().to_owned()]),
                None => Observed::Nothing,
            },
            Key::SourcePrincipal => match &req.principal {
                Some(p) => strings(vec![p.clone()]),
                None => Observed::Nothing,
            },
            Key::DestinationPort => Observed::Port(req.port),
            Key::Unknown => Observed::Nothing,
        }
    }
}

enum Observed {
    Nothing,
    Strings(Vec<String>),
    Ip(IpAddr),
    Port(u16),
}

/// A claim as the strings it is matched by: a string, a number or a boolean
/// as written; a list, its items (one level); an object, nothing.
fn claim_strings(v: &serde_json::Value) -> Vec<String> {
    use serde_json::Value;
    let scalar = |v: &Value| match v {
        Value::String(s) => Some(s.clone()),
        Value::Bool(_) | Value::Number(_) => Some(v.to_string()),
        _ => None,
    };
    match v {
        Value::Array(items) => items.iter().filter_map(scalar).collect(),
        v => scalar(v).into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Two services bound to the waypoint `wp`, and `policies`.
    fn authz(policies: &str) -> Authz {
        let yaml = format!(
            r#"
workloads:
- {{name: wp-0, node: n0, native_tunnel: true, labels: {{app: wp}}, addresses: [10.0.0.1]}}
- {{name: web-0, node: n0, labels: {{app: web}}, addresses: [10.0.0.2]}}
services:
- {{name: wp, addresses: [], ports: [], selector: {{app: wp}}}}
- {{name: web, addresses: [10.96.0.2], ports: [{{port: 80}}], selector: {{app: web}}, waypoint: wp}}
- {{name: api, addresses: [10.96.0.3], ports: [{{port: 80}}], selector: {{app: web}}, waypoint: wp}}
- {{name: unbound, addresses: [10.96.0.4], ports: [{{port: 80}}], selector: {{app: web}}}}
extension_providers:
- {{name: ext, http: {{service: ext.default, port: 9000}}}}
{policies}"#
        );
        let mesh = crate::discovery::file::parse(Path::new("t.yaml"), &yaml)
            .unwrap()
            .mesh;
        Authz::new(&mesh)
    }

    const FRONT: &str = "spiffe://cluster.local/ns/front/sa/ui";

    /// A request as the policies see it; change what a case needs.
    struct Req {
        peer: Option<SpiffeId>,
        method: &'static str,
        path: &'static str,
        host: &'static str,
        headers: HeaderMap,
        auth: Option<RequestAuth>,
        remote_ip: &'static str,
    }

    fn req() -> Req {
        Req {
            peer: Some(FRONT.parse().unwrap()),
            method: "GET",
            path: "/",
            host: "web.default:80",
            headers: HeaderMap::new(),
            auth: None,
            remote_ip: "10.1.0.9",
        }
    }

    impl Req {
        fn attrs(&self) -> Attributes<'_> {
            Attributes {
                peer: self.peer.as_ref(),
                principal: self.peer.as_ref().map(|id| {
                    format!(
                        "{}/ns/{}/sa/{}",
                        id.trust_domain(),
                        id.namespace(),
                        id.service_account()
                    )
                }),
                source_ip: "10.1.0.9".parse().unwrap(),
                remote_ip: self.remote_ip.parse().unwrap(),
                port: 80,
                host: self.host,
                method: self.method,
                path: self.path,
                headers: &self.headers,
                auth: self.auth.as_ref(),
            }
        }
    }

    fn web() -> ServiceKey {
        ("default".to_owned(), "web".to_owned())
    }

    /// `None`: allowed; else the reason.
    fn verdict(a: &Authz, svc: &ServiceKey, r: &Req) -> Option<String> {
        a.decide(svc, &r.attrs()).denied
    }

    #[test]
    fn attachment_by_service_gateway_and_gateway_class() {
        let a = authz(
            r#"
authorization_policies:
- {name: by-service, action: DENY, targetRefs: [{kind: Service, name: web}], rules: [{to: [{operation: {paths: [/s]}}]}]}
- {name: by-gateway, action: DENY, targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}], rules: [{to: [{operation: {paths: [/g]}}]}]}
- {name: by-class, namespace: weft-system, action: DENY, targetRefs: [{kind: GatewayClass, name: istio-waypoint}], rules: [{to: [{operation: {paths: [/c]}}]}]}
- {name: workload, action: DENY, rules: [{}]}
"#,
        );
        let api = ("default".to_owned(), "api".to_owned());
        let unbound = ("default".to_owned(), "unbound".to_owned());
        for (path, web_denied, api_denied) in [
            ("/s", true, false),
            ("/g", true, true),
            ("/c", true, true),
            ("/x", false, false),
        ] {
            let r = Req { path, ..req() };
            assert_eq!(verdict(&a, &web(), &r).is_some(), web_denied, "{path}");
            assert_eq!(verdict(&a, &api, &r).is_some(), api_denied, "{path}");
            // A service with no waypoint has no waypoint policies; the
            // workload policy (no target_refs) is the agent's.
            assert!(verdict(&a, &unbound, &r).is_none(), "{path}");
        }
    }

    #[test]
    fn deny_then_allow_and_audit_only_logs() {
        let a = authz(
            r#"
authorization_policies:
- name: allow-front-get
  targetRefs: [{kind: Service, name: web}]
  rules:
  - from: [{source: {principals: ["cluster.local/ns/front/sa/ui"]}}]
    to: [{operation: {methods: [GET, HEAD]}}]
- name: deny-admin
  action: DENY
  targetRefs: [{kind: Service, name: web}]
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
- name: audit-all
  action: AUDIT
  targetRefs: [{kind: Service, name: web}]
  rules: [{}]
"#,
        );
        assert_eq!(verdict(&a, &web(), &req()), None);
        assert_eq!(
            verdict(
                &a,
                &web(),
                &Req {
                    path: "/admin/x",
                    ..req()
                }
            )
            .as_deref(),
            Some("denied by DENY policy default/deny-admin")
        );
        assert_eq!(
            verdict(
                &a,
                &web(),
                &Req {
                    method: "POST",
                    ..req()
                }
            )
            .as_deref(),
            Some("no ALLOW policy matches (1 applies)")
        );
        let other = Req {
            peer: Some("spiffe://cluster.local/ns/bad/sa/x".parse().unwrap()),
            ..req()
        };
        assert!(verdict(&a, &web(), &other).is_some());
        assert!(
            verdict(
                &a,
                &web(),
                &Req {
                    peer: None,
                    ..req()
                }
            )
            .is_some()
        );
        assert_eq!(
            a.decide(&web(), &req().attrs()).audited,
            ["default/audit-all"]
        );
    }

    #[test]
    fn custom_policies_name_their_provider_when_they_match() {
        let a = authz(
            r#"
authorization_policies:
- name: ext
  action: CUSTOM
  provider: {name: ext}
  targetRefs: [{kind: Service, name: web}]
  rules: [{to: [{operation: {paths: ["/api/*"]}}]}]
"#,
        );
        let d = a.decide(
            &web(),
            &Req {
                path: "/api/x",
                ..req()
            }
            .attrs(),
        );
        assert_eq!(d.custom.len(), 1);
        assert_eq!(d.custom[0].1.unwrap().name, "ext");
        assert!(d.denied.is_none());
        assert!(a.decide(&web(), &req().attrs()).custom.is_empty());
    }

    #[test]
    fn path_patterns_and_templates() {
        let table: &[(&str, &[(&str, bool)])] = &[
            (
                "/admin",
                &[("/admin", true), ("/admin/", false), ("/ADMIN", false)],
            ),
            (
                "/admin*",
                &[
                    ("/admin", true),
                    ("/admin/x", true),
                    ("/administrator", true),
                    ("/admi", false),
                    ("/admin;x", true),
                ],
            ),
            ("*.json", &[("/a/b.json", true), ("/a/b.jsonx", false)]),
            ("*", &[("/", true), ("/x", true)]),
            (
                "/a/{*}/c",
                &[
                    ("/a/b/c", true),
                    ("/a//c", false),
                    ("/a/b/x/c", false),
                    ("/a/b/c/", false),
                ],
            ),
            (
                "/a/{**}",
                &[
                    ("/a/", true),
                    ("/a/b", true),
                    ("/a/b/c/d", true),
                    ("/a", false),
                    ("/ab", false),
                ],
            ),
            (
                "/a/{*}/{**}",
                &[("/a/b/", true), ("/a/b/c/d", true), ("/a/b", false)],
            ),
            ("/{*}", &[("/x", true), ("/", false), ("/x/", false)]),
        ];
        for (pattern, cases) in table {
            crate::model::validate::check_path_pattern(pattern).unwrap();
            let p = PathPattern::parse(pattern);
            for (path, want) in *cases {
                assert_eq!(p.matches(path), *want, "{pattern} on {path}");
            }
        }
        for bad in [
            "/a/{**}/b",
            "/a/x{*}",
            "/a/{*}*",
            "/a/{x}",
            "/a*b",
            "a/{*}",
            "",
        ] {
            assert!(
                crate::model::validate::check_path_pattern(bad).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn hosts_are_case_insensitive_and_match_without_the_port() {
        let a = authz(
            r#"
authorization_policies:
- {name: p, targetRefs: [{kind: Service, name: web}], rules: [{to: [{operation: {hosts: [Web.Default, "*.example.com"]}}]}]}
"#,
        );
        for (host, allowed) in [
            ("web.default", true),
            ("WEB.default:80", true),
            ("a.example.com:8080", true),
            ("web.other", false),
            ("web.default.evil", false),
        ] {
            assert_eq!(
                verdict(&a, &web(), &Req { host, ..req() }).is_none(),
                allowed,
                "{host}"
            );
        }
    }

    #[test]
    fn request_principals_and_claims() {
        let a = authz(
            r#"
authorization_policies:
- name: p
  targetRefs: [{kind: Service, name: web}]
  rules:
  - from: [{source: {requestPrincipals: ["https://issuer/*"]}}]
    when:
    - {key: "request.auth.claims[groups]", values: [admins]}
    - {key: "request.auth.claims[org][team]", notValues: [red]}
    - {key: request.auth.audiences, values: [web]}
"#,
        );
        let auth = |claims: serde_json::Value| RequestAuth {
            principal: "https://issuer/alice".to_owned(),
            audiences: vec!["api".to_owned(), "web".to_owned()],
            presenter: None,
            claims,
        };
        let with = |claims| Req {
            auth: Some(auth(claims)),
            ..req()
        };
        use serde_json::json;
        assert!(
            verdict(
                &a,
                &web(),
                &with(json!({"groups": ["dev", "admins"], "org": {"team": "blue"}}))
            )
            .is_none()
        );
        assert!(verdict(&a, &web(), &with(json!({"groups": "admins"}))).is_none());
        assert!(verdict(&a, &web(), &with(json!({"groups": ["dev"]}))).is_some());
        assert!(
            verdict(
                &a,
                &web(),
                &with(json!({"groups": ["admins"], "org": {"team": "red"}}))
            )
            .is_some()
        );
        assert!(verdict(&a, &web(), &with(json!({}))).is_some());
        // No token: no request principal, no claims.
        assert!(verdict(&a, &web(), &req()).is_some());
    }

    #[test]
    fn header_and_remote_ip_conditions() {
        let a = authz(
            r#"
authorization_policies:
- name: p
  targetRefs: [{kind: Service, name: web}]
  rules:
  - from: [{source: {notRemoteIpBlocks: ["192.0.2.0/24"]}}]
    when:
    - {key: "request.headers[X-Team]", values: ["blue*"]}
"#,
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-team", HeaderValue::from_static("blue-1"));
        let ok = Req {
            headers: headers.clone(),
            ..req()
        };
        assert!(verdict(&a, &web(), &ok).is_none());
        assert!(verdict(&a, &web(), &req()).is_some(), "no header");
        let far = Req {
            headers,
            remote_ip: "192.0.2.7",
            ..req()
        };
        assert!(verdict(&a, &web(), &far).is_some());
    }

    #[test]
    fn remote_ip_trusts_only_the_given_hops() {
        let mut h = HeaderMap::new();
        h.append(
            "x-forwarded-for",
            HeaderValue::from_static("192.0.2.1, 10.0.0.1"),
        );
        h.append("x-forwarded-for", HeaderValue::from_static("10.0.0.2"));
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        assert_eq!(remote_ip(&h, 0), None);
        assert_eq!(remote_ip(&h, 1), ip("10.0.0.2"));
        assert_eq!(remote_ip(&h, 3), ip("192.0.2.1"));
        assert_eq!(remote_ip(&h, 4), None);
        assert_eq!(remote_ip(&HeaderMap::new(), 1), None);
    }
}
