//! Translation from real objects: `kubectl get -o yaml` lists (`testdata/`), fed
//! as kube `watcher::Event`s through the same path the watches take
//! ([`state::change`] with the kind's translation, then [`State::apply`]), into
//! the model.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Namespace, Pod},
    discovery::v1::EndpointSlice,
};
use kube::{core::DynamicObject, runtime::watcher::Event};
use serde::de::DeserializeOwned;

use super::{
    state::{Change, Group, Kinds, Res, State, change},
    translate::{self, Entry},
};
use crate::model::{Endpoints, Mesh, PeerMode, UseWaypoint, Workload};

fn items<K: DeserializeOwned>(text: &str) -> Vec<K> {
    let list: serde_json::Value = crate::yaml::from_str(text).expect("fixture parses");
    list["items"]
        .as_array()
        .expect("a List")
        .iter()
        .map(|i| serde_json::from_value(i.clone()).expect("fixture item deserializes"))
        .collect()
}

const NAMESPACES: &str = include_str!("testdata/namespaces.yaml");
const PODS: &str = include_str!("testdata/pods.yaml");
const SERVICES: &str = include_str!("testdata/services.yaml");
const SLICES: &str = include_str!("testdata/endpointslices.yaml");
const HTTP_ROUTES: &str = include_str!("testdata/httproutes.yaml");
const AUTHZ: &str = include_str!("testdata/authorizationpolicies.yaml");
const PEER_AUTHN: &str = include_str!("testdata/peerauthentications.yaml");
const REQUEST_AUTHN: &str = include_str!("testdata/requestauthentications.yaml");

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

fn slice(name: &str) -> EndpointSlice {
    items::<EndpointSlice>(SLICES)
        .into_iter()
        .find(|p| p.metadata.name.as_deref() == Some(name))
        .expect("slice in the fixture")
}

/// The group a dynamic object's `apiVersion` names.
fn group_of(o: &DynamicObject) -> Group {
    match o.types.as_ref().map(|t| t.api_version.as_str()) {
        Some(v) if v.starts_with("security.istio.io/") => Group::Istio,
        _ => Group::Weft,
    }
}

/// A cluster as the watches see it: a state fed watch events.
struct Cluster {
    state: State,
}

impl Cluster {
    fn new() -> Cluster {
        Cluster {
            state: State::new(Kinds::All, "cluster.local", "weft-system"),
        }
    }

    /// Every kind listed from the fixtures (Init, InitApply..., InitDone).
    fn synced() -> Cluster {
        let mut c = Cluster::new();
        c.list(Res::Namespace, items(NAMESPACES), translate::namespace);
        c.list(Res::Pod, items(PODS), translate::pod);
        c.list(Res::Service, items(SERVICES), translate::service);
        c.list(Res::EndpointSlice, items(SLICES), translate::endpoint_slice);
        c.list(Res::HttpRoute, items(HTTP_ROUTES), translate::http_route);
        // No GRPCRoute CRD in this cluster.
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

    fn mesh(&mut self) -> Mesh {
        let mesh = self.state.build().expect("synced");
        assert_eq!(
            crate::model::validate::problems(&mesh),
            Vec::<String>::new(),
            "what is published is valid"
        );
        mesh
    }
}

fn workload<'a>(mesh: &'a Mesh, ns: &str, name: &str) -> Option<&'a Workload> {
    mesh.workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
        .map(|w| &**w)
}

fn endpoints(mesh: &Mesh, ns: &str, name: &str) -> Vec<String> {
    let svc = mesh
        .services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
        .expect("service");
    match &svc.endpoints {
        Endpoints::Listed(list) => list.iter().map(|e| e.workload.clone()).collect(),
        Endpoints::Selector(_) => panic!("endpoints come from EndpointSlices"),
    }
}

fn enrolled(mesh: &Mesh) -> Vec<String> {
    mesh.workloads
        .iter()
        .filter(|w| w.enrolled)
        .map(|w| w.key().to_string())
        .collect()
}

