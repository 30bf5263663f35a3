//! The cost of an authorization decision with 10,000 policies loaded.
//!
//! Builds a mesh of 200 namespaces with 50 policies each, most selecting other
//! workloads, a few applying to the target, a mesh-wide DENY for plaintext and a
//! namespace DENY on a principal; then times `Authorizer::check` for an allowed mTLS
//! connection, a denied one and a plaintext one, on the resolved path (a workload of
//! the config) and on the fallback path (a workload the config does not list), and
//! `Authorizer::peer_mode`. Before the Criterion runs it prints, per scenario, the
//! decision (so the scenario can be checked) and the allocations per call (counted
//! by the global allocator: the allowed path must make none).
//!
//! `cargo bench -p weft --bench authz` (add `-- --quick` for a short run).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    hint::black_box,
    net::IpAddr,
    sync::atomic::{AtomicU64, Ordering},
    time::Instant,
};

use criterion::{BenchmarkId, Criterion};
use weft::{
    authz::{Authorizer, Conn},
    identity::SpiffeId,
    model::{
        Action, AuthorizationPolicy, Labels, Mesh, Operation, PeerAuthentication, PeerMode, Rule,
        Source, Workload,
    },
};

const NAMESPACES: usize = 200;
const PER_NAMESPACE: usize = 50;
/// Calls over which the allocations per call are counted.
const COUNTED_CALLS: u32 = 1_000;

/// The system allocator, counting allocations: the allowed path must make none.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` above, that is from System, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn workload(namespace: &str, name: &str, app: &str) -> Workload {
    Workload {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        service_account: name.to_owned(),
        node: "n0".to_owned(),
        addresses: Vec::new(),
        enrolled: false,
        outside_mesh: Default::default(),
        labels: labels(&[("app", app), ("version", "v1")]),
        native_tunnel: false,
    }
}

fn from(source: Source) -> Vec<Source> {
    vec![source]
}

fn ports(ports: &[u16]) -> Vec<Operation> {
    vec![Operation {
        ports: ports.to_vec(),
        ..Default::default()
    }]
}

fn policy(
    namespace: &str,
    name: String,
    app: Option<&str>,
    action: Action,
    rules: Vec<Rule>,
) -> AuthorizationPolicy {
    AuthorizationPolicy {
        name,
        namespace: namespace.to_owned(),
        selector: app.map(|a| labels(&[("app", a)])),
        target_refs: Vec::new(),
        action,
        provider: None,
        rules,
    }
}

/// An ALLOW rule from one namespace's service account to some ports: the usual
/// shape of a policy.
fn allow_rule(ns: usize, sa: usize, to: &[u16]) -> Rule {
    Rule {
        from: from(Source {
            principals: vec![format!("cluster.local/ns/ns-{ns}/sa/sa-{sa}")],
            ..Default::default()
        }),
        to: ports(to),
        when: Vec::new(),
    }
}

fn config() -> Mesh {
    let mut config = Mesh::default();
    let mut policies = Vec::new();
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        for p in 0..PER_NAMESPACE {
            // Each namespace: 45 workload-specific ALLOW policies for apps app-0..44,
            // 3 more for app-0 (so the target has several applicable), one
            // namespace-wide DENY on a principal, one DENY on an IP block for app-1.
            let policy = match p {
                0..45 => policy(
                    &ns,
                    format!("allow-app-{p}"),
                    Some(&format!("app-{p}")),
                    Action::Allow,
                    vec![
                        allow_rule((n + p) % NAMESPACES, p, &[8080]),
                        allow_rule(n, 0, &[9090]),
                    ],
                ),
                45..48 => policy(
                    &ns,
                    format!("allow-app-0-{p}"),
                    Some("app-0"),
                    Action::Allow,
                    vec![allow_rule((n + p + 1) % NAMESPACES, p, &[8080, 8443])],
                ),
                48 => policy(
                    &ns,
                    "deny-bad".to_owned(),
                    None,
                    Action::Deny,
                    vec![Rule {
                        from: from(Source {
                            principals: vec!["cluster.local/ns/bad/*".to_owned()],
                            ..Default::default()
                        }),
                        to: Vec::new(),
                        when: Vec::new(),
                    }],
                ),
                _ => policy(
                    &ns,
                    "deny-range".to_owned(),
                    Some("app-1"),
                    Action::Deny,
                    vec![Rule {
                        from: from(Source {
                            ip_blocks: vec!["192.0.2.0/24".parse().unwrap()],
                            ..Default::default()
                        }),
                        to: Vec::new(),
                        when: Vec::new(),
                    }],
                ),
            };
            policies.push(policy);
        }
    }
    // Mesh-wide: no plaintext to app-0 anywhere. First, so that the cut to 10,000
    // drops the last namespace's last policy instead.
    policies.insert(
        0,
        policy(
            "weft-system",
            "no-plaintext".to_owned(),
            Some("app-0"),
            Action::Deny,
            vec![Rule {
                from: from(Source {
                    not_principals: vec!["*".to_owned()],
                    ..Default::default()
                }),
                to: Vec::new(),
                when: Vec::new(),
            }],
        ),
    );
    policies.truncate(10_000);
    config.authorization_policies = policies;
    for n in 0..NAMESPACES {
        for a in 0..5 {
            let app = format!("app-{a}");
            config.workloads.push(std::sync::Arc::new(workload(
                &format!("ns-{n}"),
                &app,
                &app,
            )));
        }
    }
    config.peer_authentications.push(PeerAuthentication {
        name: "mesh".to_owned(),
        namespace: "weft-system".to_owned(),
        selector: None,
        mode: PeerMode::Strict,
    });
    config
}

