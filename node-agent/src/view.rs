//! The agent's compiled view of one config: what the data path asks per
//! connection, answered from hash maps (workload by key and by address,
//! service by virtual IP), the authorization policies compiled, and a load
//! balancer per service.
//!
//! A view is made whole from a mesh ([`View::new`]: a file reload, or a change
//! of anything but workloads in Kubernetes) or from the view before it and the
//! workloads that changed ([`View::with_delta`]: a pod added, deleted or
//! changed). The second costs what changed, not the size of the cluster: the
//! workload tables are [`Table`]s, which a copy shares and a change copies one
//! small shard of; services, their index and the compiled policies are shared
//! as they are; the balancers of the services naming a changed workload are
//! updated in place. Views are snapshots: a connection keeps the one it
//! decided on, and a new view never changes an old one.
//!
//! Load balancers outlive a view: a reload updates each service's balancer in
//! place (endpoints, settings), so outlier state, active counts and round-robin
//! position of endpoints that stay are kept, and connections in flight keep the
//! balancer they picked from.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, hash_map::RandomState},
    hash::{BuildHasher, Hash},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::{
    authz::Authorizer,
    lb::{Balancer, EndpointSpec},
    model::{
        Endpoints, Mesh, MeshDelta, Service, ServiceKey, Workload, WorkloadId, WorkloadKey,
        endpoints_of, selects,
    },
    stats::ServiceName,
};

/// Every service's balancer, kept across reloads.
#[derive(Default)]
pub struct Balancers(Mutex<HashMap<ServiceKey, Arc<Balancer>>>);

pub struct View {
    /// The mesh the view was made from, without its workloads (they are in
    /// the tables below): shared by the views made from this one by changes
    /// of workloads.
    config: Arc<Mesh>,
    /// This agent's node.
    pub node: String,
    /// Workloads by key (the key is the workload: a copied shard costs a
    /// refcount per entry, not two strings).
    workloads: Table<ByKey, ()>,
    /// Workloads by each of their addresses (canonical).
    by_addr: Table<IpAddr, Arc<Workload>>,
    /// The workloads of this node (a few dozen): what enrollment, the /proc
    /// scan and the status page walk, without walking the cluster.
    local: Arc<BTreeMap<WorkloadKey, Arc<Workload>>>,
    /// How many workloads are enrolled, mesh-wide (the shrink guard's base).
    enrolled: usize,
    services: Services,
    pub authz: Arc<Authorizer>,
}

/// The services of a view and their indexes. A delta shares what it does
/// not change: the index by address, key and waypoint always (a delta never
/// adds or removes a service); the list and the index of endpoints but the
/// one chunk or shard a change copies ([`Chunks`], [`Table`]).
#[derive(Clone)]
struct Services {
    fixed: Arc<ServiceIndex>,
    /// Per service (config order): the service, shared with connections to it
    /// (a refcount per connection, not a copy), and its balancer.
    list: Chunks<(Arc<Service>, Arc<Balancer>)>,
    /// Which services list each workload as an endpoint.
    naming: Naming,
}

/// Per workload that services list as an endpoint (by a hash of its key,
/// [`ServiceIndex::named`]): the first service that does, and in `more` any
/// others. A hash, not the key: every pod of a cluster is some service's
/// endpoint, and two strings per pod are ~100 bytes where this is 16; two
/// keys that collide only make a change update one balancer more.
#[derive(Clone)]
struct Naming {
    first: Table<u64, u32>,
    more: Table<u64, Vec<u32>>,
}

/// What deltas leave as it is.
struct ServiceIndex {
    vips: HashMap<IpAddr, usize>,
    by_key: HashMap<ServiceKey, usize>,
    /// Per service: the index of the waypoint service it is bound to.
    waypoints: Vec<Option<usize>>,
    /// Keyed per process: no one can choose names that collide.
    hasher: RandomState,
    /// The services whose endpoints are a label selector (the file's form;
    /// Kubernetes services list theirs).
    selecting: Vec<usize>,
}

