//! The incremental state: per kind, the translated entry of each object, fed
//! by watch events, and the assembly of the mesh model from it.
//!
//! An event costs the translation of its one object and a map update; nothing
//! else is touched until a mesh is assembled (at most every
//! [`super::COALESCE`]). A pod change touches no service: services list their
//! endpoints by pod name (from their EndpointSlices), resolved at assembly.
//!
//! Re-lists (after a disconnect or a `410 Gone`) fill a second map while the
//! first keeps serving, swapped in whole at `InitDone`, as kube's own reflector
//! store does: an object that went away while the watch was down disappears
//! then, and never is a half-listed kind published.
//!
//! Most changes in a cluster are pods and the EndpointSlices that list them
//! (a pod turning ready or not). When only those changed since the last
//! update (or a namespace's enrollment label, whose pods are then settled
//! again), [`State::next_update`] sends just the workloads that did and the
//! services whose slices did, whole ([`Update::Delta`]), checked as
//! validation checks a whole mesh (the pods' own fields, their addresses
//! against every other workload's and service's, what EndpointSlices say of
//! them; the services' resolved target ports), at a cost of what changed,
//! not of the cluster. Anything it cannot decide that way (another kind
//! changed, a namespace's waypoint binding, an invalid pod or slice, an address taken, an endpoint whose pod
//! appears or disappears, a waypoint's replicas, a service the last mesh left
//! out, a burst of more than [`MAX_DELTA`] objects) is a whole mesh,
//! assembled and validated as before.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::RandomState},
    hash::BuildHasher,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use kube::runtime::watcher;
use tracing::warn;

use super::translate::{Entry, Key, PodEntry, SliceEntry, SvcEntry, Target};
use crate::model::{self, Mesh, MeshDelta, authn};

/// At most this many pods and slices in one [`Update::Delta`] (nor more pods than a
/// quarter of the pods, so that a delta never carries a shrink the whole
/// mesh's guard would hold back); more is a whole mesh.
pub const MAX_DELTA: usize = 1000;

/// What an ordered source publishes ([`super::start_ordered`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A whole mesh: the first, and after any change but of pods and
    /// EndpointSlices.
    Mesh(Arc<Mesh>),
    /// Only these workloads and these services' endpoints changed since the
    /// update before.
    Delta(MeshDelta),
}

/// A kind of object that is watched. Policies are watched in two API groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Res {
    Namespace,
    Pod,
    Service,
    EndpointSlice,
    HttpRoute,
    GrpcRoute,
    AuthorizationPolicy(Group),
    PeerAuthentication(Group),
    RequestAuthentication(Group),
}

/// Where a policy kind comes from: Weft's CRDs, or Istio's (read as well, so a
/// cluster can move over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Group {
    Weft,
    Istio,
}

impl Group {
    pub fn api_group(self) -> &'static str {
        match self {
            Group::Weft => "weft.dev",
            Group::Istio => "security.istio.io",
        }
    }
}

impl Res {
    /// The object kind, as the API names it (and as the invalid-objects metric
    /// labels it).
    pub fn kind(self) -> &'static str {
        match self {
            Res::Namespace => "Namespace",
            Res::Pod => "Pod",
            Res::Service => "Service",
            Res::EndpointSlice => "EndpointSlice",
            Res::HttpRoute => "HTTPRoute",
            Res::GrpcRoute => "GRPCRoute",
            Res::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Res::PeerAuthentication(_) => "PeerAuthentication",
            Res::RequestAuthentication(_) => "RequestAuthentication",
        }
    }

    /// The resource's name in the API's paths (and in RBAC rules): the
    /// plural its CRD declares. Spelled out, not derived from the kind:
    /// "AuthorizationPolicy" + "s" is a path no API server serves, and a
    /// kind that 404s is taken as having no objects.
    pub fn plural(self) -> &'static str {
        match self {
            Res::Namespace => "namespaces",
            Res::Pod => "pods",
            Res::Service => "services",
            Res::EndpointSlice => "endpointslices",
            Res::HttpRoute => "httproutes",
            Res::GrpcRoute => "grpcroutes",
            Res::AuthorizationPolicy(_) => "authorizationpolicies",
            Res::PeerAuthentication(_) => "peerauthentications",
            Res::RequestAuthentication(_) => "requestauthentications",
        }
    }

    /// `group/version` of the API serving it.
    pub fn api_version(self) -> &'static str {
        match self {
            Res::Namespace | Res::Pod | Res::Service => "v1",
            Res::EndpointSlice => "discovery.k8s.io/v1",
            Res::HttpRoute | Res::GrpcRoute => "gateway.networking.k8s.io/v1",
            Res::AuthorizationPolicy(g)
            | Res::PeerAuthentication(g)
            | Res::RequestAuthentication(g) => match g {
                Group::Weft => "weft.dev/v1",
                Group::Istio => "security.istio.io/v1",
            },
        }
    }

    /// An older version a CRD of this kind may serve alone, read when
    /// [`Res::api_version`] is not served: Istio's `v1beta1`, the only one
    /// before Istio 1.22 (the spec is the same). Its `group/version` too.
    pub fn older_version(self) -> Option<(&'static str, &'static str)> {
        match self {
            Res::AuthorizationPolicy(Group::Istio)
            | Res::PeerAuthentication(Group::Istio)
            | Res::RequestAuthentication(Group::Istio) => {
                Some(("v1beta1", "security.istio.io/v1beta1"))
            }
            _ => None,
        }
    }

    /// Served by a CRD that may not be installed: a 404 means "none of them".
    pub fn optional(self) -> bool {
        !matches!(
            self,
            Res::Namespace | Res::Pod | Res::Service | Res::EndpointSlice
        )
    }
}