#[test]
fn a_labelled_namespace_enrolls_its_pods_and_a_pod_label_opts_in_or_out() {
    let mesh = Cluster::synced().mesh();
    assert_eq!(
        enrolled(&mesh),
        [
            "batch/job-1",  // its own label, in an unlabelled namespace
            "legacy/api-0", // Istio's ambient label on its namespace
            "shop/web-0",
            "shop/web-1",
        ]
    );
    let reports = workload(&mesh, "shop", "reports-0").expect("opted out, still a workload");
    assert!(!reports.enrolled);
    let wp = workload(&mesh, "shop", "shop-waypoint-0").unwrap();
    assert!(
        wp.native_tunnel && !wp.enrolled,
        "a waypoint is reached, never captured"
    );
    let web = workload(&mesh, "shop", "web-0").unwrap();
    assert_eq!(web.service_account, "web");
    assert_eq!(web.node, "node-1");
    assert_eq!(
        web.addresses,
        ["10.244.1.10".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(&web.labels["app"], "web");
    assert!(
        workload(&mesh, "shop", "node-exporter-0").is_none(),
        "host-network pods are not the mesh's"
    );
    assert!(
        workload(&mesh, "batch", "finished-0").is_none(),
        "a finished pod's IP may already be another's"
    );
}

#[test]
fn unlabelling_a_namespace_unenrolls_its_pods() {
    let mut c = Cluster::synced();
    let mut shop = ns("shop");
    shop.metadata
        .labels
        .as_mut()
        .unwrap()
        .remove(super::labels::MESH);
    c.event(Res::Namespace, Event::Apply(shop), translate::namespace);
    let mesh = c.mesh();
    assert_eq!(enrolled(&mesh), ["batch/job-1", "legacy/api-0"]);
    // Labelled again: back in.
    c.event(
        Res::Namespace,
        Event::Apply(ns("shop")),
        translate::namespace,
    );
    assert!(workload(&c.mesh(), "shop", "web-0").unwrap().enrolled);
}

#[test]
fn a_pod_opt_out_label_wins_over_its_namespace() {
    let mut c = Cluster::synced();
    let mut web = pod("web-0");
    web.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("istio.io/dataplane-mode".into(), "none".into());
    c.event(Res::Pod, Event::Apply(web), translate::pod);
    assert!(!workload(&c.mesh(), "shop", "web-0").unwrap().enrolled);
}

#[test]
fn a_deleted_pod_leaves_the_model_and_its_service_at_once() {
    let mut c = Cluster::synced();
    assert_eq!(endpoints(&c.mesh(), "shop", "web"), ["web-0", "web-1"]);
    c.event(Res::Pod, Event::Delete(pod("web-1")), translate::pod);
    // The slice still lists it (the controller has not caught up): it is no
    // endpoint the moment the pod is gone.
    let mesh = c.mesh();
    assert!(workload(&mesh, "shop", "web-1").is_none());
    assert_eq!(endpoints(&mesh, "shop", "web"), ["web-0"]);
}

#[test]
fn a_pod_relabelled_out_of_a_service_leaves_its_endpoints() {
    let mut c = Cluster::synced();
    let mut web1 = pod("web-1");
    web1.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("app".into(), "debug".into());
    c.event(Res::Pod, Event::Apply(web1), translate::pod);
    // The EndpointSlice controller then drops it from the slice.
    let mut s = slice("web-x7k2p");
    s.endpoints
        .retain(|e| e.target_ref.as_ref().unwrap().name.as_deref() != Some("web-1"));
    c.event(
        Res::EndpointSlice,
        Event::Apply(s),
        translate::endpoint_slice,
    );
    let mesh = c.mesh();
    assert_eq!(
        &workload(&mesh, "shop", "web-1").unwrap().labels["app"],
        "debug"
    );
    assert_eq!(endpoints(&mesh, "shop", "web"), ["web-0"]);
    // A not-ready endpoint is no endpoint either.
    let mut s = slice("web-x7k2p");
    s.endpoints[0].conditions.as_mut().unwrap().ready = Some(false);
    c.event(
        Res::EndpointSlice,
        Event::Apply(s),
        translate::endpoint_slice,
    );
    assert_eq!(endpoints(&c.mesh(), "shop", "web"), ["web-1"]);
}

#[test]
fn a_pod_moving_ip_frees_its_old_address() {
    let mut c = Cluster::synced();
    let mut web1 = pod("web-1");
    let status = web1.status.as_mut().unwrap();
    status.pod_ip = Some("10.244.2.99".into());
    status.pod_ips.as_mut().unwrap()[0].ip = "10.244.2.99".into();
    c.event(Res::Pod, Event::Apply(web1), translate::pod);
    // Another pod takes the old address: no conflict, both valid.
    let mut job = pod("job-0");
    job.status.as_mut().unwrap().pod_ip = Some("10.244.2.11".into());
    job.status.as_mut().unwrap().pod_ips.as_mut().unwrap()[0].ip = "10.244.2.11".into();
    c.event(Res::Pod, Event::Apply(job), translate::pod);
    let mesh = c.mesh();
    let at = |ip: &str| {
        mesh.workload_by_address(ip.parse().unwrap())
            .map(|w| w.key().to_string())
    };
    assert_eq!(at("10.244.2.99").as_deref(), Some("shop/web-1"));
    assert_eq!(at("10.244.2.11").as_deref(), Some("batch/job-0"));
}

#[test]
fn a_pod_without_an_address_yet_is_known_so_its_cni_add_can_be_answered() {
    // The CNI ADD comes before the kubelet reports the IP that ADD gives.
    let mut c = Cluster::synced();
    let mut web1 = pod("web-1");
    let status = web1.status.as_mut().unwrap();
    status.pod_ip = None;
    status.pod_ips = None;
    status.phase = Some("Pending".into());
    c.event(Res::Pod, Event::Apply(web1), translate::pod);
    let mesh = c.mesh();
    let w = workload(&mesh, "shop", "web-1").expect("the pod is in the model");
    assert!(w.addresses.is_empty() && w.enrolled, "{w:?}");
}

#[test]
fn two_pods_claiming_one_address_leave_out_one_and_say_why() {
    let mut c = Cluster::synced();
    let mut job = pod("job-0");
    job.status.as_mut().unwrap().pod_ips.as_mut().unwrap()[0].ip = "10.244.1.10".into();
    job.status.as_mut().unwrap().pod_ip = Some("10.244.1.10".into());
    c.event(Res::Pod, Event::Apply(job), translate::pod);
    let mesh = c.mesh();
    // The model lists pods by namespace and name: batch/job-0 comes first and
    // keeps the address; the other is left out until one of them lets go.
    assert!(workload(&mesh, "batch", "job-0").is_some());
    assert!(workload(&mesh, "shop", "web-0").is_none());
    assert!(
        c.state.invalid()[&("Pod", "shop/web-0".to_owned())].contains("also batch/job-0's"),
        "{:?}",
        c.state.invalid()
    );
    // Its endpoints go with it.
    assert_eq!(endpoints(&mesh, "shop", "web"), ["web-1"]);
}

#[test]
fn a_service_takes_its_target_ports_from_its_slices() {
    let mesh = Cluster::synced().mesh();
    let web = mesh.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(
        web.addresses,
        ["10.96.10.20".parse::<std::net::IpAddr>().unwrap()]
    );
    let ports: Vec<(u16, u16, Option<&str>)> = web
        .ports
        .iter()
        .map(|p| (p.port, p.target_port, p.app_protocol.as_deref()))
        .collect();
    // `targetPort: http` is 8080 on the pods; the UDP port is not meshed.
    assert_eq!(ports, [(80, 8080, Some("http")), (9090, 9091, None)]);
    let api = mesh.services.iter().find(|s| s.name == "api").unwrap();
    assert_eq!(
        api.ports[0].app_protocol.as_deref(),
        Some("kubernetes.io/h2c")
    );
}

#[test]
fn a_headless_service_has_no_vip_and_is_left_out() {
    let mesh = Cluster::synced().mesh();
    let names: Vec<&str> = mesh.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["api", "shop-waypoint", "web"]);
}

#[test]
fn waypoints_bind_by_namespace_and_service_labels() {
    let mesh = Cluster::synced().mesh();
    let svc = |ns: &str, name: &str| {
        mesh.services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
            .unwrap()
    };
    let shop_wp = Some(("shop".to_owned(), "shop-waypoint".to_owned()));
    // web: by its namespace's label.
    assert_eq!(mesh.waypoint_of(svc("shop", "web")), shop_wp);
    // api: by Istio's labels on the service, to another namespace's waypoint.
    assert_eq!(mesh.waypoint_of(svc("legacy", "api")), shop_wp);
    // The waypoint's own service opts out.
    assert_eq!(
        svc("shop", "shop-waypoint").waypoint,
        Some(UseWaypoint::None)
    );
    assert_eq!(mesh.namespaces.len(), 1);
}

#[test]
fn an_http_route_with_a_service_parent_is_the_waypoints() {
    let mut c = Cluster::synced();
    let mesh = c.mesh();
    let names: Vec<&str> = mesh.http_routes.iter().map(|r| r.name.as_str()).collect();
    // `edge` has only a Gateway parent; `bad-regex` is invalid.
    assert_eq!(names, ["web-canary"]);
    let r = &mesh.http_routes[0];
    assert_eq!(r.spec.parent_refs[0].name, "web");
    assert_eq!(r.spec.rules[0].backend_refs[0].weight, 90);
    assert!(
        c.state.invalid()[&("HTTPRoute", "shop/bad-regex".to_owned())]
            .contains("regular expression")
    );
}

#[test]
fn an_invalid_authorization_policy_is_skipped_and_the_rest_applies() {
    let mut c = Cluster::synced();
    let mesh = c.mesh();
    let names: Vec<String> = mesh
        .authorization_policies
        .iter()
        .map(|p| format!("{}/{}", p.namespace, p.name))
        .collect();
    assert_eq!(names, ["shop/web-allow-frontend", "legacy/api-deny-batch"]);
    let allow = &mesh.authorization_policies[0];
    assert_eq!(&allow.selector.as_ref().unwrap()["app"], "web");
    assert_eq!(
        allow.rules[0].to[0].ports,
        [8080],
        "Istio writes ports as strings"
    );
    assert_eq!(allow.rules[0].from[0].not_namespaces, ["batch"]);
    let istio = &mesh.authorization_policies[1];
    assert_eq!(istio.target_refs[0].name, "api");
    let invalid = c.state.invalid();
    assert!(invalid[&("AuthorizationPolicy", "shop/port-zero".to_owned())].contains("port 0"));
    assert!(invalid[&("AuthorizationPolicy", "shop/bad-block".to_owned())].contains("prefix"));
    assert_eq!(c.state.counts.counts()["AuthorizationPolicy"], 2);
    assert!(
        c.state
            .counts
            .render()
            .contains("weft_discovery_invalid_objects{kind=\"AuthorizationPolicy\"} 2\n")
    );
    // The rest of the mesh is all there.
    assert_eq!(enrolled(&mesh).len(), 4);
    // Fixed: counted no more.
    let fixed: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "weft.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "port-zero", "namespace": "shop"},
        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "web"}},
                 "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]}
    }))
    .unwrap();
    c.event(
        Res::AuthorizationPolicy(Group::Weft),
        Event::Apply(fixed),
        translate::authorization_policy,
    );
    assert_eq!(c.mesh().authorization_policies.len(), 3);
    assert_eq!(c.state.counts.counts()["AuthorizationPolicy"], 1);

    // Edited into an invalid one, a policy that applied keeps its last good
    // version in force (fail closed: the DENY stays); it is reported all the
    // same. Deleted, it is gone.
    let broken: DynamicObject = serde_json::from_value(serde_json::json!({
        "apiVersion": "weft.dev/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "port-zero", "namespace": "shop"},
        "spec": {"action": "DENY", "selector": {"matchLabels": {"app": "web"}},
                 "rules": [{"to": [{"operation": {"ports": ["0"]}}]}]}
    }))
    .unwrap();
    c.event(
        Res::AuthorizationPolicy(Group::Weft),
        Event::Apply(broken.clone()),
        translate::authorization_policy,
    );
    let mesh = c.mesh();
    let kept = mesh
        .authorization_policies
        .iter()
        .find(|p| p.name == "port-zero")
        .expect("the last good version");
    assert_eq!(kept.rules[0].to[0].ports, [22]);
    assert!(
        c.state.invalid()[&("AuthorizationPolicy", "shop/port-zero".to_owned())]
            .contains("last good version stays")
    );
    c.event(
        Res::AuthorizationPolicy(Group::Weft),
        Event::Delete(broken),
        translate::authorization_policy,
    );
    assert!(
        !c.mesh()
            .authorization_policies
            .iter()
            .any(|p| p.name == "port-zero")
    );
}

