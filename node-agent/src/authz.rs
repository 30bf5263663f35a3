//! L4 authorization with Istio's AuthorizationPolicy semantics, and the
//! PeerAuthentication mode that applies to a workload. The destination's agent
//! asks both for every inbound connection.
//!
//! Decision, as in Istio: a policy applies to a workload if it is in the workload's
//! namespace or in the root namespace and its selector (if any) selects the
//! workload. Any applicable DENY policy that matches denies; otherwise, with no
//! applicable ALLOW policy the connection is allowed; otherwise some applicable
//! ALLOW policy must match. A policy matches if one of its rules does (no rules:
//! nothing matches).
//!
//! Layers, as Istio ambient's ztunnel: policies with `target_refs` belong to
//! waypoints (`http::authz`) and CUSTOM and AUDIT need a request, so none of
//! them is enforced here. The L7 fields of the others cannot be seen here:
//! an ALLOW rule that has any never matches, and a DENY rule keeps only its L4
//! fields, so it matches every connection those match ([`Policy::compile`]).
//!
//! Cost. [`Authorizer::new`] compiles every policy once (principal and namespace
//! patterns parsed, service accounts split, policy names formatted) and indexes
//! them by namespace: O(P) for P policies. It then resolves, for each distinct
//! (namespace, labels) among the config's workloads, which policies apply:
//! O(W · (P_ns + P_root)) selector checks at worst, where P_ns and P_root count the
//! policies of the workload's namespace and of the root namespace; replicas that
//! share labels share the work. [`Authorizer::check`] is then two hash lookups
//! (namespace, name), a comparison of the workload's labels with the ones resolved
//! (so a workload whose labels changed is never judged by a stale set), and the
//! evaluation of the applicable policies only, DENY ones first: O(A · R · F) for A
//! applicable policies of R rules of F fields. A workload the config does not list
//! falls back to scanning its namespace's and the root namespace's policies with
//! their selectors: O(P_ns + P_root). Neither path allocates unless the answer is a
//! denial (which formats its reason); the peer's principal is matched piece by piece
//! (trust domain, `/ns/`, namespace, `/sa/`, service account) rather than built.
//! [`Authorizer::peer_mode`] is a hash lookup and a scan of the namespace's
//! selector-bearing peer authentications. With 10,000 policies loaded
//! (`cargo bench -p weft --bench authz`): about 20 ms to build, about 100 ns a
//! decision for a listed workload, about 450 ns for an unlisted one.
//!
//! When several DENY policies match, the one reported is the first of the root
//! namespace's, then of the workload's namespace, in file order.

use std::{
    collections::HashMap,
    hash::{BuildHasherDefault, Hasher},
    net::IpAddr,
};

use crate::{
    identity::SpiffeId,
    model::{self, Action, IpNet, Labels, Mesh, PeerMode, Workload},
};

/// What the destination's agent knows about a connection.
#[derive(Debug, Clone, Copy)]
pub struct Conn<'a> {
    /// The peer's verified identity; `None` for plaintext.
    pub src_identity: Option<&'a SpiffeId>,
    pub src_ip: IpAddr,
    /// The destination port in the workload (the application's port).
    pub dst_port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `namespace/name` of the DENY policy that matched; empty when the
        /// connection matched none of the applicable ALLOW policies.
        policy: String,
        /// For logs: which rule of the semantics refused the connection.
        reason: String,
    },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// The policies of one config, compiled for fast checks. Immutable: a new config
/// builds a new one.
#[derive(Debug)]
pub struct Authorizer {
    root_namespace: Box<str>,
    policies: Vec<Policy>,
    /// Indices into `policies` by namespace, in file order.
    by_namespace: NameMap<Vec<usize>>,
    /// The applicable policies of each distinct (namespace, labels) of the config's
    /// workloads.
    resolved: Vec<Resolved>,
    /// Namespace, then workload name, to an index into `resolved`.
    by_workload: NameMap<NameMap<usize>>,
    peer: NameMap<NamespacePeer>,
}

impl Authorizer {
    pub fn new(config: &Mesh) -> Authorizer {
        let mut by_namespace: NameMap<Vec<usize>> = NameMap::default();
        let policies: Vec<Policy> = config
            .authorization_policies
            .iter()
            .filter(|p| enforced_at_l4(p))
            .enumerate()
            .map(|(i, p)| {
                by_namespace
                    .entry(p.namespace.as_str().into())
                    .or_default()
                    .push(i);
                Policy::compile(p)
            })
            .collect();
        let mut authz = Authorizer {
            root_namespace: config.root_namespace.as_str().into(),
            policies,
            by_namespace,
            resolved: Vec::new(),
            by_workload: NameMap::default(),
            peer: NameMap::default(),
        };

        let mut seen: HashMap<(&str, &Labels), usize> = HashMap::new();
        for w in &config.workloads {
            let index = *seen.entry((&w.namespace, &w.labels)).or_insert_with(|| {
                // DENY policies first: a denial then stops the scan before any
                // ALLOW policy is evaluated.
                let mut policies = Vec::from_iter(authz.applicable(&w.namespace, &w.labels));
                policies.sort_by_key(|&i| authz.policies[i].action == Action::Allow);
                authz.resolved.push(Resolved {
                    labels: w.labels.clone(),
                    policies: policies.into(),
                });
                authz.resolved.len() - 1
            });
            authz
                .by_workload
                .entry(w.namespace.as_str().into())
                .or_default()
                .insert(w.name.as_str().into(), index);
        }

        for pa in &config.peer_authentications {
            let ns = authz.peer.entry(pa.namespace.as_str().into()).or_default();
            // An empty selector is namespace-wide, as in Istio.
            match pa.selector.as_ref().filter(|s| !s.is_empty()) {
                Some(selector) => ns.selected.push((selector.clone(), pa.mode)),
                None => {
                    ns.wide.get_or_insert(pa.mode);
                }
            }
        }
        authz
    }