/// Which kinds a source watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kinds {
    /// Everything the agent's model holds.
    All,
    /// Pods and namespaces: which identities run on which node (the CA).
    WorkloadsOnly,
}

impl Kinds {
    pub fn watched(self) -> Vec<Res> {
        let mut list = vec![Res::Namespace, Res::Pod];
        if self == Kinds::All {
            list.extend([
                Res::Service,
                Res::EndpointSlice,
                Res::HttpRoute,
                Res::GrpcRoute,
            ]);
            for g in [Group::Weft, Group::Istio] {
                list.extend([
                    Res::AuthorizationPolicy(g),
                    Res::PeerAuthentication(g),
                    Res::RequestAuthentication(g),
                ]);
            }
        }
        list
    }
}

/// A watch event with its object already translated (and the object dropped),
/// or the news that the kind's CRD is not installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Apply(Key, Entry),
    Delete(Key),
    Init,
    InitApply(Key, Entry),
    InitDone,
    /// The kind's API answered 404 (its CRD is not installed): there are none.
    Absent,
}

/// Translates a watcher event: `translate` sees the object, which is dropped
/// right after.
pub fn change<K: kube::Resource>(ev: watcher::Event<K>, translate: impl Fn(&K) -> Entry) -> Change {
    use super::translate::key_of;
    match ev {
        watcher::Event::Apply(o) => Change::Apply(key_of(&o), translate(&o)),
        watcher::Event::Delete(o) => Change::Delete(key_of(&o)),
        watcher::Event::Init => Change::Init,
        watcher::Event::InitApply(o) => Change::InitApply(key_of(&o), translate(&o)),
        watcher::Event::InitDone => Change::InitDone,
    }
}

#[derive(Debug, Default)]
struct Objects {
    /// Listed completely at least once (or known absent).
    synced: bool,
    live: BTreeMap<Key, Entry>,
    /// A re-list in progress.
    relist: Option<BTreeMap<Key, Entry>>,
}

/// Objects that could not be used, per kind, as the metric
/// `weft_discovery_invalid_objects{kind}` reports them (a gauge: how many are
/// invalid now). Shared with whoever exports metrics.
#[derive(Debug, Default)]
pub struct Invalid {
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Invalid {
    /// The current count per kind.
    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The Prometheus text of the gauge.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# HELP weft_discovery_invalid_objects Kubernetes objects skipped because they are invalid.\n\
             # TYPE weft_discovery_invalid_objects gauge\n",
        );
        for (kind, n) in self.counts() {
            out.push_str(&format!(
                "weft_discovery_invalid_objects{{kind=\"{kind}\"}} {n}\n"
            ));
        }
        out
    }

    fn set(&self, counts: BTreeMap<&'static str, u64>) {
        *self.counts.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }
}

