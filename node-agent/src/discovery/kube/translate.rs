//! One Kubernetes object in, one entry of the model out: what each kind becomes,
//! and what is dropped on the way. Translation reads only what the model needs
//! and keeps nothing else of the object (no managed fields, no status, no
//! spec), so the object can be freed at once: this is what bounds the memory
//! each watched pod costs.
//!
//! Routes and policies are dynamic objects: their `spec` is read with the same
//! serde types as the mesh file (`model::route`, `file::authorization_policy`,
//! `model::authn`), so the two sources accept exactly the same shapes.

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Namespace, Pod, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use kube::{ResourceExt as _, core::DynamicObject};
use serde_json::{Map, Value};

use super::labels;
use crate::model::{self, authn, route};

/// An object's key: namespace (empty for a cluster-scoped object) and name.
pub type Key = (String, String);

/// The key of any object.
pub fn key_of<K: kube::Resource>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// What an object becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Boxed, as every kind but pods: an entry is as large as its largest
    /// kind, and 100,000 pods each pay for it.
    Namespace(Box<NsEntry>),
    Pod(PodEntry),
    Service(Box<SvcEntry>),
    Slice(Box<SliceEntry>),
    HttpRoute(Box<route::HttpRoute>),
    GrpcRoute(Box<route::GrpcRoute>),
    AuthorizationPolicy(Box<model::AuthorizationPolicy>),
    PeerAuthentication(Box<model::PeerAuthentication>),
    RequestAuthentication(Box<authn::RequestAuthentication>),
    /// Nothing in the model (a headless service, a host-network pod, a pod
    /// without an address yet, a route for Gateways only): as if absent.
    Skip,
    /// Not translatable; kept (to be reported and counted) until it changes.
    Invalid(String),
}

/// A namespace's labels, as far as the mesh cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsEntry {
    /// Its enrollment label ([`labels::mesh_mode`]).
    pub mesh: Option<bool>,
    pub waypoint: Option<model::UseWaypoint>,
    /// It is being deleted (`metadata.deletionTimestamp`): for Weft's own,
    /// an uninstall ([`super::State::namespace_going`]).
    pub deleting: bool,
}

/// A pod: its workload, enrolled or not once its namespace is known.
///
/// Held for every pod of the cluster, and shared with the meshes and views
/// made from it (one allocation per pod for all of them: a mesh or a view
/// holds a refcount, not a copy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEntry {
    /// The workload, `enrolled` as its namespace said when the entry was
    /// last settled ([`PodEntry::in_namespace`]).
    pub workload: Arc<model::Workload>,
    /// The pod's own enrollment label.
    pub mesh: Option<bool>,
}

impl PodEntry {
    /// The workload, enrolled as the pod's label or else its namespace's
    /// (`ns_mode`) says: the one held when its flag says so already (a
    /// refcount), else a copy with the flag set.
    pub fn in_namespace(&self, ns_mode: Option<bool>) -> Arc<model::Workload> {
        let enrolled = labels::enrolled(self.mesh, ns_mode, self.workload.native_tunnel);
        if self.workload.enrolled == enrolled {
            return self.workload.clone();
        }
        let mut w = (*self.workload).clone();
        w.enrolled = enrolled;
        Arc::new(w)
    }
}

/// A service, with its endpoints and target ports still to come from its
/// EndpointSlices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvcEntry {
    /// `endpoints` empty and each `target_port` provisional until assembly.
    pub service: model::Service,
    /// Per port of `service.ports`, in order: the port's name and its
    /// `targetPort` as written.
    pub targets: Vec<(String, Target)>,
}

/// A service port's `targetPort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Number(u16),
    /// A container port's name: resolved per endpoint by the EndpointSlice
    /// controller, read back from the slices' port of the same name.
    Named(String),
}

/// An EndpointSlice: the ready pods of one service and the ports they serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEntry {
    /// The service's name (label `kubernetes.io/service-name`), same namespace.
    pub service: String,
    /// Port name (empty for an unnamed port) → the port on the endpoints.
    pub ports: Vec<(String, u16)>,
    /// Names of the ready pods, in the slice's namespace.
    pub pods: Vec<String>,
}

