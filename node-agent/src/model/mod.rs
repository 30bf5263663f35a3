//! The mesh model: what every role knows about the cluster, whatever told it.
//!
//! Workloads, services, authorization policies and peer authentications, in
//! shapes of their own: no file format and no API object lives here. Sources
//! translate into it (`discovery::file` from the local YAML file; Kubernetes
//! discovery later), [`validate`] checks what must hold whatever the source, and
//! the data path compiles it (`view`, `authz`, `lb`). Facts that only one node
//! knows (a pod's network namespace) are not part of it: they live in the node's
//! registry (`node::registry`).
//!
//! Entries keep the order their source gave them; problems name entries by
//! that order (`workloads[2] (shop/web-0)`), which for the file is its order.

pub mod authn;
pub mod ratelimit;
pub mod route;
pub mod validate;

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use serde::Serialize;

use crate::identity::SpiffeId;

/// The whole mesh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mesh {
    /// The trust domain of every identity in this mesh.
    pub trust_domain: String,
    /// Policies in this namespace apply to every workload (Istio's root namespace).
    pub root_namespace: String,
    pub workloads: Vec<Arc<Workload>>,
    pub services: Vec<Service>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    /// Namespace-wide settings (the waypoint its services use).
    pub namespaces: Vec<Namespace>,
    /// Gateway API routes; the waypoint of each parent Service applies them.
    pub http_routes: Vec<route::HttpRoute>,
    pub grpc_routes: Vec<route::GrpcRoute>,
    /// Istio's RequestAuthentication: JWT rules, applied at waypoints.
    pub request_authentications: Vec<authn::RequestAuthentication>,
    /// External authorization services, named by CUSTOM policies (Istio's
    /// MeshConfig `extensionProviders`).
    pub extension_providers: Vec<ExtensionProvider>,
    /// Rate limits at waypoints (Envoy Gateway's BackendTrafficPolicy shape).
    pub rate_limits: Vec<ratelimit::RateLimitPolicy>,
}

/// What changed since the mesh before: what a source that knows its changes
/// (Kubernetes) sends instead of a whole mesh when only pods and the
/// endpoints of services changed. `upserts` are whole workloads, new or
/// replacing the one of their key; `removes` are keys gone; `services` are
/// whole services replacing the one of their key, changed only in what their
/// EndpointSlices say (their endpoints, the ports their named target ports
/// resolve to). A delta never adds or removes a service: that is a whole
/// mesh.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MeshDelta {
    pub upserts: Vec<Arc<Workload>>,
    pub removes: Vec<WorkloadKey>,
    pub services: Vec<Service>,
}

impl MeshDelta {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removes.is_empty() && self.services.is_empty()
    }
}

/// The root namespace when a source names none.
pub const DEFAULT_ROOT_NAMESPACE: &str = "weft-system";

impl Default for Mesh {
    fn default() -> Self {
        Mesh {
            trust_domain: crate::identity::DEFAULT_TRUST_DOMAIN.to_owned(),
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_owned(),
            workloads: Vec::new(),
            services: Vec::new(),
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
            namespaces: Vec::new(),
            http_routes: Vec::new(),
            grpc_routes: Vec::new(),
            request_authentications: Vec::new(),
            extension_providers: Vec::new(),
            rate_limits: Vec::new(),
        }
    }
}

/// Labels of a workload, and label selectors (every listed label must match):
/// a list sorted by key, keys unique. Not a `BTreeMap<String, String>`: every
/// workload of a cluster carries its labels, and a `BTreeMap` of two labels
/// allocates a node of eleven slots, about 550 bytes, before the strings;
/// this is two words and the strings. Lookups are a binary search over a
/// handful of entries. Shared (an `Arc`): the pods of a Deployment carry the
/// same labels, which a source can hold once for all ([`LabelSets`]).
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Labels(Arc<[(Box<str>, Box<str>)]>);

