//! Kubernetes discovery at scale: a synthetic cluster of 10,000 and 100,000 pods
//! and 10,000 services (with their EndpointSlices), fed to
//! `discovery::kube::State` as the watches feed it (a list: `Init`,
//! `InitApply`..., `InitDone`), each object translated and dropped as it
//! arrives.
//!
//! Prints, per size:
//! - the memory the discovery state holds per pod (bytes still allocated after
//!   the list, counted by the global allocator, over the pod count; the objects
//!   themselves were freed);
//! - the time of the initial list (translation of every object) and of the
//!   first assembly of the mesh (`State::build`, with validation);
//! - the initial `View::new` (what the agent compiles from that mesh), and
//!   what the agent holds in all (the state and the view: the mesh is moved
//!   into the view);
//! - one pod changing (its labels): the event's translation and apply, the
//!   update the agent's ordered source sends for it (`State::next_update`: a
//!   delta of that workload), and the agent applying it
//!   (`View::with_delta`); then, for comparison, what a change of another
//!   kind costs, a whole mesh (`State::build`) and `View::new`.
//!
//! `cargo bench -p weft --bench discovery` (`-- --quick`: 10,000 pods only).
//! Not criterion: one list of 100,000 pods is itself the measurement.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    hint::black_box,
    sync::atomic::{AtomicI64, Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{
        core::v1::{
            Container, ContainerPort, Namespace, ObjectReference, Pod, PodIP, PodSpec, PodStatus,
            Service, ServicePort, ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ManagedFieldsEntry, ObjectMeta},
        util::intstr::IntOrString,
    },
};
use kube::runtime::watcher::Event;
use weft::{
    ca::placement::Placement,
    discovery::kube::{
        Change, Kinds, Res, State, Update,
        state::change,
        translate::{self, Entry},
    },
    model::MeshDelta,
    view::{Balancers, View},
};

/// The system allocator, keeping the count of bytes allocated and not freed.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        // SAFETY: `ptr` came from `alloc` above, that is from System, with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

const SERVICES: usize = 10_000;
const NODES: usize = 5_000;
/// Pods per namespace.
const PER_NAMESPACE: usize = 100;

fn labels(pairs: &[(&str, String)]) -> Option<BTreeMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
    )
}

fn namespace_of(i: usize) -> String {
    format!("team-{}", i / PER_NAMESPACE)
}

/// A pod as the API server sends it: labels of a Deployment's pod, managed
/// fields, a container, status with its IP.
fn pod(i: usize, services: usize, rev: u32) -> Pod {
    let svc = i % services;
    let ip = format!("10.{}.{}.{}", 64 + (i >> 16), (i >> 8) & 255, i & 255);
    Pod {
        metadata: ObjectMeta {
            name: Some(format!("app-{svc}-7d9c8b6f5-{i:05x}")),
            namespace: Some(namespace_of(i)),
            labels: labels(&[
                ("app", format!("app-{svc}")),
                ("pod-template-hash", "7d9c8b6f5".into()),
                ("version", format!("v{rev}")),
            ]),
            managed_fields: Some(vec![ManagedFieldsEntry {
                api_version: Some("v1".into()),
                fields_type: Some("FieldsV1".into()),
                manager: Some("kube-controller-manager".into()),
                operation: Some("Update".into()),
                ..Default::default()
            }]),
            resource_version: Some(format!("{}", 100_000 + i)),
            uid: Some(format!("9e8d7c6b-{i:08x}-4a3b-9c8d-7e6f5a4b3c2d")),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "app".into(),
                image: Some("registry.example/app:1.4.2".into()),
                ports: Some(vec![ContainerPort {
                    container_port: 8080,
                    name: Some("http".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }],
            node_name: Some(format!("node-{}", i % NODES)),
            service_account_name: Some(format!("app-{svc}")),
            ..Default::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some(ip.clone()),
            pod_ips: Some(vec![PodIP { ip }]),
            host_ip: Some("192.168.0.1".into()),
            ..Default::default()
        }),
    }
}

/// Service `s` selects the pods `i` with `i % services == s`: they live in
/// the namespace of pod `s` only when there are no more pods than services,
/// so each service is put in the namespace of its first pod and lists the
/// pods of that namespace it selects.
fn service(s: usize) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(format!("app-{s}")),
            namespace: Some(namespace_of(s)),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some(format!("10.96.{}.{}", s >> 8, s & 255)),
            cluster_ips: Some(vec![format!("10.96.{}.{}", s >> 8, s & 255)]),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                target_port: Some(IntOrString::String("http".into())),
                app_protocol: Some("http".into()),
                ..Default::default()
            }]),
            selector: labels(&[("app", format!("app-{s}"))]),
            ..Default::default()
        }),
        status: None,
    }
}

