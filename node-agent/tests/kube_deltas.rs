//! Kubernetes discovery's deltas against whole meshes, through the agent's
//! view: fixtures as `kubectl get -o yaml` prints them, fed as watch events
//! into two states, one sending deltas. (Here, not beside the state: the
//! discovery module may not see the view.)

use k8s_openapi::{
    api::{
        core::v1::{Namespace, ObjectReference, Pod},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{core::DynamicObject, runtime::watcher::Event};
use serde::de::DeserializeOwned;
use weft::discovery::kube::{
    Change, Group, Kinds, Res, State,
    state::change,
    translate::{self, Entry},
};
use weft::model::{Mesh, Workload};

fn items<K: DeserializeOwned>(text: &str) -> Vec<K> {
    let list: serde_json::Value = weft::yaml::from_str(text).expect("fixture parses");
    list["items"]
        .as_array()
        .expect("a List")
        .iter()
        .map(|i| serde_json::from_value(i.clone()).expect("fixture item deserializes"))
        .collect()
}

const NAMESPACES: &str = include_str!("../src/discovery/kube/testdata/namespaces.yaml");
const PODS: &str = include_str!("../src/discovery/kube/testdata/pods.yaml");
const SERVICES: &str = include_str!("../src/discovery/kube/testdata/services.yaml");
const SLICES: &str = include_str!("../src/discovery/kube/testdata/endpointslices.yaml");
const HTTP_ROUTES: &str = include_str!("../src/discovery/kube/testdata/httproutes.yaml");
const AUTHZ: &str = include_str!("../src/discovery/kube/testdata/authorizationpolicies.yaml");
const PEER_AUTHN: &str = include_str!("../src/discovery/kube/testdata/peerauthentications.yaml");
const REQUEST_AUTHN: &str =
    include_str!("../src/discovery/kube/testdata/requestauthentications.yaml");

fn pod(name: &str) -> Pod {
    items::<Pod>(PODS)
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .expect("pod in the fixture")
}

fn ns(name: &str) -> Namespace {
    items::<Namespace>(NAMESPACES)
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .expect("namespace in the fixture")
}

fn group_of(o: &DynamicObject) -> Group {
    match o.types.as_ref().map(|t| t.api_version.as_str()) {
        Some(v) if v.starts_with("security.istio.io/") => Group::Istio,
        _ => Group::Weft,
    }
}

struct Cluster {
    state: State,
}

impl Cluster {
    /// Every kind listed from the fixtures.
    fn synced(state: State) -> Cluster {
        let mut c = Cluster { state };
        c.list(Res::Namespace, items(NAMESPACES), translate::namespace);
        c.list(Res::Pod, items(PODS), translate::pod);
        c.list(Res::Service, items(SERVICES), translate::service);
        c.list(Res::EndpointSlice, items(SLICES), translate::endpoint_slice);
        c.list(Res::HttpRoute, items(HTTP_ROUTES), translate::http_route);
        c.state.apply(Res::GrpcRoute, Change::Absent);
        for g in [Group::Weft, Group::Istio] {
            let of = |text| -> Vec<DynamicObject> {
                items::<DynamicObject>(text)
                    .into_iter()
                    .filter(|o| group_of(o) == g)
                    .collect()
            };
            c.list(
                Res::AuthorizationPolicy(g),
                of(AUTHZ),
                translate::authorization_policy,
            );
            c.list(
                Res::PeerAuthentication(g),
                of(PEER_AUTHN),
                translate::peer_authentication,
            );
            c.list(
                Res::RequestAuthentication(g),
                of(REQUEST_AUTHN),
                translate::request_authentication,
            );
        }
        c
    }

    fn list<K: kube::Resource>(&mut self, res: Res, objects: Vec<K>, f: fn(&K) -> Entry) {
        self.state.apply(res, change(Event::Init, f));
        for o in objects {
            self.state.apply(res, change(Event::InitApply(o), f));
        }
        self.state.apply(res, change(Event::InitDone, f));
    }

    fn event<K: kube::Resource>(&mut self, res: Res, ev: Event<K>, f: fn(&K) -> Entry) {
        self.state.apply(res, change(ev, f));
    }
}

/// An EndpointSlice of `service` in `shop` listing `pods` (those `ready`
/// ready), with port `http` on `port`.
fn slice(name: &str, service: &str, pods: &[(&str, bool)], port: i32) -> EndpointSlice {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some("shop".to_owned()),
            labels: Some(
                [("kubernetes.io/service-name".to_owned(), service.to_owned())]
                    .into_iter()
                    .collect(),
            ),
            ..Default::default()
        },
        address_type: "IPv4".to_owned(),
        endpoints: pods
            .iter()
            .map(|&(pod, ready)| Endpoint {
                addresses: vec!["10.244.7.1".to_owned()],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    ..Default::default()
                }),
                target_ref: Some(ObjectReference {
                    kind: Some("Pod".to_owned()),
                    name: Some(pod.to_owned()),
                    namespace: Some("shop".to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .collect(),
        ports: Some(vec![EndpointPort {
            name: Some("http".to_owned()),
            port: Some(port),
            protocol: Some("TCP".to_owned()),
            ..Default::default()
        }]),
    }
}

/// Changes of pods and EndpointSlices alone are sent as deltas, and a mesh
/// kept up by applying every update in order is, after each one, the mesh a
/// whole assembly gives, and so is the agent's view: 250 random changes of
/// pods (new, deleted, relabelled, opted out, made waypoints, moved to
/// another node or address, taking another pod's or a service's address) and
/// of slices (listing other pods, ready or not, resolving the port to
/// another number or to the mesh's, moved to another service, the
/// waypoint's, deleted), with a namespace relabelled now and then.
#[test]
fn changes_sent_as_deltas_add_up_to_the_whole_mesh() {
    use std::time::Instant;

    use weft::{
        discovery::kube::Update,
        model::WorkloadKey,
        view::{Balancers, View},
    };

    let mut ordered =
        Cluster::synced(State::new(Kinds::All, "cluster.local", "weft-system").with_deltas());
    let mut whole = Cluster::synced(State::new(Kinds::All, "cluster.local", "weft-system"));
    // 30 more pods, each with an address of its own.
    let names: Vec<String> = ["web-0", "web-1", "shop-waypoint-0"]
        .into_iter()
        .map(String::from)
        .chain((0..30).map(|i| format!("extra-{i}")))
        .collect();
    let make = |name: &str, ip: String, node: &str| {
        let mut p = pod("web-0");
        p.metadata.name = Some(name.to_owned());
        p.spec.as_mut().unwrap().node_name = Some(node.to_owned());
        let status = p.status.as_mut().unwrap();
        status.pod_ip = Some(ip.clone());
        status.pod_ips = Some(vec![k8s_openapi::api::core::v1::PodIP { ip }]);
        p
    };
    for i in 0..30 {
        // The address each is given below (its index in `names`).
        let ev = Event::Apply(make(
            &format!("extra-{i}"),
            format!("10.244.9.{}", i + 3),
            "node-1",
        ));
        ordered.event(Res::Pod, ev.clone(), translate::pod);
        whole.event(Res::Pod, ev, translate::pod);
    }
    let Some(Update::Mesh(first)) = ordered.state.next_update() else {
        panic!("the first update is a whole mesh");
    };
    let mut kept = Mesh::clone(&first);
    let view_balancers = Balancers::default();
    let mut view = View::new(kept.clone(), "node-1", &view_balancers);

    // A small, seeded generator: the same run every time.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    // Addresses of the fixture's pods and a service's: taking one is a
    // conflict.
    let taken = ["10.244.1.10", "10.244.2.11", "10.244.1.12", "10.96.10.20"];
    let (mut deltas, mut meshes, mut endpoints) = (0, 0, 0);
    for step in 0..250 {
        for _ in 0..=next(2) {
            if next(3) == 0 {
                let name = ["web-extra-a", "web-extra-b"][next(2) as usize];
                let service = match next(12) {
                    0 => "shop-waypoint",
                    1 => "web-headless",
                    2 => "no-such-service",
                    _ => "web",
                };
                let port = match next(10) {
                    0 => 15008,
                    1..=3 => 8081,
                    _ => 8080,
                };
                let listed: Vec<(&str, bool)> = (0..next(5))
                    .map(|_| {
                        let pod = names[next(names.len() as u64) as usize].as_str();
                        (pod, next(4) != 0)
                    })
                    .collect();
                let s = slice(name, service, &listed, port);
                let ev = if next(6) == 0 {
                    Event::Delete(s)
                } else {
                    Event::Apply(s)
                };
                ordered.event(Res::EndpointSlice, ev.clone(), translate::endpoint_slice);
                whole.event(Res::EndpointSlice, ev, translate::endpoint_slice);
                continue;
            }
            let i = next(names.len() as u64) as usize;
            let name = names[i].as_str();
            if next(8) == 0 {
                let ev = Event::Delete(make(name, String::new(), "node-1"));
                ordered.event(Res::Pod, ev.clone(), translate::pod);
                whole.event(Res::Pod, ev, translate::pod);
                continue;
            }
            if next(40) == 0 {
                let mut n = ns("shop");
                let labels = n.metadata.labels.get_or_insert_default();
                if next(2) == 0 {
                    labels.remove("weft.dev/mesh");
                } else {
                    labels.insert("weft.dev/mesh".into(), "enabled".into());
                }
                let ev = Event::Apply(n);
                ordered.event(Res::Namespace, ev.clone(), translate::namespace);
                whole.event(Res::Namespace, ev, translate::namespace);
                continue;
            }
            // Mostly its own address, sometimes a second one of its own (a
            // move), now and then one that is taken.
            let ip = match next(20) {
                0 => taken[next(taken.len() as u64) as usize].to_owned(),
                1..=3 => format!("10.244.8.{i}"),
                _ => format!("10.244.9.{i}"),
            };
            let mut p = make(name, ip, ["node-1", "node-2"][next(2) as usize]);
            let labels = p.metadata.labels.get_or_insert_default();
            labels.insert("rev".into(), next(3).to_string());
            match next(16) {
                0 | 1 => {
                    labels.insert("weft.dev/mesh".into(), "disabled".into());
                }
                2 => {
                    labels.insert("weft.dev/role".into(), "waypoint".into());
                }
                _ => {}
            }
            let ev = Event::Apply(p);
            ordered.event(Res::Pod, ev.clone(), translate::pod);
            whole.event(Res::Pod, ev, translate::pod);
        }
        match ordered.state.next_update() {
            Some(Update::Mesh(m)) => {
                meshes += 1;
                kept = Mesh::clone(&m);
                view = View::new(kept.clone(), "node-1", &view_balancers);
            }
            Some(Update::Delta(d)) => {
                deltas += 1;
                endpoints += usize::from(!d.services.is_empty());
                kept.apply_delta(d.clone());
                let started = Instant::now();
                view = view.with_delta(d, &view_balancers);
                assert!(started.elapsed().as_millis() < 100);
            }
            None => {}
        }
        let expected = whole.state.build().unwrap();
        assert_eq!(sorted(&kept), sorted(&expected), "step {step}: workloads");
        assert!(
            kept.eq_without_workloads(&expected),
            "step {step}: the rest"
        );
        // The bindings to waypoints at once, as one by one.
        let one_by_one: Vec<_> = expected
            .services
            .iter()
            .map(|s| expected.waypoint_of(s))
            .collect();
        assert_eq!(expected.waypoints(), one_by_one, "step {step}: waypoints");
        assert_eq!(
            ordered.state.invalid(),
            whole.state.invalid(),
            "step {step}: invalid"
        );

        // The view made by changes answers as one made whole.
        let fresh = View::new(expected.clone(), "node-1", &Balancers::default());
        let all: Vec<&Workload> = expected.workloads.iter().map(|w| &**w).collect();
        assert_eq!(view.workload_count(), all.len(), "step {step}");
        assert_eq!(view.enrolled_count(), fresh.enrolled_count(), "step {step}");
        for w in &all {
            assert_eq!(view.workload(&w.key()), Some(*w), "step {step}");
            for a in &w.addresses {
                assert_eq!(view.workload_by_address(*a), Some(*w), "step {step}: {a}");
            }
        }
        for ip in taken {
            let ip = ip.parse().unwrap();
            assert_eq!(
                view.workload_by_address(ip).map(Workload::key),
                fresh.workload_by_address(ip).map(Workload::key),
                "step {step}: {ip}"
            );
        }
        assert!(
            view.services().eq(expected.services.iter()),
            "step {step}: services"
        );
        let local = |v: &View| v.local().map(Workload::key).collect::<Vec<WorkloadKey>>();
        assert_eq!(local(&view), local(&fresh), "step {step}: this node's");
        let now = Instant::now();
        for svc in &expected.services {
            let eps = |v: &View| {
                v.service(&svc.key()).map(|(_, b)| {
                    b.snapshot(now)
                        .into_iter()
                        .map(|e| (e.key, e.same_node))
                        .collect::<Vec<_>>()
                })
            };
            assert_eq!(
                eps(&view),
                eps(&fresh),
                "step {step}: endpoints of {}",
                svc.name
            );
        }
    }
    eprintln!("STATS {deltas} {endpoints} {meshes}");
    // Both paths ran, the cheap one most.
    assert!(
        deltas > 80 && meshes > 10 && endpoints > 20,
        "{deltas} deltas ({endpoints} changing endpoints), {meshes} meshes"
    );
}

fn sorted(mesh: &Mesh) -> Vec<std::sync::Arc<Workload>> {
    let mut w = mesh.workloads.clone();
    w.sort_by_key(|w| w.key());
    w
}

/// Meshing a namespace (or taking it out) by its label changes the
/// enrollment of its pods only: a delta of those pods, not a whole mesh; a
/// new namespace without pods sends nothing; a namespace bound to another
/// waypoint is a whole mesh (the services' bindings change with it).
#[test]
fn a_namespace_relabelled_is_a_delta_of_its_pods() {
    use weft::discovery::kube::Update;

    let mut ordered =
        Cluster::synced(State::new(Kinds::All, "cluster.local", "weft-system").with_deltas());
    let mut whole = Cluster::synced(State::new(Kinds::All, "cluster.local", "weft-system"));
    let Some(Update::Mesh(first)) = ordered.state.next_update() else {
        panic!("the first update is a whole mesh");
    };
    let mut kept = Mesh::clone(&first);
    let enrolled_in_shop = |m: &Mesh| {
        m.workloads
            .iter()
            .filter(|w| w.namespace == "shop" && w.enrolled)
            .count()
    };
    let before = enrolled_in_shop(&kept);
    assert!(before > 0);
    for (step, mode) in ["disabled", "enabled", "disabled"].into_iter().enumerate() {
        let mut n = ns("shop");
        n.metadata
            .labels
            .get_or_insert_default()
            .insert("weft.dev/mesh".into(), mode.into());
        let ev = Event::Apply(n);
        ordered.event(Res::Namespace, ev.clone(), translate::namespace);
        whole.event(Res::Namespace, ev, translate::namespace);
        let Some(Update::Delta(d)) = ordered.state.next_update() else {
            panic!("step {step}: a relabel is sent as a delta");
        };
        assert!(d.removes.is_empty() && d.services.is_empty(), "{d:?}");
        assert!(
            !d.upserts.is_empty() && d.upserts.iter().all(|w| w.namespace == "shop"),
            "step {step}: {d:?}"
        );
        kept.apply_delta(d);
        let expected = whole.state.build().unwrap();
        assert_eq!(sorted(&kept), sorted(&expected), "step {step}");
        assert!(kept.eq_without_workloads(&expected), "step {step}");
        let now = enrolled_in_shop(&kept);
        assert_eq!(now == 0, mode == "disabled", "step {step}: {now} enrolled");
    }
    assert_eq!(enrolled_in_shop(&kept), 0);

    // A new namespace, no pods in it yet: nothing to send.
    let mut fresh = ns("batch");
    fresh.metadata.name = Some("fresh".into());
    let ev = Event::Apply(fresh);
    ordered.event(Res::Namespace, ev.clone(), translate::namespace);
    whole.event(Res::Namespace, ev, translate::namespace);
    assert_eq!(ordered.state.next_update(), None);
    assert_eq!(sorted(&kept), sorted(&whole.state.build().unwrap()));

    // Bound to a waypoint now: a whole mesh.
    let mut bound = ns("batch");
    bound
        .metadata
        .labels
        .get_or_insert_default()
        .insert("istio.io/use-waypoint".into(), "shop-waypoint".into());
    let ev = Event::Apply(bound);
    ordered.event(Res::Namespace, ev.clone(), translate::namespace);
    whole.event(Res::Namespace, ev, translate::namespace);
    let Some(Update::Mesh(m)) = ordered.state.next_update() else {
        panic!("a new waypoint binding is a whole mesh");
    };
    let expected = whole.state.build().unwrap();
    assert_eq!(sorted(&m), sorted(&expected));
    assert!(m.eq_without_workloads(&expected));
}
