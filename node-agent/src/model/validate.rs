//! What must hold of a mesh whatever its source: names are DNS labels, keys and
//! addresses unique, ports usable, endpoints exist, policies well formed, and the
//! CA's own identity belongs to no workload. Every problem names the entry it is
//! about, by its place in the model and its key (`services[1] (shop/web)`).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
};

use super::{Endpoints, Labels, Mesh, UseWaypoint};
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
        if !seen.insert(w.key()) {
            problems.push(format!("{at}: duplicate workload"));
        }
        if identity::is_ca(&w.namespace, &w.service_account) {
            problems.push(format!(
                "{at}: service account {}/{} is the CA's identity, which no workload may \
                 have (agents send their node tokens to whoever proves it)",
                w.namespace, w.service_account
            ));
        }
        let me = w.key().to_string();
        for a in &w.addresses {
            if let Some(other) = addresses.insert(a.to_canonical(), me.clone())
                && other != me
            {
                problems.push(format!("{at}: address {a} is also {other}'s"));
            }
        }
        labels_problems(&at, "labels", &w.labels, problems);
        if w.native_tunnel && w.enrolled {
            problems.push(format!(
                "{at}: a `native_tunnel` workload (a waypoint) speaks HBONE itself and is never captured: it cannot be `enrolled`"
            ));
        }
    }
}

fn namespace_problems(mesh: &Mesh, problems: &mut Vec<String>) {
    let mut seen = HashSet::new();
    for (i, ns) in mesh.namespaces.iter().enumerate() {
        let at = format!("namespaces[{i}] ({})", ns.name);
        if !is_dns_label(&ns.name) {
            problems.push(format!("{at}: name must be a DNS label"));
        }
        if !seen.insert(&ns.name) {
            problems.push(format!("{at}: duplicate namespace"));
        }
        waypoint_problem(mesh, ns.waypoint.as_ref(), &ns.name, &mut |p| {
            problems.push(format!("{at}: waypoint: {p}"))
        });
    }
}

/// Reports what is wrong with a binding to a waypoint; true if something was.
fn waypoint_problem(
    mesh: &Mesh,
    binding: Option<&UseWaypoint>,
    _namespace: &str,
    report: &mut dyn FnMut(String),
) -> bool {
    let Some(UseWaypoint::Service { namespace, name }) = binding else {
        return false;
    };
    let Some(wp) = mesh
        .services
        .iter()
        .find(|s| s.namespace == *namespace && s.name == *name)
    else {
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
        let waypoint = mesh.is_waypoint(svc);
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
        waypoint_problem(mesh, svc.waypoint.as_ref(), &svc.namespace, &mut |p| {
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
                    if !mesh
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
        for (r, rule) in p.rules.iter().enumerate() {
            for (f, src) in rule.from.iter().enumerate() {
                let at = format!("{at}: rules[{r}].from[{f}].source");
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
            for (t, op) in rule.to.iter().enumerate() {
                if op.ports.contains(&0) || op.not_ports.contains(&0) {
                    problems.push(format!("{at}: rules[{r}].to[{t}].operation: port 0"));
                }
            }
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
