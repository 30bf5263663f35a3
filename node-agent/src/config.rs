//! The mesh model as the local YAML file declares it, and its validation.
//!
//! One file describes the whole (local) mesh; each agent serves the workloads the
//! file places on its node. Parsing is strict (unknown fields are errors, so a typo
//! is never silently ignored), and every error names where it is.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The whole mesh, as one file declares it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// The trust domain of every identity in this mesh.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Policies in this namespace apply to every workload (Istio's root namespace).
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub authorization_policies: Vec<AuthorizationPolicy>,
    #[serde(default)]
    pub peer_authentications: Vec<PeerAuthentication>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: default_trust_domain(),
            root_namespace: default_root_namespace(),
            workloads: Vec::new(),
            services: Vec::new(),
            authorization_policies: Vec::new(),
            peer_authentications: Vec::new(),
        }
    }
}

fn default_root_namespace() -> String {
    "weft-system".to_owned()
}

/// Labels of a workload, and label selectors (every listed label must match).
pub type Labels = BTreeMap<String, String>;

/// Whether `labels` carry every key and value of `selector`.
pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn default_trust_domain() -> String {
    crate::identity::DEFAULT_TRUST_DOMAIN.to_owned()
}

/// Where an enrolled workload's connections go when their destination is not in
/// the mesh (not an enrolled workload, or unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
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

/// A workload (a pod, in Kubernetes terms).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The node the workload runs on.
    pub node: String,
    /// Its network namespace (a path such as `/var/run/netns/<name>` or
    /// `/proc/<pid>/ns/net`). Needed to enroll it.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Whether the mesh captures its traffic.
    #[serde(default)]
    pub enrolled: bool,
    /// What its connections to destinations outside the mesh do.
    #[serde(default)]
    pub outside_mesh: OutsideMesh,
    /// What service selectors and policy selectors match.
    #[serde(default)]
    pub labels: Labels,
}

/// A service: virtual IPs whose connections go to one of its endpoints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Its virtual IPs: a connection to one of them, on one of `ports`, is sent to
    /// an endpoint. Unique across services and workloads.
    pub addresses: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Endpoints: the workloads of the service's namespace with these labels...
    #[serde(default)]
    pub selector: Option<Labels>,
    /// ...or these workloads, listed (with weights). Exactly one of the two.
    #[serde(default)]
    pub endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// The port on the endpoint; default: `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// A listed endpoint: a workload of the service's namespace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub workload: String,
    /// Relative share of connections (1 to 1000; default 1).
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// How a service picks an endpoint for a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoadBalancing {
    #[serde(default)]
    pub policy: LbPolicy,
    /// Pick among endpoints on the client's node while any of them is healthy.
    #[serde(default)]
    pub prefer_same_node: bool,
    /// Connect timeout per attempt; default: the agent's `--connect-timeout-ms`.
    #[serde(default, with = "opt_duration")]
    pub connect_timeout: Option<Duration>,
    /// Other endpoints tried after a refused or timed-out connect.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        LoadBalancing {
            policy: LbPolicy::default(),
            prefer_same_node: false,
            connect_timeout: None,
            retries: default_retries(),
        }
    }
}

fn default_retries() -> u32 {
    2
}

/// Ejects an endpoint after consecutive connect failures, for a time that doubles
/// with every ejection (up to a cap); it is re-admitted when the time is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "default_base_ejection", with = "duration")]
    pub base_ejection_time: Duration,
    #[serde(default = "default_max_ejection", with = "duration")]
    pub max_ejection_time: Duration,
    /// At most this share of endpoints is ejected at once (at least one may be).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejection_percent() -> u8 {
    50
}

/// Istio's AuthorizationPolicy, L4 part: evaluated by the destination's agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    /// The root namespace makes it mesh-wide.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Workloads of `namespace` it applies to; absent: all of them.
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub action: Action,
    /// A connection matches the policy if it matches any rule. No rules: an ALLOW
    /// policy matches nothing (denies all), a DENY policy matches nothing.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Action {
    #[default]
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

/// Matches if some `from` matches (or there is none) and some `to` matches (or
/// there is none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Vec<FromSource>,
    #[serde(default)]
    pub to: Vec<ToOperation>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FromSource {
    pub source: Source,
}