    /// The decision for a connection to `dst` (a workload of the config).
    pub fn check(&self, dst: &Workload, conn: &Conn) -> Decision {
        let peer = Peer {
            id: conn.src_identity,
            principal: conn.src_identity.map(Principal::of),
            ip: conn.src_ip,
            port: conn.dst_port,
        };
        let resolved = self
            .by_workload
            .get(dst.namespace.as_str())
            .and_then(|names| names.get(dst.name.as_str()))
            .map(|&i| &self.resolved[i])
            .filter(|r| r.labels == dst.labels);
        match resolved {
            Some(r) => self.decide(r.policies.iter().copied(), &peer),
            None => self.decide(self.applicable(&dst.namespace, &dst.labels), &peer),
        }
    }

    /// The peer-authentication mode that applies to `dst`: its namespace's first
    /// policy (in file order) whose selector selects it, else its namespace's
    /// namespace-wide one, else the root namespace's namespace-wide one, else
    /// PERMISSIVE. Selectors in the root namespace only select workloads of the
    /// root namespace.
    pub fn peer_mode(&self, dst: &Workload) -> PeerMode {
        if let Some(ns) = self.peer.get(dst.namespace.as_str()) {
            if let Some((_, mode)) = ns
                .selected
                .iter()
                .find(|(selector, _)| model::selects(selector, &dst.labels))
            {
                return *mode;
            }
            if let Some(mode) = ns.wide {
                return mode;
            }
        }
        self.peer
            .get(&*self.root_namespace)
            .and_then(|root| root.wide)
            .unwrap_or_default()
    }

    /// The policies that apply to a workload of `namespace` with `labels`: the root
    /// namespace's, then the namespace's, each in file order.
    fn applicable<'s>(
        &'s self,
        namespace: &'s str,
        labels: &'s Labels,
    ) -> impl Iterator<Item = usize> + 's {
        let root = self.by_namespace.get(&*self.root_namespace);
        let own = if namespace == &*self.root_namespace {
            None
        } else {
            self.by_namespace.get(namespace)
        };
        root.into_iter()
            .chain(own)
            .flatten()
            .copied()
            .filter(move |&i| self.policies[i].selects(labels))
    }

    fn decide(&self, applicable: impl Iterator<Item = usize>, peer: &Peer) -> Decision {
        let mut allow_policies = 0usize;
        let mut allowed = false;
        for i in applicable {
            let policy = &self.policies[i];
            match policy.action {
                Action::Deny => {
                    if policy.matches(peer) {
                        return Decision::Deny {
                            policy: policy.id.clone(),
                            reason: ["denied by DENY policy ", &policy.id].concat(),
                        };
                    }
                }
                Action::Allow => {
                    allow_policies += 1;
                    // A later DENY still wins, so keep going after a match.
                    allowed = allowed || policy.matches(peer);
                }
                // Never compiled here (`enforced_at_l4`).
                Action::Custom | Action::Audit => {}
            }
        }
        if allowed || allow_policies == 0 {
            Decision::Allow
        } else {
            Decision::Deny {
                policy: String::new(),
                reason: format!(
                    "no ALLOW policy matches ({allow_policies} {})",
                    if allow_policies == 1 {
                        "applies"
                    } else {
                        "apply"
                    }
                ),
            }
        }
    }
}

/// Whether an L4 enforcement point (the destination's agent) enforces `p`:
/// a policy attached to waypoints (`target_refs`) is theirs alone, and CUSTOM
/// and AUDIT need a request to act on, as in Istio (whose ztunnel is sent
/// neither).
fn enforced_at_l4(p: &model::AuthorizationPolicy) -> bool {
    !p.at_waypoint() && matches!(p.action, Action::Allow | Action::Deny)
}

/// Maps keyed by namespace or workload name. The keys come from the config, never
/// from a peer, so an unkeyed hash is safe here; on these short keys FNV saves about
/// 20 ns of a 105 ns decision over the default SipHash (`benches/authz.rs`).
type NameMap<V> = HashMap<Box<str>, V, BuildHasherDefault<Fnv>>;

/// FNV-1a, 64 bits.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
}

#[derive(Debug)]
struct Resolved {
    labels: Labels,
    /// The applicable DENY policies, then the ALLOW ones, each in the order of
    /// [`Authorizer::applicable`] (the sort is stable).
    policies: Box<[usize]>,
}

#[derive(Debug, Default)]
struct NamespacePeer {
    /// Policies with a (non-empty) selector, in file order.
    selected: Vec<(Labels, PeerMode)>,
    /// The first namespace-wide policy.
    wide: Option<PeerMode>,
}

/// The connection, as the policies see it.
struct Peer<'a> {
    id: Option<&'a SpiffeId>,
    principal: Option<Principal<'a>>,
    ip: IpAddr,
    port: u16,
}

/// A peer's principal, `<trust-domain>/ns/<namespace>/sa/<service-account>`, kept
/// as its pieces so that matching it builds no string.
#[derive(Debug, Clone, Copy)]
struct Principal<'a>([&'a str; 5]);

impl<'a> Principal<'a> {
    fn of(id: &'a SpiffeId) -> Self {
        Principal([
            id.trust_domain(),
            "/ns/",
            id.namespace(),
            "/sa/",
            id.service_account(),
        ])
    }

    fn len(&self) -> usize {
        self.0.iter().map(|p| p.len()).sum()
    }

    fn starts_with(&self, mut s: &str) -> bool {
        for piece in self.0 {
            if s.len() <= piece.len() {
                return piece.starts_with(s);
            }
            match s.strip_prefix(piece) {
                Some(rest) => s = rest,
                None => return false,
            }
        }
        // `s` is longer than the whole principal.
        false
    }