/// Label sets held once, for a source that keeps many workloads: the pods of
/// one Deployment, ReplicaSet or DaemonSet carry equal labels (down to
/// `pod-template-hash`), so 100,000 pods hold a few thousand sets, not
/// 100,000 (~150 bytes each for three labels).
#[derive(Debug, Default)]
pub struct LabelSets {
    held: std::collections::HashSet<Labels>,
    /// Sets no workload holds any more are dropped when `held` reaches this.
    prune_at: usize,
}

impl LabelSets {
    /// Makes `labels` the set held for its value (a refcount), holding it
    /// if it is new.
    pub fn intern(&mut self, labels: &mut Labels) {
        if let Some(held) = self.held.get(labels) {
            if !Arc::ptr_eq(&held.0, &labels.0) {
                *labels = held.clone();
            }
            return;
        }
        if self.held.len() >= self.prune_at {
            self.held.retain(|l| Arc::strong_count(&l.0) > 1);
            // Amortized: a prune per as many new sets as are kept.
            self.prune_at = (self.held.len() * 2).max(64);
        }
        self.held.insert(labels.clone());
    }

    /// How many sets are held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

impl Labels {
    pub fn new() -> Labels {
        Labels::default()
    }

    /// The value of `key`, if it is there.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|i| &*self.0[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// `(key, value)`, by key.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Sets `key` to `value` (a copy of the list: for building, not for a
    /// hot path).
    pub fn insert(&mut self, key: impl Into<Box<str>>, value: impl Into<Box<str>>) {
        let mut v = self.0.to_vec();
        v.push((key.into(), value.into()));
        *self = v.into_iter().collect();
    }

    /// Takes `key` out, with its value.
    pub fn remove(&mut self, key: &str) -> Option<Box<str>> {
        let i = self.0.binary_search_by(|(k, _)| (**k).cmp(key)).ok()?;
        let mut v = self.0.to_vec();
        let (_, value) = v.remove(i);
        self.0 = v.into();
        Some(value)
    }
}

/// Later pairs win over earlier ones with the same key, as a map's inserts.
impl<K: Into<Box<str>>, V: Into<Box<str>>> FromIterator<(K, V)> for Labels {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Labels {
        let mut v: Vec<(Box<str>, Box<str>)> = iter
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        // Stable: of equal keys, the last one is kept below.
        v.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out: Vec<(Box<str>, Box<str>)> = Vec::with_capacity(v.len());
        for pair in v {
            match out.last_mut() {
                Some(last) if last.0 == pair.0 => *last = pair,
                _ => out.push(pair),
            }
        }
        Labels(out.into())
    }
}

impl<K: Into<Box<str>>, V: Into<Box<str>>, const N: usize> From<[(K, V); N]> for Labels {
    fn from(pairs: [(K, V); N]) -> Labels {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Labels {
        map.into_iter().collect()
    }
}

/// `labels["app"]`: the value, or a panic if the key is not there (as a map's).
impl std::ops::Index<&str> for Labels {
    type Output = str;