#[test]
fn peer_and_request_authentications_take_istio_shapes() {
    let mut c = Cluster::synced();
    let mesh = c.mesh();
    assert_eq!(
        mesh.peer_authentications.len(),
        1,
        "UNSET inherits: not in the model"
    );
    assert_eq!(mesh.peer_authentications[0].mode, PeerMode::Strict);
    assert!(
        c.state.invalid()[&("PeerAuthentication", "legacy/plaintext".to_owned())]
            .contains("DISABLE")
    );
    assert_eq!(mesh.request_authentications[0].name, "web-jwt");
    assert!(mesh.request_authentications[0].jwt_rules[0].forward_original_token);
}

#[test]
fn a_relist_swaps_in_whole_at_init_done_and_drops_what_is_gone() {
    let mut c = Cluster::synced();
    let before = c.mesh();
    // The watch fell over (a 410 Gone); the re-list no longer has web-1.
    c.event(Res::Pod, Event::Init, translate::pod);
    for p in items::<Pod>(PODS) {
        if p.metadata.name.as_deref() != Some("web-1") {
            c.event(Res::Pod, Event::InitApply(p), translate::pod);
        }
        // Half-way through, the last good model is what is served.
        assert_eq!(c.state.build().unwrap(), before);
    }
    c.event(Res::Pod, Event::InitDone, translate::pod);
    assert!(c.state.dirty());
    let after = c.mesh();
    assert!(workload(&after, "shop", "web-1").is_none());
    assert_eq!(after.workloads.len(), before.workloads.len() - 1);
    // A re-list that finds the same objects changes nothing.
    c.event(Res::Pod, Event::Init, translate::pod);
    for p in items::<Pod>(PODS) {
        if p.metadata.name.as_deref() != Some("web-1") {
            c.event(Res::Pod, Event::InitApply(p), translate::pod);
        }
    }
    c.event(Res::Pod, Event::InitDone, translate::pod);
    assert!(!c.state.dirty());
}

