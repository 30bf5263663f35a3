//! The agent's compiled view of one config: what the data path asks per
//! connection, answered from hash maps built once per reload (workload by
//! address, service by virtual IP), the authorization policies compiled, and a
//! load balancer per service.
//!
//! Load balancers outlive a view: a reload updates each service's balancer in
//! place (endpoints, settings), so outlier state, active counts and round-robin
//! position of endpoints that stay are kept, and connections in flight keep the
//! balancer they picked from.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
};

use crate::{
    authz::Authorizer,
    lb::{Balancer, EndpointSpec},
    model::{Endpoints, Mesh, Service, ServiceKey, Workload, WorkloadKey},
    stats::ServiceName,
};

/// Every service's balancer, kept across reloads.
#[derive(Default)]
pub struct Balancers(Mutex<HashMap<ServiceKey, Arc<Balancer>>>);

pub struct View {
    mesh: Mesh,
    /// This agent's node.
    pub node: String,
    by_addr: HashMap<IpAddr, usize>,
    by_key: HashMap<WorkloadKey, usize>,
    vips: HashMap<IpAddr, usize>,
    /// Per service (config order): the service, shared with connections to it
    /// (a refcount per connection, not a copy), and its balancer.
    services: Vec<(Arc<Service>, Arc<Balancer>)>,
    by_service: HashMap<ServiceKey, usize>,
    /// Per service: the index of the waypoint service it is bound to.
    waypoints: Vec<Option<usize>>,
    pub authz: Authorizer,
}

impl View {
    /// Compiles `config` for the agent of `node`, updating (or making) each
    /// service's balancer in `balancers` and forgetting those of removed services.
    pub fn new(mesh: Mesh, node: &str, balancers: &Balancers) -> View {
        let mut by_addr = HashMap::new();
        let mut by_key = HashMap::new();
        for (i, w) in mesh.workloads.iter().enumerate() {
            by_key.insert(w.key(), i);
            for a in &w.addresses {
                by_addr.insert(a.to_canonical(), i);
            }
        }
        let mut vips = HashMap::new();
        let mut kept = HashMap::new();
        let mut list = Vec::with_capacity(mesh.services.len());
        {
            let mut all = balancers.0.lock().unwrap_or_else(|e| e.into_inner());
            for (i, svc) in mesh.services.iter().enumerate() {
                for a in &svc.addresses {
                    vips.insert(a.to_canonical(), i);
                }
                let key = svc.key();
                let endpoints = indexed_endpoints(&mesh, svc, node, &by_key);
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
                kept.insert(key, b);
            }
            *all = kept;
        }
        let by_service: HashMap<ServiceKey, usize> = mesh
            .services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.key(), i))
            .collect();
        let waypoints = mesh
            .services
            .iter()
            .map(|s| {
                mesh.waypoint_of(s)
                    .and_then(|k| by_service.get(&k).copied())
            })
            .collect();
        View {
            by_service,
            waypoints,
            authz: Authorizer::new(&mesh),
            mesh,
            node: node.to_owned(),
            by_addr,
            by_key,
            vips,
            services: list,
        }
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Workload> {
        self.by_addr
            .get(&ip.to_canonical())
            .map(|&i| &self.mesh.workloads[i])
    }

    /// The index of `key` in [`View::workloads`].
    pub fn workload_index(&self, key: &WorkloadKey) -> Option<usize> {
        self.by_key.get(key).copied()
    }

    pub fn workload(&self, key: &WorkloadKey) -> Option<&Workload> {
        self.by_key.get(key).map(|&i| &self.mesh.workloads[i])
    }

    /// The service whose virtual IP is `ip`, and its balancer.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&(Arc<Service>, Arc<Balancer>)> {
        self.vips
            .get(&ip.to_canonical())
            .map(|&i| &self.services[i])
    }

    /// The service named `key`, and its balancer.
    pub fn service(&self, key: &ServiceKey) -> Option<&(Arc<Service>, Arc<Balancer>)> {
        self.by_service.get(key).map(|&i| &self.services[i])
    }

    /// The waypoint `svc` is bound to (its service and balancer), if any.
    pub fn waypoint_of(&self, svc: &Service) -> Option<&(Arc<Service>, Arc<Balancer>)> {
        let i = *self.by_service.get(&svc.key())?;
        self.waypoints[i].map(|w| &self.services[w])
    }

    /// The mesh this view was made from.
    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn trust_domain(&self) -> &str {
        &self.mesh.trust_domain
    }

    pub fn workloads(&self) -> &[Workload] {
        &self.mesh.workloads
    }

    pub fn services(&self) -> &[Service] {
        &self.mesh.services
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

/// [`endpoints`], with listed endpoints found through the view's index: a
/// cluster's services list their endpoints by name (from EndpointSlices), and
/// a scan of the workloads per endpoint is quadratic (100,000 pods: minutes).
fn indexed_endpoints(
    mesh: &Mesh,
    svc: &Service,
    node: &str,
    by_key: &HashMap<WorkloadKey, usize>,
) -> Vec<EndpointSpec> {
    let Endpoints::Listed(list) = &svc.endpoints else {
        return endpoints(mesh, svc, node);
    };
    list.iter()
        .filter_map(|ep| {
            let key = WorkloadKey {
                namespace: svc.namespace.clone(),
                name: ep.workload.clone(),
            };
            let w = &mesh.workloads[*by_key.get(&key)?];
            (!w.addresses.is_empty()).then(|| EndpointSpec {
                key,
                weight: ep.weight,
                same_node: w.node == node,
            })
        })
        .collect()
}

/// A service's endpoints, as its balancer takes them.
pub fn endpoints(mesh: &Mesh, svc: &Service, node: &str) -> Vec<EndpointSpec> {
    mesh.endpoint_workloads(svc)
        .into_iter()
        .map(|(w, weight)| EndpointSpec {
            key: w.key(),
            weight,
            same_node: w.node == node,
        })
        .collect()
}