    fn index(&self, key: &str) -> &str {
        self.get(key).unwrap_or_else(|| panic!("no label {key:?}"))
    }
}

impl<'a> IntoIterator for &'a Labels {
    type Item = (&'a str, &'a str);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (Box<str>, Box<str>)>,
        fn(&'a (Box<str>, Box<str>)) -> (&'a str, &'a str),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl fmt::Debug for Labels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

impl<'de> serde::Deserialize<'de> for Labels {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Labels, D::Error> {
        BTreeMap::<String, String>::deserialize(d).map(Labels::from)
    }
}

/// A service's endpoints with their weights, among `all` (scanned for a
/// selector) and through `find` (a workload of its namespace by name, as the
/// caller indexes them): only workloads with an address can be one.
pub fn endpoints_of<'a>(
    svc: &Service,
    all: impl Iterator<Item = &'a Arc<Workload>>,
    find: impl Fn(&str) -> Option<&'a Arc<Workload>>,
) -> Vec<(&'a Arc<Workload>, u32)> {
    match &svc.endpoints {
        Endpoints::Selector(sel) => all
            .filter(|w| {
                w.namespace == svc.namespace && !w.addresses.is_empty() && selects(sel, &w.labels)
            })
            .map(|w| (w, 1))
            .collect(),
        Endpoints::Listed(list) => list
            .iter()
            .filter_map(|ep| {
                let w = find(&ep.workload)?;
                (!w.addresses.is_empty()).then_some((w, ep.weight))
            })
            .collect(),
    }
}

/// Whether `labels` carry every key and value of `selector`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A workload (a pod, in Kubernetes terms): one identity, addresses, labels, and
/// the node whose agent serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// The node the workload runs on.
    pub node: String,
    /// How other pods reach it; unique across the mesh.
    pub addresses: Vec<IpAddr>,
    /// Whether the mesh captures its traffic.
    pub enrolled: bool,
    /// What its connections to destinations outside the mesh do.
    pub outside_mesh: OutsideMesh,
    /// What service selectors and policy selectors match.
    pub labels: Labels,
    /// It speaks HBONE itself on port 15008 (a waypoint): reached over HBONE
    /// with its identity, never captured (so never `enrolled`).
    pub native_tunnel: bool,
}

/// What names a workload: its namespace and name, whether from a key, the
/// workload or a handle to it (lookups by any of them copy no string).
pub trait WorkloadId {
    fn id(&self) -> (&str, &str);
}

impl WorkloadId for WorkloadKey {
    fn id(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl WorkloadId for Workload {
    fn id(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

/// `(namespace, name)`.
impl WorkloadId for (&str, &str) {
    fn id(&self) -> (&str, &str) {
        *self
    }
}

impl WorkloadId for Arc<Workload> {
    fn id(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

/// A workload's key: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct WorkloadKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Its SPIFFE identity in `trust_domain`. Validation makes this infallible for
    /// a valid mesh.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, crate::identity::Error> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// Where an enrolled workload's connections go when their destination is not in
/// the mesh (not an enrolled workload, or unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutsideMesh {
    /// Connect directly, in plaintext, as the pod would without the mesh. The
    /// default: enrolling a pod must not cut it off from DNS, package mirrors or
    /// databases outside the cluster; there is no identity there to check.
    #[default]
    Passthrough,
    /// Refuse (reset) the connection: for pods that must only talk inside the mesh.
    Refuse,
}

/// A service's key: namespace and name.
pub type ServiceKey = (String, String);

/// A service: virtual IPs whose connections go to one of its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// Its virtual IPs: a connection to one of them, on one of `ports`, is sent
    /// to an endpoint. Unique across services and workloads.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    pub endpoints: Endpoints,
    pub load_balancing: LoadBalancing,
    pub outlier_detection: OutlierDetection,
    /// The waypoint its connections go through; `None`: the namespace's.
    pub waypoint: Option<UseWaypoint>,
}

impl Service {
    pub fn key(&self) -> ServiceKey {
        (self.namespace.clone(), self.name.clone())
    }
}

/// A binding to a waypoint (Istio's `istio.io/use-waypoint` label).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UseWaypoint {
    /// No waypoint, whatever the namespace says (`use-waypoint: none`).
    None,
    /// The waypoint whose replicas are this service's endpoints (a service of
    /// `native_tunnel` workloads).
    Service { namespace: String, name: String },
}

/// Settings of a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    /// The waypoint of its services that name none.
    pub waypoint: Option<UseWaypoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub port: u16,
    /// The port on the endpoint.
    pub target_port: u16,
    /// What the port speaks (Kubernetes' `appProtocol`): `http`, `http2`,
    /// `grpc`, `kubernetes.io/h2c`, `tcp`...; `None`: a waypoint detects it.
    pub app_protocol: Option<String>,
}

/// What a waypoint speaks to a service port's endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppProtocol {
    /// Bytes, with L4 policy only.
    Tcp,
    Http1,
    /// HTTP/2 in cleartext, prior knowledge (gRPC too).
    H2c,
    /// Unknown: HTTP/1.1 or HTTP/2 as the client speaks it, or bytes when the
    /// client's first bytes are not HTTP.
    Detect,
}

impl ServicePort {
    pub fn protocol(&self) -> AppProtocol {
        match self.app_protocol.as_deref() {
            Some("tcp" | "TCP") => AppProtocol::Tcp,
            Some("http" | "HTTP") => AppProtocol::Http1,
            Some("http2" | "HTTP2" | "grpc" | "GRPC" | "h2c" | "kubernetes.io/h2c") => {
                AppProtocol::H2c
            }
            _ => AppProtocol::Detect,
        }
    }
}

/// Which workloads serve a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoints {
    /// The workloads of the service's namespace with these labels.
    Selector(Labels),
    /// These workloads of the service's namespace, with weights.
    Listed(Vec<Endpoint>),
}

/// A listed endpoint: a workload of the service's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub workload: String,
    /// Relative share of connections (1 to 1000).
    pub weight: u32,
}

/// How a service picks an endpoint for a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// In turn, in proportion to the weights (smooth weighted round robin).
    #[default]
    RoundRobin,
    /// The less busy of two endpoints picked at random (weighted).
    LeastRequest,
    /// By the client's IP address: a client keeps its endpoint, and a change to
    /// the endpoints moves only the clients it must.
    ConsistentHash,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LoadBalancing {
    pub policy: LbPolicy,
    /// Pick among endpoints on the client's node while any of them is healthy.
    pub prefer_same_node: bool,
    /// Connect timeout per attempt; `None`: the agent's default.
    #[serde(serialize_with = "ser_opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Other endpoints tried after a refused or timed-out connect.
    pub retries: u32,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        LoadBalancing {
            policy: LbPolicy::default(),
            prefer_same_node: false,
            connect_timeout: None,
            retries: 2,
        }
    }
}

