//! Kubernetes discovery: the mesh model from the API server, the second source
//! beside the mesh file.
//!
//! ```ignore
//! let mut source = discovery::kube::start_ordered(client, KubeOptions { kinds: Kinds::All, ..Default::default() });
//! let first = source.first().await; // the first whole mesh
//! let next = source.updates.recv().await; // then every update, in order
//! ```
//!
//! [`start_ordered`] watches (kube's `watcher`, list then watch, re-listing
//! after a disconnect or a `410 Gone`) every kind [`Kinds`] names: the
//! agent's and the waypoint's ([`Kinds::All`]) and the CA's
//! ([`Kinds::WorkloadsOnly`]: pods and namespaces, which identities run on
//! which node). Nothing is sent until every kind has been listed completely
//! once (a partial mesh is never published); then every update in order on a
//! channel, at most every [`COALESCE`], the first a whole mesh, then, when
//! only pods, EndpointSlices and namespaces' enrollment labels changed, just
//! the workloads and the services' endpoints that did ([`Update::Delta`]),
//! which they apply to their view at the cost of the change
//! (`View::with_delta`) instead of compiling the whole cluster again.
//!
//! - Pods → workloads (every pod of the cluster, as ztunnel does: any of them may
//!   be a peer), enrolled by label ([`labels`]); Namespaces → enrollment and
//!   waypoint bindings; Services with cluster IPs → services, their endpoints
//!   the ready pods of their EndpointSlices.
//! - HTTPRoute and GRPCRoute (`gateway.networking.k8s.io/v1`) with a Service
//!   parent; AuthorizationPolicy, PeerAuthentication, RequestAuthentication in
//!   `weft.dev/v1` and in Istio's `security.istio.io/v1`. A kind whose CRD is not
//!   installed counts as empty and is looked for again every minute.
//! - Each object is translated as it arrives and dropped ([`translate`]); the
//!   state keeps only the model's entries, per kind ([`state`]).
//! - An object that cannot be translated, or that model validation faults, is
//!   left out, logged once with its reason and counted in
//!   `weft_discovery_invalid_objects{kind}` ([`Source::invalid`]); the rest
//!   applies.
//!
//! Network namespaces are not the API's to know: in Kubernetes mode they reach
//! the node's registry from the CNI plugin and a scan of `/proc`.
//!
//! No API server can run where this is built and tested: the tests feed
//! `kubectl get -o yaml` fixtures (`testdata/`) through the same event path the
//! watches use.

pub mod labels;
mod run;
pub mod state;
pub mod translate;

#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

pub use state::{Change, Group, Invalid, Kinds, MAX_DELTA, Res, State, Update};

use crate::model::Mesh;

/// A new mesh is published at most this often: a burst of changes (a
/// deployment rolling, a node draining) is one rebuild, not hundreds.
pub const COALESCE: Duration = Duration::from_millis(100);

/// What a source watches and the settings its model carries.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    pub kinds: Kinds,
    pub trust_domain: String,
    /// Policies here apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
    /// Weft's own namespace, whose deletion [`OrderedSource::uninstalling`]
    /// reports.
    pub own_namespace: Option<String>,
}

impl Default for KubeOptions {
    fn default() -> Self {
        let mesh = Mesh::default();
        KubeOptions {
            kinds: Kinds::All,
            trust_domain: mesh.trust_domain,
            root_namespace: mesh.root_namespace,
            own_namespace: None,
        }
    }
}

/// A running ordered source: every update, in order.
pub struct OrderedSource {
    /// A whole mesh first (once synced), then an [`Update`] per change, at most
    /// every [`COALESCE`]. Each delta is relative to the update before it: a
    /// receiver must apply every one.
    pub updates: mpsc::Receiver<Update>,
    pub invalid: Arc<Invalid>,
    /// True while [`KubeOptions::own_namespace`] is being deleted (or is
    /// gone): Weft is being uninstalled.
    pub uninstalling: watch::Receiver<bool>,
}

impl OrderedSource {
    /// Waits for the first complete mesh; `None` if the source stopped first.
    pub async fn first(&mut self) -> Option<Arc<Mesh>> {
        tracing::info!("waiting for the first complete list from the Kubernetes API");
        loop {
            // The first update is always a whole mesh.
            if let Update::Mesh(m) = self.updates.recv().await? {
                return Some(m);
            }
        }
    }
}

/// [`start`], with deltas: see [`OrderedSource`].
pub fn start_ordered(client: kube::Client, opts: KubeOptions) -> OrderedSource {
    let state = State::new(opts.kinds, &opts.trust_domain, &opts.root_namespace).with_deltas();
    let invalid = state.counts.clone();
    // One update in flight: a receiver busy applying makes the publisher
    // wait, and the changes meanwhile coalesce into the next update.
    let (tx, updates) = mpsc::channel(1);
    let (changes, rx) = mpsc::channel(1024);
    run::spawn_all(&client, &opts.kinds.watched(), &changes);
    let (going_tx, uninstalling) = watch::channel(false);
    let going = opts.own_namespace.map(|namespace| run::Going {
        namespace,
        tx: going_tx,
    });
    tokio::spawn(run::publish(state, rx, tx, going));
    OrderedSource {
        updates,
        invalid,
        uninstalling,
    }
}