#[test]
fn nothing_is_published_before_every_kind_is_synced() {
    let mut c = Cluster::new();
    c.list(Res::Namespace, items(NAMESPACES), translate::namespace);
    c.list(Res::Pod, items(PODS), translate::pod);
    assert!(c.state.build().is_none());
    // Services listed, slices still listing: still nothing.
    c.list(Res::Service, items(SERVICES), translate::service);
    c.event(Res::EndpointSlice, Event::Init, translate::endpoint_slice);
    c.event(
        Res::EndpointSlice,
        Event::InitApply(slice("web-x7k2p")),
        translate::endpoint_slice,
    );
    assert!(c.state.build().is_none());
    c.event(
        Res::EndpointSlice,
        Event::InitDone,
        translate::endpoint_slice,
    );
    assert!(
        c.state.build().is_none(),
        "routes and policies are not listed yet"
    );
    // CRDs not installed count as none of them.
    for res in c.state.unsynced() {
        c.state.apply(res, Change::Absent);
    }
    let mesh = c.mesh();
    assert_eq!(mesh.workloads.len(), 7);
    assert!(mesh.authorization_policies.is_empty());
}

#[test]
fn the_ca_watches_only_pods_and_namespaces() {
    let mut state = State::new(Kinds::WorkloadsOnly, "cluster.local", "weft-system");
    for (res, objects) in [(Res::Namespace, items::<Namespace>(NAMESPACES))] {
        state.apply(res, Change::Init);
        for o in objects {
            state.apply(res, change(Event::InitApply(o), translate::namespace));
        }
        state.apply(res, Change::InitDone);
    }
    assert!(state.build().is_none());
    state.apply(Res::Pod, Change::Init);
    for p in items::<Pod>(PODS) {
        state.apply(Res::Pod, change(Event::InitApply(p), translate::pod));
    }
    state.apply(Res::Pod, Change::InitDone);
    let mesh = state.build().unwrap();
    // What `ca::server::authorize` asks: is this identity on that node?
    let id = |ns, name| {
        workload(&mesh, ns, name)
            .unwrap()
            .identity(&mesh.trust_domain)
            .unwrap()
    };
    let web = id("shop", "web-0");
    assert!(mesh.identity_on_node(&web, "node-1"));
    assert!(mesh.identity_on_node(&web, "node-2"));
    assert!(!mesh.identity_on_node(&web, "node-3"));
    let api = id("legacy", "api-0");
    assert!(mesh.identity_on_node(&api, "node-1"));
    assert!(!mesh.identity_on_node(&api, "node-2"));
}