/// Ejects an endpoint after consecutive connect failures, for a time that doubles
/// with every ejection (up to a cap); it is re-admitted when the time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_failures: u32,
    #[serde(serialize_with = "ser_duration")]
    pub base_ejection_time: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub max_ejection_time: Duration,
    /// At most this share of endpoints is ejected at once (at least one may be).
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

/// Istio's AuthorizationPolicy. Without `target_refs` it is a workload's
/// policy, enforced by the destination's agent at L4 (`authz`); with them, it
/// is enforced by the waypoint of the services it names, at L7 (`http::authz`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    /// The root namespace makes it mesh-wide.
    pub namespace: String,
    /// Workloads of `namespace` it applies to; `None`: all of them.
    pub selector: Option<Labels>,
    /// What it is attached to at a waypoint (Istio ambient's `targetRefs`).
    pub target_refs: Vec<PolicyTargetRef>,
    pub action: Action,
    /// The extension provider a CUSTOM policy asks.
    pub provider: Option<String>,
    /// A request matches the policy if it matches any rule. No rules: an ALLOW
    /// policy matches nothing (denies all), a DENY policy matches nothing.
    pub rules: Vec<Rule>,
}

impl AuthorizationPolicy {
    /// Whether the waypoint enforces it (rather than the destination's agent).
    pub fn at_waypoint(&self) -> bool {
        !self.target_refs.is_empty()
    }
}

/// What a policy is attached to: `Service` (a service bound to a waypoint, of
/// the policy's namespace), `Gateway` (a waypoint, by its service's name: every
/// service it serves) or `GatewayClass` (`istio-waypoint`, from the root
/// namespace: every waypoint).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyTargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum Action {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    /// Asks an external authorization service (the policy's `provider`).
    #[serde(rename = "CUSTOM")]
    Custom,
    /// Only logs what it matches.
    #[serde(rename = "AUDIT")]
    Audit,
}