/// The label that ties an EndpointSlice to its service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub fn namespace(ns: &Namespace) -> Entry {
    let labels = ns.labels();
    Entry::Namespace(Box::new(NsEntry {
        mesh: labels::mesh_mode(labels),
        waypoint: labels::use_waypoint(labels, &ns.name_any()),
        deleting: ns.metadata.deletion_timestamp.is_some(),
    }))
}

/// A pod in the model has an address and may still run: pods that finished keep
/// their IP in their status while the IP is given to a new pod, and two owners
/// of one address would make the model invalid. Host-network pods share the
/// node's address and are never meshed (as in Istio ambient).
pub fn pod(p: &Pod) -> Entry {
    let Some(spec) = &p.spec else {
        return Entry::Skip;
    };
    if spec.host_network == Some(true) {
        return Entry::Skip;
    }
    let Some(status) = &p.status else {
        return Entry::Skip;
    };
    if !matches!(status.phase.as_deref(), Some("Running" | "Pending")) {
        return Entry::Skip;
    }
    let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
        return Entry::Skip;
    };
    let mut addresses: Vec<IpAddr> = Vec::new();
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    for ip in listed.chain(status.pod_ip.as_deref()) {
        match ip.parse::<IpAddr>() {
            Ok(ip) if !addresses.contains(&ip.to_canonical()) => addresses.push(ip.to_canonical()),
            Ok(_) => {}
            Err(_) => return Entry::Invalid(format!("status.podIPs: {ip:?} is not an IP address")),
        }
    }
    // A pod without an address yet is kept: the CNI plugin asks about the pod
    // before the kubelet has reported its IP (the IP comes from that very CNI
    // ADD), and the agent answers only for pods its model knows. Others reach
    // it by address once the API has one.
    let labels = p.labels();
    Entry::Pod(PodEntry {
        mesh: labels::mesh_mode(labels),
        workload: Arc::new(model::Workload {
            name: p.name_any(),
            namespace: p.namespace().unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".to_owned()),
            node,
            addresses,
            enrolled: false,
            outside_mesh: model::OutsideMesh::Passthrough,
            native_tunnel: labels::is_waypoint(labels),
            labels: labels
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        }),
    })
}

/// A service with cluster IPs. Headless and ExternalName services have no
/// virtual IP to capture: their clients connect to pod addresses, which the
/// mesh knows as workloads. Only TCP ports are meshed.
pub fn service(s: &Service) -> Entry {
    let Some(spec) = &s.spec else {
        return Entry::Skip;
    };
    if spec.type_.as_deref() == Some("ExternalName") {
        return Entry::Skip;
    }
    let written = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))
        .unwrap_or_default();
    let mut addresses = Vec::new();
    for ip in written.iter().filter(|ip| !ip.is_empty() && *ip != "None") {
        match ip.parse::<IpAddr>() {
            Ok(ip) => addresses.push(ip.to_canonical()),
            Err(_) => {
                return Entry::Invalid(format!("spec.clusterIPs: {ip:?} is not an IP address"));
            }
        }
    }
    if addresses.is_empty() {
        return Entry::Skip;
    }
    let mut ports = Vec::new();
    let mut targets = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Ok(port) = u16::try_from(p.port) else {
            return Entry::Invalid(format!("spec.ports[{i}].port: {} is not a port", p.port));
        };
        let target = match &p.target_port {
            None => Target::Number(port),
            Some(IntOrString::Int(n)) => match u16::try_from(*n) {
                Ok(n) if n > 0 => Target::Number(n),
                _ => {
                    return Entry::Invalid(format!(
                        "spec.ports[{i}].targetPort: {n} is not a port"
                    ));
                }
            },
            Some(IntOrString::String(name)) => match name.parse::<u16>() {
                Ok(n) if n > 0 => Target::Number(n),
                _ => Target::Named(name.clone()),
            },
        };
        ports.push(model::ServicePort {
            port,
            target_port: match target {
                Target::Number(n) => n,
                Target::Named(_) => port,
            },
            app_protocol: p.app_protocol.clone(),
        });
        targets.push((p.name.clone().unwrap_or_default(), target));
    }
    let namespace = s.namespace().unwrap_or_default();
    Entry::Service(Box::new(SvcEntry {
        service: model::Service {
            name: s.name_any(),
            waypoint: labels::use_waypoint(s.labels(), &namespace),
            namespace,
            addresses,
            ports,
            endpoints: model::Endpoints::Listed(Vec::new()),
            load_balancing: model::LoadBalancing::default(),
            outlier_detection: model::OutlierDetection::default(),
        },
        targets,
    }))
}

