//! The pods this agent serves, reconciled with the model and the node's registry.
//!
//! Enrolling opens the pod's listeners first and only then switches capture on, so
//! a captured connect never finds no listener. Unenrolling switches capture off
//! first, then closes the listeners; connections already proxied run to their end.
//! A pod that cannot be enrolled (its namespace not there yet, say) is logged and
//! retried, without holding up the others.
//!
//! Unenrolling is an explicit act: the model must say the workload is not
//! enrolled (`enrolled: false`), or place it on another node. A pod whose
//! workload merely *vanishes* from the model while its network namespace lives
//! on is not let go: dropping its capture would send its traffic around the mesh
//! in plaintext. It stays captured, and every connection to or from it is
//! refused ("no longer in the config"), until the model speaks of it again or
//! its namespace is gone. Either way it is logged.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use tracing::{error, info, warn};

use super::{
    InboundSource, Pod, Shared, hbone_in::HboneListener, inbound::InboundListener,
    outbound::OutboundListener, registry::Registry,
};
use crate::{ebpf::Capture, identity::SpiffeId, model::WorkloadKey, net::Netns, view::View};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open network namespace {path}: {source}")]
    Netns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open listeners in {path}: {source}")]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Ebpf(#[from] crate::ebpf::Error),
}

/// The least time after start before handover entries found then count as a
/// dead agent's (see [`Pods::clear_stale_handovers`]).
const STALE_HANDOVER_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

pub struct Pods {
    node: String,
    capture: Capture,
    shared: Arc<Shared>,
    pods: BTreeMap<WorkloadKey, Arc<Pod>>,
    /// Enrolled pods whose workload left the model while their namespace lives
    /// on: kept captured, their connections refused (see the module's doc).
    orphans: BTreeSet<WorkloadKey>,
    /// Workloads that should be enrolled but are not yet (last attempt failed,
    /// or their namespace is not known yet).
    pending: BTreeSet<WorkloadKey>,
    /// Namespaces a previous run enrolled that the config no longer names but
    /// that live on: kept captured (warned about once).
    kept: BTreeSet<u64>,
    /// Why the last attempt to enroll a pending workload failed: what the CNI
    /// plugin reports to the runtime.
    failures: BTreeMap<WorkloadKey, String>,
}

impl Pods {
    pub fn new(node: String, capture: Capture, shared: Arc<Shared>) -> Self {
        shared.set_handover(capture.handover());
        Pods {
            node,
            capture,
            shared,
            pods: BTreeMap::new(),
            orphans: BTreeSet::new(),
            pending: BTreeSet::new(),
            kept: BTreeSet::new(),
            failures: BTreeMap::new(),
        }
    }

    /// Whether something waits for a later look: an enrollment to retry, or an
    /// orphan whose namespace may go ([`Pods::revisit`]).
    pub fn needs_revisit(&self) -> bool {
        !self.pending.is_empty() || !self.orphans.is_empty()
    }

    pub fn enrolled(&self) -> impl Iterator<Item = &WorkloadKey> {
        self.pods.keys()
    }

    /// The network namespace `pod` is enrolled in, if it is.
    pub fn netns_of(&self, pod: &WorkloadKey) -> Option<&Netns> {
        self.pods.get(pod).map(|p| &p.netns)
    }

    /// Why `pod` could not be enrolled at the last attempt, if it could not.
    pub fn failure(&self, pod: &WorkloadKey) -> Option<&str> {
        self.failures.get(pod).map(String::as_str)
    }

    /// Unenrolls `pod` whatever the model says: the container runtime has
    /// deleted its sandbox (a CNI DEL), so what the model still says of it is
    /// about to change. Applying the model again enrolls it anew where its
    /// namespace is known.
    pub fn release(&mut self, pod: &WorkloadKey, why: &str) {
        self.remove(pod, why);
    }

    /// Entries per eBPF map, into the metrics.
    pub fn count_map_entries(&self) {
        crate::stats::STATS.set_map_entries(&self.capture.map_entries());
    }

    /// Strikes off the kernel's handover entries that were there when this
    /// agent started and still are, long after any `connect` of a
    /// predecessor would have ended: a dead agent's leftovers.
    pub fn clear_stale_handovers(&mut self) {
        let after = (self.shared.settings.connect_timeout * 2).max(STALE_HANDOVER_AFTER);
        self.capture.clear_stale_handovers(after);
    }

