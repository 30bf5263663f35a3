//! The local mesh file: one YAML file describes the whole mesh (local mode, the
//! demo and the tests). Its format is this module's: strict (unknown fields are
//! errors, so a typo is never silently ignored), with Istio's camelCase names
//! accepted beside ours, and every error naming where it is.
//!
//! Reading it yields the mesh model and, beside it, each workload's network
//! namespace: the one node-local fact the file carries for lack of a CNI plugin
//! to report it (an agent keeps only its own node's, in its registry).

use std::{
    collections::{BTreeMap, HashSet},
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::model::{self, Labels, Mesh, WorkloadKey, route};

/// The largest mesh file read, by default. A file that is larger is refused
/// before it is parsed: parsing 50 MiB took each agent and the CA past 100 MB.
/// 16 MiB is tens of thousands of workloads.
pub const DEFAULT_MAX_BYTES: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: {size} bytes is over the {max}-byte limit (raise --config-max-bytes if the mesh really is that large)"
    )]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error(
        "{path}: the file is empty; an empty mesh file is never applied (it would unenroll every pod). To empty the mesh on purpose, write `workloads: []` and `allow_shrink: true`"
    )]
    Empty { path: PathBuf },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// A mesh file, read and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub mesh: Mesh,
    /// Each workload's network namespace, where the file names one.
    pub netns: BTreeMap<WorkloadKey, PathBuf>,
    /// The file says that a change shrinking the mesh sharply is meant
    /// (`allow_shrink: true`): see [`super::guard`].
    pub allow_shrink: bool,
}

/// Reads, parses and validates the mesh file at `path`, refusing one larger than
/// `max_bytes` before reading it whole.
pub fn load(path: &Path, max_bytes: u64) -> Result<Loaded, Error> {
    let read = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    // Read one byte past the limit: a file that grows while read is caught too.
    let mut text = String::new();
    file.take(max_bytes.saturating_add(1))
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > max_bytes {
        let size = std::fs::metadata(path).map_or(text.len() as u64, |m| m.len());
        return Err(Error::TooLarge {
            path: path.to_owned(),
            size,
            max: max_bytes,
        });
    }
    parse(path, &text)
}

/// Parses and validates mesh file text; `path` only names it in errors.
pub fn parse(path: &Path, text: &str) -> Result<Loaded, Error> {
    if text.trim().is_empty() {
        return Err(Error::Empty {
            path: path.to_owned(),
        });
    }
    let file: File = crate::yaml::from_str(text).map_err(|message| Error::Parse {
        path: path.to_owned(),
        message,
    })?;
    let mut problems = file.problems();
    let loaded = file.into_model();
    problems.extend(model::validate::problems(&loaded.mesh));
    if problems.is_empty() {
        Ok(loaded)
    } else {
        Err(Error::Invalid {
            path: path.to_owned(),
            problems,
        })
    }
}

// ---- the file format ----------------------------------------------------------

/// The whole mesh, as the file writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    root_namespace: Option<String>,
    /// A change that unenrolls most of the mesh or drops every policy is meant.
    #[serde(default)]
    allow_shrink: bool,
    #[serde(default)]
    workloads: Vec<Workload>,
    #[serde(default)]
    services: Vec<Service>,
    #[serde(default)]
    authorization_policies: Vec<AuthorizationPolicy>,
    #[serde(default)]
    peer_authentications: Vec<PeerAuthentication>,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    /// Gateway API routes: each entry carries the object's `spec` as written.
    #[serde(default)]
    http_routes: Vec<Route<route::HttpRouteSpec>>,
    #[serde(default)]
    grpc_routes: Vec<Route<route::GrpcRouteSpec>>,
    /// Istio's RequestAuthentication, in the model's own shape (Istio's fields).
    #[serde(default, alias = "requestAuthentications")]
    request_authentications: Vec<model::authn::RequestAuthentication>,
    /// External authorization services for CUSTOM policies (Istio's
    /// MeshConfig `extensionProviders`).
    #[serde(default, alias = "extensionProviders")]
    extension_providers: Vec<ExtensionProvider>,
    /// Rate limits at waypoints, in the model's own shape (Envoy Gateway's
    /// BackendTrafficPolicy `rateLimit` fields).
    #[serde(default, alias = "rateLimits")]
    rate_limits: Vec<model::ratelimit::RateLimitPolicy>,
}

/// Namespace-wide settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Namespace {
    name: String,
    /// Istio's `istio.io/use-waypoint` label: a waypoint service's name (of
    /// this namespace), `<namespace>/<name>`, or `none`.
    #[serde(default)]
    waypoint: Option<String>,
}

/// A `waypoint:` value: `none`, `<name>` (in `namespace`) or `<namespace>/<name>`.
fn use_waypoint(value: String, namespace: &str) -> model::UseWaypoint {
    match value.split_once('/') {
        _ if value == "none" => model::UseWaypoint::None,
        Some((ns, name)) => model::UseWaypoint::Service {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        },
        None => model::UseWaypoint::Service {
            namespace: namespace.to_owned(),
            name: value,
        },
    }
}