    fn ends_with(&self, mut s: &str) -> bool {
        for piece in self.0.into_iter().rev() {
            if s.len() <= piece.len() {
                return piece.ends_with(s);
            }
            match s.strip_suffix(piece) {
                Some(rest) => s = rest,
                None => return false,
            }
        }
        false
    }

    fn equals(&self, s: &str) -> bool {
        s.len() == self.len() && self.starts_with(s)
    }
}

/// A principal or namespace pattern: `*`, `prefix*`, `*suffix` or exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pattern {
    /// Any present value (never a plaintext peer's).
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Pattern {
    /// Validation allows `*` only first or last; anything else is taken literally.
    pub(crate) fn parse(p: &str) -> Pattern {
        if p == "*" {
            Pattern::Any
        } else if let Some(prefix) = p.strip_suffix('*').filter(|s| !s.contains('*')) {
            Pattern::Prefix(prefix.into())
        } else if let Some(suffix) = p.strip_prefix('*').filter(|s| !s.contains('*')) {
            Pattern::Suffix(suffix.into())
        } else {
            Pattern::Exact(p.into())
        }
    }

    pub(crate) fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => !value.is_empty(),
            Pattern::Exact(s) => value == &**s,
            Pattern::Prefix(s) => value.starts_with(&**s),
            Pattern::Suffix(s) => value.ends_with(&**s),
        }
    }

    fn matches_principal(&self, principal: &Principal) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => principal.equals(s),
            Pattern::Prefix(s) => principal.starts_with(s),
            Pattern::Suffix(s) => principal.ends_with(s),
        }
    }
}

#[derive(Debug)]
struct Policy {
    /// `namespace/name`, formatted once for denials.
    id: String,
    selector: Option<Labels>,
    action: Action,
    rules: Vec<Rule>,
}

impl Policy {
    /// Compiles `p` for an L4 enforcement point, with Istio's safe rule for the
    /// L7 fields it cannot see (`requestPrincipals`, `remoteIpBlocks`, `hosts`,
    /// `methods`, `paths`, their `not` forms, and `when` keys other than
    /// [`model::L4_CONDITION_KEYS`]): in an ALLOW policy, a rule with any of
    /// them anywhere (in `from`, `to` or `when`) is left out, so it never
    /// matches; in a DENY policy, they are left out of their rule, which keeps
    /// its L4 fields and so matches every connection those match (a `to`, a
    /// `from` or a condition made only of L7 fields matches everything). Both
    /// err towards refusing. This is istiod's translation for ztunnel
    /// (`ambient/authorization.go`, `handleRule`).
    fn compile(p: &model::AuthorizationPolicy) -> Policy {
        Policy {
            id: format!("{}/{}", p.namespace, p.name),
            selector: p.selector.clone(),
            action: p.action,
            rules: p
                .rules
                .iter()
                .filter(|r| p.action != Action::Allow || r.l7_fields().is_empty())
                .map(|r| Rule {
                    from: r.from.iter().map(Source::compile).collect(),
                    to: r
                        .to
                        .iter()
                        .map(|t| Operation {
                            ports: t.ports.clone(),
                            not_ports: t.not_ports.clone(),
                        })
                        .collect(),
                    when: r.when.iter().filter_map(Condition::compile).collect(),
                })
                .collect(),
        }
    }

    fn selects(&self, labels: &Labels) -> bool {
        self.selector
            .as_ref()
            .is_none_or(|s| model::selects(s, labels))
    }

    fn matches(&self, peer: &Peer) -> bool {
        self.rules.iter().any(|r| r.matches(peer))
    }
}

#[derive(Debug)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    /// The L4 conditions; every one must hold.
    when: Vec<Condition>,
}

impl Rule {
    fn matches(&self, peer: &Peer) -> bool {
        (self.to.is_empty() || self.to.iter().any(|o| o.matches(peer.port)))
            && (self.from.is_empty() || self.from.iter().any(|s| s.matches(peer)))
            && self.when.iter().all(|c| c.holds(peer))
    }
}

/// A `when` condition on what the agent knows of a connection.
#[derive(Debug)]
enum Condition {
    SourceIp(Vec<IpNet>, Vec<IpNet>),
    SourceNamespace(Vec<Pattern>, Vec<Pattern>),
    SourcePrincipal(Vec<Pattern>, Vec<Pattern>),
    DestinationPort(Vec<u16>, Vec<u16>),
}

impl Condition {
    /// `None` for a key an L4 enforcement point cannot evaluate (see
    /// [`Policy::compile`]). Validation makes every value parse; one that does
    /// not here is left out.
    fn compile(c: &model::Condition) -> Option<Condition> {
        fn each<T>(v: &[String], f: impl Fn(&str) -> Option<T>) -> Vec<T> {
            v.iter().filter_map(|s| f(s)).collect()
        }
        let ips = |v: &[String]| each(v, |s| s.parse().ok());
        let patterns = |v: &[String]| each(v, |s| Some(Pattern::parse(s)));
        let ports = |v: &[String]| each(v, |s| s.parse().ok());
        let (yes, no) = (&c.values[..], &c.not_values[..]);
        Some(match c.key.as_str() {
            "source.ip" => Condition::SourceIp(ips(yes), ips(no)),
            "source.namespace" => Condition::SourceNamespace(patterns(yes), patterns(no)),
            "source.principal" => Condition::SourcePrincipal(patterns(yes), patterns(no)),
            "destination.port" => Condition::DestinationPort(ports(yes), ports(no)),
            _ => return None,
        })
    }