    /// The enrolled pods and their namespace cookies.
    pub fn enrolled_pods(&self) -> BTreeMap<WorkloadKey, u64> {
        self.pods
            .iter()
            .map(|(k, p)| (k.clone(), p.netns.cookie()))
            .collect()
    }

    /// Brings the enrolled set in line with `view` (already in force) and
    /// `registry`.
    pub fn apply(&mut self, view: &View, registry: &Registry) {
        let mut desired: BTreeMap<WorkloadKey, (PathBuf, SpiffeId)> = BTreeMap::new();
        self.pending.clear();
        self.failures.clear();
        // The view indexes its node's workloads: this walks a few dozen pods,
        // not the cluster, so it runs on every change of the model.
        for w in view.enrolled_here() {
            let Ok(id) = w.identity(view.trust_domain()) else {
                continue;
            };
            match registry.netns(&w.key()) {
                Some(path) => {
                    desired.insert(w.key(), (path.to_owned(), id));
                }
                None => {
                    warn!(workload = %w.key(), "cannot enroll pod: its network namespace is not known yet; will retry");
                    self.pending.insert(w.key());
                }
            }
        }
        // Certificates: exactly the identities of this node's enrolled pods, fetched
        // ahead of their first connection.
        let mut ids: Vec<SpiffeId> = desired.values().map(|(_, id)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        self.shared.certs.retain(&ids);

        let current: Vec<WorkloadKey> = self.pods.keys().cloned().collect();
        for key in current {
            let pod = &self.pods[&key];
            if let Some((path, id)) = desired.get(&key) {
                if pod.netns.path() == path && pod.identity == *id {
                    if self.orphans.remove(&key) {
                        info!(workload = %key, "pod is back in the config; serving it again");
                    }
                    continue;
                }
                self.remove(
                    &key,
                    "its namespace or identity changed; enrolling it again",
                );
                continue;
            }
            match view.workload(&key) {
                Some(w) if !w.enrolled => {
                    self.remove(&key, "the config says `enrolled: false`");
                }
                Some(w) if w.node != self.node => {
                    let why = format!("the config places it on node {}", w.node);
                    self.remove(&key, &why);
                }
                _ if !pod.netns.still_at_path() => {
                    self.remove(&key, "its network namespace is gone");
                }
                _ => {
                    if self.orphans.insert(key.clone()) {
                        warn!(
                            workload = %key,
                            netns = %pod.netns.path().display(),
                            "an enrolled pod left the config while its network namespace lives on: it stays captured and its connections are refused until the config says `enrolled: false` or the pod is gone"
                        );
                    }
                }
            }
        }

        for (key, (path, identity)) in desired {
            if self.pods.contains_key(&key) {
                continue;
            }
            match self.add(&key, &path, identity) {
                Ok(cookie) => {
                    info!(workload = %key, netns = %path.display(), netns_cookie = cookie, "pod enrolled")
                }
                Err(e) => {
                    error!(workload = %key, error = %e, "cannot enroll pod; will retry");
                    self.failures.insert(key.clone(), e.to_string());
                    self.pending.insert(key);
                }
            }
        }
        self.forget_stale(view, registry);
    }

    /// Looks again at what [`Pods::needs_revisit`] waits for: retries pending
    /// enrollments, lets go of orphans whose namespace is gone.
    pub fn revisit(&mut self, view: &View, registry: &Registry) {
        let gone: Vec<WorkloadKey> = self
            .orphans
            .iter()
            .filter(|k| self.pods.get(*k).is_none_or(|p| !p.netns.still_at_path()))
            .cloned()
            .collect();
        for key in gone {
            self.remove(&key, "its network namespace is gone");
        }
        if !self.pending.is_empty() {
            self.apply(view, registry);
        }
    }

    fn add(&mut self, key: &WorkloadKey, path: &Path, identity: SpiffeId) -> Result<u64, Error> {
        let netns = Netns::open(path).map_err(|source| Error::Netns {
            path: path.to_owned(),
            source,
        })?;
        let cookie = netns.cookie();
        let addresses = netns.addresses().map_err(|source| Error::Netns {
            path: path.to_owned(),
            source,
        })?;
        if let Err(e) = crate::net::route::migrate_requests(&netns) {
            warn!(workload = %key, error = %e, "cannot set tcp_migrate_req in this pod: when this agent stops beside its successor, the connections it has not accepted yet are reset");
        }
        let handover = self.shared.settings.inbound_source == InboundSource::Client
            && match crate::net::route::prepare_handover(&netns) {
                Ok(()) => true,
                Err(e) => {
                    warn!(workload = %key, error = %e, "cannot route handovers in this pod: its applications see connections from 127.0.0.6");
                    false
                }
            };
        let pod = Arc::new(Pod::new(key.clone(), identity, netns, &addresses, handover));
        let listen_err = |source| Error::Listen {
            path: path.to_owned(),
            source,
        };
        let outbound =
            OutboundListener::new(pod.clone(), self.capture.orig_dst(), self.shared.clone())
                .map_err(listen_err)?;
        let inbound = InboundListener::new(pod.clone(), self.shared.clone()).map_err(listen_err)?;
        let hbone = HboneListener::new(pod.clone(), self.shared.clone()).map_err(listen_err)?;
        self.capture
            .enroll(&pod.netns, &addresses, inbound.socket())?;

        // The accept loops run on the workers, which serve what they accept.
        crate::workers::spawn_listener(outbound.run());
        crate::workers::spawn_listener(hbone.run());
        crate::workers::spawn_listener(inbound.run());
        self.shared.serve(pod.clone());
        self.pods.insert(key.clone(), pod);
        Ok(cookie)
    }

    fn remove(&mut self, key: &WorkloadKey, why: &str) {
        self.orphans.remove(key);
        let Some(pod) = self.pods.remove(key) else {
            return;
        };
        self.shared.unserve(Some(key));
        if let Err(err) = self.capture.unenroll(pod.netns.cookie()) {
            error!(workload = %key, error = %err, "cannot unenroll pod in the kernel");
        }
        pod.stop();
        warn!(workload = %key, reason = why, "pod unenrolled");
    }

    /// Deals with kernel state a previous run left for namespaces this agent
    /// does not serve (pods that left the config while it was away). As for a
    /// pod that leaves the config while the agent runs, leaving the config is
    /// not unenrolling: a namespace that still lives stays captured, its
    /// connections refused, until the config says `enrolled: false` for it (or
    /// `weft agent --uninstall`); capture of a namespace that is gone is removed.
    fn forget_stale(&mut self, view: &View, registry: &Registry) {
        let ours: BTreeSet<u64> = self.pods.values().map(|p| p.netns.cookie()).collect();
        let mut stale: BTreeSet<u64> = self.capture.enrolled_cookies().into_iter().collect();
        stale.extend(self.capture.pinned_lookup_cookies());
        let stale: BTreeSet<u64> = stale.difference(&ours).copied().collect();
        if stale.is_empty() {
            return;
        }
        // The namespaces the config explicitly unenrolls.
        let released: BTreeSet<u64> = view
            .local()
            .filter(|w| !w.enrolled)
            .filter_map(|w| Netns::open(registry.netns(&w.key())?).ok())
            .map(|netns| netns.cookie())
            .collect();
        for cookie in stale {
            let alive = self.capture.captured_namespace_lives(cookie);
            if alive && !released.contains(&cookie) {
                if self.kept.insert(cookie) {
                    warn!(
                        netns_cookie = cookie,
                        "a namespace a previous run enrolled is not in the config but lives on: it stays captured and its connections are refused until the config says `enrolled: false` for it (or `weft agent --uninstall`)"
                    );
                }
                continue;
            }
            self.kept.remove(&cookie);
            match self.capture.unenroll(cookie) {
                Ok(()) if alive => info!(
                    netns_cookie = cookie,
                    "capture removed: the config says `enrolled: false`"
                ),
                Ok(()) => info!(
                    netns_cookie = cookie,
                    "removed capture of a namespace that is gone"
                ),
                Err(e) => warn!(netns_cookie = cookie, error = %e, "cannot remove stale capture"),
            }
        }
    }

    /// Stops every listener. Capture stays attached and pinned: enrolled pods fail
    /// closed until an agent serves them again.
    pub fn shutdown(&mut self) {
        self.shared.unserve(None);
        for (_, pod) in std::mem::take(&mut self.pods) {
            pod.stop();
        }
    }
}