/// Matches if some source in `from` matches (or there is none), some
/// operation in `to` matches (or there is none) and every condition in
/// `when` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
    pub when: Vec<Condition>,
}

impl Rule {
    /// The L7 fields it uses (Istio's names), which an L4 enforcement point
    /// cannot see.
    pub fn l7_fields(&self) -> Vec<&str> {
        let mut found = Vec::new();
        for s in &self.from {
            for (name, given) in [
                ("requestPrincipals", !s.request_principals.is_empty()),
                ("notRequestPrincipals", !s.not_request_principals.is_empty()),
                ("remoteIpBlocks", !s.remote_ip_blocks.is_empty()),
                ("notRemoteIpBlocks", !s.not_remote_ip_blocks.is_empty()),
            ] {
                if given {
                    found.push(name);
                }
            }
        }
        for o in &self.to {
            for (name, given) in [
                ("hosts", !o.hosts.is_empty()),
                ("notHosts", !o.not_hosts.is_empty()),
                ("methods", !o.methods.is_empty()),
                ("notMethods", !o.not_methods.is_empty()),
                ("paths", !o.paths.is_empty()),
                ("notPaths", !o.not_paths.is_empty()),
            ] {
                if given {
                    found.push(name);
                }
            }
        }
        for c in &self.when {
            if !L4_CONDITION_KEYS.contains(&c.key.as_str()) {
                found.push(&c.key);
            }
        }
        found
    }
}

/// The `when` keys an L4 enforcement point can evaluate (Istio's list, less
/// `destination.ip`, which Weft does not support).
pub const L4_CONDITION_KEYS: &[&str] = &[
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
];

/// Every field given must match. Principals (`<trust-domain>/ns/<ns>/sa/<sa>`) and
/// namespaces may start or end with `*`; `*` alone matches any present value.
/// Plaintext connections have no principal, namespace or service account: those
/// fields never match them, and their `not_` forms always do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    /// JWT principals, `<iss>/<sub>` (L7).
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    /// `<namespace>/<service account>`.
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
    /// Source addresses.
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    /// The original client's address, from `X-Forwarded-For` (L7).
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    /// Destination ports (the application's port in the pod; the service's
    /// port at a waypoint).
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    /// The request's authority, without a port (L7); case-insensitive.
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    /// L7.
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// The normalized path, without the query (L7): exact, `prefix*`,
    /// `*suffix`, `*`, or a template with `{*}` (one segment) and `{**}` (the
    /// rest).
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

/// A `when` condition: the key's value must be one of `values` (if given)
/// and none of `not_values`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Condition {
    /// `request.headers[<name>]`, `request.auth.claims[<a>][<b>]...`,
    /// `request.auth.principal`, `request.auth.audiences`,
    /// `request.auth.presenter`, `source.ip`, `remote.ip`, `source.namespace`,
    /// `source.principal`, `destination.port`.
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

/// An external authorization service (Istio's `envoyExtAuthzHttp` or
/// `envoyExtAuthzGrpc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtensionProvider {
    pub name: String,
    /// Where the service is and how long a check may take; the HTTP form's
    /// other fields apply to it only.
    pub http: ExtAuthzHttp,
    /// Envoy's gRPC protocol (`envoy.service.auth.v3.Authorization/Check`)
    /// instead of the HTTP form.
    pub grpc: bool,
    /// On an error or a timeout, allow the request (default: deny it).
    pub fail_open: bool,
    /// The status a request gets when the service fails and `fail_open` is
    /// off (default 403).
    pub status_on_error: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ExtAuthzHttp {
    /// A mesh service, `<name>.<namespace>` (also with `.svc...` after it),
    /// or an IP address.
    pub service: String,
    pub port: u16,
    /// Put before the request's path in the check request.
    pub path_prefix: String,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Request headers copied into the check request, besides those Envoy
    /// always copies (`host`, `authorization`); the check has the request's
    /// method and path, and no body.
    pub include_request_headers_in_check: Vec<String>,
    /// Headers added to the check request.
    pub include_additional_headers_in_check: BTreeMap<String, String>,
    /// Headers of the service's 2xx answer copied onto the request upstream.
    pub headers_to_upstream_on_allow: Vec<String>,
    /// Headers of the service's denial copied onto the answer to the client.
    pub headers_to_downstream_on_deny: Vec<String>,
}

