//! What must hold of a mesh whatever its source: names are DNS labels, keys and
//! addresses unique, ports usable, endpoints exist, policies well formed, and the
//! CA's own identity belongs to no workload, and routes ask only for what the
//! waypoint does. Every problem names the entry it is about, by its place in the
//! model and its key (`services[1] (shop/web)`), then the field
//! (`http_routes[0] (default/reviews): rules[1].matches[0].path: ...`).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use super::{Endpoints, Labels, Mesh, UseWaypoint, route};
use crate::identity::{self, SpiffeId};

/// Every problem of `mesh`, in the order of its entries; empty when it is valid.
pub fn problems(mesh: &Mesh) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = SpiffeId::new(&mesh.trust_domain, "default", "default") {
        problems.push(format!("trust_domain: {e}"));
    }
    if !is_dns_label(&mesh.root_namespace) {
        problems.push(format!(
            "root_namespace: {:?} is not a DNS label",
            mesh.root_namespace
        ));
    }
    let mut addresses = HashMap::new();
    workload_problems(mesh, &mut addresses, &mut problems);
    service_problems(mesh, &mut addresses, &mut problems);
    namespace_problems(mesh, &mut problems);
    policy_problems(mesh, &mut problems);
    route_problems(mesh, &mut problems);
    super::authn::problems(mesh, &mut problems);
    super::ratelimit::problems(mesh, &mut problems);
    problems
}

fn workload_problems(
    mesh: &Mesh,
    addresses: &mut HashMap<IpAddr, String>,
    problems: &mut Vec<String>,
) {
    let mut seen = HashSet::new();
    for (i, w) in mesh.workloads.iter().enumerate() {
        let at = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
        workload_entry(w, &mut |p| problems.push(format!("{at}: {p}")));
        if !seen.insert(w.key()) {
            problems.push(format!("{at}: duplicate workload"));
        }
        let me = w.key().to_string();
        for a in &w.addresses {
            if let Some(other) = addresses.insert(a.to_canonical(), me.clone())
                && other != me
            {
                problems.push(format!("{at}: address {a} is also {other}'s"));
            }
        }
    }
}

/// What must hold of one workload by itself (uniqueness of its key and
/// addresses is the mesh's to check): each problem, without the workload's
/// place, to `report`.
pub fn workload_entry(w: &super::Workload, report: &mut dyn FnMut(String)) {
    if !is_dns_label(&w.name) {
        report("name must be a DNS label (a-z, 0-9, '-')".to_owned());
    }
    if !is_dns_label(&w.namespace) {
        report("namespace must be a DNS label".to_owned());
    }
    if !is_dns_label(&w.service_account) {
        report("service_account must be a DNS label".to_owned());
    }
    if w.node.is_empty() {
        report("node must not be empty".to_owned());
    }
    if identity::is_ca(&w.namespace, &w.service_account) {
        report(format!(
            "service account {}/{} is the CA's identity, which no workload may \
             have (agents send their node tokens to whoever proves it)",
            w.namespace, w.service_account
        ));
    }
    let mut labels = Vec::new();
    labels_problems("", "labels", &w.labels, &mut labels);
    for p in labels {
        report(p.trim_start_matches(": ").to_owned());
    }
    if w.native_tunnel && w.enrolled {
        report(
            "a `native_tunnel` workload (a waypoint) speaks HBONE itself and is never captured: it cannot be `enrolled`"
                .to_owned(),
        );
    }
}

fn namespace_problems(mesh: &Mesh, problems: &mut Vec<String>) {
    let mut seen = HashSet::new();
    let services = service_index(mesh);
    for (i, ns) in mesh.namespaces.iter().enumerate() {
        let at = format!("namespaces[{i}] ({})", ns.name);
        if !is_dns_label(&ns.name) {
            problems.push(format!("{at}: name must be a DNS label"));
        }
        if !seen.insert(&ns.name) {
            problems.push(format!("{at}: duplicate namespace"));
        }
        waypoint_problem(&services, ns.waypoint.as_ref(), &ns.name, &mut |p| {
            problems.push(format!("{at}: waypoint: {p}"))
        });
    }
}

/// The services by (namespace, name): made once per check, as a binding per
/// service looked up by a scan is quadratic (10,000 services: a second).
type ServiceIndex<'a> = HashMap<(&'a str, &'a str), &'a super::Service>;

fn service_index(mesh: &Mesh) -> ServiceIndex<'_> {
    mesh.services
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect()
}

/// Reports what is wrong with a binding to a waypoint; true if something was.
fn waypoint_problem(
    services: &ServiceIndex,
    binding: Option<&UseWaypoint>,
    _namespace: &str,
    report: &mut dyn FnMut(String),
) -> bool {
    let Some(UseWaypoint::Service { namespace, name }) = binding else {
        return false;
    };
    let Some(wp) = services.get(&(namespace.as_str(), name.as_str())) else {
        report(format!("no service {namespace}/{name}"));
        return true;
    };
    if let Some(UseWaypoint::Service { .. }) = &wp.waypoint {
        report(format!(
            "{namespace}/{name} is itself bound to a waypoint (a waypoint's traffic never goes through another)"
        ));
        return true;
    }
    false
}