#[test]
fn what_a_pod_keeps_is_the_model_entry_only() {
    // The translated entry of a pod whose object carries managed fields, a
    // status and a full spec: only what the model needs.
    let Entry::Pod(p) = translate::pod(&pod("web-0")) else {
        panic!("a pod")
    };
    let expected: BTreeMap<String, String> = [("app", "web"), ("pod-template-hash", "7d9c8b6f5")]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let w = &p.workload;
    assert_eq!(w.labels, expected.into());
    assert_eq!((w.namespace.as_str(), w.name.as_str()), ("shop", "web-0"));
    assert_eq!(p.mesh, None);
    let bad = {
        let mut p = pod("web-0");
        p.status.as_mut().unwrap().pod_ips.as_mut().unwrap()[0].ip = "10.244.1.300".into();
        p
    };
    assert!(matches!(translate::pod(&bad), Entry::Invalid(why) if why.contains("10.244.1.300")));
}

#[test]
fn a_missing_crd_is_told_apart_from_a_failing_watch() {
    use kube::runtime::watcher::Error;
    let status = |code| Box::new(kube::core::Status::failure("x", "NotFound").with_code(code));
    assert!(super::run::not_found(&Error::InitialListFailed(
        kube::Error::Api(status(404))
    )));
    assert!(!super::run::not_found(&Error::InitialListFailed(
        kube::Error::Api(status(403))
    )));
    assert!(!super::run::not_found(&Error::WatchError(status(410))));
}