    /// Some of the values match (or none are given) and none of the
    /// `not_values` do. A plaintext peer has no namespace or principal: it
    /// matches no value.
    fn holds(&self, peer: &Peer) -> bool {
        fn check<T>(yes: &[T], no: &[T], hit: impl Fn(&T) -> bool) -> bool {
            (yes.is_empty() || yes.iter().any(&hit)) && !no.iter().any(hit)
        }
        match self {
            Condition::SourceIp(yes, no) => check(yes, no, |b| b.contains(peer.ip)),
            Condition::SourceNamespace(yes, no) => check(yes, no, |p| {
                peer.id.is_some_and(|id| p.matches(id.namespace()))
            }),
            Condition::SourcePrincipal(yes, no) => check(yes, no, |p| {
                peer.principal.is_some_and(|pr| p.matches_principal(&pr))
            }),
            Condition::DestinationPort(yes, no) => check(yes, no, |p| *p == peer.port),
        }
    }
}

#[derive(Debug)]
struct Source {
    principals: Vec<Pattern>,
    not_principals: Vec<Pattern>,
    namespaces: Vec<Pattern>,
    not_namespaces: Vec<Pattern>,
    /// (namespace, service account).
    service_accounts: Vec<(Box<str>, Box<str>)>,
    not_service_accounts: Vec<(Box<str>, Box<str>)>,
    ip_blocks: Vec<IpNet>,
    not_ip_blocks: Vec<IpNet>,
}

impl Source {
    fn compile(s: &model::Source) -> Source {
        let patterns = |v: &[String]| v.iter().map(|p| Pattern::parse(p)).collect();
        // Validation guarantees `ns/sa`; an unvalidated entry without a slash
        // keeps an empty service account, which no identity has.
        let accounts = |v: &[String]| {
            v.iter()
                .map(|a| {
                    let (ns, sa) = a.split_once('/').unwrap_or((a, ""));
                    (ns.into(), sa.into())
                })
                .collect()
        };
        Source {
            principals: patterns(&s.principals),
            not_principals: patterns(&s.not_principals),
            namespaces: patterns(&s.namespaces),
            not_namespaces: patterns(&s.not_namespaces),
            service_accounts: accounts(&s.service_accounts),
            not_service_accounts: accounts(&s.not_service_accounts),
            ip_blocks: s.ip_blocks.clone(),
            not_ip_blocks: s.not_ip_blocks.clone(),
        }
    }

    /// Every field given must match. A plaintext peer has no principal, namespace
    /// or service account: it matches none of a positive field's values, so the
    /// positive field fails and the `not_` field holds.
    fn matches(&self, peer: &Peer) -> bool {
        let principal = |pats: &[Pattern]| {
            peer.principal
                .is_some_and(|p| pats.iter().any(|pat| pat.matches_principal(&p)))
        };
        let namespace = |pats: &[Pattern]| {
            peer.id
                .is_some_and(|id| pats.iter().any(|pat| pat.matches(id.namespace())))
        };
        let account = |accounts: &[(Box<str>, Box<str>)]| {
            peer.id.is_some_and(|id| {
                accounts
                    .iter()
                    .any(|(ns, sa)| **ns == *id.namespace() && **sa == *id.service_account())
            })
        };
        let ip = |blocks: &[IpNet]| blocks.iter().any(|b| b.contains(peer.ip));
        (self.principals.is_empty() || principal(&self.principals))
            && (self.not_principals.is_empty() || !principal(&self.not_principals))
            && (self.namespaces.is_empty() || namespace(&self.namespaces))
            && (self.not_namespaces.is_empty() || !namespace(&self.not_namespaces))
            && (self.service_accounts.is_empty() || account(&self.service_accounts))
            && (self.not_service_accounts.is_empty() || !account(&self.not_service_accounts))
            && (self.ip_blocks.is_empty() || ip(&self.ip_blocks))
            && (self.not_ip_blocks.is_empty() || !ip(&self.not_ip_blocks))
    }
}

#[derive(Debug)]
struct Operation {
    ports: Vec<u16>,
    not_ports: Vec<u16>,
}

impl Operation {
    fn matches(&self, port: u16) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port)) && !self.not_ports.contains(&port)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// A parsed config and its authorizer.
    struct Mesh {
        config: model::Mesh,
        authz: Authorizer,
    }

    fn mesh(yaml: &str) -> Mesh {
        let config = crate::discovery::file::parse(Path::new("t.yaml"), yaml)
            .unwrap()
            .mesh;
        let authz = Authorizer::new(&config);
        Mesh { config, authz }
    }

    impl Mesh {
        fn workload(&self, key: &str) -> &Workload {
            let (ns, name) = key.split_once('/').unwrap();
            self.config
                .workloads
                .iter()
                .find(|w| w.namespace == ns && w.name == name)
                .unwrap_or_else(|| panic!("no workload {key}"))
        }

        /// The decision for a connection to workload `dst` (`ns/name`) from `src` (a
        /// SPIFFE ID, or None for plaintext). Also checks that a workload the
        /// config does not list (the uncached path) gets the same decision.
        fn check(&self, dst: &str, src: Option<&str>, ip: &str, port: u16) -> Decision {
            let id = src.map(|s| s.parse::<SpiffeId>().unwrap());
            let conn = Conn {
                src_identity: id.as_ref(),
                src_ip: ip.parse().unwrap(),
                dst_port: port,
            };
            let w = self.workload(dst);
            let decision = self.authz.check(w, &conn);
            let mut unlisted = w.clone();
            unlisted.name = "not-in-the-config".to_owned();
            assert_eq!(self.authz.check(&unlisted, &conn), decision, "uncached");
            decision
        }

        fn allowed(&self, dst: &str, src: Option<&str>, ip: &str, port: u16) -> bool {
            self.check(dst, src, ip, port).is_allowed()
        }
    }

    const WORKLOADS: &str = r#"