impl View {
    /// Compiles `mesh` for the agent of `node`, updating (or making) each
    /// service's balancer in `balancers` and forgetting those of removed services.
    pub fn new(mut mesh: Mesh, node: &str, balancers: &Balancers) -> View {
        // Before the workloads leave the mesh: it caches the policies of each.
        let authz = Arc::new(Authorizer::new(&mesh));
        let list = std::mem::take(&mut mesh.workloads);
        let mut view = View {
            config: Arc::new(Mesh::default()),
            node: node.to_owned(),
            workloads: Table::with_capacity(list.len()),
            by_addr: Table::with_capacity(list.len()),
            local: Arc::default(),
            enrolled: 0,
            services: Services {
                fixed: Arc::new(ServiceIndex {
                    vips: HashMap::new(),
                    by_key: HashMap::new(),
                    waypoints: Vec::new(),
                    hasher: RandomState::new(),
                    selecting: Vec::new(),
                }),
                list: Chunks::from(Vec::new()),
                naming: Naming {
                    first: Table::with_capacity(0),
                    more: Table::with_capacity(0),
                },
            },
            authz,
        };
        let mut local = BTreeMap::new();
        for w in list {
            if w.node == node {
                local.insert(w.key(), w.clone());
            }
            view.index(&w);
            // A duplicate key is refused by validation; the last one wins here.
            if let Some(old) = view.workloads.replace(ByKey(w)) {
                view.enrolled -= usize::from(old.0.enrolled);
            }
        }
        view.local = Arc::new(local);
        let listed = mesh
            .services
            .iter()
            .map(|s| match &s.endpoints {
                Endpoints::Listed(eps) => eps.len(),
                Endpoints::Selector(_) => 0,
            })
            .sum();
        let mut fixed = ServiceIndex {
            vips: HashMap::new(),
            by_key: HashMap::with_capacity(mesh.services.len()),
            waypoints: Vec::new(),
            hasher: RandomState::new(),
            selecting: Vec::new(),
        };
        let mut list = Vec::with_capacity(mesh.services.len());
        let mut naming = Naming {
            first: Table::with_capacity(listed),
            more: Table::with_capacity(0),
        };
        {
            let mut all = balancers.0.lock().unwrap_or_else(|e| e.into_inner());
            let mut kept = HashMap::new();
            for (i, svc) in mesh.services.iter().enumerate() {
                for a in &svc.addresses {
                    fixed.vips.insert(a.to_canonical(), i);
                }
                match &svc.endpoints {
                    Endpoints::Listed(eps) => {
                        for ep in eps {
                            naming.add(fixed.named(&svc.namespace, &ep.workload), i as u32);
                        }
                    }
                    Endpoints::Selector(_) => fixed.selecting.push(i),
                }
                let key = svc.key();
                let endpoints = view.endpoint_specs(svc);
                let lb = &svc.load_balancing;
                let b = match all.get(&key) {
                    Some(b) => {
                        b.update(
                            lb.policy,
                            lb.prefer_same_node,
                            svc.outlier_detection,
                            endpoints,
                        );
                        b.clone()
                    }
                    None => Arc::new(Balancer::new(
                        lb.policy,
                        lb.prefer_same_node,
                        svc.outlier_detection,
                        endpoints,
                    )),
                };
                list.push((Arc::new(svc.clone()), b.clone()));
                fixed.by_key.insert(key.clone(), i);
                kept.insert(key, b);
            }
            *all = kept;
        }
        fixed.waypoints = mesh
            .waypoints()
            .into_iter()
            .map(|k| k.and_then(|k| fixed.by_key.get(&k).copied()))
            .collect();
        view.services = Services {
            fixed: Arc::new(fixed),
            list: Chunks::from(list),
            naming,
        };
        view.config = Arc::new(mesh);
        view
    }