/// Whether a workload accepts plaintext (Istio's PeerAuthentication). The most
/// specific applies: a selector over the namespace-wide one over the root
/// namespace's; default `PERMISSIVE`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<Labels>,
    pub mode: PeerMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
pub enum PeerMode {
    /// Mutual TLS only: plaintext inbound connections are refused.
    #[serde(rename = "STRICT")]
    Strict,
    /// Mutual TLS and plaintext both accepted.
    #[default]
    #[serde(rename = "PERMISSIVE")]
    Permissive,
}

/// An address block: an address and a prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for IpNet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or a block like 10.0.0.0/8"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Durations in dumps: `30000ms`.
fn ser_duration<S: serde::Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{}ms", v.as_millis()))
}

fn ser_opt_duration<S: serde::Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => ser_duration(v, s),
        None => s.serialize_none(),
    }
}

impl Mesh {
    /// Applies `delta` (a scan of the workloads and services: for a mesh held
    /// aside, not the data path's view).
    pub fn apply_delta(&mut self, delta: MeshDelta) {
        let gone: std::collections::HashSet<WorkloadKey> = delta
            .removes
            .into_iter()
            .chain(delta.upserts.iter().map(|w| w.key()))
            .collect();
        self.workloads.retain(|w| !gone.contains(&w.key()));
        self.workloads.extend(delta.upserts);
        if !delta.services.is_empty() {
            let mut changed: HashMap<ServiceKey, Service> =
                delta.services.into_iter().map(|s| (s.key(), s)).collect();
            for svc in &mut self.services {
                if let Some(s) = changed.remove(&svc.key()) {
                    *svc = s;
                }
            }
        }
    }

    /// Whether the two meshes are equal in everything but their workloads.
    pub fn eq_without_workloads(&self, other: &Mesh) -> bool {
        self.services == other.services && self.eq_settings(other)
    }

    /// Whether the two meshes are equal in everything but their workloads
    /// and services.
    pub fn eq_settings(&self, other: &Mesh) -> bool {
        let Mesh {
            trust_domain,
            root_namespace,
            workloads: _,
            services: _,
            authorization_policies,
            peer_authentications,
            namespaces,
            http_routes,
            grpc_routes,
            request_authentications,
            extension_providers,
            rate_limits,
        } = self;
        *trust_domain == other.trust_domain
            && *root_namespace == other.root_namespace
            && *authorization_policies == other.authorization_policies
            && *peer_authentications == other.peer_authentications
            && *namespaces == other.namespaces
            && *http_routes == other.http_routes
            && *grpc_routes == other.grpc_routes
            && *request_authentications == other.request_authentications
            && *extension_providers == other.extension_providers
            && *rate_limits == other.rate_limits
    }

    /// The workload that owns `ip`, if any (a scan: the data path asks
    /// `view::View`, which indexes them).
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Workload> {
        let ip = ip.to_canonical();
        self.workloads
            .iter()
            .find(|w| w.addresses.contains(&ip))
            .map(|w| &**w)
    }

    /// Whether some workload on `node` has identity `id` (what the CA signs for
    /// that node's agent).
    pub fn identity_on_node(&self, id: &SpiffeId, node: &str) -> bool {
        id.trust_domain() == self.trust_domain
            && self.workloads.iter().any(|w| {
                w.node == node
                    && w.namespace == id.namespace()
                    && w.service_account == id.service_account()
            })
    }