workloads:
- {name: web, namespace: shop, service_account: web, node: n0, labels: {app: web}}
- {name: db, namespace: shop, service_account: db, node: n0, labels: {app: db}}
- {name: api, namespace: other, node: n0, labels: {app: web}}
- {name: agent, namespace: weft-system, node: n0, labels: {app: agent}}
"#;

    const FRONT: Option<&str> = Some("spiffe://cluster.local/ns/front/sa/ui");
    const BAD: Option<&str> = Some("spiffe://cluster.local/ns/bad/sa/evil");
    const IP: &str = "10.1.0.9";

    fn with(policies: &str) -> Mesh {
        mesh(&format!("{WORKLOADS}{policies}"))
    }

    #[test]
    fn no_policy_allows_everything() {
        let m = with("");
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(m.allowed("shop/web", None, IP, 80));
    }

    #[test]
    fn deny_wins_over_allow_whatever_the_order() {
        let m = with(
            r#"
authorization_policies:
- {name: allow-all, namespace: shop, rules: [{}]}
- name: deny-bad
  namespace: shop
  action: DENY
  rules: [{from: [{source: {namespaces: [bad]}}]}]
"#,
        );
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert_eq!(
            m.check("shop/web", BAD, IP, 80),
            Decision::Deny {
                policy: "shop/deny-bad".to_owned(),
                reason: "denied by DENY policy shop/deny-bad".to_owned(),
            }
        );
    }

    #[test]
    fn only_deny_policies_allow_the_rest() {
        let m = with(
            r#"
authorization_policies:
- name: deny-bad
  namespace: shop
  action: DENY
  rules: [{from: [{source: {principals: ["cluster.local/ns/bad/sa/evil"]}}]}]
"#,
        );
        assert!(!m.allowed("shop/web", BAD, IP, 80));
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(m.allowed("shop/web", None, IP, 80));
    }

    #[test]
    fn an_allow_policy_denies_what_it_does_not_match() {
        let m = with(
            r#"
authorization_policies:
- name: front-only
  namespace: shop
  rules: [{from: [{source: {namespaces: [front]}}]}]
- name: ports
  namespace: shop
  rules: [{to: [{operation: {ports: [9090]}}]}]
"#,
        );
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(m.allowed("shop/web", BAD, IP, 9090));
        assert_eq!(
            m.check("shop/web", BAD, IP, 80),
            Decision::Deny {
                policy: String::new(),
                reason: "no ALLOW policy matches (2 apply)".to_owned(),
            }
        );
        // Another namespace's policies do not apply.
        assert!(m.allowed("other/api", BAD, IP, 80));
    }

    #[test]
    fn empty_rules_match_nothing_and_an_empty_rule_matches_everything() {
        let m = with("authorization_policies:\n- {name: none, namespace: shop}\n");
        assert!(!m.allowed("shop/web", FRONT, IP, 80));
        assert!(!m.allowed("shop/web", None, IP, 80));
        let m = with("authorization_policies:\n- {name: none, namespace: shop, action: DENY}\n");
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        let m = with("authorization_policies:\n- {name: all, namespace: shop, rules: [{}]}\n");
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(m.allowed("shop/web", None, IP, 80));
        let m = with(
            r#"
authorization_policies:
- name: all
  namespace: shop
  action: DENY
  rules: [{from: [{source: {}}], to: [{operation: {}}]}]
"#,
        );
        assert!(!m.allowed("shop/web", FRONT, IP, 80));
        assert!(!m.allowed("shop/web", None, IP, 80));
    }

    /// Allows only what one `source` matches; returns which of the peers get in.
    fn source_admits(source: &str, peers: &[(Option<&str>, &str)]) -> Vec<bool> {
        let m = with(&format!(
            r#"
authorization_policies:
- name: p
  namespace: shop
  rules: [{{from: [{{source: {source}}}]}}]
"#
        ));
        peers
            .iter()
            .map(|(src, ip)| m.allowed("shop/web", *src, ip, 80))
            .collect()
    }

    #[test]
    fn principal_and_namespace_patterns() {
        let peers = [
            (FRONT, IP),
            (BAD, IP),
            (Some("spiffe://other.td/ns/front/sa/ui"), IP),
            (None, IP),
        ];
        let table: &[(&str, [bool; 4])] = &[
            (
                r#"{principals: ["cluster.local/ns/front/sa/ui"]}"#,
                [true, false, false, false],
            ),
            (
                r#"{principals: ["cluster.local/ns/front/sa/u"]}"#,
                [false, false, false, false],
            ),
            (
                r#"{principals: ["cluster.local/ns/front/sa/uix"]}"#,
                [false, false, false, false],
            ),
            (
                r#"{principals: ["cluster.local/ns/front/*"]}"#,
                [true, false, false, false],
            ),
            (
                r#"{principals: ["cluster.local/*"]}"#,
                [true, true, false, false],
            ),
            (
                r#"{principals: ["cluster.lo*"]}"#,
                [true, true, false, false],
            ),
            (
                r#"{principals: ["*/ns/front/sa/ui"]}"#,
                [true, false, true, false],
            ),
            (
                r#"{principals: ["*/sa/evil"]}"#,
                [false, true, false, false],
            ),
            (r#"{principals: ["*t/sa/ui"]}"#, [true, false, true, false]),
            (
                r#"{principals: ["*cluster.local/ns/front/sa/ui"]}"#,
                [true, false, false, false],
            ),
            (
                r#"{principals: ["*xcluster.local/ns/front/sa/ui"]}"#,
                [false, false, false, false],
            ),
            (r#"{principals: ["*"]}"#, [true, true, true, false]),
            (
                r#"{principals: ["x", "*/evil"]}"#,
                [false, true, false, false],
            ),
            (r#"{not_principals: ["*"]}"#, [false, false, false, true]),
            (
                r#"{notPrincipals: ["cluster.local/*"]}"#,
                [false, false, true, true],
            ),
            (r#"{namespaces: [front]}"#, [true, false, true, false]),
            (r#"{namespaces: ["fr*"]}"#, [true, false, true, false]),
            (r#"{namespaces: ["*ad"]}"#, [false, true, false, false]),
            (r#"{namespaces: ["*"]}"#, [true, true, true, false]),
            (r#"{not_namespaces: [bad]}"#, [true, false, true, true]),
            (
                r#"{namespaces: [front], not_principals: ["other.td/*"]}"#,
                [true, false, false, false],
            ),
        ];
        for (source, want) in table {
            assert_eq!(source_admits(source, &peers), want, "{source}");
        }
    }

    #[test]
    fn service_accounts() {
        let peers = [
            (FRONT, IP),
            (BAD, IP),
            (Some("spiffe://other.td/ns/front/sa/ui"), IP),
            (Some("spiffe://cluster.local/ns/front/sa/admin"), IP),
            (None, IP),
        ];
        assert_eq!(
            source_admits("{service_accounts: [front/ui]}", &peers),
            [true, false, true, false, false]
        );
        assert_eq!(
            source_admits("{serviceAccounts: [front/ui, bad/evil]}", &peers),
            [true, true, true, false, false]
        );
        assert_eq!(
            source_admits("{not_service_accounts: [front/ui]}", &peers),
            [false, true, false, true, true]
        );
    }

    #[test]
    fn ip_blocks_v4_and_v6() {
        let peers = [
            (None, "10.1.0.9"),
            (None, "10.2.0.9"),
            (None, "::ffff:10.1.0.9"),
            (None, "fd00::1"),
            (None, "fe80::1"),
        ];
        assert_eq!(
            source_admits(r#"{ip_blocks: ["10.1.0.0/16", "fd00::/8"]}"#, &peers),
            [true, false, true, true, false]
        );
        assert_eq!(
            source_admits(r#"{ipBlocks: ["10.2.0.9"]}"#, &peers),
            [false, true, false, false, false]
        );
        assert_eq!(
            source_admits(r#"{not_ip_blocks: ["10.0.0.0/8", "fd00::/8"]}"#, &peers),
            [false, false, false, false, true]
        );
        assert_eq!(
            source_admits(
                r#"{ipBlocks: ["0.0.0.0/0"], notIpBlocks: ["10.2.0.0/16"]}"#,
                &peers
            ),
            [true, false, true, false, false]
        );
    }

    #[test]
    fn every_field_of_a_source_must_match_and_any_source_may() {
        let m = with(
            r#"
authorization_policies:
- name: p
  namespace: shop
  rules:
  - from:
    - source: {namespaces: [front], ip_blocks: ["10.1.0.0/16"]}
    - source: {principals: ["*/sa/evil"], ip_blocks: ["10.9.0.0/16"]}
"#,
        );
        assert!(m.allowed("shop/web", FRONT, "10.1.2.3", 80));
        assert!(!m.allowed("shop/web", FRONT, "10.9.2.3", 80));
        assert!(m.allowed("shop/web", BAD, "10.9.2.3", 80));
        assert!(!m.allowed("shop/web", BAD, "10.1.2.3", 80));
    }

    #[test]
    fn ports_and_not_ports() {
        let m = with(
            r#"
authorization_policies:
- name: p
  namespace: shop
  rules:
  - to: [{operation: {ports: [80, 443]}}, {operation: {notPorts: [80, 443, 22]}}]
    from: [{source: {namespaces: [front]}}]
- name: deny-ssh
  namespace: shop
  action: DENY
  rules: [{to: [{operation: {ports: [22], not_ports: [80]}}]}]
"#,
        );
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(m.allowed("shop/web", FRONT, IP, 443));
        assert!(m.allowed("shop/web", FRONT, IP, 8080));
        assert!(!m.allowed("shop/web", BAD, IP, 80));
        assert_eq!(
            m.check("shop/web", FRONT, IP, 22),
            Decision::Deny {
                policy: "shop/deny-ssh".to_owned(),
                reason: "denied by DENY policy shop/deny-ssh".to_owned(),
            }
        );
    }

    #[test]
    fn selectors_and_the_root_namespace() {
        let m = with(
            r#"
authorization_policies:
- name: web-front-only
  namespace: shop
  selector: {app: web}
  rules: [{from: [{source: {namespaces: [front]}}]}]
- name: no-plaintext-to-web
  namespace: weft-system
  action: DENY
  selector: {app: web}
  rules: [{from: [{source: {not_principals: ["*"]}}]}]
- name: deny-bad-everywhere
  namespace: weft-system
  action: DENY
  rules: [{from: [{source: {namespaces: [bad]}}]}]
"#,
        );
        // shop/web: its own selector policy, and both root policies.
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(!m.allowed("shop/web", Some("spiffe://cluster.local/ns/x/sa/y"), IP, 80));
        assert_eq!(
            m.check("shop/web", None, IP, 80),
            Decision::Deny {
                policy: "weft-system/no-plaintext-to-web".to_owned(),
                reason: "denied by DENY policy weft-system/no-plaintext-to-web".to_owned(),
            }
        );
        assert!(!m.allowed("shop/web", BAD, IP, 80));
        // shop/db: not selected by either `app: web` policy.
        assert!(m.allowed("shop/db", None, IP, 80));
        assert!(m.allowed("shop/db", Some("spiffe://cluster.local/ns/x/sa/y"), IP, 80));
        assert!(!m.allowed("shop/db", BAD, IP, 80));
        // other/api has `app: web` too: the root namespace's selector reaches it, the
        // shop namespace's does not.
        assert!(!m.allowed("other/api", None, IP, 80));
        assert!(m.allowed(
            "other/api",
            Some("spiffe://cluster.local/ns/x/sa/y"),
            IP,
            80
        ));
        assert!(!m.allowed("other/api", BAD, IP, 80));
        // The root namespace's own workloads (each policy counted once).
        assert!(!m.allowed("weft-system/agent", BAD, IP, 80));
        assert!(m.allowed("weft-system/agent", None, IP, 80));
    }

    #[test]
    fn root_namespace_allow_policies_count_as_applicable() {
        let m = mesh(&format!(
            r#"
root_namespace: istio-system
{WORKLOADS}
- {{name: gw, namespace: istio-system, node: n0}}
authorization_policies:
- name: mesh-allow-front
  namespace: istio-system
  rules: [{{from: [{{source: {{namespaces: [front]}}}}]}}]
"#
        ));
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert_eq!(
            m.check("shop/web", BAD, IP, 80),
            Decision::Deny {
                policy: String::new(),
                reason: "no ALLOW policy matches (1 applies)".to_owned(),
            }
        );
        assert!(!m.allowed("istio-system/gw", BAD, IP, 80));
        // weft-system is an ordinary namespace now.
        assert!(!m.allowed("weft-system/agent", BAD, IP, 80));
    }

    #[test]
    fn changed_labels_are_not_judged_by_the_resolved_set() {
        let m =
            with("authorization_policies:\n- {name: p, namespace: shop, selector: {app: web}}\n");
        let mut w = m.workload("shop/web").clone();
        let id: SpiffeId = FRONT.unwrap().parse().unwrap();
        let conn = Conn {
            src_identity: Some(&id),
            src_ip: IP.parse().unwrap(),
            dst_port: 80,
        };
        assert!(!m.authz.check(&w, &conn).is_allowed());
        w.labels.insert("app".to_owned(), "web2".to_owned());
        assert!(m.authz.check(&w, &conn).is_allowed());
    }

    #[test]
    fn peer_mode_takes_the_most_specific() {
        let peer = |pas: &str| {
            let m = with(&format!("peer_authentications:\n{pas}\n"));
            ["shop/web", "shop/db", "other/api", "weft-system/agent"]
                .map(|w| m.authz.peer_mode(m.workload(w)))
        };
        use PeerMode::{Permissive as P, Strict as S};
        assert_eq!(
            peer("- {name: shop, namespace: shop, selector: {app: none}, mode: STRICT}"),
            [P, P, P, P]
        );
        assert_eq!(
            peer("- {name: mesh, namespace: weft-system, mode: STRICT}"),
            [S, S, S, S]
        );
        assert_eq!(
            peer(
                r#"
- {name: mesh, namespace: weft-system, mode: STRICT}
- {name: shop, namespace: shop, mode: PERMISSIVE}
"#
            ),
            [P, P, S, S]
        );
        assert_eq!(
            peer(
                r#"
- {name: mesh, namespace: weft-system, mode: STRICT}
- {name: shop, namespace: shop, mode: PERMISSIVE}
- {name: web, namespace: shop, selector: {app: web}, mode: STRICT}
- {name: web-again, namespace: shop, selector: {app: web}, mode: PERMISSIVE}
"#
            ),
            [S, P, S, S]
        );
        // Selectors elsewhere do not reach into other namespaces; the root
        // namespace's select only its own workloads.
        assert_eq!(
            peer(
                r#"
- {name: web, namespace: shop, selector: {app: web}, mode: STRICT}
- {name: root-web, namespace: weft-system, selector: {app: web}, mode: STRICT}
- {name: root-agent, namespace: weft-system, selector: {app: agent}, mode: STRICT}
"#
            ),
            [S, P, P, S]
        );
        // An empty selector is namespace-wide: it yields to a selecting one.
        assert_eq!(
            peer(
                r#"
- {name: all, namespace: shop, selector: {}, mode: STRICT}
- {name: db, namespace: shop, selector: {app: db}, mode: PERMISSIVE}
"#
            ),
            [S, P, P, P]
        );
    }

    /// Istio's safe rule for L7 fields at an L4 enforcement point
    /// (`Policy::compile`), field by field: an ALLOW rule with one never
    /// matches, a DENY rule with one matches what its L4 fields match.
    #[test]
    fn l7_fields_at_l4_allow_never_matches_deny_matches_everything() {
        let l7: &[(&str, &str)] = &[
            ("from", r#"{source: {requestPrincipals: ["*"]}}"#),
            ("from", r#"{source: {notRequestPrincipals: ["*"]}}"#),
            ("from", r#"{source: {remoteIpBlocks: ["10.0.0.0/8"]}}"#),
            ("from", r#"{source: {notRemoteIpBlocks: ["10.0.0.0/8"]}}"#),
            ("to", r#"{operation: {hosts: ["x"]}}"#),
            ("to", r#"{operation: {notHosts: ["x"]}}"#),
            ("to", r#"{operation: {methods: [GET]}}"#),
            ("to", r#"{operation: {notMethods: [GET]}}"#),
            ("to", r#"{operation: {paths: ["/admin*"]}}"#),
            ("to", r#"{operation: {notPaths: ["/admin*"]}}"#),
            ("when", r#"{key: "request.headers[x-a]", values: [b]}"#),
            (
                "when",
                r#"{key: "request.auth.claims[groups]", values: [b]}"#,
            ),
            ("when", r#"{key: request.auth.principal, values: ["*"]}"#),
            ("when", r#"{key: remote.ip, values: ["10.0.0.0/8"]}"#),
        ];
        for (place, field) in l7 {
            let rule = format!("{{{place}: [{field}]}}");
            // ALLOW: the rule never matches, so the policy denies everyone,
            // even the peers a plain `{}` rule would let in.
            let m = with(&format!(
                "authorization_policies:\n- {{name: p, namespace: shop, rules: [{rule}]}}\n"
            ));
            for src in [FRONT, BAD, None] {
                assert_eq!(
                    m.check("shop/web", src, IP, 80),
                    Decision::Deny {
                        policy: String::new(),
                        reason: "no ALLOW policy matches (1 applies)".to_owned(),
                    },
                    "ALLOW {rule}"
                );
            }
            // Another ALLOW rule of the same policy without L7 fields still
            // matches.
            let m = with(&format!(
                "authorization_policies:\n- {{name: p, namespace: shop, rules: [{rule}, {{from: [{{source: {{namespaces: [front]}}}}]}}]}}\n"
            ));
            assert!(
                m.allowed("shop/web", FRONT, IP, 80),
                "ALLOW {rule} + L4 rule"
            );
            assert!(
                !m.allowed("shop/web", BAD, IP, 80),
                "ALLOW {rule} + L4 rule"
            );
            // DENY: the rule matches every connection.
            let m = with(&format!(
                "authorization_policies:\n- {{name: p, namespace: shop, action: DENY, rules: [{rule}]}}\n"
            ));
            for src in [FRONT, BAD, None] {
                assert!(!m.allowed("shop/web", src, IP, 80), "DENY {rule}");
                assert!(!m.allowed("shop/web", src, "10.9.9.9", 8080), "DENY {rule}");
            }
            // Other namespaces are not concerned.
            assert!(m.allowed("other/api", FRONT, IP, 80), "DENY {rule}");
        }
    }

    #[test]
    fn a_deny_rule_with_l7_fields_keeps_its_l4_fields() {
        let m = with(
            r#"
authorization_policies:
- name: deny-admin
  namespace: shop
  action: DENY
  rules:
  - from: [{source: {namespaces: [bad], requestPrincipals: ["*"]}}]
    to: [{operation: {ports: [8080], paths: ["/admin*"]}}]
"#,
        );
        // Only what the L4 fields match is refused: all of port 8080 from bad.
        assert!(!m.allowed("shop/web", BAD, IP, 8080));
        assert!(m.allowed("shop/web", BAD, IP, 80));
        assert!(m.allowed("shop/web", FRONT, IP, 8080));
        // An L4 `when` is still evaluated, an L7 one dropped.
        let m = with(
            r#"
authorization_policies:
- name: deny
  namespace: shop
  action: DENY
  rules:
  - when:
    - {key: source.namespace, values: [bad]}
    - {key: "request.headers[x-debug]", values: ["1"]}
"#,
        );
        assert!(!m.allowed("shop/web", BAD, IP, 80));
        assert!(m.allowed("shop/web", FRONT, IP, 80));
    }

    #[test]
    fn l4_conditions() {
        let m = with(
            r#"
authorization_policies:
- name: p
  namespace: shop
  rules:
  - when:
    - {key: source.ip, values: ["10.1.0.0/16"], notValues: ["10.1.9.0/24"]}
    - {key: destination.port, notValues: ["22"]}
    - {key: source.principal, values: ["cluster.local/ns/front/*"]}
"#,
        );
        assert!(m.allowed("shop/web", FRONT, "10.1.0.9", 80));
        assert!(!m.allowed("shop/web", FRONT, "10.1.9.9", 80));
        assert!(!m.allowed("shop/web", FRONT, "10.2.0.9", 80));
        assert!(!m.allowed("shop/web", FRONT, "10.1.0.9", 22));
        assert!(!m.allowed("shop/web", BAD, "10.1.0.9", 80));
        assert!(!m.allowed("shop/web", None, "10.1.0.9", 80));
        let m = with(
            r#"
authorization_policies:
- name: p
  namespace: shop
  rules: [{when: [{key: source.namespace, notValues: [bad]}]}]
"#,
        );
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(m.allowed("shop/web", None, IP, 80));
        assert!(!m.allowed("shop/web", BAD, IP, 80));
    }

    #[test]
    fn waypoint_custom_and_audit_policies_are_not_enforced_at_l4() {
        let m = with(
            r#"
extension_providers:
- {name: ext, http: {service: ext.shop, port: 80}}
authorization_policies:
- name: svc-deny-all
  namespace: shop
  action: DENY
  targetRefs: [{kind: Service, name: web}]
  rules: [{}]
- name: svc-allow-none
  namespace: shop
  target_refs: [{kind: Service, name: web}]
- name: custom
  namespace: shop
  action: CUSTOM
  provider: {name: ext}
  target_refs: [{kind: Service, name: web}]
  rules: [{}]
- name: audit
  namespace: shop
  action: AUDIT
  target_refs: [{kind: Service, name: web}]
  rules: [{}]
"#,
        );
        assert!(m.allowed("shop/web", FRONT, IP, 80));
        assert!(m.allowed("shop/web", None, IP, 80));
    }

    #[test]
    fn principal_pieces_match_like_the_string() {
        let id: SpiffeId = "spiffe://cluster.local/ns/front/sa/ui".parse().unwrap();
        let p = Principal::of(&id);
        let whole = "cluster.local/ns/front/sa/ui";
        for i in 0..=whole.len() {
            assert!(p.starts_with(&whole[..i]), "{}", &whole[..i]);
            assert!(p.ends_with(&whole[i..]), "{}", &whole[i..]);
            assert!(!p.equals(&whole[..i]) || i == whole.len());
        }
        assert!(p.equals(whole));
        for not in [
            "cluster.local/ns/front/sa/uix",
            "xcluster.local/ns/front/sa/ui",
            "cluster.local/ns/fronT",
        ] {
            assert!(
                !p.equals(not) && !p.starts_with(not) && !p.ends_with(not),
                "{not}"
            );
        }
    }
}