/// The translated objects of every watched kind.
#[derive(Debug)]
pub struct State {
    trust_domain: String,
    root_namespace: String,
    kinds: BTreeMap<Res, Objects>,
    /// Service (namespace, name) → its EndpointSlices' names.
    slices_of: HashMap<Key, BTreeSet<String>>,
    dirty: bool,
    /// Invalid objects at the last assembly: (kind, namespace/name) → why.
    invalid: BTreeMap<(&'static str, String), String>,
    /// The policies of the last mesh built, by (kind, `namespace/name`). A
    /// policy edited into an invalid one keeps its last good version in force
    /// until it is fixed or deleted: fail closed, so a mistyped edit of a DENY
    /// policy does not open what it closed.
    last_good: HashMap<(&'static str, String), Kept>,
    pub(super) counts: std::sync::Arc<Invalid>,
    /// Whether [`State::next_update`] may send deltas (an ordered source):
    /// `published` is kept only then.
    deltas: bool,
    /// Pods changed since the last update, with their entry as it was then
    /// (`None`: there was none).
    pending: BTreeMap<Key, Option<Entry>>,
    /// EndpointSlices changed since the last update, with their entry as it
    /// was then.
    pending_slices: BTreeMap<Key, Option<Entry>>,
    /// Namespaces whose enrollment label changed (or that came or went)
    /// since the last update, their waypoint binding the same: their pods
    /// are settled again and sent.
    pending_namespaces: BTreeSet<String>,
    /// Something else than a pod or an EndpointSlice changed since the last
    /// update, or they were listed again: the next one is a whole mesh.
    others_changed: bool,
    /// What the updates published so far hold, to check a delta against;
    /// `None` before the first whole mesh.
    published: Option<Published>,
    /// The pods' label sets, each held once.
    labels: model::LabelSets,
}

/// Pods settled again against their namespace, for the state's entries to
/// take.
type Settled = Vec<(Key, Arc<model::Workload>)>;

/// The facts a delta is checked against (kept small: hashes, not names).
#[derive(Debug)]
struct Published {
    /// Every address of a workload or a service, and a hash of its owner.
    addrs: HashMap<IpAddr, u64>,
    /// Hashes of the pods that EndpointSlices name, and how many times they
    /// are named.
    named: HashMap<u64, u32>,
    /// Hashes of the services in the mesh.
    services: HashSet<u64>,
    /// Hashes of the services that are waypoints (bound to by a service or
    /// a namespace).
    waypoints: HashSet<u64>,
    /// How many workloads there are.
    pods: usize,
}

/// The hash that stands for a pod, or a service (`svc` true), in [`Published`].
/// Keyed per process (`RandomState`): no one can choose names that collide.
fn owner(hasher: &RandomState, (ns, name): (&str, &str), svc: bool) -> u64 {
    hasher.hash_one((svc, ns, name))
}

static OWNERS: std::sync::LazyLock<RandomState> = std::sync::LazyLock::new(RandomState::new);

/// A policy as it last applied.
#[derive(Debug, Clone)]
enum Kept {
    Authz(model::AuthorizationPolicy),
    Peer(model::PeerAuthentication),
    Request(authn::RequestAuthentication),
}

impl State {
    pub fn new(kinds: Kinds, trust_domain: &str, root_namespace: &str) -> State {
        State {
            trust_domain: trust_domain.to_owned(),
            root_namespace: root_namespace.to_owned(),
            kinds: kinds
                .watched()
                .into_iter()
                .map(|r| (r, Objects::default()))
                .collect(),
            slices_of: HashMap::new(),
            dirty: false,
            invalid: BTreeMap::new(),
            last_good: HashMap::new(),
            counts: Default::default(),
            deltas: false,
            pending: BTreeMap::new(),
            pending_slices: BTreeMap::new(),
            pending_namespaces: BTreeSet::new(),
            others_changed: false,
            published: None,
            labels: model::LabelSets::default(),
        }
    }

    /// A state whose [`State::next_update`] sends deltas when only pods
    /// changed.
    pub fn with_deltas(mut self) -> State {
        self.deltas = true;
        self
    }

    /// Whether every watched kind has been listed completely once.
    pub fn synced(&self) -> bool {
        self.kinds.values().all(|o| o.synced)
    }

    /// Whether something changed since the last [`State::build`].
    pub fn dirty(&self) -> bool {
        self.dirty
    }

    /// The kinds not listed yet (for the log while waiting).
    pub fn unsynced(&self) -> Vec<Res> {
        self.kinds
            .iter()
            .filter(|(_, o)| !o.synced)
            .map(|(r, _)| *r)
            .collect()
    }

    /// How many objects of `res` are held.
    pub fn len(&self, res: Res) -> usize {
        self.kinds.get(&res).map_or(0, |o| o.live.len())
    }

    /// Applies one change of kind `res`.
    pub fn apply(&mut self, res: Res, mut change: Change) {
        let pod = res == Res::Pod;
        if pod
            && let Change::Apply(_, Entry::Pod(p)) | Change::InitApply(_, Entry::Pod(p)) =
                &mut change
        {
            self.settle(p);
        }
        let Some(objects) = self.kinds.get_mut(&res) else {
            return;
        };
        let was_dirty = std::mem::replace(&mut self.dirty, false);
        let slice = res == Res::EndpointSlice;
        if (pod || slice)
            && self.deltas
            && let Change::Apply(key, _) | Change::Delete(key) = &change
        {
            let pending = if pod {
                &mut self.pending
            } else {
                &mut self.pending_slices
            };
            if !pending.contains_key(key) {
                pending.insert(key.clone(), objects.live.get(key).cloned());
            }
        }
        let relist = matches!(change, Change::InitDone | Change::Absent);
        // A namespace whose waypoint binding stays: only its pods' enrollment
        // can change with it.
        let was = match &change {
            Change::Apply(key, _) | Change::Delete(key) if res == Res::Namespace && self.deltas => {
                Some((key.clone(), binding(objects.live.get(key))))
            }
            _ => None,
        };
        self.apply_to(res, change);
        let settles = was.and_then(|(key, was)| {
            let now = binding(
                self.kinds
                    .get(&Res::Namespace)
                    .and_then(|o| o.live.get(&key)),
            );
            (was.is_ok() && was == now).then_some(key.1)
        });
        match settles {
            Some(name) if self.dirty => {
                self.pending_namespaces.insert(name);
            }
            _ if self.dirty && (!(pod || slice) || relist) => self.others_changed = true,
            _ => {}
        }
        self.dirty |= was_dirty;
    }

    /// Sets a new pod's `enrolled` as its namespace says now, so that the
    /// meshes made from it share its workload (a namespace relabelled later
    /// is settled by [`State::build`]), and its labels to the set held for
    /// their value.
    fn settle(&mut self, p: &mut PodEntry) {
        let Some(w) = Arc::get_mut(&mut p.workload) else {
            return;
        };
        self.labels.intern(&mut w.labels);
        let namespaces = self.kinds.get(&Res::Namespace).map(|o| &o.live);
        let ns_mode = mesh_mode_of(namespaces, &w.namespace);
        w.enrolled = super::labels::enrolled(p.mesh, ns_mode, w.native_tunnel);
    }

    fn apply_to(&mut self, res: Res, change: Change) {
        let Some(objects) = self.kinds.get_mut(&res) else {
            return;
        };
        let slices = res == Res::EndpointSlice;
        match change {
            Change::Apply(key, Entry::Skip) | Change::Delete(key) => {
                if let Some(old) = objects.live.remove(&key) {
                    if slices {
                        unindex(&mut self.slices_of, &key, &old);
                    }
                    self.dirty = true;
                }
            }
            Change::Apply(key, entry) => {
                if slices {
                    index(&mut self.slices_of, &key, &entry);
                }
                let old = objects.live.insert(key.clone(), entry);
                if slices && let Some(old) = &old {
                    // A slice moved to another service (never in practice, but the
                    // label can be edited).
                    let now = &objects.live[&key];
                    if slice_service(old) != slice_service(now) {
                        unindex(&mut self.slices_of, &key, old);
                    }
                }
                if old.as_ref() != objects.live.get(&key) {
                    self.dirty = true;
                }
            }
            Change::Init => objects.relist = Some(BTreeMap::new()),
            Change::InitApply(_, Entry::Skip) => {}
            Change::InitApply(key, entry) => {
                objects.relist.get_or_insert_default().insert(key, entry);
            }
            Change::InitDone => {
                let listed = objects.relist.take().unwrap_or_default();
                if !objects.synced || listed != objects.live {
                    objects.live = listed;
                    self.dirty = true;
                    if slices {
                        self.slices_of.clear();
                        for (k, e) in &objects.live {
                            index(&mut self.slices_of, k, e);
                        }
                    }
                }
                objects.synced = true;
            }
            Change::Absent => {
                objects.relist = None;
                if !objects.synced || !objects.live.is_empty() {
                    objects.live.clear();
                    self.dirty = true;
                }
                objects.synced = true;
            }
        }
    }

    fn live(&self, res: Res) -> impl Iterator<Item = (&Key, &Entry)> {
        self.kinds.get(&res).into_iter().flat_map(|o| o.live.iter())
    }

    /// The mesh the objects describe, without the invalid ones (each logged
    /// once, and counted); `None` until every kind is synced. Clears
    /// [`State::dirty`].
    pub fn build(&mut self) -> Option<Mesh> {
        if !self.synced() {
            return None;
        }
        self.dirty = false;
        let mut invalid = BTreeMap::new();
        let mut mesh = Mesh {
            trust_domain: self.trust_domain.clone(),
            root_namespace: self.root_namespace.clone(),
            ..Mesh::default()
        };
        let mut ns_mesh: HashMap<&str, Option<bool>> = HashMap::new();
        for ((_, name), e) in self.live(Res::Namespace) {
            if let Entry::Namespace(ns) = e {
                ns_mesh.insert(name, ns.mesh);
                if ns.waypoint.is_some() {
                    mesh.namespaces.push(model::Namespace {
                        name: name.clone(),
                        waypoint: ns.waypoint.clone(),
                    });
                }
            }
        }
        // Pods whose namespace changed their enrollment since they were
        // settled: their entry takes the new workload, so that the next mesh
        // shares it again.
        let mut settled = Vec::new();
        for (key @ (ns, name), e) in self.live(Res::Pod) {
            match e {
                Entry::Pod(p) => {
                    let w = p.in_namespace(ns_mesh.get(ns.as_str()).copied().flatten());
                    if !Arc::ptr_eq(&w, &p.workload) {
                        settled.push((key.clone(), w.clone()));
                    }
                    mesh.workloads.push(w);
                }
                Entry::Invalid(why) => {
                    invalid.insert(("Pod", format!("{ns}/{name}")), why.clone());
                }
                _ => {}
            }
        }
        let pods = self.kinds.get(&Res::Pod).map(|o| &o.live);
        let slices = self.kinds.get(&Res::EndpointSlice).map(|o| &o.live);
        for (key @ (ns, name), e) in self.live(Res::Service) {
            match e {
                Entry::Service(s) => {
                    mesh.services
                        .push(assemble_service(key, s, pods, slices, &self.slices_of));
                }
                Entry::Invalid(why) => {
                    invalid.insert(("Service", format!("{ns}/{name}")), why.clone());
                }
                _ => {}
            }
        }
        // A waypoint's Service (as Istio deploys one) lists the ports its
        // replicas listen on, 15008 among them: the model reaches waypoints on
        // 15008 by their endpoints and has no use for them, and would refuse
        // them as ports of a service.
        let waypoints: HashSet<(String, String)> = mesh
            .waypoint_services()
            .map(|(ns, name)| (ns.to_owned(), name.to_owned()))
            .collect();
        for svc in &mut mesh.services {
            if waypoints.contains(&(svc.namespace.clone(), svc.name.clone())) {
                svc.ports
                    .retain(|p| !weft_common::is_mesh_port(p.target_port));
            }
        }
        // Weft's policies first: a same-named Istio one is then the duplicate
        // that validation drops.
        let kinds: Vec<Res> = self.kinds.keys().copied().collect();
        for res in kinds {
            for ((ns, name), e) in self.live(res) {
                match e {
                    Entry::HttpRoute(r) => mesh.http_routes.push((**r).clone()),
                    Entry::GrpcRoute(r) => mesh.grpc_routes.push((**r).clone()),
                    Entry::AuthorizationPolicy(p) => {
                        mesh.authorization_policies.push((**p).clone())
                    }
                    Entry::PeerAuthentication(p) => mesh.peer_authentications.push((**p).clone()),
                    Entry::RequestAuthentication(p) => {
                        mesh.request_authentications.push((**p).clone())
                    }
                    Entry::Invalid(why) if !matches!(res, Res::Pod | Res::Service) => {
                        invalid.insert((res.kind(), format!("{ns}/{name}")), why.clone());
                    }
                    _ => {}
                }
            }
        }
        prune(&mut mesh, &mut invalid);
        // Invalid now, good before: the last good version stays.
        let mut restored = false;
        for ((kind, name), why) in invalid.iter_mut() {
            let Some(kept) = self.last_good.get(&(*kind, name.clone())) else {
                continue;
            };
            match kept.clone() {
                Kept::Authz(p) => mesh.authorization_policies.push(p),
                Kept::Peer(p) => mesh.peer_authentications.push(p),
                Kept::Request(p) => mesh.request_authentications.push(p),
            }
            why.push_str("; its last good version stays in force");
            restored = true;
        }
        if restored {
            let mut again = BTreeMap::new();
            prune(&mut mesh, &mut again);
        }
        self.last_good = mesh
            .authorization_policies
            .iter()
            .map(|p| {
                (
                    ("AuthorizationPolicy", format!("{}/{}", p.namespace, p.name)),
                    Kept::Authz(p.clone()),
                )
            })
            .chain(mesh.peer_authentications.iter().map(|p| {
                (
                    ("PeerAuthentication", format!("{}/{}", p.namespace, p.name)),
                    Kept::Peer(p.clone()),
                )
            }))
            .chain(mesh.request_authentications.iter().map(|p| {
                (
                    (
                        "RequestAuthentication",
                        format!("{}/{}", p.namespace, p.name),
                    ),
                    Kept::Request(p.clone()),
                )
            }))
            .collect();
        for ((kind, name), why) in &invalid {
            if self.invalid.get(&(kind, name.clone())) != Some(why) {
                warn!(kind, object = %name, reason = %why, "invalid object skipped; the rest of the mesh applies");
            }
        }
        let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
        for (kind, _) in invalid.keys() {
            *counts.entry(kind).or_default() += 1;
        }
        self.counts.set(counts);
        self.invalid = invalid;
        if let Some(pods) = self.kinds.get_mut(&Res::Pod) {
            for (key, w) in settled {
                if let Some(Entry::Pod(p)) = pods.live.get_mut(&key) {
                    p.workload = w;
                }
            }
        }
        self.pending.clear();
        self.pending_slices.clear();
        self.pending_namespaces.clear();
        self.others_changed = false;
        if self.deltas {
            self.published = Some(self.index(&mesh));
        }
        Some(mesh)
    }

    /// What an ordered source sends next, if anything changed: only the
    /// workloads that did when nothing else changed and they check out, else
    /// the whole mesh ([`State::build`]). `None` until synced. Clears
    /// [`State::dirty`].
    pub fn next_update(&mut self) -> Option<Update> {
        if !self.synced() || !self.dirty {
            return None;
        }
        if let Some((delta, settled)) = self.delta() {
            self.dirty = false;
            self.pending.clear();
            self.pending_slices.clear();
            self.pending_namespaces.clear();
            if let Some(pods) = self.kinds.get_mut(&Res::Pod) {
                for (key, w) in settled {
                    if let Some(Entry::Pod(p)) = pods.live.get_mut(&key) {
                        p.workload = w;
                    }
                }
            }
            return (!delta.is_empty()).then_some(Update::Delta(delta));
        }
        self.build().map(|m| Update::Mesh(Arc::new(m)))
    }

    /// What changed since the last update as a delta, if it can be checked
    /// without assembling the mesh; `None`: assemble it. Cost: the changed
    /// pods and slices, and the pods of relabelled namespaces.
    fn delta(&mut self) -> Option<(MeshDelta, Settled)> {
        let published = self.published.as_mut()?;
        if self.others_changed
            || self.pending.len() + self.pending_slices.len() > MAX_DELTA
            || self.pending.len() * 4 > published.pods
            // A pod left out as invalid may be valid now that another
            // changed (an address freed): the whole mesh decides.
            || self.invalid.keys().any(|(kind, _)| *kind == "Pod")
        {
            return None;
        }
        let pods = &self.kinds.get(&Res::Pod)?.live;
        let namespaces = self.kinds.get(&Res::Namespace).map(|o| &o.live);
        let slices = self.kinds.get(&Res::EndpointSlice).map(|o| &o.live);
        let hasher = &*OWNERS;
        // The services whose EndpointSlices changed, and what the slices name
        // now (before the pods: a pod a slice stops naming in this batch is
        // no endpoint any more).
        let mut services: BTreeSet<Key> = BTreeSet::new();
        for (key, old) in &self.pending_slices {
            let now = slices.and_then(|s| s.get(key));
            if now == old.as_ref() {
                continue;
            }
            // An invalid one is reported, or no longer, by the whole mesh.
            if matches!(now, Some(Entry::Invalid(_))) || matches!(old, Some(Entry::Invalid(_))) {
                return None;
            }
            for (e, count) in [(old.as_ref(), false), (now, true)] {
                let Some(Entry::Slice(slice)) = e else {
                    continue;
                };
                services.insert((key.0.clone(), slice.service.clone()));
                for p in &slice.pods {
                    let named = owner(hasher, (&key.0, p), false);
                    if count {
                        *published.named.entry(named).or_default() += 1;
                    } else if let Some(n) = published.named.get_mut(&named) {
                        *n -= 1;
                        if *n == 0 {
                            published.named.remove(&named);
                        }
                    }
                }
            }
        }
        // The workloads as they were and are. An invalid entry now is for
        // the whole mesh to report.
        let mut changes = Vec::with_capacity(self.pending.len());
        for (key, old) in &self.pending {
            let now = pods.get(key);
            if now == old.as_ref() {
                continue;
            }
            let workload = |e: Option<&Entry>| match e {
                Some(Entry::Pod(p)) => Some(p.in_namespace(mesh_mode_of(namespaces, &key.0))),
                _ => None,
            };
            if matches!(now, Some(Entry::Invalid(_))) {
                return None;
            }
            changes.push((key, workload(old.as_ref()), workload(now)));
        }
        // Addresses the changed pods held are free first: two pods trading
        // addresses in one batch is no conflict. One a service claims too
        // (which was left out for it) is for the whole mesh.
        for (key, old, _) in &changes {
            let me = owner(hasher, (&key.0, &key.1), false);
            for a in old.iter().flat_map(|w| &w.addresses) {
                let a = a.to_canonical();
                match published.addrs.get(&a) {
                    Some(o) if *o == me => {
                        published.addrs.remove(&a);
                    }
                    Some(_) => return None,
                    None => {}
                }
            }
        }
        let mut delta = MeshDelta::default();
        for (key, old, now) in changes {
            let me = owner(hasher, (&key.0, &key.1), false);
            if published.named.contains_key(&me) {
                // What a service's endpoints are (and what validation checks
                // of a waypoint's) changes with these: the whole mesh.
                let shape = |w: &Option<Arc<model::Workload>>| {
                    w.as_ref()
                        .map(|w| (w.native_tunnel, w.addresses.is_empty()))
                };
                if shape(&old) != shape(&now) {
                    return None;
                }
            }
            match now {
                Some(w) => {
                    let mut bad = false;
                    model::validate::workload_entry(&w, &mut |_| bad = true);
                    for a in &w.addresses {
                        let a = a.to_canonical();
                        match published.addrs.get(&a) {
                            Some(o) if *o != me => bad = true,
                            _ => {
                                published.addrs.insert(a, me);
                            }
                        }
                    }
                    if bad {
                        return None;
                    }
                    published.pods += usize::from(old.is_none());
                    delta.upserts.push(w);
                }
                None if old.is_some() => {
                    published.pods -= 1;
                    delta.removes.push(model::WorkloadKey {
                        namespace: key.0.clone(),
                        name: key.1.clone(),
                    });
                }
                None => {}
            }
        }
        // The pods of the namespaces whose enrollment label changed, settled
        // again (those changed themselves are above). The state's entries
        // take the new workloads, so the next meshes share them.
        let mut settled = Vec::new();
        for ns in &self.pending_namespaces {
            let mode = mesh_mode_of(namespaces, ns);
            let first = (ns.clone(), String::new());
            for (key, e) in pods.range(first..).take_while(|(k, _)| k.0 == *ns) {
                if let Entry::Pod(p) = e
                    && !self.pending.contains_key(key)
                {
                    let w = p.in_namespace(mode);
                    if !Arc::ptr_eq(&w, &p.workload) {
                        settled.push((key.clone(), w));
                    }
                }
            }
            // (The agent's shrink guard counts pods removed, not unenrolled:
            // only the size of the delta bounds it.)
            if settled.len() + delta.upserts.len() > MAX_DELTA {
                return None;
            }
        }
        delta.upserts.extend(settled.iter().map(|(_, w)| w.clone()));
        // The services whose slices changed, whole, as the mesh would have
        // them. One the last mesh left out, or a waypoint (validation checks
        // its replicas), is for the whole mesh.
        let live = self.kinds.get(&Res::Service).map(|o| &o.live);
        for key in services {
            let me = owner(hasher, (&key.0, &key.1), true);
            let published_now = published.services.contains(&me);
            match live.and_then(|l| l.get(&key)) {
                Some(Entry::Service(s)) => {
                    if !published_now || published.waypoints.contains(&me) {
                        return None;
                    }
                    let svc = assemble_service(&key, s, Some(pods), slices, &self.slices_of);
                    // What validation checks of what slices say.
                    if svc
                        .ports
                        .iter()
                        .any(|p| p.target_port == 0 || weft_common::is_mesh_port(p.target_port))
                    {
                        return None;
                    }
                    delta.services.push(svc);
                }
                // A slice of no service (yet) changes nothing.
                _ if !published_now => {}
                _ => return None,
            }
        }
        Some((delta, settled))
    }

    /// The facts of `mesh` a delta is checked against.
    fn index(&self, mesh: &Mesh) -> Published {
        let hasher = &*OWNERS;
        let mut addrs = HashMap::new();
        // Every service's, also of those left out: one left out because a pod
        // holds its address comes back when the pod lets it go, which only a
        // whole mesh sees (the pod then holds an address that is not its own
        // here).
        for ((ns, name), e) in self.live(Res::Service) {
            if let Entry::Service(s) = e {
                let me = owner(hasher, (ns, name), true);
                for a in &s.service.addresses {
                    addrs.insert(a.to_canonical(), me);
                }
            }
        }
        for w in &mesh.workloads {
            let me = owner(hasher, (&w.namespace, &w.name), false);
            for a in &w.addresses {
                addrs.entry(a.to_canonical()).or_insert(me);
            }
        }
        let mut named: HashMap<u64, u32> = HashMap::new();
        for ((ns, _), e) in self.live(Res::EndpointSlice) {
            if let Entry::Slice(s) = e {
                for p in &s.pods {
                    *named.entry(owner(hasher, (ns, p), false)).or_default() += 1;
                }
            }
        }
        let services = mesh
            .services
            .iter()
            .map(|s| owner(hasher, (&s.namespace, &s.name), true))
            .collect();
        let waypoints = mesh
            .waypoint_services()
            .map(|key| owner(hasher, key, true))
            .collect();
        Published {
            addrs,
            named,
            services,
            waypoints,
            pods: mesh.workloads.len(),
        }
    }

    /// Whether the namespace `name` is being deleted or is gone, once
    /// namespaces are listed: for Weft's own namespace, an uninstall under
    /// way (`kubectl delete -k deploy/` deletes it first, before the RBAC
    /// that lets the agent ask, and its DaemonSet goes with it), which the
    /// agent tells apart from a restart or an upgrade as it stops.
    pub fn namespace_going(&self, name: &str) -> bool {
        let Some(namespaces) = self.kinds.get(&Res::Namespace) else {
            return false;
        };
        namespaces.synced
            && match namespace_entry(&namespaces.live, name) {
                Some(Entry::Namespace(ns)) => ns.deleting,
                Some(_) => false,
                None => true,
            }
    }

    /// The invalid objects at the last assembly: (kind, `namespace/name`) → why.
    pub fn invalid(&self) -> &BTreeMap<(&'static str, String), String> {
        &self.invalid
    }
}

/// Namespace `name`'s entry among the listed namespaces.
/// The service `key` as the mesh has it: its endpoints the pods its
/// EndpointSlices list that exist (each once), its named target ports
/// resolved as the slices say.
fn assemble_service(
    (ns, name): &Key,
    s: &SvcEntry,
    pods: Option<&BTreeMap<Key, Entry>>,
    slices: Option<&BTreeMap<Key, Entry>>,
    slices_of: &HashMap<Key, BTreeSet<String>>,
) -> model::Service {
    let mut svc = s.service.clone();
    let mine: Vec<&SliceEntry> = slices_of
        .get(&(ns.clone(), name.clone()))
        .into_iter()
        .flatten()
        .filter_map(|slice| match slices?.get(&(ns.clone(), slice.clone()))? {
            Entry::Slice(s) => Some(&**s),
            _ => None,
        })
        .collect();
    let mut seen = HashSet::new();
    let mut endpoints = Vec::new();
    for pod in mine.iter().flat_map(|s| &s.pods) {
        let present =
            pods.is_some_and(|p| matches!(p.get(&(ns.clone(), pod.clone())), Some(Entry::Pod(_))));
        if present && seen.insert(pod) {
            endpoints.push(model::Endpoint {
                workload: pod.clone(),
                weight: 1,
            });
        }
    }
    svc.endpoints = model::Endpoints::Listed(endpoints);
    for (port, (port_name, target)) in svc.ports.iter_mut().zip(&s.targets) {
        // The slices say what a name resolved to; for a number they say the
        // same number.
        let resolved = mine
            .iter()
            .flat_map(|s| &s.ports)
            .find(|(n, _)| n == port_name)
            .map(|(_, p)| *p);
        port.target_port = match (target, resolved) {
            (_, Some(p)) => p,
            (Target::Number(n), None) => *n,
            (Target::Named(_), None) => port.port,
        };
    }
    svc
}

/// What of a namespace's entry a delta cannot carry: its waypoint binding
/// (`Err`: an entry that is not a namespace's).
fn binding(e: Option<&Entry>) -> Result<Option<model::UseWaypoint>, ()> {
    match e {
        None => Ok(None),
        Some(Entry::Namespace(ns)) => Ok(ns.waypoint.clone()),
        Some(_) => Err(()),
    }
}

fn namespace_entry<'a>(namespaces: &'a BTreeMap<Key, Entry>, name: &str) -> Option<&'a Entry> {
    namespaces.get(&(String::new(), name.to_owned()))
}