/// The publisher: nothing before the first complete list, then one mesh per
/// burst (at most every `COALESCE`). (A state without deltas: every update
/// is a whole mesh.)
#[tokio::test]
async fn the_publisher_waits_for_a_full_list_and_coalesces_bursts() {
    use std::time::Duration;
    let state = State::new(Kinds::WorkloadsOnly, "cluster.local", "weft-system");
    let (changes, rx) = tokio::sync::mpsc::channel(1024);
    let (tx, mut updates) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(super::run::publish(state, rx, tx, None));
    let send = |res, c| {
        let changes = changes.clone();
        async move { changes.send((res, c)).await.unwrap() }
    };
    use super::Update;
    let mesh = |u: Option<Update>| match u {
        Some(Update::Mesh(m)) => m,
        other => panic!("not a whole mesh: {other:?}"),
    };
    send(Res::Namespace, Change::Init).await;
    for n in items::<Namespace>(NAMESPACES) {
        send(
            Res::Namespace,
            change(Event::InitApply(n), translate::namespace),
        )
        .await;
    }
    send(Res::Namespace, Change::InitDone).await;
    tokio::time::sleep(super::COALESCE * 2).await;
    assert!(updates.try_recv().is_err(), "pods not listed yet");
    send(Res::Pod, Change::Init).await;
    for p in items::<Pod>(PODS) {
        send(Res::Pod, change(Event::InitApply(p), translate::pod)).await;
    }
    send(Res::Pod, Change::InitDone).await;
    let first = tokio::time::timeout(Duration::from_secs(5), updates.recv())
        .await
        .expect("published");
    assert_eq!(mesh(first).workloads.len(), 7);
    // A burst of 200 changes of one pod: a handful of meshes, the last one right.
    let web0 = pod("web-0");
    for i in 0..200u32 {
        let mut p = web0.clone();
        p.metadata
            .labels
            .as_mut()
            .unwrap()
            .insert("rev".into(), i.to_string());
        send(Res::Pod, change(Event::Apply(p), translate::pod)).await;
    }
    let mut published = 0;
    let mut last = None;
    while let Ok(Some(u)) = tokio::time::timeout(Duration::from_millis(500), updates.recv()).await {
        published += 1;
        last = Some(mesh(Some(u)));
    }
    assert!(
        (1..=10).contains(&published),
        "{published} meshes for one burst"
    );
    let last = last.unwrap();
    assert_eq!(
        &workload(&last, "shop", "web-0").unwrap().labels["rev"],
        "199"
    );
}