/// An EndpointSlice's ready pod endpoints. A condition left unset means ready
/// (the API's rule for consumers); endpoints that are not pods (a selectorless
/// service's manual slice) have no workload to send to and are left out.
pub fn endpoint_slice(s: &EndpointSlice) -> Entry {
    let Some(service) = s.labels().get(SERVICE_NAME_LABEL) else {
        return Entry::Skip;
    };
    if s.address_type == "FQDN" {
        return Entry::Skip;
    }
    let namespace = s.namespace().unwrap_or_default();
    let pods = s
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| e.target_ref.as_ref())
        .filter(|r| r.kind.as_deref() == Some("Pod"))
        .filter(|r| r.namespace.as_deref().is_none_or(|ns| ns == namespace))
        .filter_map(|r| r.name.clone())
        .collect();
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|proto| proto == "TCP"))
        .filter_map(|p| {
            let port = u16::try_from(p.port?).ok()?;
            Some((p.name.clone().unwrap_or_default(), port))
        })
        .collect();
    Entry::Slice(Box::new(SliceEntry {
        service: service.clone(),
        ports,
        pods,
    }))
}

fn spec_of(o: &DynamicObject) -> Value {
    o.data
        .get("spec")
        .cloned()
        .unwrap_or_else(|| Value::Object(Map::new()))
}

/// An HTTPRoute with at least one Service parent, with only those parents
/// (GEP-1426: a route bound to Gateways only is not the mesh's).
pub fn http_route(o: &DynamicObject) -> Entry {
    match serde_json::from_value::<route::HttpRouteSpec>(spec_of(o)) {
        Err(e) => Entry::Invalid(format!("spec: {e}")),
        Ok(mut spec) => {
            spec.parent_refs.retain(route::ParentReference::is_service);
            if spec.parent_refs.is_empty() {
                return Entry::Skip;
            }
            Entry::HttpRoute(Box::new(route::HttpRoute {
                name: o.name_any(),
                namespace: o.namespace().unwrap_or_default(),
                spec,
            }))
        }
    }
}

pub fn grpc_route(o: &DynamicObject) -> Entry {
    match serde_json::from_value::<route::GrpcRouteSpec>(spec_of(o)) {
        Err(e) => Entry::Invalid(format!("spec: {e}")),
        Ok(mut spec) => {
            spec.parent_refs.retain(route::ParentReference::is_service);
            if spec.parent_refs.is_empty() {
                return Entry::Skip;
            }
            Entry::GrpcRoute(Box::new(route::GrpcRoute {
                name: o.name_any(),
                namespace: o.namespace().unwrap_or_default(),
                spec,
            }))
        }
    }
}