/// Every field given must match. Principals (`<trust-domain>/ns/<ns>/sa/<sa>`) and
/// namespaces may start or end with `*`; `*` alone matches any present value.
/// Plaintext connections have no principal, namespace or service account: those
/// fields never match them, and their `not_` forms always do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default, alias = "notPrincipals")]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default, alias = "notNamespaces")]
    pub not_namespaces: Vec<String>,
    /// `<namespace>/<service account>`.
    #[serde(default, alias = "serviceAccounts")]
    pub service_accounts: Vec<String>,
    #[serde(default, alias = "notServiceAccounts")]
    pub not_service_accounts: Vec<String>,
    /// Source addresses: `10.0.0.0/8`, `fd00::/8`, or one address.
    #[serde(default, alias = "ipBlocks")]
    pub ip_blocks: Vec<IpNet>,
    #[serde(default, alias = "notIpBlocks")]
    pub not_ip_blocks: Vec<IpNet>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ToOperation {
    pub operation: Operation,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Operation {
    /// Destination ports (the application's port in the pod).
    #[serde(default)]
    pub ports: Vec<u16>,
    #[serde(default, alias = "notPorts")]
    pub not_ports: Vec<u16>,
}

/// Whether a workload accepts plaintext (Istio's PeerAuthentication). The most
/// specific applies: a selector over the namespace-wide one over the root
/// namespace's; default `PERMISSIVE`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<Labels>,
    pub mode: PeerMode,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
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

impl<'de> Deserialize<'de> for IpNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for IpNet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Durations in the file: `500ms`, `30s`, `5m`, `1h`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::cli::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}ms", v.as_millis()))
    }
}

mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        crate::cli::parse_duration(&s)
            .map(Some)
            .map_err(serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => super::duration::serialize(v, s),
            None => s.serialize_none(),
        }
    }
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// A workload's identity in the config: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// a loaded config.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, crate::identity::Error> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