#[test]
fn a_pods_entry_is_small() {
    // Every pod of the cluster has one: its size is the largest kind's.
    assert!(
        std::mem::size_of::<Entry>() <= 32,
        "{}",
        std::mem::size_of::<Entry>()
    );
}

/// Weft's own namespace, as `kubectl get ns weft-system -o yaml` prints it,
/// and as it prints it once `kubectl delete -k deploy/` has deleted it (its
/// DaemonSet and the agents go with it).
const WEFT_SYSTEM: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  creationTimestamp: \"2026-12-01T09:00:00Z\"
  labels:
    kubernetes.io/metadata.name: weft-system
  name: weft-system
  resourceVersion: \"812\"
  uid: 0f4c2a8e-3b1d-4e5f-9a7b-6c8d9e0f1a2b
spec:
  finalizers:
  - kubernetes
status:
  phase: Active
";

fn terminating(mut ns: Namespace) -> Namespace {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    ns.metadata.deletion_timestamp = Some(Time("2026-12-07T12:00:00Z".parse().unwrap()));
    ns.status.get_or_insert_default().phase = Some("Terminating".into());
    ns
}

#[test]
fn weft_s_own_namespace_being_deleted_is_an_uninstall() {
    let weft: Namespace = crate::yaml::from_str(WEFT_SYSTEM).unwrap();
    let mut state = State::new(Kinds::WorkloadsOnly, "cluster.local", "weft-system");
    // Not listed yet: nothing is known, so nothing is torn down.
    assert!(!state.namespace_going("weft-system"));
    state.apply(Res::Namespace, Change::Init);
    for n in items::<Namespace>(NAMESPACES)
        .into_iter()
        .chain([weft.clone()])
    {
        state.apply(
            Res::Namespace,
            change(Event::InitApply(n), translate::namespace),
        );
    }
    state.apply(Res::Namespace, Change::InitDone);
    assert!(!state.namespace_going("weft-system"), "it lives");
    // Another namespace deleted is not Weft's.
    state.apply(
        Res::Namespace,
        change(Event::Apply(terminating(ns("shop"))), translate::namespace),
    );
    assert!(!state.namespace_going("weft-system"));
    state.apply(
        Res::Namespace,
        change(
            Event::Apply(terminating(weft.clone())),
            translate::namespace,
        ),
    );
    assert!(state.namespace_going("weft-system"), "being deleted");
    state.apply(
        Res::Namespace,
        change(Event::Delete(terminating(weft)), translate::namespace),
    );
    assert!(state.namespace_going("weft-system"), "gone");
}

/// The ordered source tells the agent as the deletion arrives.
#[tokio::test]
async fn the_ordered_publisher_reports_weft_s_namespace_being_deleted() {
    use std::time::Duration;
    let weft: Namespace = crate::yaml::from_str(WEFT_SYSTEM).unwrap();
    let state = State::new(Kinds::WorkloadsOnly, "cluster.local", "weft-system").with_deltas();
    let (changes, rx) = tokio::sync::mpsc::channel(1024);
    let (tx, mut updates) = tokio::sync::mpsc::channel(1);
    let (going, mut uninstalling) = tokio::sync::watch::channel(false);
    tokio::spawn(super::run::publish(
        state,
        rx,
        tx,
        Some(super::run::Going {
            namespace: "weft-system".into(),
            tx: going,
        }),
    ));
    let send = |res, c| {
        let changes = changes.clone();
        async move { changes.send((res, c)).await.unwrap() }
    };
    send(Res::Namespace, Change::Init).await;
    for n in items::<Namespace>(NAMESPACES)
        .into_iter()
        .chain([weft.clone()])
    {
        send(
            Res::Namespace,
            change(Event::InitApply(n), translate::namespace),
        )
        .await;
    }
    send(Res::Namespace, Change::InitDone).await;
    send(Res::Pod, Change::Init).await;
    send(Res::Pod, Change::InitDone).await;
    tokio::time::timeout(Duration::from_secs(5), updates.recv())
        .await
        .expect("the first mesh")
        .unwrap();
    assert!(!*uninstalling.borrow_and_update(), "it lives");
    send(
        Res::Namespace,
        change(Event::Apply(terminating(weft)), translate::namespace),
    )
    .await;
    tokio::time::timeout(Duration::from_secs(5), uninstalling.changed())
        .await
        .expect("reported")
        .unwrap();
    assert!(*uninstalling.borrow());
}