/// A route entry: a name, a namespace, and the Gateway API `spec` as-is
/// (camelCase), so a user pastes the `spec` of an HTTPRoute or GRPCRoute.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Route<S> {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    spec: S,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Workload {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default = "default_namespace")]
    service_account: String,
    node: String,
    /// A path such as `/var/run/netns/<name>` or `/proc/<pid>/ns/net`.
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    addresses: Vec<IpAddr>,
    #[serde(default)]
    enrolled: bool,
    #[serde(default)]
    outside_mesh: OutsideMesh,
    #[serde(default)]
    labels: Labels,
    /// It speaks HBONE itself (a waypoint): never captured.
    #[serde(default, alias = "nativeTunnel")]
    native_tunnel: bool,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum OutsideMesh {
    #[default]
    Passthrough,
    Refuse,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Service {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    addresses: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    #[serde(default)]
    selector: Option<Labels>,
    #[serde(default)]
    endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    load_balancing: LoadBalancing,
    #[serde(default)]
    outlier_detection: OutlierDetection,
    /// See [`Namespace::waypoint`].
    #[serde(default)]
    waypoint: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicePort {
    port: u16,
    #[serde(default)]
    target_port: Option<u16>,
    #[serde(default, alias = "appProtocol")]
    app_protocol: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Endpoint {
    workload: String,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    ConsistentHash,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadBalancing {
    #[serde(default)]
    policy: LbPolicy,
    #[serde(default)]
    prefer_same_node: bool,
    #[serde(default, deserialize_with = "opt_duration")]
    connect_timeout: Option<Duration>,
    #[serde(default)]
    retries: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutlierDetection {
    #[serde(default)]
    consecutive_failures: Option<u32>,
    #[serde(default, deserialize_with = "opt_duration")]
    base_ejection_time: Option<Duration>,
    #[serde(default, deserialize_with = "opt_duration")]
    max_ejection_time: Option<Duration>,
    #[serde(default)]
    max_ejection_percent: Option<u8>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizationPolicy {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    selector: Option<Labels>,
    #[serde(default, alias = "targetRefs")]
    target_refs: Vec<TargetRef>,
    #[serde(default)]
    action: Action,
    #[serde(default)]
    provider: Option<Provider>,
    #[serde(default)]
    rules: Vec<Rule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetRef {
    #[serde(default)]
    group: String,
    kind: String,
    name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Provider {
    name: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
enum Action {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    #[serde(rename = "CUSTOM")]
    Custom,
    #[serde(rename = "AUDIT")]
    Audit,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    #[serde(default)]
    from: Vec<FromSource>,
    #[serde(default)]
    to: Vec<ToOperation>,
    #[serde(default)]
    when: Vec<Condition>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FromSource {
    source: Source,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default, alias = "notPrincipals")]
    not_principals: Vec<String>,
    #[serde(default, alias = "requestPrincipals")]
    request_principals: Vec<String>,
    #[serde(default, alias = "notRequestPrincipals")]
    not_request_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default, alias = "notNamespaces")]
    not_namespaces: Vec<String>,
    #[serde(default, alias = "serviceAccounts")]
    service_accounts: Vec<String>,
    #[serde(default, alias = "notServiceAccounts")]
    not_service_accounts: Vec<String>,
    #[serde(default, alias = "ipBlocks", deserialize_with = "ip_nets")]
    ip_blocks: Vec<model::IpNet>,
    #[serde(default, alias = "notIpBlocks", deserialize_with = "ip_nets")]
    not_ip_blocks: Vec<model::IpNet>,
    #[serde(default, alias = "remoteIpBlocks", deserialize_with = "ip_nets")]
    remote_ip_blocks: Vec<model::IpNet>,
    #[serde(default, alias = "notRemoteIpBlocks", deserialize_with = "ip_nets")]
    not_remote_ip_blocks: Vec<model::IpNet>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToOperation {
    operation: Operation,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Operation {
    #[serde(default, deserialize_with = "ports")]
    ports: Vec<u16>,
    #[serde(default, alias = "notPorts", deserialize_with = "ports")]
    not_ports: Vec<u16>,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default, alias = "notHosts")]
    not_hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default, alias = "notMethods")]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default, alias = "notPaths")]
    not_paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Condition {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default, alias = "notValues")]
    not_values: Vec<String>,
}

/// Istio's `extensionProviders` entry: `envoyExtAuthzHttp` or
/// `envoyExtAuthzGrpc`, exactly one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtensionProvider {
    name: String,
    #[serde(default, alias = "envoyExtAuthzHttp")]
    http: Option<ExtAuthzHttp>,
    #[serde(default, alias = "envoyExtAuthzGrpc")]
    grpc: Option<ExtAuthzGrpc>,
    #[serde(default, alias = "failOpen")]
    fail_open: bool,
    #[serde(default, alias = "statusOnError")]
    status_on_error: Option<u16>,
}

/// Istio's `envoyExtAuthzGrpc`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtAuthzGrpc {
    service: String,
    port: u16,
    #[serde(default, deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExtAuthzHttp {
    service: String,
    port: u16,
    #[serde(default, alias = "pathPrefix")]
    path_prefix: String,
    #[serde(default, deserialize_with = "opt_duration")]
    timeout: Option<Duration>,
    #[serde(default, alias = "includeRequestHeadersInCheck")]
    include_request_headers_in_check: Vec<String>,
    #[serde(default, alias = "includeAdditionalHeadersInCheck")]
    include_additional_headers_in_check: BTreeMap<String, String>,
    #[serde(default, alias = "headersToUpstreamOnAllow")]
    headers_to_upstream_on_allow: Vec<String>,
    #[serde(default, alias = "headersToDownstreamOnDeny")]
    headers_to_downstream_on_deny: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeerAuthentication {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    selector: Option<Labels>,
    mode: PeerMode,
}

#[derive(Debug, Clone, Copy, Deserialize)]
enum PeerMode {
    #[serde(rename = "STRICT")]
    Strict,
    #[serde(rename = "PERMISSIVE")]
    Permissive,
}