impl MeshConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let config: MeshConfig = if text.trim().is_empty() {
            MeshConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| Error::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?
        };
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Cross-field rules; each problem names the entry it is about.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = SpiffeId::new(&self.trust_domain, "default", "default") {
            problems.push(format!("trust_domain: {e}"));
        }
        let mut seen = HashSet::new();
        let mut addresses = std::collections::HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            if !is_dns_label(&w.name) {
                problems.push(format!("{at}: name must be a DNS label (a-z, 0-9, '-')"));
            }
            if !is_dns_label(&w.namespace) {
                problems.push(format!("{at}: namespace must be a DNS label"));
            }
            if !is_dns_label(&w.service_account) {
                problems.push(format!("{at}: service_account must be a DNS label"));
            }
            if w.node.is_empty() {
                problems.push(format!("{at}: node must not be empty"));
            }
            if w.enrolled && w.netns.is_none() {
                problems.push(format!("{at}: an enrolled workload needs `netns`"));
            }
            if !seen.insert(w.key()) {
                problems.push(format!("{at}: duplicate workload"));
            }
            for a in &w.addresses {
                if let Some(other) = addresses.insert(*a, w.key().to_string())
                    && other != w.key().to_string()
                {
                    problems.push(format!("{at}: address {a} is also {other}'s"));
                }
            }
            labels_problems(&at, "labels", &w.labels, &mut problems);
        }
        self.service_problems(&mut addresses, &mut problems);
        self.policy_problems(&mut problems);
        problems
    }

    fn service_problems(
        &self,
        addresses: &mut std::collections::HashMap<IpAddr, String>,
        problems: &mut Vec<String>,
    ) {
        let mut seen = HashSet::new();
        for (i, svc) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({}/{})", svc.namespace, svc.name);
            if !is_dns_label(&svc.name) || !is_dns_label(&svc.namespace) {
                problems.push(format!("{at}: name and namespace must be DNS labels"));
            }
            if !seen.insert((&svc.namespace, &svc.name)) {
                problems.push(format!("{at}: duplicate service"));
            }
            if svc.addresses.is_empty() {
                problems.push(format!("{at}: needs at least one address (its VIP)"));
            }
            let me = format!("service {}/{}", svc.namespace, svc.name);
            for a in &svc.addresses {
                if let Some(other) = addresses.insert(a.to_canonical(), me.clone())
                    && other != me
                {
                    problems.push(format!("{at}: address {a} is also {other}'s"));
                }
            }
            if svc.ports.is_empty() {
                problems.push(format!("{at}: needs at least one port"));
            }
            let mut ports = HashSet::new();
            for (j, p) in svc.ports.iter().enumerate() {
                if p.port == 0 || p.target_port == Some(0) {
                    problems.push(format!("{at}: ports[{j}]: port 0"));
                }
                if !ports.insert(p.port) {
                    problems.push(format!("{at}: ports[{j}]: port {} twice", p.port));
                }
                if crate::proxy::is_reserved_port(p.target()) {
                    problems.push(format!(
                        "{at}: ports[{j}]: target port {} is reserved for the mesh",
                        p.target()
                    ));
                }
            }
            match (&svc.selector, &svc.endpoints) {
                (Some(_), Some(_)) | (None, None) => problems.push(format!(
                    "{at}: give exactly one of `selector` and `endpoints`"
                )),
                (Some(sel), None) => labels_problems(&at, "selector", sel, problems),
                (None, Some(eps)) => {
                    for (j, ep) in eps.iter().enumerate() {
                        if !self
                            .workloads
                            .iter()
                            .any(|w| w.namespace == svc.namespace && w.name == ep.workload)
                        {
                            problems.push(format!(
                                "{at}: endpoints[{j}]: no workload {}/{}",
                                svc.namespace, ep.workload
                            ));
                        }
                        if !(1..=1000).contains(&ep.weight) {
                            problems
                                .push(format!("{at}: endpoints[{j}]: weight must be 1 to 1000"));
                        }
                    }
                }
            }
            let lb = &svc.load_balancing;
            if lb.connect_timeout.is_some_and(|t| t.is_zero()) {
                problems.push(format!(
                    "{at}: load_balancing.connect_timeout must not be 0"
                ));
            }
            if lb.retries > 10 {
                problems.push(format!("{at}: load_balancing.retries must be at most 10"));
            }
            let od = &svc.outlier_detection;
            if od.consecutive_failures == 0 {
                problems.push(format!(
                    "{at}: outlier_detection.consecutive_failures must be at least 1"
                ));
            }
            if od.base_ejection_time.is_zero() || od.max_ejection_time < od.base_ejection_time {
                problems.push(format!(
                    "{at}: outlier_detection: need 0 < base_ejection_time <= max_ejection_time"
                ));
            }
            if od.max_ejection_percent > 100 {
                problems.push(format!(
                    "{at}: outlier_detection.max_ejection_percent must be 0 to 100"
                ));
            }
        }
    }

    fn policy_problems(&self, problems: &mut Vec<String>) {
        let mut seen = HashSet::new();
        for (i, p) in self.authorization_policies.iter().enumerate() {
            let at = format!("authorization_policies[{i}] ({}/{})", p.namespace, p.name);
            if p.name.is_empty() || !is_dns_label(&p.namespace) {
                problems.push(format!(
                    "{at}: needs a name, and the namespace must be a DNS label"
                ));
            }
            if !seen.insert((&p.namespace, &p.name)) {
                problems.push(format!("{at}: duplicate policy"));
            }
            if let Some(sel) = &p.selector {
                labels_problems(&at, "selector", sel, problems);
            }
            for (r, rule) in p.rules.iter().enumerate() {
                for (f, from) in rule.from.iter().enumerate() {
                    let at = format!("{at}: rules[{r}].from[{f}].source");
                    let src = &from.source;
                    for (field, patterns) in [
                        ("principals", &src.principals),
                        ("not_principals", &src.not_principals),
                        ("namespaces", &src.namespaces),
                        ("not_namespaces", &src.not_namespaces),
                    ] {
                        for pat in patterns {
                            if !is_pattern(pat) {
                                problems.push(format!(
                                    "{at}.{field}: {pat:?}: `*` may only be the first or the last character"
                                ));
                            }
                        }
                    }
                    for (field, accounts) in [
                        ("service_accounts", &src.service_accounts),
                        ("not_service_accounts", &src.not_service_accounts),
                    ] {
                        for sa in accounts {
                            if !sa
                                .split_once('/')
                                .is_some_and(|(ns, sa)| is_dns_label(ns) && is_dns_label(sa))
                            {
                                problems.push(format!(
                                    "{at}.{field}: {sa:?} is not `<namespace>/<service account>`"
                                ));
                            }
                        }
                    }
                }
                for (t, to) in rule.to.iter().enumerate() {
                    let op = &to.operation;
                    if op.ports.contains(&0) || op.not_ports.contains(&0) {
                        problems.push(format!("{at}: rules[{r}].to[{t}].operation: port 0"));
                    }
                }
            }
        }
        let mut seen = HashSet::new();
        let mut wide = HashSet::new();
        for (i, p) in self.peer_authentications.iter().enumerate() {
            let at = format!("peer_authentications[{i}] ({}/{})", p.namespace, p.name);
            if p.name.is_empty() || !is_dns_label(&p.namespace) {
                problems.push(format!(
                    "{at}: needs a name, and the namespace must be a DNS label"
                ));
            }
            if !seen.insert((&p.namespace, &p.name)) {
                problems.push(format!("{at}: duplicate peer authentication"));
            }
            match &p.selector {
                Some(sel) => labels_problems(&at, "selector", sel, problems),
                None => {
                    if !wide.insert(&p.namespace) {
                        problems.push(format!(
                            "{at}: a second namespace-wide peer authentication in {}",
                            p.namespace
                        ));
                    }
                }
            }
        }
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Workload> {
        let ip = ip.to_canonical();
        self.workloads.iter().find(|w| w.addresses.contains(&ip))
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

    /// The enrolled workloads placed on `node`.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .iter()
            .filter(move |w| w.enrolled && w.node == node)
    }
}