    /// This view with `delta` applied: its workloads removed, added or
    /// replaced, its services' endpoints replaced, and the balancers of the
    /// services that changed or list a changed workload updated. Everything
    /// else is shared with `self`. The source checked the delta as it checks
    /// a whole mesh (keys, addresses unique, endpoints that exist); a delta
    /// changes no service's address, port binding or waypoint, and no policy.
    pub fn with_delta(&self, delta: MeshDelta, balancers: &Balancers) -> View {
        let mut view = View {
            config: self.config.clone(),
            node: self.node.clone(),
            workloads: self.workloads.clone(),
            by_addr: self.by_addr.clone(),
            local: self.local.clone(),
            enrolled: self.enrolled,
            services: self.services.clone(),
            authz: self.authz.clone(),
        };
        let mut touched = BTreeSet::new();
        let mut local_changed = false;
        let changed = |view: &View, w: &Workload, touched: &mut BTreeSet<usize>| {
            let s = &view.services;
            let named = s.fixed.named(&w.namespace, &w.name);
            touched.extend(s.naming.of(named).map(|i| i as usize));
            for &i in &s.fixed.selecting {
                let svc = &s.list[i].0;
                if let Endpoints::Selector(sel) = &svc.endpoints
                    && svc.namespace == w.namespace
                    && selects(sel, &w.labels)
                {
                    touched.insert(i);
                }
            }
        };
        let mut local = BTreeMap::clone(&view.local);
        for key in &delta.removes {
            if let Some(ByKey(old)) = view.workloads.take(key as &dyn WorkloadId) {
                view.unindex(&old);
                view.enrolled -= usize::from(old.enrolled);
                local_changed |= local.remove(key).is_some();
                changed(&view, &old, &mut touched);
            }
        }
        for w in delta.upserts {
            let key = w.key();
            if let Some(ByKey(old)) = view.workloads.replace(ByKey(w.clone())) {
                view.unindex(&old);
                view.enrolled -= usize::from(old.enrolled);
                local_changed |= local.remove(&key).is_some();
                changed(&view, &old, &mut touched);
            }
            view.index(&w);
            if w.node == view.node {
                local.insert(key, w.clone());
                local_changed = true;
            }
            changed(&view, &w, &mut touched);
        }
        if local_changed {
            view.local = Arc::new(local);
        }
        if !delta.services.is_empty() {
            for svc in delta.services {
                let Some(&i) = view.services.fixed.by_key.get(&svc.key()) else {
                    // Never sent (a delta adds no service): one unknown here
                    // waits for the next whole mesh.
                    continue;
                };
                let s = &mut view.services;
                let before = s.fixed.listed(&s.list[i].0);
                let after = s.fixed.listed(&svc);
                for &gone in before.difference(&after) {
                    s.naming.remove(gone, i as u32);
                }
                for &new in after.difference(&before) {
                    s.naming.add(new, i as u32);
                }
                let b = s.list[i].1.clone();
                s.list.set(i, (Arc::new(svc), b));
                touched.insert(i);
            }
        }
        if !touched.is_empty() {
            let all = balancers.0.lock().unwrap_or_else(|e| e.into_inner());
            for i in touched {
                let (svc, b) = &view.services.list[i];
                // The registry's balancer is this view's unless a later full
                // view replaced it; update what connections pick from.
                let b = all.get(&svc.key()).unwrap_or(b);
                let lb = &svc.load_balancing;
                b.update(
                    lb.policy,
                    lb.prefer_same_node,
                    svc.outlier_detection,
                    view.endpoint_specs(svc),
                );
            }
        }
        view
    }

    /// Files `w` under its addresses; counts it if enrolled.
    fn index(&mut self, w: &Arc<Workload>) {
        for a in &w.addresses {
            self.by_addr.insert(a.to_canonical(), w.clone());
        }
        self.enrolled += usize::from(w.enrolled);
    }

    /// Takes `w`'s addresses back (those still its own).
    fn unindex(&mut self, w: &Arc<Workload>) {
        for a in &w.addresses {
            let a = a.to_canonical();
            if self.by_addr.get(&a).is_some_and(|o| Arc::ptr_eq(o, w)) {
                self.by_addr.remove(&a);
            }
        }
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_addr.get(&ip.to_canonical()).map(|w| &**w)
    }

    pub fn workload(&self, key: &impl WorkloadId) -> Option<&Workload> {
        self.workloads.key(key as &dyn WorkloadId).map(|w| &*w.0)
    }

    /// The workload `key`, shared (for records that outlive a borrow).
    pub fn workload_arc(&self, key: &impl WorkloadId) -> Option<Arc<Workload>> {
        self.workloads
            .key(key as &dyn WorkloadId)
            .map(|w| w.0.clone())
    }

    /// Every workload, in no order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> {
        self.workloads.keys().map(|w| &*w.0)
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    /// How many workloads are enrolled, mesh-wide.
    pub fn enrolled_count(&self) -> usize {
        self.enrolled
    }