fn service_problems(
    mesh: &Mesh,
    addresses: &mut HashMap<IpAddr, String>,
    problems: &mut Vec<String>,
) {
    let mut seen = HashSet::new();
    let index = service_index(mesh);
    // Indexed once: a cluster's services list their endpoints by name, and a
    // scan per endpoint is quadratic (10,000 pods took a second).
    let workloads: HashSet<(&str, &str)> = mesh
        .workloads
        .iter()
        .map(|w| (w.namespace.as_str(), w.name.as_str()))
        .collect();
    let waypoints: HashSet<(&str, &str)> = mesh.waypoint_services().collect();
    for (i, svc) in mesh.services.iter().enumerate() {
        let at = format!("services[{i}] ({}/{})", svc.namespace, svc.name);
        if !is_dns_label(&svc.name) || !is_dns_label(&svc.namespace) {
            problems.push(format!("{at}: name and namespace must be DNS labels"));
        }
        if !seen.insert((&svc.namespace, &svc.name)) {
            problems.push(format!("{at}: duplicate service"));
        }
        // A waypoint's service only names its replicas: no VIP or port of its
        // own is needed (they are reached on 15008).
        let waypoint = waypoints.contains(&(svc.namespace.as_str(), svc.name.as_str()));
        if svc.addresses.is_empty() && !waypoint {
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
        if svc.ports.is_empty() && !waypoint {
            problems.push(format!("{at}: needs at least one port"));
        }
        waypoint_problem(&index, svc.waypoint.as_ref(), &svc.namespace, &mut |p| {
            problems.push(format!("{at}: waypoint: {p}"))
        });
        if waypoint {
            let replicas = mesh.endpoint_workloads(svc);
            for (w, _) in replicas.iter().filter(|(w, _)| !w.native_tunnel) {
                problems.push(format!(
                    "{at}: is a waypoint, but its endpoint {}/{} is not `native_tunnel`",
                    w.namespace, w.name
                ));
            }
        }
        let mut ports = HashSet::new();
        for (j, p) in svc.ports.iter().enumerate() {
            if p.port == 0 || p.target_port == 0 {
                problems.push(format!("{at}: ports[{j}]: port 0"));
            }
            if !ports.insert(p.port) {
                problems.push(format!("{at}: ports[{j}]: port {} twice", p.port));
            }
            if weft_common::is_mesh_port(p.target_port) {
                problems.push(format!(
                    "{at}: ports[{j}]: target port {} is reserved for the mesh",
                    p.target_port
                ));
            }
        }
        match &svc.endpoints {
            Endpoints::Selector(sel) => labels_problems(&at, "selector", sel, problems),
            Endpoints::Listed(eps) => {
                for (j, ep) in eps.iter().enumerate() {
                    if !workloads.contains(&(svc.namespace.as_str(), ep.workload.as_str())) {
                        problems.push(format!(
                            "{at}: endpoints[{j}]: no workload {}/{}",
                            svc.namespace, ep.workload
                        ));
                    }
                    if !(1..=1000).contains(&ep.weight) {
                        problems.push(format!("{at}: endpoints[{j}]: weight must be 1 to 1000"));
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

fn policy_problems(mesh: &Mesh, problems: &mut Vec<String>) {
    let mut seen = HashSet::new();
    for (i, p) in mesh.authorization_policies.iter().enumerate() {
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
        target_problems(mesh, &at, p, problems);
        for (r, rule) in p.rules.iter().enumerate() {
            for (c, cond) in rule.when.iter().enumerate() {
                condition_problems(&format!("{at}: rules[{r}].when[{c}]"), cond, problems);
            }
            for (f, src) in rule.from.iter().enumerate() {
                let at = format!("{at}: rules[{r}].from[{f}].source");
                for (field, patterns) in [
                    ("principals", &src.principals),
                    ("not_principals", &src.not_principals),
                    ("request_principals", &src.request_principals),
                    ("not_request_principals", &src.not_request_principals),
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
            for (t, op) in rule.to.iter().enumerate() {
                let at = format!("{at}: rules[{r}].to[{t}].operation");
                if op.ports.contains(&0) || op.not_ports.contains(&0) {
                    problems.push(format!("{at}: port 0"));
                }
                for (field, values) in [
                    ("hosts", &op.hosts),
                    ("not_hosts", &op.not_hosts),
                    ("methods", &op.methods),
                    ("not_methods", &op.not_methods),
                ] {
                    for v in values {
                        if !is_pattern(v) {
                            problems.push(format!(
                                "{at}.{field}: {v:?}: `*` may only be the first or the last character"
                            ));
                        }
                    }
                }
                for (field, paths) in [("paths", &op.paths), ("not_paths", &op.not_paths)] {
                    for path in paths {
                        if let Err(why) = check_path_pattern(path) {
                            problems.push(format!("{at}.{field}: {path:?}: {why}"));
                        }
                    }
                }
            }
        }
    }
    let mut names = HashSet::new();
    for (i, x) in mesh.extension_providers.iter().enumerate() {
        let at = format!("extension_providers[{i}] ({})", x.name);
        if x.name.is_empty() || !names.insert(&x.name) {
            problems.push(format!("{at}: needs a name of its own"));
        }
        if x.http.service.is_empty() || x.http.port == 0 {
            problems.push(format!("{at}: http: needs a service and a port"));
        }
        if !x.http.path_prefix.is_empty() && !x.http.path_prefix.starts_with('/') {
            problems.push(format!("{at}: http.path_prefix must start with `/`"));
        }
        if !(200..=599).contains(&x.status_on_error) {
            problems.push(format!("{at}: status_on_error must be 200 to 599"));
        }
    }
    let mut seen = HashSet::new();
    let mut wide = HashSet::new();
    for (i, p) in mesh.peer_authentications.iter().enumerate() {
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

/// Where a policy applies: a workload's (`selector`) or a waypoint's
/// (`target_refs`), not both; CUSTOM and AUDIT only at a waypoint, CUSTOM with
/// a provider the mesh defines.
fn target_problems(
    mesh: &Mesh,
    at: &str,
    p: &super::AuthorizationPolicy,
    problems: &mut Vec<String>,
) {
    use super::Action;
    if p.selector.is_some() && p.at_waypoint() {
        problems.push(format!(
            "{at}: give `selector` (a workload's policy) or `target_refs` (a waypoint's), not both"
        ));
    }
    for (t, r) in p.target_refs.iter().enumerate() {
        let at = format!("{at}: target_refs[{t}]");
        let group_ok = match r.kind.as_str() {
            "Service" => r.group.is_empty() || r.group == "core",
            "Gateway" | "GatewayClass" => {
                r.group.is_empty() || r.group == "gateway.networking.k8s.io"
            }
            _ => {
                problems.push(format!(
                    "{at}: kind {:?}: Service, Gateway or GatewayClass",
                    r.kind
                ));
                true
            }
        };
        if !group_ok {
            problems.push(format!(
                "{at}: group {:?} does not fit kind {}",
                r.group, r.kind
            ));
        }
        if !is_dns_label(&r.name) {
            problems.push(format!("{at}: name {:?} is not a DNS label", r.name));
        }
        if r.kind == "GatewayClass" && p.namespace != mesh.root_namespace {
            problems.push(format!(
                "{at}: a GatewayClass is targeted from the root namespace ({}) only",
                mesh.root_namespace
            ));
        }
    }
    match p.action {
        Action::Custom | Action::Audit if !p.at_waypoint() => problems.push(format!(
            "{at}: a CUSTOM or AUDIT policy is enforced by a waypoint only: give `target_refs`"
        )),
        _ => {}
    }
    match (&p.provider, p.action) {
        (None, Action::Custom) => {
            problems.push(format!("{at}: a CUSTOM policy needs `provider`"));
        }
        (Some(name), Action::Custom) => {
            if !mesh.extension_providers.iter().any(|x| x.name == *name) {
                problems.push(format!(
                    "{at}: provider {name:?} is not in `extension_providers`"
                ));
            }
        }
        (Some(_), _) => problems.push(format!("{at}: `provider` is for CUSTOM policies only")),
        (None, _) => {}
    }
}

/// A `when` condition: a key Weft evaluates, with values that parse for it.
fn condition_problems(at: &str, c: &super::Condition, problems: &mut Vec<String>) {
    if c.values.is_empty() && c.not_values.is_empty() {
        problems.push(format!("{at}: give `values` or `not_values`"));
    }
    let key = c.key.as_str();
    let bracketed = |prefix: &str| {
        key.strip_prefix(prefix).and_then(|rest| {
            let mut parts = Vec::new();
            let mut rest = rest;
            while !rest.is_empty() {
                let (part, after) = rest.strip_prefix('[')?.split_once(']')?;
                if part.is_empty() {
                    return None;
                }
                parts.push(part);
                rest = after;
            }
            Some(parts)
        })
    };
    let values = c.values.iter().chain(&c.not_values);
    match key {
        "source.ip" | "remote.ip" => {
            for v in values {
                if let Err(e) = v.parse::<super::IpNet>() {
                    problems.push(format!("{at}: {key}: {e}"));
                }
            }
        }
        "destination.port" => {
            for v in values {
                if !v.parse::<u16>().is_ok_and(|p| p != 0) {
                    problems.push(format!("{at}: {key}: {v:?} is not a port"));
                }
            }
        }
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter" => {
            for v in values {
                if !is_pattern(v) {
                    problems.push(format!(
                        "{at}: {v:?}: `*` may only be the first or the last character"
                    ));
                }
            }
        }
        _ => match (
            bracketed("request.headers"),
            bracketed("request.auth.claims"),
        ) {
            (Some(parts), _) if parts.len() == 1 => {
                if let Err(e) = check_header_name(parts[0]) {
                    problems.push(format!("{at}: {key}: {e}"));
                }
            }
            (_, Some(parts)) if !parts.is_empty() => {}
            _ => problems.push(format!(
                "{at}: key {key:?}: one of request.headers[<name>], request.auth.claims[<name>]..., \
                 request.auth.principal, request.auth.audiences, request.auth.presenter, \
                 source.ip, remote.ip, source.namespace, source.principal, destination.port"
            )),
        },
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

/// A DNS label (RFC 1123): what namespaces, names and service accounts must be.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

// ---- routes ---------------------------------------------------------------------

/// The Gateway API's own bounds (its CRD's `MaxItems`): a route within them
/// compiles into a table whose size and matching cost stay bounded.
const MAX_PARENT_REFS: usize = 32;
const MAX_HOSTNAMES: usize = 16;
const MAX_RULES: usize = 16;
const MAX_HTTP_MATCHES: usize = 64;
/// Across all the rules of one HTTPRoute.
const MAX_HTTP_MATCHES_TOTAL: usize = 128;
const MAX_GRPC_MATCHES: usize = 8;
const MAX_FILTERS: usize = 16;
const MAX_BACKEND_REFS: usize = 16;
const MAX_HEADER_MATCHES: usize = 16;
const MAX_HEADER_ACTIONS: usize = 16;
const MAX_CORS_ITEMS: usize = 64;
/// Retries per request: more multiplies a failing backend's load.
const MAX_RETRY_ATTEMPTS: u32 = 10;
const MAX_WEIGHT: u32 = 1_000_000;
const MAX_PATH_LEN: usize = 1024;

fn route_problems(mesh: &Mesh, problems: &mut Vec<String>) {
    let mut seen = HashSet::new();
    for (i, r) in mesh.http_routes.iter().enumerate() {
        let at = format!("http_routes[{i}] ({}/{})", r.namespace, r.name);
        name_problems(&at, &r.name, &r.namespace, problems);
        if !seen.insert((&r.namespace, &r.name)) {
            problems.push(format!("{at}: duplicate HTTPRoute"));
        }
        let spec = &r.spec;
        parent_problems(&at, &spec.parent_refs, problems);
        hostname_problems(&at, &spec.hostnames, problems);
        if spec.rules.len() > MAX_RULES {
            problems.push(format!("{at}: rules: at most {MAX_RULES}"));
        }
        let total: usize = spec.rules.iter().map(|r| r.matches.len()).sum();
        if total > MAX_HTTP_MATCHES_TOTAL {
            problems.push(format!(
                "{at}: rules: at most {MAX_HTTP_MATCHES_TOTAL} matches across all rules, not {total}"
            ));
        }
        rule_name_problems(&at, spec.rules.iter().map(|r| r.name.as_deref()), problems);
        for (j, rule) in spec.rules.iter().enumerate() {
            http_rule_problems(&format!("{at}: rules[{j}]"), rule, problems);
        }
    }
    let mut seen = HashSet::new();
    for (i, r) in mesh.grpc_routes.iter().enumerate() {
        let at = format!("grpc_routes[{i}] ({}/{})", r.namespace, r.name);
        name_problems(&at, &r.name, &r.namespace, problems);
        if !seen.insert((&r.namespace, &r.name)) {
            problems.push(format!("{at}: duplicate GRPCRoute"));
        }
        let spec = &r.spec;
        parent_problems(&at, &spec.parent_refs, problems);
        hostname_problems(&at, &spec.hostnames, problems);
        if spec.rules.len() > MAX_RULES {
            problems.push(format!("{at}: rules: at most {MAX_RULES}"));
        }
        rule_name_problems(&at, spec.rules.iter().map(|r| r.name.as_deref()), problems);
        for (j, rule) in spec.rules.iter().enumerate() {
            grpc_rule_problems(&format!("{at}: rules[{j}]"), rule, problems);
        }
    }
}

fn name_problems(at: &str, name: &str, namespace: &str, problems: &mut Vec<String>) {
    if !is_dns_label(name) || !is_dns_label(namespace) {
        problems.push(format!("{at}: name and namespace must be DNS labels"));
    }
}

fn rule_name_problems<'a>(
    at: &str,
    names: impl Iterator<Item = Option<&'a str>>,
    problems: &mut Vec<String>,
) {
    let mut seen = HashSet::new();
    for (j, name) in names.enumerate() {
        let Some(name) = name else { continue };
        if !is_dns_label(name) {
            problems.push(format!(
                "{at}: rules[{j}].name: {name:?} is not a DNS label"
            ));
        }
        if !seen.insert(name) {
            problems.push(format!("{at}: rules[{j}].name: {name:?} is used twice"));
        }
    }
}

fn parent_problems(at: &str, parents: &[route::ParentReference], problems: &mut Vec<String>) {
    if parents.is_empty() {
        problems.push(format!(
            "{at}: parentRefs: empty, so the route applies nowhere (name a Service: \
             {{group: \"\", kind: Service, name: ...}})"
        ));
    }
    if parents.len() > MAX_PARENT_REFS {
        problems.push(format!("{at}: parentRefs: at most {MAX_PARENT_REFS}"));
    }
    for (k, p) in parents.iter().enumerate() {
        let at = format!("{at}: parentRefs[{k}]");
        if !p.is_service() {
            problems.push(format!(
                "{at}: {}/{} {:?} is not supported: a mesh route's parent is a Service \
                 (`group: \"\"`, `kind: Service`; the spec's default is a Gateway)",
                if p.group.is_empty() { "core" } else { &p.group },
                p.kind,
                p.name
            ));
        }
        if !is_dns_label(&p.name) || p.namespace.as_deref().is_some_and(|n| !is_dns_label(n)) {
            problems.push(format!("{at}: name and namespace must be DNS labels"));
        }
        if p.section_name.is_some() {
            problems.push(format!(
                "{at}: sectionName is not supported for a Service parent (use `port`)"
            ));
        }
        if p.port == Some(0) {
            problems.push(format!("{at}: port 0"));
        }
    }
}

fn hostname_problems(at: &str, hostnames: &[String], problems: &mut Vec<String>) {
    if hostnames.len() > MAX_HOSTNAMES {
        problems.push(format!("{at}: hostnames: at most {MAX_HOSTNAMES}"));
    }
    for (k, h) in hostnames.iter().enumerate() {
        let name = h.strip_prefix("*.").unwrap_or(h);
        if !is_hostname(name) {
            problems.push(format!(
                "{at}: hostnames[{k}]: {h:?} is not a hostname (a `*.` prefix is allowed)"
            ));
        }
    }
}

/// An RFC 1123 hostname, not an IP address.
fn is_hostname(h: &str) -> bool {
    h.len() <= 253 && h.parse::<IpAddr>().is_err() && h.split('.').all(is_dns_label)
}

fn http_rule_problems(at: &str, rule: &route::HttpRouteRule, problems: &mut Vec<String>) {
    use route::{HttpPathModifierType as Modifier, HttpRouteFilterType as T, PathMatchType};

    if rule.matches.len() > MAX_HTTP_MATCHES {
        problems.push(format!("{at}.matches: at most {MAX_HTTP_MATCHES}"));
    }
    for (m, mat) in rule.matches.iter().enumerate() {
        let at = format!("{at}.matches[{m}]");
        let path = &mat.path;
        match path.kind {
            PathMatchType::Exact | PathMatchType::PathPrefix => {
                if let Err(e) = check_path(&path.value) {
                    problems.push(format!("{at}.path: {:?} {e}", path.value));
                }
            }
            PathMatchType::RegularExpression => {
                if let Err(e) = route::compile_regex(&path.value) {
                    problems.push(format!("{at}.path: {e}"));
                }
            }
        }
        header_match_problems(&format!("{at}.headers"), &mat.headers, true, problems);
        header_match_problems(
            &format!("{at}.queryParams"),
            &mat.query_params,
            false,
            problems,
        );
    }
    if rule.filters.len() > MAX_FILTERS {
        problems.push(format!("{at}.filters: at most {MAX_FILTERS}"));
    }
    let count = |t: T| rule.filters.iter().filter(|f| f.kind == t).count();
    if count(T::RequestRedirect) > 0 && count(T::UrlRewrite) > 0 {
        problems.push(format!(
            "{at}.filters: RequestRedirect and URLRewrite may not be combined"
        ));
    }
    for t in [
        T::RequestHeaderModifier,
        T::ResponseHeaderModifier,
        T::RequestRedirect,
        T::UrlRewrite,
        T::Cors,
    ] {
        if count(t) > 1 {
            problems.push(format!("{at}.filters: {t:?} may be given only once"));
        }
    }
    if count(T::RequestRedirect) > 0 && !rule.backend_refs.is_empty() {
        problems.push(format!(
            "{at}: a RequestRedirect filter answers the request itself, so the rule may not have backendRefs"
        ));
    }
    let one_prefix =
        rule.matches.len() == 1 && rule.matches[0].path.kind == PathMatchType::PathPrefix;
    for (f, filter) in rule.filters.iter().enumerate() {
        let at = format!("{at}.filters[{f}]");
        http_filter_problems(&at, filter, problems);
        let modifier = filter
            .request_redirect
            .as_ref()
            .and_then(|r| r.path.as_ref())
            .or(filter.url_rewrite.as_ref().and_then(|r| r.path.as_ref()));
        if modifier.is_some_and(|m| m.kind == Modifier::ReplacePrefixMatch) && !one_prefix {
            problems.push(format!(
                "{at}: ReplacePrefixMatch needs the rule to have exactly one match, of type PathPrefix"
            ));
        }
    }
    backend_ref_problems(at, &rule.backend_refs, problems, |at, f, problems| {
        if !matches!(f.kind, T::RequestHeaderModifier | T::ResponseHeaderModifier) {
            problems.push(format!(
                "{at}: {:?} is not supported on a backendRef (only the header modifiers)",
                f.kind
            ));
        } else {
            http_filter_problems(at, f, problems);
        }
    });
    if let Some(t) = &rule.timeouts {
        let request = duration_problems(&format!("{at}.timeouts.request"), &t.request, problems);
        let backend = duration_problems(
            &format!("{at}.timeouts.backendRequest"),
            &t.backend_request,
            problems,
        );
        if let (Some(r), Some(b)) = (request, backend)
            && !r.is_zero()
            && b > r
        {
            problems.push(format!(
                "{at}.timeouts: backendRequest must not be longer than request"
            ));
        }
    }
    if let Some(retry) = &rule.retry {
        for (c, code) in retry.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                problems.push(format!("{at}.retry.codes[{c}]: {code} is not 400 to 599"));
            }
        }
        if retry.attempts.is_some_and(|a| a > MAX_RETRY_ATTEMPTS) {
            problems.push(format!("{at}.retry.attempts: at most {MAX_RETRY_ATTEMPTS}"));
        }
        duration_problems(&format!("{at}.retry.backoff"), &retry.backoff, problems);
    }
    if rule.session_persistence.is_some() {
        problems.push(format!("{at}.sessionPersistence: not supported"));
    }
}

fn grpc_rule_problems(at: &str, rule: &route::GrpcRouteRule, problems: &mut Vec<String>) {
    use route::{GrpcRouteFilterType as T, HeaderMatchType};

    if rule.matches.len() > MAX_GRPC_MATCHES {
        problems.push(format!("{at}.matches: at most {MAX_GRPC_MATCHES}"));
    }
    for (m, mat) in rule.matches.iter().enumerate() {
        let at = format!("{at}.matches[{m}]");
        if let Some(method) = &mat.method {
            let service = method.service.as_deref().filter(|s| !s.is_empty());
            let name = method.method.as_deref().filter(|s| !s.is_empty());
            if service.is_none() && name.is_none() {
                problems.push(format!("{at}.method: give a service, a method or both"));
            }
            for (field, value) in [("service", service), ("method", name)] {
                let Some(value) = value else { continue };
                let ok = match method.kind {
                    HeaderMatchType::Exact if field == "service" => is_grpc_service(value),
                    HeaderMatchType::Exact => is_grpc_ident(value),
                    HeaderMatchType::RegularExpression => match route::compile_regex(value) {
                        Ok(_) => true,
                        Err(e) => {
                            problems.push(format!("{at}.method.{field}: {e}"));
                            continue;
                        }
                    },
                };
                if !ok {
                    problems.push(format!(
                        "{at}.method.{field}: {value:?} is not a valid gRPC {field} name"
                    ));
                }
            }
        }
        header_match_problems(&format!("{at}.headers"), &mat.headers, true, problems);
    }
    if rule.filters.len() > MAX_FILTERS {
        problems.push(format!("{at}.filters: at most {MAX_FILTERS}"));
    }
    for t in [T::RequestHeaderModifier, T::ResponseHeaderModifier] {
        if rule.filters.iter().filter(|f| f.kind == t).count() > 1 {
            problems.push(format!("{at}.filters: {t:?} may be given only once"));
        }
    }
    for (f, filter) in rule.filters.iter().enumerate() {
        grpc_filter_problems(&format!("{at}.filters[{f}]"), filter, problems);
    }
    backend_ref_problems(at, &rule.backend_refs, problems, |at, f, problems| {
        if !matches!(f.kind, T::RequestHeaderModifier | T::ResponseHeaderModifier) {
            problems.push(format!(
                "{at}: {:?} is not supported on a backendRef (only the header modifiers)",
                f.kind
            ));
        } else {
            grpc_filter_problems(at, f, problems);
        }
    });
    if rule.session_persistence.is_some() {
        problems.push(format!("{at}.sessionPersistence: not supported"));
    }
}

/// `[.]name(.name)*`, each name `[A-Za-z_][A-Za-z0-9_]*` (the spec's pattern).
fn is_grpc_service(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    s.split('.').all(is_grpc_ident)
}

fn is_grpc_ident(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// What the spec requires of an Exact or PathPrefix value.
fn check_path(p: &str) -> Result<(), &'static str> {
    if !p.starts_with('/') {
        return Err("must start with '/'");
    }
    if p.len() > MAX_PATH_LEN {
        return Err("is longer than 1024 bytes");
    }
    if p.contains("//")
        || p.contains("/./")
        || p.contains("/../")
        || p.ends_with("/..")
        || p.ends_with("/.")
    {
        return Err("must not contain '//', '/./' or '/../' nor end in '/.' or '/..'");
    }
    if p.contains("%2f") || p.contains("%2F") || p.contains('#') {
        return Err("must not contain '%2f' or '#'");
    }
    let ok = p
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@%".contains(&b));
    if !ok {
        return Err("has a character a path may not (percent-encode it)");
    }
    Ok(())
}

fn header_match_problems(
    at: &str,
    matches: &[route::HttpHeaderMatch],
    is_header: bool,
    problems: &mut Vec<String>,
) {
    if matches.len() > MAX_HEADER_MATCHES {
        problems.push(format!("{at}: at most {MAX_HEADER_MATCHES}"));
    }
    for (h, m) in matches.iter().enumerate() {
        let at = format!("{at}[{h}]");
        if is_header {
            if let Err(e) = check_header_name(&m.name) {
                problems.push(format!("{at}.name: {e}"));
            }
        } else if m.name.is_empty() {
            problems.push(format!("{at}.name: must not be empty"));
        }
        if m.value.is_empty() {
            problems.push(format!("{at}.value: must not be empty"));
        }
        match m.kind {
            route::HeaderMatchType::Exact => {
                if is_header && http::HeaderValue::from_str(&m.value).is_err() {
                    problems.push(format!(
                        "{at}.value: {:?} is not a valid header value",
                        m.value
                    ));
                }
            }
            route::HeaderMatchType::RegularExpression => {
                if let Err(e) = route::compile_regex(&m.value) {
                    problems.push(format!("{at}.value: {e}"));
                }
            }
        }
    }
}

/// A header name a filter or match may use: a token, not an HTTP/2 pseudo-header.
fn check_header_name(name: &str) -> Result<(), String> {
    if name.starts_with(':') {
        return Err(format!("{name:?}: pseudo-headers are not supported"));
    }
    http::HeaderName::from_bytes(name.as_bytes())
        .map(|_| ())
        .map_err(|_| format!("{name:?} is not a valid header name"))
}

fn header_filter_problems(at: &str, f: &route::HttpHeaderFilter, problems: &mut Vec<String>) {
    let mut names = HashSet::new();
    for (field, headers) in [("set", &f.set), ("add", &f.add)] {
        if headers.len() > MAX_HEADER_ACTIONS {
            problems.push(format!("{at}.{field}: at most {MAX_HEADER_ACTIONS}"));
        }
        for (h, header) in headers.iter().enumerate() {
            if let Err(e) = check_header_name(&header.name) {
                problems.push(format!("{at}.{field}[{h}].name: {e}"));
            }
            if http::HeaderValue::from_str(&header.value).is_err() {
                problems.push(format!(
                    "{at}.{field}[{h}].value: {:?} is not a valid header value",
                    header.value
                ));
            }
            if !names.insert(header.name.to_ascii_lowercase()) {
                problems.push(format!(
                    "{at}.{field}[{h}]: {:?} is already modified by this filter (one action per header)",
                    header.name
                ));
            }
        }
    }
    if f.remove.len() > MAX_HEADER_ACTIONS {
        problems.push(format!("{at}.remove: at most {MAX_HEADER_ACTIONS}"));
    }
    for (h, name) in f.remove.iter().enumerate() {
        if let Err(e) = check_header_name(name) {
            problems.push(format!("{at}.remove[{h}]: {e}"));
        }
        if !names.insert(name.to_ascii_lowercase()) {
            problems.push(format!(
                "{at}.remove[{h}]: {name:?} is already modified by this filter (one action per header)"
            ));
        }
    }
}

/// Whether a filter's `type` and the field it fills agree; `given` lists the
/// fields that are set, by their spec name.
fn filter_kind_problems(at: &str, kind: &str, given: &[&str], problems: &mut Vec<String>) {
    let want = filter_field(kind);
    if given != [want] {
        problems.push(format!(
            "{at}: type {kind} needs `{want}` and no other filter field (found: {})",
            if given.is_empty() {
                "none".to_owned()
            } else {
                given.join(", ")
            }
        ));
    }
}

/// The field a filter type fills.
fn filter_field(kind: &str) -> &'static str {
    match kind {
        "RequestHeaderModifier" => "requestHeaderModifier",
        "ResponseHeaderModifier" => "responseHeaderModifier",
        "RequestMirror" => "requestMirror",
        "RequestRedirect" => "requestRedirect",
        "UrlRewrite" => "urlRewrite",
        "Cors" => "cors",
        _ => "extensionRef",
    }
}

fn http_filter_problems(at: &str, f: &route::HttpRouteFilter, problems: &mut Vec<String>) {
    let given: Vec<&str> = [
        ("requestHeaderModifier", f.request_header_modifier.is_some()),
        (
            "responseHeaderModifier",
            f.response_header_modifier.is_some(),
        ),
        ("requestMirror", f.request_mirror.is_some()),
        ("requestRedirect", f.request_redirect.is_some()),
        ("urlRewrite", f.url_rewrite.is_some()),
        ("cors", f.cors.is_some()),
        ("extensionRef", f.extension_ref.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, set)| set.then_some(n))
    .collect();
    filter_kind_problems(at, &format!("{:?}", f.kind), &given, problems);
    if let Some(h) = &f.request_header_modifier {
        header_filter_problems(&format!("{at}.requestHeaderModifier"), h, problems);
    }
    if let Some(h) = &f.response_header_modifier {
        header_filter_problems(&format!("{at}.responseHeaderModifier"), h, problems);
    }
    if let Some(m) = &f.request_mirror {
        mirror_problems(&format!("{at}.requestMirror"), m, problems);
    }
    if let Some(r) = &f.request_redirect {
        let at = format!("{at}.requestRedirect");
        if let Some(s) = &r.scheme
            && s != "http"
            && s != "https"
        {
            problems.push(format!("{at}.scheme: {s:?} is not http or https"));
        }
        if let Some(h) = &r.hostname
            && !is_hostname(h)
        {
            problems.push(format!("{at}.hostname: {h:?} is not a hostname"));
        }
        if r.port == Some(0) {
            problems.push(format!("{at}.port: port 0"));
        }
        if ![301, 302, 303, 307, 308].contains(&r.status_code) {
            problems.push(format!(
                "{at}.statusCode: {} is not 301, 302, 303, 307 or 308",
                r.status_code
            ));
        }
        if let Some(p) = &r.path {
            path_modifier_problems(&format!("{at}.path"), p, problems);
        }
    }
    if let Some(r) = &f.url_rewrite {
        let at = format!("{at}.urlRewrite");
        if let Some(h) = &r.hostname
            && !is_hostname(h)
        {
            problems.push(format!("{at}.hostname: {h:?} is not a hostname"));
        }
        if let Some(p) = &r.path {
            path_modifier_problems(&format!("{at}.path"), p, problems);
        }
    }
    if let Some(c) = &f.cors {
        cors_problems(&format!("{at}.cors"), c, problems);
    }
    if f.extension_ref.is_some() {
        problems.push(format!("{at}: ExtensionRef filters are not supported"));
    }
}

fn grpc_filter_problems(at: &str, f: &route::GrpcRouteFilter, problems: &mut Vec<String>) {
    let given: Vec<&str> = [
        ("requestHeaderModifier", f.request_header_modifier.is_some()),
        (
            "responseHeaderModifier",
            f.response_header_modifier.is_some(),
        ),
        ("requestMirror", f.request_mirror.is_some()),
        ("extensionRef", f.extension_ref.is_some()),
    ]
    .into_iter()
    .filter_map(|(n, set)| set.then_some(n))
    .collect();
    filter_kind_problems(at, &format!("{:?}", f.kind), &given, problems);
    if let Some(h) = &f.request_header_modifier {
        header_filter_problems(&format!("{at}.requestHeaderModifier"), h, problems);
    }
    if let Some(h) = &f.response_header_modifier {
        header_filter_problems(&format!("{at}.responseHeaderModifier"), h, problems);
    }
    if let Some(m) = &f.request_mirror {
        mirror_problems(&format!("{at}.requestMirror"), m, problems);
    }
    if f.extension_ref.is_some() {
        problems.push(format!("{at}: ExtensionRef filters are not supported"));
    }
}

fn path_modifier_problems(at: &str, p: &route::HttpPathModifier, problems: &mut Vec<String>) {
    use route::HttpPathModifierType as T;
    let value = match (p.kind, &p.replace_full_path, &p.replace_prefix_match) {
        (T::ReplaceFullPath, Some(v), None) => v,
        (T::ReplacePrefixMatch, None, Some(v)) => v,
        (T::ReplaceFullPath, ..) => {
            problems.push(format!(
                "{at}: type ReplaceFullPath needs `replaceFullPath` and no `replacePrefixMatch`"
            ));
            return;
        }
        (T::ReplacePrefixMatch, ..) => {
            problems.push(format!(
                "{at}: type ReplacePrefixMatch needs `replacePrefixMatch` and no `replaceFullPath`"
            ));
            return;
        }
    };
    // An empty prefix replacement is allowed: it strips the prefix.
    if !(value.is_empty() && p.kind == T::ReplacePrefixMatch)
        && let Err(e) = check_path(value)
    {
        problems.push(format!("{at}: {value:?} {e}"));
    }
}

fn mirror_problems(at: &str, m: &route::HttpRequestMirrorFilter, problems: &mut Vec<String>) {
    object_ref_problems(&format!("{at}.backendRef"), &m.backend_ref, problems);
    if m.percent.is_some() && m.fraction.is_some() {
        problems.push(format!("{at}: give percent or fraction, not both"));
    }
    if m.percent.is_some_and(|p| !(0..=100).contains(&p)) {
        problems.push(format!("{at}.percent: must be 0 to 100"));
    }
    if let Some(f) = m.fraction
        && (f.numerator < 0 || f.denominator < 1 || f.numerator > f.denominator)
    {
        problems.push(format!(
            "{at}.fraction: need 0 <= numerator <= denominator and denominator >= 1"
        ));
    }
}

fn object_ref_problems(at: &str, r: &route::BackendObjectReference, problems: &mut Vec<String>) {
    if !is_dns_label(&r.name) || r.namespace.as_deref().is_some_and(|n| !is_dns_label(n)) {
        problems.push(format!("{at}: name and namespace must be DNS labels"));
    }
    if route::is_core_group(&r.group) && r.kind == "Service" && r.port.is_none() {
        problems.push(format!("{at}: port is required for a Service"));
    }
    if r.port == Some(0) {
        problems.push(format!("{at}: port 0"));
    }
}

fn backend_ref_problems<F>(
    at: &str,
    refs: &[route::BackendRef<F>],
    problems: &mut Vec<String>,
    filter_problems: impl Fn(&str, &F, &mut Vec<String>),
) {
    if refs.len() > MAX_BACKEND_REFS {
        problems.push(format!("{at}.backendRefs: at most {MAX_BACKEND_REFS}"));
    }
    for (b, r) in refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{b}]");
        // A backend that names no existing service is not a problem here: the
        // spec keeps the route and answers 500 for its share of requests.
        object_ref_problems(&at, &r.object(), problems);
        if r.weight > MAX_WEIGHT {
            problems.push(format!("{at}.weight: must be 0 to {MAX_WEIGHT}"));
        }
        if r.filters.len() > MAX_FILTERS {
            problems.push(format!("{at}.filters: at most {MAX_FILTERS}"));
        }
        for (f, filter) in r.filters.iter().enumerate() {
            filter_problems(&format!("{at}.filters[{f}]"), filter, problems);
        }
    }
}

fn cors_problems(at: &str, c: &route::HttpCorsFilter, problems: &mut Vec<String>) {
    for (field, list) in [
        ("allowOrigins", &c.allow_origins),
        ("allowMethods", &c.allow_methods),
        ("allowHeaders", &c.allow_headers),
        ("exposeHeaders", &c.expose_headers),
    ] {
        if list.len() > MAX_CORS_ITEMS {
            problems.push(format!("{at}.{field}: at most {MAX_CORS_ITEMS}"));
        }
        if list.len() > 1 && list.iter().any(|v| v == "*") {
            problems.push(format!(
                "{at}.{field}: `*` may not be given with other values"
            ));
        }
    }
    for (o, origin) in c.allow_origins.iter().enumerate() {
        if origin == "*" {
            continue;
        }
        let host = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        let ok = host.is_some_and(|h| {
            let (host, port) = h.rsplit_once(':').unwrap_or((h, "1"));
            let host = host.strip_prefix("*.").unwrap_or(host);
            port.parse::<u16>().is_ok_and(|p| p > 0)
                && (host == "*"
                    || is_hostname(&host.to_ascii_lowercase())
                    || host.parse::<IpAddr>().is_ok())
        });
        if !ok {
            problems.push(format!(
                "{at}.allowOrigins[{o}]: {origin:?} is not an origin like https://www.example.com, \
                 https://*.example.com or *"
            ));
        }
    }
    for (m, method) in c.allow_methods.iter().enumerate() {
        let known = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "*",
        ];
        if !known.contains(&method.as_str()) {
            problems.push(format!(
                "{at}.allowMethods[{m}]: {method:?} is not a method or `*`"
            ));
        }
    }
    for (field, list) in [
        ("allowHeaders", &c.allow_headers),
        ("exposeHeaders", &c.expose_headers),
    ] {
        for (h, name) in list.iter().enumerate() {
            if name != "*"
                && let Err(e) = check_header_name(name)
            {
                problems.push(format!("{at}.{field}[{h}]: {e}"));
            }
        }
    }
    if c.max_age < 1 {
        problems.push(format!("{at}.maxAge: must be at least 1 (second)"));
    }
}

fn duration_problems(
    at: &str,
    value: &Option<String>,
    problems: &mut Vec<String>,
) -> Option<std::time::Duration> {
    let v = value.as_deref()?;
    match route::parse_duration(v) {
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(format!("{at}: {e}"));
            None
        }
    }
}

/// Whether `p` is a path pattern Istio accepts: it starts with `/` (or is a
/// `*` rule), and a template (`{*}`, `{**}`) has its operators as whole
/// segments, `{**}` last, and no `*` outside them.
pub fn check_path_pattern(p: &str) -> Result<(), &'static str> {
    if p.is_empty() {
        return Err("empty");
    }
    if !p.contains('{') && !p.contains('}') {
        let stars = p.matches('*').count();
        return if stars == 0 || (stars == 1 && (p.starts_with('*') || p.ends_with('*'))) {
            Ok(())
        } else {
            Err("`*` may only be the first or the last character")
        };
    }
    if !p.starts_with('/') {
        return Err("a template must start with `/`");
    }
    let segments: Vec<&str> = p[1..].split('/').collect();
    for (i, s) in segments.iter().enumerate() {
        match *s {
            "{*}" => {}
            "{**}" if i + 1 == segments.len() => {}
            "{**}" => return Err("`{**}` must be the last segment"),
            s if s.contains(['{', '}', '*']) => {
                return Err("`{*}` and `{**}` must be whole segments, and `*` cannot go with them");
            }
            _ => {}
        }
    }
    Ok(())
}
