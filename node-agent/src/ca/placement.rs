//! Which identities run on which node: what the CA checks each request
//! against, indexed so that a check is a hash lookup, not a scan of the
//! cluster's workloads, and kept up by the deltas of an ordered discovery
//! source at the cost of what changed.
//!
//! A scan of 100,000 workloads per certificate request is about a
//! millisecond; a DaemonSet starting on 5,000 nodes asks for some 100,000
//! certificates at once. And with whole meshes, every pod change in the
//! cluster cost the CA a mesh assembled from all its pods.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use crate::{
    identity::SpiffeId,
    model::{Mesh, MeshDelta, Workload, WorkloadKey},
};

/// The placement of a mesh's workloads.
#[derive(Debug, Default)]
pub struct Placement {
    trust_domain: String,
    /// Every workload by key (shared with the source's state): what a delta
    /// that replaces or removes one undoes.
    workloads: HashMap<WorkloadKey, Arc<Workload>>,
    /// (node, namespace, service account) → how many workloads run there
    /// with that identity. Strings, not hashes: a collision here would sign
    /// an identity for a node that has none of it.
    identities: HashMap<(String, String, String), u32>,
    /// Namespace → how many pods in it speak HBONE themselves (waypoints):
    /// where the CA publishes the trust bundle.
    native: BTreeMap<String, u32>,
}

impl Placement {
    pub fn new(mesh: &Mesh) -> Placement {
        let mut p = Placement {
            trust_domain: mesh.trust_domain.clone(),
            workloads: HashMap::with_capacity(mesh.workloads.len()),
            ..Default::default()
        };
        for w in &mesh.workloads {
            p.insert(w.clone());
        }
        p
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Applies the workloads of `delta` (its services are not the CA's
    /// concern).
    pub fn apply(&mut self, delta: &MeshDelta) {
        for key in &delta.removes {
            if let Some(old) = self.workloads.remove(key) {
                self.forget(&old);
            }
        }
        for w in &delta.upserts {
            self.insert(w.clone());
        }
    }

    fn insert(&mut self, w: Arc<Workload>) {
        *self
            .identities
            .entry((
                w.node.clone(),
                w.namespace.clone(),
                w.service_account.clone(),
            ))
            .or_default() += 1;
        if w.native_tunnel {
            *self.native.entry(w.namespace.clone()).or_default() += 1;
        }
        if let Some(old) = self.workloads.insert(w.key(), w) {
            self.forget(&old);
        }
    }

    /// Takes `w`'s counts back.
    fn forget(&mut self, w: &Workload) {
        let key = (
            w.node.clone(),
            w.namespace.clone(),
            w.service_account.clone(),
        );
        if let Some(n) = self.identities.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                self.identities.remove(&key);
            }
        }
        if w.native_tunnel
            && let Some(n) = self.native.get_mut(&w.namespace)
        {
            *n -= 1;
            if *n == 0 {
                self.native.remove(&w.namespace);
            }
        }
    }

    /// Whether some workload on `node` has identity `id`.
    pub fn identity_on_node(&self, id: &SpiffeId, node: &str) -> bool {
        id.trust_domain() == self.trust_domain
            && self.identities.contains_key(&(
                node.to_owned(),
                id.namespace().to_owned(),
                id.service_account().to_owned(),
            ))
    }

    /// The workload `namespace/name`, if there is one.
    pub fn workload(&self, namespace: &str, name: &str) -> Option<&Workload> {
        self.workloads
            .get(&WorkloadKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .map(|w| &**w)
    }

    /// The namespaces where pods that speak HBONE themselves run.
    pub fn native_namespaces(&self) -> impl Iterator<Item = &str> {
        self.native.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.workloads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, node: &str, sa: &str, native: bool) -> Arc<Workload> {
        let mesh: Mesh = crate::discovery::file::parse(
            std::path::Path::new("mesh.yaml"),
            &format!(
                "workloads:\n- {{name: {name}, namespace: shop, node: {node}, \
                 service_account: {sa}, addresses: [10.0.0.1], native_tunnel: {native}}}\n"
            ),
        )
        .unwrap()
        .mesh;
        mesh.workloads[0].clone()
    }

    /// Checked against a scan of the workloads after every change.
    #[test]
    fn a_placement_kept_by_deltas_answers_as_a_scan_of_the_mesh() {
        let mut mesh = Mesh::default();
        let mut placement = Placement::new(&mesh);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        let nodes = ["n1", "n2", "n3"];
        let accounts = ["web", "api", "waypoint"];
        for step in 0..400 {
            let name = format!("pod-{}", next(12));
            let mut delta = MeshDelta::default();
            if next(4) == 0 {
                delta.removes.push(WorkloadKey {
                    namespace: "shop".into(),
                    name,
                });
            } else {
                delta.upserts.push(workload(
                    &name,
                    nodes[next(3) as usize],
                    accounts[next(3) as usize],
                    next(3) == 0,
                ));
            }
            mesh.apply_delta(delta.clone());
            placement.apply(&delta);
            assert_eq!(placement.len(), mesh.workloads.len(), "step {step}");
            for node in nodes {
                for sa in accounts {
                    let id: SpiffeId = format!("spiffe://cluster.local/ns/shop/sa/{sa}")
                        .parse()
                        .unwrap();
                    assert_eq!(
                        placement.identity_on_node(&id, node),
                        mesh.identity_on_node(&id, node),
                        "step {step}: {sa} on {node}"
                    );
                }
            }
            let native: Vec<&str> = placement.native_namespaces().collect();
            let scanned = mesh.workloads.iter().any(|w| w.native_tunnel);
            assert_eq!(native == ["shop"], scanned, "step {step}");
            assert_eq!(native.is_empty(), !scanned, "step {step}");
        }
        // Another trust domain is never on any node.
        let other: SpiffeId = "spiffe://other.local/ns/shop/sa/web".parse().unwrap();
        assert!(nodes.iter().all(|n| !placement.identity_on_node(&other, n)));
    }
}