    /// The workloads on this view's node, by key.
    pub fn local(&self) -> impl Iterator<Item = &Workload> {
        self.local.values().map(|w| &**w)
    }

    /// This node's enrolled workloads, by key.
    pub fn enrolled_here(&self) -> impl Iterator<Item = &Workload> {
        self.local().filter(|w| w.enrolled)
    }

    /// The service whose virtual IP is `ip`, and its balancer.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&(Arc<Service>, Arc<Balancer>)> {
        let s = &self.services;
        s.fixed.vips.get(&ip.to_canonical()).map(|&i| &s.list[i])
    }

    /// The service named `key`, and its balancer.
    pub fn service(&self, key: &ServiceKey) -> Option<&(Arc<Service>, Arc<Balancer>)> {
        let s = &self.services;
        s.fixed.by_key.get(key).map(|&i| &s.list[i])
    }

    /// The waypoint `svc` is bound to (its service and balancer), if any.
    pub fn waypoint_of(&self, svc: &Service) -> Option<&(Arc<Service>, Arc<Balancer>)> {
        let s = &self.services;
        let i = *s.fixed.by_key.get(&svc.key())?;
        s.fixed.waypoints[i].map(|w| &s.list[w])
    }

    /// The mesh this view was made from, **without its workloads** (ask the
    /// view for those): services, policies, routes, settings. Its services'
    /// endpoints are as that mesh had them; deltas since may have changed
    /// them (ask [`View::service`] or [`View::services`]).
    pub fn config(&self) -> &Mesh {
        &self.config
    }

    /// The whole mesh in force, workloads by key (for the status page; a copy).
    pub fn to_mesh(&self) -> Mesh {
        let mut mesh = Mesh::clone(&self.config);
        mesh.workloads = self.workloads.keys().map(|w| w.0.clone()).collect();
        mesh.services = self.services().cloned().collect();
        mesh.workloads
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        mesh
    }

    /// Whether `mesh` is what this view was made from (its workloads in any
    /// order): a reload that changes nothing is not applied.
    pub fn is_of(&self, mesh: &Mesh) -> bool {
        mesh.workloads.len() == self.workloads.len()
            && mesh
                .workloads
                .iter()
                .all(|w| self.workload(&w.key()) == Some(&**w))
            && mesh.services.len() == self.services.list.len()
            && mesh.services.iter().eq(self.services())
            && self.config.eq_settings(mesh)
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// Every service, in the mesh's order, with its endpoints in force.
    pub fn services(&self) -> impl ExactSizeIterator<Item = &Service> {
        self.services.list.iter().map(|(s, _)| &**s)
    }

    /// A service's endpoints that are workloads of this view, with their
    /// weights.
    pub fn endpoint_workloads<'a>(&'a self, svc: &'a Service) -> Vec<(&'a Arc<Workload>, u32)> {
        // A selector (the file's form) is a scan of the workloads.
        let all = self.workloads.keys().map(|w| &w.0);
        endpoints_of(svc, all, |name| {
            self.workloads
                .key(&(svc.namespace.as_str(), name) as &dyn WorkloadId)
                .map(|w| &w.0)
        })
    }

    /// A service's endpoints, as its balancer takes them.
    fn endpoint_specs(&self, svc: &Service) -> Vec<EndpointSpec> {
        self.endpoint_workloads(svc)
            .into_iter()
            .map(|(w, weight)| EndpointSpec {
                workload: w.clone(),
                weight,
                same_node: w.node == self.node,
            })
            .collect()
    }
}

impl ServiceIndex {
    /// What stands for the workload `namespace/name` in [`Naming`].
    fn named(&self, namespace: &str, name: &str) -> u64 {
        self.hasher.hash_one((namespace, name))
    }

    /// What stands for each endpoint `svc` lists.
    fn listed(&self, svc: &Service) -> HashSet<u64> {
        match &svc.endpoints {
            Endpoints::Listed(eps) => eps
                .iter()
                .map(|ep| self.named(&svc.namespace, &ep.workload))
                .collect(),
            Endpoints::Selector(_) => HashSet::new(),
        }
    }
}