/// An Istio-shaped policy `spec` in the file's shape: `selector.matchLabels`
/// becomes `selector`, the deprecated single `targetRef` joins `targetRefs`, a
/// target's `namespace` must be the policy's own (the only one Istio allows),
/// and `name` and `namespace` come from the metadata.
fn policy_value(o: &DynamicObject) -> Result<Value, String> {
    let namespace = o.namespace().unwrap_or_default();
    let Value::Object(mut spec) = spec_of(o) else {
        return Err("spec: not an object".to_owned());
    };
    match spec.remove("selector") {
        None | Some(Value::Null) => {}
        Some(Value::Object(mut sel)) => {
            let labels = sel
                .remove("matchLabels")
                .unwrap_or_else(|| Value::Object(Map::new()));
            if let Some(other) = sel.keys().next() {
                return Err(format!(
                    "spec.selector.{other}: only matchLabels is supported"
                ));
            }
            spec.insert("selector".to_owned(), labels);
        }
        Some(_) => return Err("spec.selector: not an object".to_owned()),
    }
    if let Some(one) = spec.remove("targetRef") {
        let refs = spec
            .entry("targetRefs")
            .or_insert_with(|| Value::Array(Vec::new()));
        match refs {
            Value::Array(list) => list.insert(0, one),
            _ => return Err("spec.targetRefs: not a list".to_owned()),
        }
    }
    if let Some(Value::Array(refs)) = spec.get_mut("targetRefs") {
        for (i, r) in refs.iter_mut().enumerate() {
            if let Value::Object(r) = r {
                match r.remove("namespace") {
                    None | Some(Value::Null) => {}
                    Some(Value::String(ns)) if ns == namespace || ns.is_empty() => {}
                    Some(other) => {
                        return Err(format!(
                            "spec.targetRefs[{i}].namespace: {other} is not the policy's namespace {namespace:?}"
                        ));
                    }
                }
            }
        }
    }
    spec.insert("name".to_owned(), Value::String(o.name_any()));
    spec.insert("namespace".to_owned(), Value::String(namespace));
    Ok(Value::Object(spec))
}

pub fn authorization_policy(o: &DynamicObject) -> Entry {
    match policy_value(o).and_then(|v| {
        crate::discovery::file::authorization_policy(v).map_err(|e| format!("spec: {e}"))
    }) {
        Ok(p) => Entry::AuthorizationPolicy(Box::new(p)),
        Err(e) => Entry::Invalid(e),
    }
}

pub fn request_authentication(o: &DynamicObject) -> Entry {
    match policy_value(o).and_then(|v| {
        serde_json::from_value::<authn::RequestAuthentication>(v).map_err(|e| format!("spec: {e}"))
    }) {
        Ok(p) => Entry::RequestAuthentication(Box::new(p)),
        Err(e) => Entry::Invalid(e),
    }
}

/// Istio's PeerAuthentication: `mtls.mode` STRICT or PERMISSIVE. UNSET (or no
/// `mtls`) inherits from the namespace's or the root namespace's, which is what
/// leaving it out of the model does. DISABLE and per-port modes have no
/// equivalent in Weft: reported rather than guessed.
pub fn peer_authentication(o: &DynamicObject) -> Entry {
    let v = match policy_value(o) {
        Ok(Value::Object(v)) => v,
        Ok(_) => return Entry::Invalid("spec: not an object".to_owned()),
        Err(e) => return Entry::Invalid(e),
    };
    for k in v.keys() {
        match k.as_str() {
            "name" | "namespace" | "selector" | "mtls" => {}
            "portLevelMtls" => {
                return Entry::Invalid(
                    "spec.portLevelMtls: per-port modes are not supported".to_owned(),
                );
            }
            other => return Entry::Invalid(format!("spec: unknown field `{other}`")),
        }
    }
    let selector = match v.get("selector") {
        None => None,
        Some(s) => match serde_json::from_value::<model::Labels>(s.clone()) {
            Ok(s) => Some(s),
            Err(e) => return Entry::Invalid(format!("spec.selector.matchLabels: {e}")),
        },
    };
    let mode = v
        .get("mtls")
        .and_then(|m| m.get("mode"))
        .and_then(Value::as_str)
        .unwrap_or("UNSET");
    let mode = match mode {
        "STRICT" => model::PeerMode::Strict,
        "PERMISSIVE" => model::PeerMode::Permissive,
        "UNSET" => return Entry::Skip,
        other => {
            return Entry::Invalid(format!(
                "spec.mtls.mode: {other:?} is not supported (STRICT, PERMISSIVE or UNSET)"
            ));
        }
    };
    Entry::PeerAuthentication(Box::new(model::PeerAuthentication {
        name: o.name_any(),
        namespace: o.namespace().unwrap_or_default(),
        selector,
        mode,
    }))
}