/// Namespace `name`'s enrollment label, if it is listed and has one.
fn mesh_mode_of(namespaces: Option<&BTreeMap<Key, Entry>>, name: &str) -> Option<bool> {
    match namespaces.and_then(|n| namespace_entry(n, name)) {
        Some(Entry::Namespace(ns)) => ns.mesh,
        _ => None,
    }
}

fn slice_service(e: &Entry) -> Option<&str> {
    match e {
        Entry::Slice(s) => Some(&s.service),
        _ => None,
    }
}

fn index(slices_of: &mut HashMap<Key, BTreeSet<String>>, key: &Key, e: &Entry) {
    if let Some(svc) = slice_service(e) {
        slices_of
            .entry((key.0.clone(), svc.to_owned()))
            .or_default()
            .insert(key.1.clone());
    }
}

fn unindex(slices_of: &mut HashMap<Key, BTreeSet<String>>, key: &Key, e: &Entry) {
    if let Some(svc) = slice_service(e) {
        let svc_key = (key.0.clone(), svc.to_owned());
        if let Some(set) = slices_of.get_mut(&svc_key) {
            set.remove(&key.1);
            if set.is_empty() {
                slices_of.remove(&svc_key);
            }
        }
    }
}

/// Drops the entries model validation finds fault with, until none is left
/// (dropping one can fault another: a service bound to a dropped waypoint),
/// recording each as an invalid object of its kind. Problems that name no
/// entry cannot be dropped; they are left for the caller's check.
fn prune(mesh: &mut Mesh, invalid: &mut BTreeMap<(&'static str, String), String>) {
    for _ in 0..8 {
        let problems = model::validate::problems(mesh);
        let mut drop: BTreeMap<&str, BTreeMap<usize, String>> = BTreeMap::new();
        for p in &problems {
            if let Some((section, i, why)) = locate(p) {
                drop.entry(section).or_default().entry(i).or_insert(why);
            }
        }
        if drop.is_empty() {
            return;
        }
        for (section, entries) in drop {
            for (i, why) in entries.into_iter().rev() {
                let (kind, name) = match section {
                    "workloads" => ("Pod", mesh.workloads.remove(i).key().to_string()),
                    "services" => {
                        let s = mesh.services.remove(i);
                        ("Service", format!("{}/{}", s.namespace, s.name))
                    }
                    "namespaces" => ("Namespace", mesh.namespaces.remove(i).name),
                    "authorization_policies" => {
                        let p = mesh.authorization_policies.remove(i);
                        ("AuthorizationPolicy", format!("{}/{}", p.namespace, p.name))
                    }
                    "peer_authentications" => {
                        let p = mesh.peer_authentications.remove(i);
                        ("PeerAuthentication", format!("{}/{}", p.namespace, p.name))
                    }
                    "request_authentications" => {
                        let p = mesh.request_authentications.remove(i);
                        (
                            "RequestAuthentication",
                            format!("{}/{}", p.namespace, p.name),
                        )
                    }
                    "http_routes" => {
                        let r = mesh.http_routes.remove(i);
                        ("HTTPRoute", format!("{}/{}", r.namespace, r.name))
                    }
                    "grpc_routes" => {
                        let r = mesh.grpc_routes.remove(i);
                        ("GRPCRoute", format!("{}/{}", r.namespace, r.name))
                    }
                    _ => continue,
                };
                invalid.insert((kind, name), why);
            }
        }
        // A dropped pod is no service's endpoint any more.
        let present: HashSet<(&str, &str)> = mesh
            .workloads
            .iter()
            .map(|w| (w.namespace.as_str(), w.name.as_str()))
            .collect();
        let services = std::mem::take(&mut mesh.services);
        mesh.services = services
            .into_iter()
            .map(|mut s| {
                if let model::Endpoints::Listed(list) = &mut s.endpoints {
                    list.retain(|e| present.contains(&(s.namespace.as_str(), e.workload.as_str())));
                }
                s
            })
            .collect();
    }
}

/// `services[3] (shop/web): why` → ("services", 3, "why").
fn locate(problem: &str) -> Option<(&'static str, usize, String)> {
    const SECTIONS: &[&str] = &[
        "workloads",
        "services",
        "namespaces",
        "authorization_policies",
        "peer_authentications",
        "request_authentications",
        "http_routes",
        "grpc_routes",
    ];
    let (section, rest) = problem.split_once('[')?;
    let section = SECTIONS.iter().find(|s| **s == section)?;
    let (i, rest) = rest.split_once(']')?;
    let why = rest.split_once("): ").map_or(rest, |(_, why)| why);
    Some((section, i.parse().ok()?, why.to_owned()))
}