impl Naming {
    /// The services that list `named`.
    fn of(&self, named: u64) -> impl Iterator<Item = u32> + '_ {
        let first = self.first.get(&named).copied();
        let more = self.more.get(&named).into_iter().flatten().copied();
        first.into_iter().chain(more)
    }

    /// Service `i` lists `named`.
    fn add(&mut self, named: u64, i: u32) {
        match self.first.get(&named) {
            None => {
                self.first.insert(named, i);
            }
            Some(&j) if j == i => {}
            Some(_) => {
                let mut more = self.more.get(&named).cloned().unwrap_or_default();
                if !more.contains(&i) {
                    more.push(i);
                    self.more.insert(named, more);
                }
            }
        }
    }

    /// Service `i` no longer lists `named`.
    fn remove(&mut self, named: u64, i: u32) {
        let mut more = self.more.remove(&named).unwrap_or_default();
        if self.first.get(&named) == Some(&i) {
            if more.is_empty() {
                self.first.remove(&named);
            } else {
                self.first.insert(named, more.remove(0));
            }
        } else {
            more.retain(|&j| j != i);
        }
        if !more.is_empty() {
            self.more.insert(named, more);
        }
    }
}

impl Balancers {
    /// Every service's balancer, for status output.
    pub fn all(&self) -> Vec<(ServiceKey, Arc<Balancer>)> {
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = all.iter().map(|(k, b)| (k.clone(), b.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
}

/// The metrics' name for `svc`.
pub fn service_name(svc: &Service) -> ServiceName {
    ServiceName {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
    }
}

/// A hash map that is cheap to copy and to change in a copy: its entries are
/// spread over about √n shards of about √n entries, each behind an `Arc`. A
/// copy shares every shard (a refcount each); a change copies the one shard
/// it touches (`Arc::make_mut`), which the copy's other owners keep. Both
/// are O(√n): at 100,000 workloads, 512 refcounts and a shard of ~200
/// entries, some microseconds, where a `HashMap` copy is tens of
/// milliseconds. (√n balances the two: more, smaller shards make the copy
/// dearer, fewer and bigger ones the change.)
///
/// Ours rather than a persistent map crate's (`imbl`'s HAMT): that copies a
/// path of nodes of up to 64 entries per change, cloning their keys, which
/// are strings here, so it does not measure better; it is MPL-licensed and
/// brings four crates; and this is forty lines.
#[derive(Clone)]
pub struct Table<K, V> {
    shards: Box<[Arc<HashMap<K, V>>]>,
    hasher: RandomState,
    len: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> Table<K, V> {
    /// Sized for `n` entries. A table grown far past that by changes still
    /// works, with bigger shards; the next whole view sizes it again.
    pub fn with_capacity(n: usize) -> Self {
        let shards = (n.isqrt()).next_power_of_two().clamp(16, 1 << 12);
        Table {
            shards: (0..shards).map(|_| Arc::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            len: 0,
        }
    }

    fn shard<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        self.hasher.hash_one(key) as usize & (self.shards.len() - 1)
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard(key)].get(key)
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let i = self.shard(&key);
        let old = Arc::make_mut(&mut self.shards[i]).insert(key, value);
        self.len += usize::from(old.is_none());
        old
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(key);
        // Not copied for a key it does not hold.
        self.shards[i].get(key)?;
        let old = Arc::make_mut(&mut self.shards[i]).remove(key);
        self.len -= usize::from(old.is_some());
        old
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.shards.iter().flat_map(|s| s.values())
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.shards.iter().flat_map(|s| s.keys())
    }

    /// The key held that equals `key`.
    pub fn key<Q>(&self, key: &Q) -> Option<&K>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards[self.shard(key)]
            .get_key_value(key)
            .map(|(k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl<K: Hash + Eq + Clone> Table<K, ()> {
    /// Puts `key` in, in place of an equal one, which it returns.
    pub fn replace(&mut self, key: K) -> Option<K> {
        let i = self.shard(&key);
        let shard = Arc::make_mut(&mut self.shards[i]);
        let old = shard.remove_entry(&key).map(|(k, ())| k);
        shard.insert(key, ());
        self.len += usize::from(old.is_none());
        old
    }

    /// Takes the key equal to `key` out.
    pub fn take<Q>(&mut self, key: &Q) -> Option<K>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.shard(key);
        self.shards[i].get(key)?;
        let old = Arc::make_mut(&mut self.shards[i])
            .remove_entry(key)
            .map(|(k, ())| k);
        self.len -= usize::from(old.is_some());
        old
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A list that is cheap to copy and to change an entry of in a copy: its
/// entries in chunks of [`CHUNK`], each behind an `Arc`. A copy is a refcount
/// per chunk (157 at 10,000 services, where a `Vec` of pointers is 20,000);
/// a change copies its one chunk. Indexing is one more pointer away.
#[derive(Clone)]
pub struct Chunks<T> {
    chunks: Vec<Arc<Vec<T>>>,
    len: usize,
}

const CHUNK: usize = 64;

impl<T: Clone> Chunks<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Replaces entry `i` (in range), copying its chunk if shared.
    pub fn set(&mut self, i: usize, v: T) {
        Arc::make_mut(&mut self.chunks[i / CHUNK])[i % CHUNK] = v;
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = &T> + '_ {
        Iter {
            inner: self.chunks.iter().flat_map(|c| c.iter()),
            left: self.len,
        }
    }
}

struct Iter<I> {
    inner: I,
    left: usize,
}

impl<'a, T: 'a, I: Iterator<Item = &'a T>> Iterator for Iter<I> {
    type Item = &'a T;

    fn next(&mut self) -> Option<&'a T> {
        let next = self.inner.next()?;
        self.left -= 1;
        Some(next)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<'a, T: 'a, I: Iterator<Item = &'a T>> ExactSizeIterator for Iter<I> {}

impl<T> From<Vec<T>> for Chunks<T> {
    fn from(v: Vec<T>) -> Self {
        let len = v.len();
        let mut chunks = Vec::with_capacity(len.div_ceil(CHUNK));
        let mut v = v.into_iter();
        loop {
            let chunk: Vec<T> = v.by_ref().take(CHUNK).collect();
            if chunk.is_empty() {
                break;
            }
            chunks.push(Arc::new(chunk));
        }
        Chunks { chunks, len }
    }
}

impl<T> std::ops::Index<usize> for Chunks<T> {
    type Output = T;

    fn index(&self, i: usize) -> &T {
        &self.chunks[i / CHUNK][i % CHUNK]
    }
}

/// A workload as the key of its table: equal, and hashed, as its
/// (namespace, name), so that a `&WorkloadKey` finds it (through
/// [`WorkloadId`]).
#[derive(Clone)]
struct ByKey(Arc<Workload>);

impl WorkloadId for ByKey {
    fn id(&self) -> (&str, &str) {
        (&self.0.namespace, &self.0.name)
    }
}

impl Hash for dyn WorkloadId + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.id().hash(h)
    }
}

impl PartialEq for dyn WorkloadId + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for dyn WorkloadId + '_ {}

impl Hash for ByKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        // The same as a `dyn WorkloadId`'s, which `Borrow` requires.
        (self as &dyn WorkloadId).hash(h)
    }
}

impl PartialEq for ByKey {
    fn eq(&self, other: &Self) -> bool {
        self.id() == other.id()
    }
}

impl Eq for ByKey {}

impl<'a> Borrow<dyn WorkloadId + 'a> for ByKey {
    fn borrow(&self) -> &(dyn WorkloadId + 'a) {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunked_list_changed_in_a_copy_leaves_the_original_as_it_was() {
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 3] {
            let list = Chunks::from((0..n).collect::<Vec<usize>>());
            assert_eq!(list.len(), n);
            assert_eq!(list.iter().len(), n);
            assert!(list.iter().copied().eq(0..n));
            let mut copy = list.clone();
            for i in (0..n).step_by(7) {
                copy.set(i, i + 1000);
            }
            assert!(list.iter().copied().eq(0..n), "{n}: the original");
            for i in 0..n {
                let want = if i % 7 == 0 { i + 1000 } else { i };
                assert_eq!(copy[i], want, "{n}: entry {i}");
            }
            // Only the chunks a change touched were copied.
            let shared = (0..list.chunks.len())
                .filter(|&c| Arc::ptr_eq(&list.chunks[c], &copy.chunks[c]))
                .count();
            let touched = (0..n)
                .step_by(7)
                .map(|i| i / CHUNK)
                .collect::<BTreeSet<_>>();
            assert_eq!(shared, list.chunks.len() - touched.len(), "{n}");
        }
    }
}