/// `*`, or a string with at most one `*`, at its start or its end.
fn is_pattern(p: &str) -> bool {
    let stars = p.matches('*').count();
    !p.is_empty() && (stars == 0 || (stars == 1 && (p.starts_with('*') || p.ends_with('*'))))
}

fn labels_problems(at: &str, field: &str, labels: &Labels, problems: &mut Vec<String>) {
    for (k, v) in labels {
        let ok = |s: &str, max: usize| {
            s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
        };
        if k.is_empty() || !ok(k, 253) || !ok(v, 63) {
            problems.push(format!(
                "{at}: {field}: {k:?}: {v:?} is not a valid label (letters, digits, '-', '_', '.', '/')"
            ));
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MeshConfig, Error> {
        MeshConfig::parse(Path::new("mesh.yaml"), text)
    }

    #[test]
    fn parses_a_workload_with_defaults() {
        let c = parse(
            "workloads:\n- name: a\n  node: n0\n  netns: /var/run/netns/a\n  enrolled: true\n",
        )
        .unwrap();
        let w = &c.workloads[0];
        assert_eq!(w.namespace, "default");
        assert_eq!(w.service_account, "default");
        assert_eq!(c.enrolled_on("n0").count(), 1);
        assert_eq!(c.enrolled_on("n1").count(), 0);
    }

    #[test]
    fn empty_file_is_an_empty_mesh() {
        assert_eq!(parse("").unwrap(), MeshConfig::default());
    }

    #[test]
    fn unknown_field_is_an_error_with_a_location() {
        let e = parse("workloads:\n- name: a\n  node: n0\n  enroled: true\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("enroled"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
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
        .unwrap();
        assert_eq!(c.services[0].ports[0].target(), 8080);
        assert_eq!(c.services[1].ports[0].target(), 9000);
        assert_eq!(c.services[0].load_balancing.policy, LbPolicy::LeastRequest);
        assert_eq!(
            c.services[0].load_balancing.connect_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(c.services[1].endpoints.as_ref().unwrap()[1].weight, 1);
        let src = &c.authorization_policies[0].rules[0].from[0].source;
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

    #[test]
    fn the_documented_example_is_valid() {
        let doc = include_str!("../../docs/config.md");
        let start = doc
            .find("```yaml\n# A complete example")
            .expect("the example")
            + 8;
        let end = start + doc[start..].find("```").expect("its end");
        let c = parse(&doc[start..end]).unwrap();
        assert_eq!(c.workloads.len(), 3);
        assert_eq!(c.services.len(), 2);
        assert_eq!(c.authorization_policies.len(), 2);
        assert_eq!(c.peer_authentications.len(), 2);
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
        assert!(msg.contains("needs `netns`"), "{msg}");
        assert!(
            msg.contains("workloads[2] (default/b): duplicate workload"),
            "{msg}"
        );
    }
}