/// Prints what `f` returns (so the scenario can be checked) and the allocations
/// per call, counted over [`COUNTED_CALLS`] calls after a first one.
fn report<T: std::fmt::Debug>(label: &str, mut f: impl FnMut() -> T) {
    let result = f();
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    for _ in 0..COUNTED_CALLS {
        black_box(f());
    }
    let allocations =
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as f64 / f64::from(COUNTED_CALLS);
    println!("{label:<48} {allocations:>4.1} allocs/call  {result:?}");
}

fn main() {
    let config = config();
    let start = Instant::now();
    let authz = Authorizer::new(&config);
    let built = start.elapsed();
    println!(
        "{} policies, {} workloads: Authorizer::new {:.1} ms",
        config.authorization_policies.len(),
        config.workloads.len(),
        built.as_secs_f64() * 1e3
    );

    let dst = config
        .workloads
        .iter()
        .find(|w| w.namespace == "ns-7" && w.name == "app-0")
        .unwrap();
    let mut unlisted = (**dst).clone();
    unlisted.name = "not-in-the-config".to_owned();
    // ns-7's allow-app-0-47 allows ns-55/sa-47 on 8080.
    let good: SpiffeId = "spiffe://cluster.local/ns/ns-55/sa/sa-47".parse().unwrap();
    let bad: SpiffeId = "spiffe://cluster.local/ns/bad/sa/x".parse().unwrap();
    let stranger: SpiffeId = "spiffe://cluster.local/ns/ns-1/sa/sa-1".parse().unwrap();
    let ip: IpAddr = "10.1.2.3".parse().unwrap();
    let conn = |id| Conn {
        src_identity: id,
        src_ip: ip,
        dst_port: 8080,
    };
    // (scenario, source identity, destination paths it runs on)
    let resolved_only: &[(&str, &Workload)] = &[("resolved", dst)];
    let both: &[(&str, &Workload)] = &[("resolved", dst), ("fallback", &unlisted)];
    let cases = [
        ("mtls_allowed", Some(&good), both),
        ("mtls_denied_by_deny_principal", Some(&bad), both),
        ("plaintext_denied_by_mesh_deny", None, both),
        ("mtls_no_allow_matches", Some(&stranger), resolved_only),
    ];

    for (what, id, paths) in cases {
        for &(path, w) in paths {
            let conn = conn(id);
            report(&format!("check {what} [{path}]"), || {
                authz.check(black_box(w), black_box(&conn))
            });
        }
    }
    report("peer_mode", || authz.peer_mode(black_box(dst)));

    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("authz_check");
    for (what, id, paths) in cases {
        for &(path, w) in paths {
            let conn = conn(id);
            group.bench_with_input(BenchmarkId::new(what, path), &(w, conn), |b, (w, conn)| {
                b.iter(|| authz.check(black_box(w), black_box(conn)))
            });
        }
    }
    group.finish();
    c.bench_function("authz_peer_mode", |b| {
        b.iter(|| authz.peer_mode(black_box(dst)))
    });
    c.final_summary();
}