fn slice(s: usize, pods: usize) -> EndpointSlice {
    let ns = namespace_of(s);
    let members: Vec<usize> = (s..pods)
        .step_by(SERVICES.min(pods))
        .filter(|i| namespace_of(*i) == ns)
        .collect();
    EndpointSlice {
        address_type: "IPv4".into(),
        endpoints: members
            .iter()
            .map(|&i| Endpoint {
                addresses: vec![format!(
                    "10.{}.{}.{}",
                    64 + (i >> 16),
                    (i >> 8) & 255,
                    i & 255
                )],
                conditions: Some(EndpointConditions {
                    ready: Some(true),
                    serving: Some(true),
                    terminating: Some(false),
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".into()),
                    name: pod(i, SERVICES.min(pods), 0).metadata.name,
                    namespace: Some(ns.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        metadata: ObjectMeta {
            name: Some(format!("app-{s}-x7k2p")),
            namespace: Some(ns),
            labels: labels(&[("kubernetes.io/service-name", format!("app-{s}"))]),
            ..Default::default()
        },
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    }
}

fn list<K: kube::Resource>(
    state: &mut State,
    res: Res,
    n: usize,
    make: impl Fn(usize) -> K,
    f: fn(&K) -> Entry,
) {
    state.apply(res, Change::Init);
    for i in 0..n {
        // Made, translated and dropped one at a time, as a watch page is read.
        state.apply(res, change(Event::InitApply(make(i)), f));
    }
    state.apply(res, Change::InitDone);
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn run(pods: usize) {
    let services = SERVICES.min(pods);
    let namespaces = pods.div_ceil(PER_NAMESPACE);
    println!("\n== {pods} pods, {services} services, {namespaces} namespaces, {NODES} nodes ==");
    let base = live();
    let mut state = State::new(Kinds::All, "cluster.local", "weft-system").with_deltas();
    let started = Instant::now();
    list(
        &mut state,
        Res::Namespace,
        namespaces,
        |i| Namespace {
            metadata: ObjectMeta {
                name: Some(format!("team-{i}")),
                labels: labels(&[("weft.dev/mesh", "enabled".into())]),
                ..Default::default()
            },
            ..Default::default()
        },
        translate::namespace,
    );
    let before_pods = live();
    list(
        &mut state,
        Res::Pod,
        pods,
        |i| pod(i, services, 0),
        translate::pod,
    );
    let pods_bytes = live() - before_pods;
    list(
        &mut state,
        Res::Service,
        services,
        service,
        translate::service,
    );
    list(
        &mut state,
        Res::EndpointSlice,
        services,
        |s| slice(s, pods),
        translate::endpoint_slice,
    );
    for res in state.unsynced() {
        state.apply(res, Change::Absent);
    }
    let listed = started.elapsed();
    let state_bytes = live() - base;
    println!(
        "discovery state: {:.1} MiB in all, {:.1} MiB for the pods: {} B per pod (pods only), {} B per pod (all kinds)",
        mib(state_bytes),
        mib(pods_bytes),
        pods_bytes / pods as i64,
        state_bytes / pods as i64,
    );
    println!(
        "initial list (translate every object): {:.0} ms",
        ms(listed)
    );

    let before_mesh = live();
    let t = Instant::now();
    let Some(Update::Mesh(mesh)) = state.next_update() else {
        panic!("the first update is a whole mesh")
    };
    let mesh = std::sync::Arc::unwrap_or_clone(mesh);
    let build = t.elapsed();
    let mesh_bytes = live() - before_mesh;
    assert_eq!(mesh.workloads.len(), pods);
    assert_eq!(mesh.services.len(), services);
    assert!(state.invalid().is_empty(), "{:?}", state.invalid());
    println!(
        "first mesh (State::build, with validation): {:.0} ms; the mesh: {:.1} MiB, {} B per pod",
        ms(build),
        mib(mesh_bytes),
        mesh_bytes / pods as i64
    );

    // The CA's index of the same mesh (the CA itself watches only pods and
    // namespaces; the pods are the state's, shared). Not the agent's: its
    // bytes are left out of the agent's below.
    let before_placement = live();
    let t = Instant::now();
    let mut placement = Placement::new(&mesh);
    let placement_bytes = live() - before_placement;
    println!(
        "the CA's placement: Placement::new {:.0} ms, {} B per pod",
        ms(t.elapsed()),
        placement_bytes / pods as i64
    );

    let balancers = Balancers::default();
    let before_view = live();
    let t = Instant::now();
    // The agent moves the mesh into its view.
    let mut view = View::new(mesh, "node-0", &balancers);
    println!("initial View::new: {:.0} ms", ms(t.elapsed()));
    let agent_bytes = live() - base - placement_bytes;
    println!(
        "the view: {} B per pod; the agent in all (state and view): {:.1} MiB, {} B per pod",
        (live() - before_view + mesh_bytes) / pods as i64,
        mib(agent_bytes),
        agent_bytes / pods as i64
    );

    // One pod changes, over and over (a label flips; a different pod each
    // time): the event, the delta the source sends, the agent's new view.
    let rounds = 200;
    view = changes(
        "one pod change",
        rounds,
        &mut state,
        view,
        &balancers,
        Some(&mut placement),
        |r, state| {
            let changed = pod((pods / 2 + r * 7) % pods, services, r as u32);
            state.apply(Res::Pod, change(Event::Apply(changed), translate::pod));
            |d: &MeshDelta| d.upserts.len() == 1
        },
    );
    // One endpoint changes, over and over (a pod of a service turns not
    // ready in its EndpointSlice; a different service each time): the
    // slice's event, the delta, the agent's new view and balancer.
    view = changes(
        "one endpoint change",
        rounds,
        &mut state,
        view,
        &balancers,
        None,
        |r, state| {
            let mut changed = slice((r * 13) % services, pods);
            if let Some(c) = changed.endpoints[0].conditions.as_mut() {
                c.ready = Some(false);
            }
            state.apply(
                Res::EndpointSlice,
                change(Event::Apply(changed), translate::endpoint_slice),
            );
            |d: &MeshDelta| d.services.len() == 1
        },
    );
    let agent_after = live() - base - placement_bytes;
    println!(
        "the agent after {rounds} changes of each: {} B per pod",
        agent_after / pods as i64
    );
    black_box(&view);

    // A change of another kind (a Service, a policy, a namespace) is still a
    // whole mesh and a whole view.
    let rounds = if pods > 20_000 { 3 } else { 10 };
    let mut publish = Vec::new();
    let mut rebuild = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mesh = state.build().expect("synced");
        publish.push(t.elapsed());
        let t = Instant::now();
        let whole = View::new(mesh, "node-0", &balancers);
        rebuild.push(t.elapsed());
        black_box(whole);
    }
    println!(
        "a change of another kind: a whole mesh (State::build) {:.0} ms; View::new {:.0} ms (medians of {rounds})",
        ms(median(publish)),
        ms(median(rebuild)),
    );
}

/// `rounds` changes, each made by `event` (which says what its delta must
/// be), sent as a delta and applied to `view`; prints the cost of each step.
fn changes<C: Fn(&MeshDelta) -> bool>(
    what: &str,
    rounds: usize,
    state: &mut State,
    mut view: View,
    balancers: &Balancers,
    mut placement: Option<&mut Placement>,
    mut event: impl FnMut(usize, &mut State) -> C,
) -> View {
    let mut apply = Vec::new();
    let mut publish = Vec::new();
    let mut rebuild = Vec::new();
    let mut ca = Vec::new();
    for r in 1..=rounds {
        let t = Instant::now();
        let expected = event(r, state);
        apply.push(t.elapsed());
        let t = Instant::now();
        let Some(Update::Delta(delta)) = state.next_update() else {
            panic!("{what}: sent whole, not as a delta")
        };
        publish.push(t.elapsed());
        assert!(expected(&delta), "{what}: {delta:?}");
        if let Some(p) = placement.as_deref_mut() {
            let t = Instant::now();
            p.apply(&delta);
            ca.push(t.elapsed());
        }
        let t = Instant::now();
        view = view.with_delta(delta, balancers);
        rebuild.push(t.elapsed());
    }
    let (apply, publish, rebuild) = (tail(apply), tail(publish), tail(rebuild));
    println!(
        "{what} (median / p99 of {rounds}): translate + apply {:.1} / {:.1} µs; \
         the delta (State::next_update) {:.1} / {:.1} µs; View::with_delta {:.1} / {:.1} µs; \
         in all {:.1} µs at the median",
        apply.0,
        apply.1,
        publish.0,
        publish.1,
        rebuild.0,
        rebuild.1,
        apply.0 + publish.0 + rebuild.0,
    );
    if !ca.is_empty() {
        let ca = tail(ca);
        println!(
            "{what} in the CA's placement (median / p99): {:.1} / {:.1} µs",
            ca.0, ca.1
        );
    }
    view
}

/// The median and the 99th percentile, in µs.
fn tail(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // `cargo bench` passes `--bench`; anything else is for criterion benches.
    run(10_000);
    if !quick {
        run(100_000);
    }
}