impl AuthorizationPolicy {
    fn into_model(self) -> model::AuthorizationPolicy {
        let p = self;
        model::AuthorizationPolicy {
            name: p.name,
            namespace: p.namespace,
            selector: p.selector,
            target_refs: p
                .target_refs
                .into_iter()
                .map(|t| model::PolicyTargetRef {
                    group: t.group,
                    kind: t.kind,
                    name: t.name,
                })
                .collect(),
            action: match p.action {
                Action::Allow => model::Action::Allow,
                Action::Deny => model::Action::Deny,
                Action::Custom => model::Action::Custom,
                Action::Audit => model::Action::Audit,
            },
            provider: p.provider.map(|p| p.name),
            rules: p
                .rules
                .into_iter()
                .map(|r| model::Rule {
                    from: r
                        .from
                        .into_iter()
                        .map(|f| {
                            let s = f.source;
                            model::Source {
                                principals: s.principals,
                                not_principals: s.not_principals,
                                request_principals: s.request_principals,
                                not_request_principals: s.not_request_principals,
                                namespaces: s.namespaces,
                                not_namespaces: s.not_namespaces,
                                service_accounts: s.service_accounts,
                                not_service_accounts: s.not_service_accounts,
                                ip_blocks: s.ip_blocks,
                                not_ip_blocks: s.not_ip_blocks,
                                remote_ip_blocks: s.remote_ip_blocks,
                                not_remote_ip_blocks: s.not_remote_ip_blocks,
                            }
                        })
                        .collect(),
                    to: r
                        .to
                        .into_iter()
                        .map(|t| {
                            let o = t.operation;
                            model::Operation {
                                ports: o.ports,
                                not_ports: o.not_ports,
                                hosts: o.hosts,
                                not_hosts: o.not_hosts,
                                methods: o.methods,
                                not_methods: o.not_methods,
                                paths: o.paths,
                                not_paths: o.not_paths,
                            }
                        })
                        .collect(),
                    when: r
                        .when
                        .into_iter()
                        .map(|c| model::Condition {
                            key: c.key,
                            values: c.values,
                            not_values: c.not_values,
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// An AuthorizationPolicy in the file's shape (Istio's fields, camelCase or
/// snake_case, with `name`, `namespace` and `selector` as plain labels), from
/// any serde value: Kubernetes discovery reads a policy object's `spec` with
/// the same types as the file, so the two sources cannot drift apart.
pub(crate) fn authorization_policy(
    value: serde_json::Value,
) -> Result<model::AuthorizationPolicy, String> {
    serde_json::from_value::<AuthorizationPolicy>(value)
        .map(AuthorizationPolicy::into_model)
        .map_err(|e| e.to_string())
}

/// Istio's default for an ext_authz check when `timeout` is unset.
const DEFAULT_EXT_AUTHZ_TIMEOUT: Duration = Duration::from_secs(600);

fn opt_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let s = String::deserialize(d)?;
    crate::units::parse_duration(&s)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// Ports as numbers or as strings of digits: Istio's API writes them as
/// strings (`ports: ["8080"]`), so a policy pasted from a cluster reads as is.
fn ports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u16>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Port {
        Number(u16),
        Text(String),
    }
    Vec::<Port>::deserialize(d)?
        .into_iter()
        .map(|p| match p {
            Port::Number(n) => Ok(n),
            Port::Text(s) => s
                .parse()
                .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a port"))),
        })
        .collect()
}

fn ip_nets<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<model::IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| s.parse().map_err(serde::de::Error::custom))
        .collect()
}

impl File {
    /// What the model cannot say: only the file can be half-filled this way.
    fn problems(&self) -> Vec<String> {
        // An enrolled workload without `netns` is not one: the agent learns
        // its namespace from the CNI plugin, or finds it in /proc by address.
        let mut problems = Vec::new();
        for (i, svc) in self.services.iter().enumerate() {
            if svc.selector.is_some() == svc.endpoints.is_some() {
                let at = format!("services[{i}] ({}/{})", svc.namespace, svc.name);
                problems.push(format!(
                    "{at}: give exactly one of `selector` and `endpoints`"
                ));
            }
        }
        for (i, x) in self.extension_providers.iter().enumerate() {
            if x.http.is_some() == x.grpc.is_some() {
                problems.push(format!(
                    "extension_providers[{i}] ({}): give exactly one of `envoyExtAuthzHttp` and `envoyExtAuthzGrpc`",
                    x.name
                ));
            }
        }
        problems
    }

    fn into_model(self) -> Loaded {
        let defaults = Mesh::default();
        let mut netns = BTreeMap::new();
        let mut seen = HashSet::new();
        let workloads = self
            .workloads
            .into_iter()
            .map(|w| {
                let w_model = model::Workload {
                    name: w.name,
                    namespace: w.namespace,
                    service_account: w.service_account,
                    node: w.node,
                    addresses: w.addresses.iter().map(|a| a.to_canonical()).collect(),
                    enrolled: w.enrolled,
                    outside_mesh: match w.outside_mesh {
                        OutsideMesh::Passthrough => model::OutsideMesh::Passthrough,
                        OutsideMesh::Refuse => model::OutsideMesh::Refuse,
                    },
                    labels: w.labels,
                    native_tunnel: w.native_tunnel,
                };
                if let Some(path) = w.netns
                    && seen.insert(w_model.key())
                {
                    netns.insert(w_model.key(), path);
                }
                std::sync::Arc::new(w_model)
            })
            .collect();
        let lb_defaults = model::LoadBalancing::default();
        let od_defaults = model::OutlierDetection::default();
        let services = self
            .services
            .into_iter()
            .map(|s| model::Service {
                waypoint: s.waypoint.map(|w| use_waypoint(w, &s.namespace)),
                name: s.name,
                namespace: s.namespace,
                addresses: s.addresses.iter().map(|a| a.to_canonical()).collect(),
                ports: s
                    .ports
                    .iter()
                    .map(|p| model::ServicePort {
                        port: p.port,
                        target_port: p.target_port.unwrap_or(p.port),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect(),
                // Both or neither given is a problem reported above; the model
                // then takes what there is.
                endpoints: match (s.selector, s.endpoints) {
                    (Some(sel), _) => model::Endpoints::Selector(sel),
                    (None, Some(list)) => model::Endpoints::Listed(
                        list.into_iter()
                            .map(|e| model::Endpoint {
                                workload: e.workload,
                                weight: e.weight,
                            })
                            .collect(),
                    ),
                    (None, None) => model::Endpoints::Listed(Vec::new()),
                },
                load_balancing: model::LoadBalancing {
                    policy: match s.load_balancing.policy {
                        LbPolicy::RoundRobin => model::LbPolicy::RoundRobin,
                        LbPolicy::LeastRequest => model::LbPolicy::LeastRequest,
                        LbPolicy::ConsistentHash => model::LbPolicy::ConsistentHash,
                    },
                    prefer_same_node: s.load_balancing.prefer_same_node,
                    connect_timeout: s.load_balancing.connect_timeout,
                    retries: s.load_balancing.retries.unwrap_or(lb_defaults.retries),
                },
                outlier_detection: model::OutlierDetection {
                    consecutive_failures: s
                        .outlier_detection
                        .consecutive_failures
                        .unwrap_or(od_defaults.consecutive_failures),
                    base_ejection_time: s
                        .outlier_detection
                        .base_ejection_time
                        .unwrap_or(od_defaults.base_ejection_time),
                    max_ejection_time: s
                        .outlier_detection
                        .max_ejection_time
                        .unwrap_or(od_defaults.max_ejection_time),
                    max_ejection_percent: s
                        .outlier_detection
                        .max_ejection_percent
                        .unwrap_or(od_defaults.max_ejection_percent),
                },
            })
            .collect();
        let authorization_policies = self
            .authorization_policies
            .into_iter()
            .map(AuthorizationPolicy::into_model)
            .collect();
        let extension_providers = self
            .extension_providers
            .into_iter()
            .map(|p| {
                let grpc = p.grpc.is_some();
                let http = match (p.http, p.grpc) {
                    (Some(h), _) => h,
                    (None, Some(g)) => ExtAuthzHttp {
                        service: g.service,
                        port: g.port,
                        timeout: g.timeout,
                        path_prefix: String::new(),
                        include_request_headers_in_check: Vec::new(),
                        include_additional_headers_in_check: BTreeMap::new(),
                        headers_to_upstream_on_allow: Vec::new(),
                        headers_to_downstream_on_deny: Vec::new(),
                    },
                    // Reported by `problems`; this entry is never used.
                    (None, None) => ExtAuthzHttp {
                        service: String::new(),
                        port: 0,
                        timeout: None,
                        path_prefix: String::new(),
                        include_request_headers_in_check: Vec::new(),
                        include_additional_headers_in_check: BTreeMap::new(),
                        headers_to_upstream_on_allow: Vec::new(),
                        headers_to_downstream_on_deny: Vec::new(),
                    },
                };
                model::ExtensionProvider {
                    name: p.name,
                    fail_open: p.fail_open,
                    status_on_error: p.status_on_error.unwrap_or(403),
                    grpc,
                    http: model::ExtAuthzHttp {
                        service: http.service,
                        port: http.port,
                        path_prefix: http.path_prefix,
                        timeout: http.timeout.unwrap_or(DEFAULT_EXT_AUTHZ_TIMEOUT),
                        include_request_headers_in_check: http.include_request_headers_in_check,
                        include_additional_headers_in_check: http
                            .include_additional_headers_in_check,
                        headers_to_upstream_on_allow: http.headers_to_upstream_on_allow,
                        headers_to_downstream_on_deny: http.headers_to_downstream_on_deny,
                    },
                }
            })
            .collect();
        let peer_authentications = self
            .peer_authentications
            .into_iter()
            .map(|p| model::PeerAuthentication {
                name: p.name,
                namespace: p.namespace,
                selector: p.selector,
                mode: match p.mode {
                    PeerMode::Strict => model::PeerMode::Strict,
                    PeerMode::Permissive => model::PeerMode::Permissive,
                },
            })
            .collect();
        Loaded {
            mesh: Mesh {
                trust_domain: self.trust_domain.unwrap_or(defaults.trust_domain),
                root_namespace: self.root_namespace.unwrap_or(defaults.root_namespace),
                workloads,
                services,
                authorization_policies,
                peer_authentications,
                http_routes: self
                    .http_routes
                    .into_iter()
                    .map(|r| route::HttpRoute {
                        name: r.name,
                        namespace: r.namespace,
                        spec: r.spec,
                    })
                    .collect(),
                grpc_routes: self
                    .grpc_routes
                    .into_iter()
                    .map(|r| route::GrpcRoute {
                        name: r.name,
                        namespace: r.namespace,
                        spec: r.spec,
                    })
                    .collect(),
                request_authentications: self.request_authentications,
                rate_limits: self.rate_limits,
                extension_providers,
                namespaces: self
                    .namespaces
                    .into_iter()
                    .map(|n| model::Namespace {
                        waypoint: n.waypoint.map(|w| use_waypoint(w, &n.name)),
                        name: n.name,
                    })
                    .collect(),
            },
            netns,
            allow_shrink: self.allow_shrink,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LbPolicy, PeerMode};

    fn parse(text: &str) -> Result<Loaded, Error> {
        super::parse(Path::new("mesh.yaml"), text)
    }

    #[test]
    fn parses_a_workload_with_defaults() {
        let c = parse(
            "workloads:\n- name: a\n  node: n0\n  netns: /var/run/netns/a\n  enrolled: true\n",
        )
        .unwrap();
        let w = &c.mesh.workloads[0];
        assert_eq!(w.namespace, "default");
        assert_eq!(w.service_account, "default");
        assert_eq!(c.mesh.enrolled_on("n0").count(), 1);
        assert_eq!(c.mesh.enrolled_on("n1").count(), 0);
        assert_eq!(
            c.netns[&w.key()],
            PathBuf::from("/var/run/netns/a"),
            "the namespace is beside the model, not in it"
        );
        assert_eq!(c.mesh.trust_domain, "cluster.local");
        assert!(!c.allow_shrink);
    }

    #[test]
    fn an_empty_or_blank_file_is_refused() {
        for text in ["", "   \n", "\n\n\t\n"] {
            assert!(
                matches!(parse(text), Err(Error::Empty { .. })),
                "{text:?} was accepted"
            );
        }
        // A mesh emptied on purpose says so.
        let c = parse("workloads: []\nallow_shrink: true\n").unwrap();
        assert!(c.mesh.workloads.is_empty() && c.allow_shrink);
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_before_it_is_parsed() {
        let dir = std::env::temp_dir().join(format!("weft-file-limit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mesh.yaml");
        // Valid YAML, a comment line repeated past the limit.
        let text = "# padding padding padding padding padding padding padding\n".repeat(200)
            + "workloads: []\nallow_shrink: true\n";
        std::fs::write(&path, &text).unwrap();
        let small = load(&path, 1024);
        let big = load(&path, text.len() as u64);
        let _ = std::fs::remove_dir_all(&dir);
        match small {
            Err(Error::TooLarge { size, max, .. }) => {
                assert_eq!((size, max), (text.len() as u64, 1024));
            }
            other => panic!("{other:?}"),
        }
        assert!(big.is_ok(), "{big:?}");
    }

    #[test]
    fn unknown_field_is_an_error_with_a_location() {
        let e = parse("workloads:\n- name: a\n  node: n0\n  enroled: true\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("enroled"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
        assert!(!msg.contains('\n'), "one line: {msg}");
    }

    #[test]
    fn yaml_booleans_are_true_or_false_and_keys_are_given_once() {
        for text in [
            "workloads:\n- {name: a, node: n0, enrolled: yes}\n",
            "workloads:\n- {name: a, node: n0, enrolled: off}\n",
            "workloads: []\nworkloads: []\n",
        ] {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, Error::Parse { .. }), "{text:?}: {e}");
        }
    }

    #[test]
    fn an_alias_bomb_is_refused_not_expanded() {
        let mut text = String::from("x0: &x0 [a, a, a, a, a, a, a, a, a, a]\n");
        for i in 1..12 {
            let prev = format!("*x{}", i - 1);
            let list = [prev.as_str(); 10].join(", ");
            text.push_str(&format!("x{i}: &x{i} [{list}]\n"));
        }
        let labels = format!("{text}workloads:\n- name: a\n  node: n0\n  labels: {{k: v}}\n");
        // 10^12 strings if expanded: the parser's budget stops it.
        let e = parse(&labels).unwrap_err();
        assert!(matches!(e, Error::Parse { .. }), "{e}");
    }

    #[test]
    fn services_policies_and_peer_authentication_parse() {
        let c = parse(
            r#"
workloads:
- {name: web-0, node: n0, addresses: [10.1.0.2], labels: {app: web}}
- {name: web-1, node: n1, addresses: [10.1.0.3], labels: {app: web}}
services:
- name: web
  addresses: [10.96.0.10]
  ports: [{port: 80, target_port: 8080}]
  selector: {app: web}
  load_balancing: {policy: least_request, prefer_same_node: true, connect_timeout: 2s}
  outlier_detection: {consecutive_failures: 3, base_ejection_time: 5s}
- name: listed
  addresses: [10.96.0.11]
  ports: [{port: 9000}]
  endpoints: [{workload: web-0, weight: 3}, {workload: web-1}]
authorization_policies:
- name: deny-bad
  action: DENY
  selector: {app: web}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/bad/*"], ipBlocks: ["10.9.0.0/16"]}}]
    to: [{operation: {ports: [8080]}}]
peer_authentications:
- {name: strict, namespace: default, mode: STRICT}
"#,
        )
        .unwrap()
        .mesh;
        assert_eq!(c.services[0].ports[0].target_port, 8080);
        assert_eq!(c.services[1].ports[0].target_port, 9000);
        assert_eq!(c.services[0].load_balancing.policy, LbPolicy::LeastRequest);
        assert_eq!(
            c.services[0].load_balancing.connect_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(c.services[0].outlier_detection.consecutive_failures, 3);
        assert_eq!(
            c.services[0].outlier_detection.max_ejection_time,
            Duration::from_secs(300),
            "a default for what the file leaves out"
        );
        let model::Endpoints::Listed(listed) = &c.services[1].endpoints else {
            panic!("listed endpoints");
        };
        assert_eq!(listed[1].weight, 1);
        let src = &c.authorization_policies[0].rules[0].from[0];
        assert!(src.ip_blocks[0].contains("10.9.3.4".parse().unwrap()));
        assert!(!src.ip_blocks[0].contains("10.8.3.4".parse().unwrap()));
        assert_eq!(c.peer_authentications[0].mode, PeerMode::Strict);
    }

    #[test]
    fn service_and_policy_problems_name_their_entry() {
        let e = parse(
            r#"
workloads:
- {name: a, node: n0, addresses: [10.1.0.2]}
services:
- {name: s, addresses: [10.1.0.2], ports: [{port: 80, target_port: 15008}], selector: {app: a}, endpoints: []}
- {name: t, addresses: [10.96.0.1], ports: [], endpoints: [{workload: nope, weight: 0}]}
authorization_policies:
- name: p
  rules: [{from: [{source: {principals: ["a*b"], service_accounts: ["x"]}}]}]
peer_authentications:
- {name: one, mode: STRICT}
- {name: two, mode: PERMISSIVE}
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "services[0] (default/s): address 10.1.0.2 is also default/a's",
            "services[0] (default/s): ports[0]: target port 15008 is reserved",
            "services[0] (default/s): give exactly one of `selector` and `endpoints`",
            "services[1] (default/t): needs at least one port",
            "services[1] (default/t): endpoints[0]: no workload default/nope",
            "services[1] (default/t): endpoints[0]: weight must be 1 to 1000",
            "authorization_policies[0] (default/p): rules[0].from[0].source.principals: \"a*b\"",
            "service_accounts: \"x\" is not",
            "peer_authentications[1] (default/two): a second namespace-wide",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let e = parse("authorization_policies:\n- {name: p, rules: [{from: [{source: {ip_blocks: [10.0.0.0/33]}}]}]}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefix length") && e.contains("line 2"), "{e}");
    }

    /// A real HTTPRoute spec (the mesh conformance suite's weighted split, with
    /// a header match and a filter), pasted as-is.
    const REVIEWS: &str = r#"
services:
- {name: reviews, addresses: [10.96.0.20], ports: [{port: 9080}], selector: {app: reviews}}
- {name: reviews-v2, addresses: [10.96.0.21], ports: [{port: 9080}], selector: {app: reviews, version: v2}}
http_routes:
- name: reviews
  spec:
    parentRefs:
    - group: ""
      kind: Service
      name: reviews
      port: 9080
    rules:
    - matches:
      - path: {type: PathPrefix, value: /api}
        headers:
        - {name: x-canary, value: "true"}
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier:
          set: [{name: x-route, value: canary}]
      backendRefs:
      - {name: reviews-v2, port: 9080}
      timeouts: {request: 10s, backendRequest: 2s}
    - backendRefs:
      - {name: reviews, port: 9080, weight: 90}
      - {name: reviews-v2, port: 9080, weight: 10}
grpc_routes:
- name: ratings
  namespace: default
  spec:
    parentRefs: [{group: "", kind: Service, name: reviews}]
    rules:
    - matches: [{method: {service: ratings.Ratings, method: Get}}]
      backendRefs: [{name: reviews, port: 9080}]
"#;

    #[test]
    fn routes_parse_with_the_spec_defaults() {
        let mesh = parse(REVIEWS).unwrap().mesh;
        let r = &mesh.http_routes[0];
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("default", "reviews")
        );
        let rules = &r.spec.rules;
        assert_eq!(rules[0].matches[0].path.value, "/api");
        assert_eq!(
            rules[1].matches,
            vec![route::HttpRouteMatch::default()],
            "no matches: a prefix match on /"
        );
        assert_eq!(rules[1].backend_refs[1].weight, 10);
        assert_eq!(rules[0].backend_refs[0].weight, 1, "the default weight");
        let g = &mesh.grpc_routes[0].spec.rules[0].matches[0];
        assert_eq!(
            g.method.as_ref().unwrap().kind,
            route::HeaderMatchType::Exact
        );
    }

    #[test]
    fn a_typo_in_a_route_is_an_error_naming_where() {
        let e = parse(&REVIEWS.replace("backendRequest", "backendRequests"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("backendRequests") && e.contains("line 24"),
            "{e}"
        );
    }

    #[test]
    fn route_problems_name_the_route_and_the_field() {
        let e = parse(
            r#"
http_routes:
- name: reviews
  spec:
    parentRefs: [{name: reviews}]
    rules:
    - matches: [{path: {type: Exact, value: api}}, {headers: [{type: RegularExpression, name: "x y", value: "("}]}]
      filters:
      - {type: RequestRedirect, requestRedirect: {statusCode: 304, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
      - {type: URLRewrite, urlRewrite: {hostname: example.org}}
      - {type: ExtensionRef, extensionRef: {group: example.org, kind: Filter, name: f}}
      backendRefs: [{name: nowhere, port: 80, weight: 2000000}, {name: noport}]
      timeouts: {request: 1s, backendRequest: 2s}
      retry: {attempts: 11, codes: [200]}
      sessionPersistence: {sessionName: s}
    - {name: same}
    - {name: same}
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "http_routes[0] (default/reviews): parentRefs[0]: gateway.networking.k8s.io/Gateway \"reviews\" is not supported",
            "rules[0].matches[0].path: \"api\" must start with '/'",
            "rules[0].matches[1].headers[0].name: \"x y\" is not a valid header name",
            "rules[0].matches[1].headers[0].value: \"(\" is not a valid regular expression",
            "rules[0].filters: RequestRedirect and URLRewrite may not be combined",
            "rules[0]: a RequestRedirect filter answers the request itself",
            "rules[0].filters[0].requestRedirect.statusCode: 304",
            "rules[0].filters[0]: ReplacePrefixMatch needs the rule to have exactly one match",
            "rules[0].filters[2]: ExtensionRef filters are not supported",
            "rules[0].backendRefs[0].weight: must be 0 to 1000000",
            "rules[0].backendRefs[1]: port is required for a Service",
            "rules[0].timeouts: backendRequest must not be longer than request",
            "rules[0].retry.codes[0]: 200 is not 400 to 599",
            "rules[0].retry.attempts: at most 10",
            "rules[0].sessionPersistence: not supported",
            "rules[2].name: \"same\" is used twice",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        assert!(
            !e.contains("nowhere"),
            "a backend naming no service is valid (it answers 500): {e}"
        );
    }

    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc
            .find("```yaml\n# A complete example")
            .expect("the example")
            + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let c = parse(&doc[start..end]).unwrap().mesh;
        assert_eq!(c.workloads.len(), 3);
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.authorization_policies.len(), 2);
        assert_eq!(c.peer_authentications.len(), 2);
    }

    #[test]
    fn the_documented_routes_are_valid() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc.find("```yaml\n# Routes").expect("the example") + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let c = parse(&doc[start..end]).unwrap().mesh;
        assert_eq!(c.http_routes.len(), 1);
        assert_eq!(c.http_routes[0].spec.rules.len(), 2);
    }

    #[test]
    fn the_documented_waypoint_binding_is_valid() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc.find("```yaml\n# Waypoints").expect("the example") + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let c = parse(&doc[start..end]).unwrap().mesh;
        let by_name = |n: &str| c.services.iter().find(|s| s.name == n).unwrap();
        let wp = ("default".to_owned(), "waypoint".to_owned());
        assert_eq!(c.waypoint_of(by_name("shop")), Some(wp.clone()));
        assert_eq!(c.waypoint_of(by_name("metrics")), None, "opted out");
        assert_eq!(
            c.waypoint_of(by_name("waypoint")),
            None,
            "a waypoint's own service is never bound, even by its namespace"
        );
    }

    #[test]
    fn the_documented_request_authentication_is_valid() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc
            .find("```yaml\n# Request authentication")
            .expect("the example")
            + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let c = parse(&doc[start..end]).unwrap().mesh;
        let ra = &c.request_authentications;
        assert_eq!(ra.len(), 2);
        assert_eq!(ra[0].target_refs[0].name, "shop");
        let rules = &ra[0].jwt_rules;
        assert_eq!(rules[0].audiences, ["shop"]);
        assert_eq!(rules[0].output_claim_to_headers[1].claim, "org.team");
        assert_eq!(rules[1].from_headers[0].prefix, "Token ");
        assert!(rules[1].forward_original_token);
        assert_eq!(ra[1].jwt_rules[0].timeout, Some(Duration::from_secs(2)));
    }

    #[test]
    fn request_authentications_apply_by_target_and_mesh_wide() {
        let c = parse(
            r#"
services:
- {name: shop, addresses: [10.96.0.30], ports: [{port: 80}], selector: {app: shop}}
- {name: cart, addresses: [10.96.0.31], ports: [{port: 80}], selector: {app: cart}}
request_authentications:
- {name: to-shop, targetRefs: [{kind: Service, name: shop}], jwtRules: []}
- {name: to-waypoint, targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: wp}]}
- {name: mesh, namespace: weft-system}
- {name: root-selector, namespace: weft-system, selector: {app: shop}}
- {name: namespace-wide}
- {name: selected, selector: {app: shop}}
"#,
        )
        .unwrap()
        .mesh;
        let applied = |svc: &str, wp: Option<&str>| -> Vec<&str> {
            let s = c.services.iter().find(|s| s.name == svc).unwrap();
            let wp = wp.map(|n| ("default".to_owned(), n.to_owned()));
            c.request_authentications
                .iter()
                .filter(|p| p.applies_to(&c, s, wp.as_ref()))
                .map(|p| p.name.as_str())
                .collect()
        };
        assert_eq!(
            applied("shop", Some("wp")),
            ["to-shop", "to-waypoint", "mesh"]
        );
        assert_eq!(applied("cart", Some("other")), ["mesh"]);
    }

    #[test]
    fn request_authentication_problems_name_the_field() {
        let e = parse(
            r#"
request_authentications:
- name: p
  selector: {app: a}
  targetRefs: [{kind: Deployment, name: x, namespace: other}]
  jwtRules:
  - {issuer: "", jwks: '{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}'}
  - {issuer: a, jwksUri: "http://keys.example/jwks"}
  - {issuer: a}
  - issuer: b
    jwks: "{}"
    jwksUri: https://x.example/k
    fromHeaders: [{name: "bad header"}]
    fromCookies: ["a;b"]
    outputClaimToHeaders: [{header: "x y", claim: ""}]
    timeout: 0s
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "request_authentications[0] (default/p): give at most one of `selector` and `targetRefs`",
            "targetRefs[0]: /Deployment is not supported",
            "targetRefs[0]: namespace \"other\"",
            "jwtRules[0].issuer: must not be empty",
            "jwtRules[0].jwks: keys[0]: symmetric (oct) keys are refused",
            "jwtRules[1].jwksUri: \"http://keys.example/jwks\" is not an https:// URL",
            "jwtRules[2]: give `jwks` or `jwksUri`",
            "jwtRules[2]: issuer \"a\" has a rule already",
            "jwtRules[3]: give one of `jwks` and `jwksUri`",
            "jwtRules[3].fromHeaders[0].name: \"bad header\" is not a valid header name",
            "jwtRules[3].fromCookies[0]: \"a;b\" is not a valid name",
            "jwtRules[3].outputClaimToHeaders[0].header",
            "jwtRules[3].outputClaimToHeaders[0].claim: must not be empty",
            "jwtRules[3].timeout: must be more than 0s",
        ] {
            assert!(e.contains(want), "missing {want:?} in {e}");
        }
        let e =
            parse("request_authentications:\n- {name: p, jwtRules: [{issuer: a, jwksUrl: x}]}\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("jwksUrl") && e.contains("line 2"), "{e}");
    }

    #[test]
    fn the_documented_rate_limits_are_valid() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc.find("```yaml\n# Rate limits").expect("the example") + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let c = parse(&doc[start..end]).unwrap().mesh;
        let rl = &c.rate_limits;
        assert_eq!(rl.len(), 3);
        assert_eq!(rl[0].key, ["header:x-user"]);
        assert_eq!(rl[0].rules[0].burst, Some(5));
        assert!(rl[0].divide_by_replicas);
        assert_eq!(rl[1].kind, model::ratelimit::LimitType::Global);
        assert_eq!(rl[1].timeout, Some(Duration::from_millis(20)));
        assert_eq!(
            rl[1].rules[0].client_selectors[0].headers[0].kind,
            model::ratelimit::HeaderMatchType::Distinct
        );
        assert!(rl[2].shadow);
    }

    #[test]
    fn rate_limit_problems_name_the_field() {
        let err = parse(
            "rate_limits:\n\
             - name: a\n  target_refs: [{kind: Gateway, name: w}]\n  key: [cookie:x]\n  timeout: 10ms\n\
             \x20 rules:\n  - limit: {requests: 0, unit: Second}\n    burst: 0\n\
             \x20   client_selectors:\n    - headers: [{name: x, type: Distinct, value: v}, {name: y, type: RegularExpression, value: '('}]\n\
             \x20     source_cidr: {value: nope}\n\
             - name: a\n  type: Global\n  divide_by_replicas: true\n  target_refs: [{kind: Service, name: s}]\n  rules: [{limit: {requests: 1, unit: Hour}}]\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "rate_limits[0] (default/a): target_refs[0]: kind \"Gateway\" is not supported",
            "rate_limits[0] (default/a): key[0]: \"cookie:x\" is none of",
            "rate_limits[0] (default/a): failure_mode and timeout are for Global limits",
            "rate_limits[0] (default/a): rules[0].limit.requests: must be more than 0",
            "rate_limits[0] (default/a): rules[0].burst: must be more than 0",
            "rules[0].client_selectors[0].headers[0]: a Distinct match takes no value",
            "rules[0].client_selectors[0].headers[1].value: \"(\" is not a valid regular expression",
            "rules[0].client_selectors[0].source_cidr.value: \"nope\" is not a CIDR",
            "rate_limits[1] (default/a): duplicate rate limit",
            "rate_limits[1] (default/a): divide_by_replicas is for Local limits",
        ] {
            assert!(err.contains(want), "missing {want:?} in:\n{err}");
        }
        let err = parse("rate_limits:\n- {name: a, target_refs: [], rules: [{limit: {requests: 1, unit: Day}}]}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("Day"), "{err}");
    }

    #[test]
    fn the_documented_l7_policies_are_valid() {
        let doc = include_str!("../../../docs/config.md");
        let start = doc.find("```yaml\n# L7 policies").expect("the example") + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let c = parse(&doc[start..end]).unwrap().mesh;
        assert_eq!(c.authorization_policies.len(), 4);
        assert_eq!(
            c.extension_providers[0].http.timeout,
            Duration::from_millis(500)
        );
        assert!(c.authorization_policies.iter().all(|p| p.at_waypoint()));
    }

    #[test]
    fn waypoint_bindings_are_checked() {
        let e = parse(
            "workloads:\n- {name: w, node: n0, native_tunnel: true, enrolled: true, netns: /x, labels: {role: wp}}\n- {name: a, node: n0, addresses: [10.0.0.9], labels: {role: wp2}}\n\
             services:\n- {name: s, addresses: [10.96.0.1], ports: [{port: 80}], selector: {app: x}, waypoint: nope}\n\
             - {name: t, addresses: [10.96.0.2], ports: [{port: 80}], selector: {app: x}, waypoint: wp2}\n\
             - {name: wp2, addresses: [], ports: [], selector: {role: wp2}}\n\
             namespaces:\n- {name: default, waypoint: other/nope}\n",
        )
        .unwrap_err()
        .to_string();
        for want in [
            "workloads[0] (default/w): a `native_tunnel` workload",
            "services[0] (default/s): waypoint: no service default/nope",
            "services[2] (default/wp2): is a waypoint, but its endpoint default/a is not `native_tunnel`",
            "namespaces[0] (default): waypoint: no service other/nope",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
    }

    #[test]
    fn l7_policy_problems_name_their_place() {
        let e = parse(
            r#"
extension_providers:
- {name: ext, http: {service: ext.default, port: 0, path_prefix: x}, status_on_error: 99}
- {name: ext, http: {service: ext.default, port: 80}}
authorization_policies:
- name: a
  selector: {app: x}
  targetRefs: [{kind: Pod, name: web}, {kind: GatewayClass, name: istio-waypoint}, {kind: Service, group: apps, name: web}]
  action: CUSTOM
  provider: {name: nope}
  rules:
  - to: [{operation: {paths: ["/a/{**}/b"], methods: ["G*T"]}}]
    when:
    - {key: "request.headers[bad header]", values: [x]}
    - {key: source.ip, values: [nope]}
    - {key: destination.port, values: ["0"]}
    - {key: request.body, values: [x]}
    - {key: "request.auth.claims[groups]"}
- {name: b, action: AUDIT, rules: [{}]}
- {name: c, provider: {name: ext}, targetRefs: [{kind: Service, name: web}]}
"#,
        )
        .unwrap_err()
        .to_string();
        for want in [
            "extension_providers[0] (ext): http: needs a service and a port",
            "extension_providers[0] (ext): http.path_prefix must start with `/`",
            "extension_providers[0] (ext): status_on_error must be 200 to 599",
            "extension_providers[1] (ext): needs a name of its own",
            "authorization_policies[0] (default/a): give `selector` (a workload's policy) or `target_refs`",
            "authorization_policies[0] (default/a): target_refs[0]: kind \"Pod\"",
            "authorization_policies[0] (default/a): target_refs[1]: a GatewayClass is targeted from the root namespace",
            "authorization_policies[0] (default/a): target_refs[2]: group \"apps\" does not fit kind Service",
            "authorization_policies[0] (default/a): provider \"nope\" is not in `extension_providers`",
            "authorization_policies[0] (default/a): rules[0].to[0].operation.paths: \"/a/{**}/b\": `{**}` must be the last segment",
            "authorization_policies[0] (default/a): rules[0].to[0].operation.methods: \"G*T\"",
            "authorization_policies[0] (default/a): rules[0].when[0]: request.headers[bad header]: \"bad header\" is not a valid header name",
            "authorization_policies[0] (default/a): rules[0].when[1]: source.ip: \"nope\"",
            "authorization_policies[0] (default/a): rules[0].when[2]: destination.port: \"0\" is not a port",
            "authorization_policies[0] (default/a): rules[0].when[3]: key \"request.body\"",
            "authorization_policies[0] (default/a): rules[0].when[4]: give `values` or `not_values`",
            "authorization_policies[1] (default/b): a CUSTOM or AUDIT policy is enforced by a waypoint only",
            "authorization_policies[2] (default/c): `provider` is for CUSTOM policies only",
        ] {
            assert!(e.contains(want), "{want:?} not in {e}");
        }
    }

    #[test]
    fn istio_camel_case_policies_parse() {
        let c = parse(
            r#"
extensionProviders:
- name: ext
  envoyExtAuthzHttp:
    service: ext-authz.default.svc.cluster.local
    port: 8000
    pathPrefix: /check
    timeout: 2s
    includeRequestHeadersInCheck: [x-ext-authz]
    headersToUpstreamOnAllow: [x-user]
  failOpen: true
authorization_policies:
- name: p
  targetRefs: [{kind: Service, group: "", name: web}]
  action: CUSTOM
  provider: {name: ext}
  rules:
  - from: [{source: {requestPrincipals: ["*"], notRemoteIpBlocks: [192.0.2.0/24]}}]
    to: [{operation: {notHosts: [a], notMethods: [PUT], notPaths: ["/x/{*}"]}}]
    when: [{key: "request.auth.claims[iss]", notValues: [evil]}]
"#,
        )
        .unwrap()
        .mesh;
        let x = &c.extension_providers[0];
        assert!(x.fail_open);
        assert_eq!(x.status_on_error, 403);
        assert_eq!(x.http.timeout, Duration::from_secs(2));
        assert_eq!(x.http.path_prefix, "/check");
        let p = &c.authorization_policies[0];
        assert_eq!(p.action, model::Action::Custom);
        assert_eq!(p.provider.as_deref(), Some("ext"));
        assert_eq!(p.target_refs[0].kind, "Service");
        assert_eq!(
            p.rules[0].l7_fields(),
            [
                "requestPrincipals",
                "notRemoteIpBlocks",
                "notHosts",
                "notMethods",
                "notPaths",
                "request.auth.claims[iss]"
            ]
        );
    }

    #[test]
    fn ports_may_be_written_as_istio_writes_them() {
        let c = parse(
            "authorization_policies:\n- name: p\n  selector: {app: a}\n  rules:\n  - to: [{operation: {ports: [\"8080\", 9090], notPorts: [\"1\"]}}]\n",
        )
        .unwrap()
        .mesh;
        let op = &c.authorization_policies[0].rules[0].to[0];
        assert_eq!(
            (op.ports.as_slice(), op.not_ports.as_slice()),
            (&[8080, 9090][..], &[1][..])
        );
        let e = parse(
            "authorization_policies:\n- name: p\n  selector: {app: a}\n  rules:\n  - to: [{operation: {ports: [\"http\"]}}]\n",
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"http\" is not a port"), "{e}");
    }

    #[test]
    fn every_problem_is_reported() {
        let e = parse(
            "workloads:\n- name: A\n  node: n0\n  enrolled: true\n- name: b\n  node: n0\n- name: b\n  node: n0\n",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("workloads[0] (default/A): name must be a DNS label"),
            "{msg}"
        );
        assert!(
            msg.contains("workloads[2] (default/b): duplicate workload"),
            "{msg}"
        );
    }
}