    /// Every service something is bound to as its waypoint, by (namespace,
    /// name), once per binding: by a service or a namespace.
    pub fn waypoint_services(&self) -> impl Iterator<Item = (&str, &str)> {
        self.services
            .iter()
            .map(|s| &s.waypoint)
            .chain(self.namespaces.iter().map(|n| &n.waypoint))
            .filter_map(|b| match b {
                Some(UseWaypoint::Service { namespace, name }) => {
                    Some((namespace.as_str(), name.as_str()))
                }
                _ => None,
            })
    }

    /// The waypoint service `svc` is bound to, if any: its own binding, or its
    /// namespace's. A waypoint's own service is never bound (it would loop).
    pub fn waypoint_of(&self, svc: &Service) -> Option<ServiceKey> {
        let binding = svc.waypoint.as_ref().or_else(|| {
            self.namespaces
                .iter()
                .find(|n| n.name == svc.namespace)
                .and_then(|n| n.waypoint.as_ref())
        })?;
        match binding {
            UseWaypoint::None => None,
            UseWaypoint::Service { namespace, name } => {
                let key = (namespace.clone(), name.clone());
                (key != svc.key() && !self.is_waypoint(svc)).then_some(key)
            }
        }
    }

    /// [`Mesh::waypoint_of`] of every service, in order, at once: O(services
    /// + namespaces), where a call per service is quadratic.
    pub fn waypoints(&self) -> Vec<Option<ServiceKey>> {
        let by_namespace: std::collections::HashMap<&str, &UseWaypoint> = self
            .namespaces
            .iter()
            .filter_map(|n| Some((n.name.as_str(), n.waypoint.as_ref()?)))
            .collect();
        // Some service's waypoint (never bound itself).
        let waypoints: std::collections::HashSet<(&str, &str)> = self
            .services
            .iter()
            .filter_map(|s| s.waypoint.as_ref())
            .chain(self.namespaces.iter().filter_map(|n| n.waypoint.as_ref()))
            .filter_map(|b| match b {
                UseWaypoint::Service { namespace, name } => {
                    Some((namespace.as_str(), name.as_str()))
                }
                UseWaypoint::None => None,
            })
            .collect();
        self.services
            .iter()
            .map(|svc| {
                let binding = svc
                    .waypoint
                    .as_ref()
                    .or_else(|| by_namespace.get(svc.namespace.as_str()).copied())?;
                match binding {
                    UseWaypoint::None => None,
                    UseWaypoint::Service { namespace, name } => {
                        let me = (svc.namespace.as_str(), svc.name.as_str());
                        ((namespace.as_str(), name.as_str()) != me && !waypoints.contains(&me))
                            .then(|| (namespace.clone(), name.clone()))
                    }
                }
            })
            .collect()
    }

    /// A service's endpoints with their weights: its listed workloads, or those
    /// of its namespace its selector picks; only workloads with an address
    /// can be one.
    pub fn endpoint_workloads<'a>(&'a self, svc: &'a Service) -> Vec<(&'a Arc<Workload>, u32)> {
        endpoints_of(svc, self.workloads.iter(), |name| {
            self.workloads
                .iter()
                .find(|w| w.namespace == svc.namespace && w.name == name)
        })
    }

    /// Whether `svc` is some service's waypoint.
    pub fn is_waypoint(&self, svc: &Service) -> bool {
        let bound = |b: Option<&UseWaypoint>| {
            matches!(b, Some(UseWaypoint::Service { namespace, name })
                if *namespace == svc.namespace && *name == svc.name)
        };
        self.services.iter().any(|s| bound(s.waypoint.as_ref()))
            || self.namespaces.iter().any(|n| bound(n.waypoint.as_ref()))
    }

    /// The enrolled workloads placed on `node`.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .iter()
            .map(|w| &**w)
            .filter(move |w| w.enrolled && w.node == node)
    }

    /// How many workloads are enrolled, mesh-wide.
    pub fn enrolled_count(&self) -> usize {
        self.workloads.iter().filter(|w| w.enrolled).count()
    }
}