/// Each kind is listed and watched under the plural its API serves: the
/// built-in kinds' from k8s-openapi, Weft's from its CRDs in `deploy/` (and
/// Istio's, whose CRDs name theirs the same). A wrong plural is a path no API
/// server serves, which the source would take as "no objects of that kind".
#[test]
fn every_kind_is_watched_under_the_plural_its_api_serves() {
    use k8s_openapi::{Resource as _, api::core::v1::Service};
    assert_eq!(Res::Namespace.plural(), Namespace::URL_PATH_SEGMENT);
    assert_eq!(Res::Pod.plural(), Pod::URL_PATH_SEGMENT);
    assert_eq!(Res::Service.plural(), Service::URL_PATH_SEGMENT);
    assert_eq!(Res::EndpointSlice.plural(), EndpointSlice::URL_PATH_SEGMENT);
    let crds = [
        include_str!("../../../../deploy/crds/authorizationpolicies.yaml"),
        include_str!("../../../../deploy/crds/peerauthentications.yaml"),
        include_str!("../../../../deploy/crds/requestauthentications.yaml"),
    ];
    let mut checked = 0;
    for res in Kinds::All.watched() {
        let api_group = res.api_version().split_once('/').map(|(g, _)| g);
        if !matches!(api_group, Some("weft.dev" | "security.istio.io")) {
            continue;
        }
        let crd = crds
            .iter()
            .map(|text| crate::yaml::from_str::<serde_json::Value>(text).unwrap())
            .find(|crd| crd["spec"]["names"]["kind"] == res.kind())
            .unwrap_or_else(|| panic!("no CRD of kind {}", res.kind()));
        assert_eq!(crd["spec"]["names"]["plural"], res.plural(), "{res:?}");
        checked += 1;
    }
    assert_eq!(checked, 6);
    // The Gateway API's, as its CRDs name them.
    assert_eq!(Res::HttpRoute.plural(), "httproutes");
    assert_eq!(Res::GrpcRoute.plural(), "grpcroutes");
}

/// What each role's source watches is what `deploy/` grants it: list and
/// watch of every kind, under its group and plural. (The privileged
/// `kube_agent` tests run the agent and the CA against an API stand-in that
/// enforces these roles; the waypoint's is checked here.)
#[test]
fn deploy_grants_each_role_what_its_source_watches() {
    let grants = |text: &str, role: &str| -> Vec<serde_json::Value> {
        text.split("\n---\n")
            .map(|doc| crate::yaml::from_str::<serde_json::Value>(doc).unwrap())
            .filter(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == role)
            .flat_map(|o| o["rules"].as_array().cloned().unwrap_or_default())
            .collect()
    };
    let has = |list: &serde_json::Value, x: &str| {
        list.as_array().is_some_and(|l| l.iter().any(|v| v == x))
    };
    let agent = include_str!("../../../../deploy/agent/rbac.yaml");
    let waypoint = include_str!("../../../../deploy/waypoint-access.yaml");
    let ca = include_str!("../../../../deploy/ca/rbac.yaml");
    for (text, role, kinds) in [
        (agent, "weft-agent", Kinds::All),
        (waypoint, "weft-waypoint", Kinds::All),
        (ca, "weft-ca", Kinds::WorkloadsOnly),
    ] {
        let rules = grants(text, role);
        assert!(!rules.is_empty(), "no ClusterRole {role}");
        for res in kinds.watched() {
            let group = res.api_version().split_once('/').map_or("", |(g, _)| g);
            for verb in ["list", "watch"] {
                assert!(
                    rules.iter().any(|r| has(&r["apiGroups"], group)
                        && has(&r["resources"], res.plural())
                        && has(&r["verbs"], verb)
                        && r["resourceNames"].is_null()),
                    "{role} may not {verb} {}.{group}",
                    res.plural()
                );
            }
        }
    }
}
