//! The node agent's set of enrolled pods, reconciled against the config.
//!
//! Enrolling opens the pod's listeners first and only then switches capture on, so
//! a captured connect never finds no listener. Unenrolling switches capture off
//! first, then closes the listeners; connections already proxied run to their end.
//! A pod that cannot be enrolled (its namespace not there yet, say) is logged and
//! retried on the next reconcile, without holding up the others.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    config::{MeshConfig, WorkloadKey},
    ebpf::Capture,
    hbone::server::HboneListener,
    identity::SpiffeId,
    netns::Netns,
    proxy::{self, Shared, admit::Served, inbound::InboundListener, outbound::OutboundListener},
};

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

struct Enrolled {
    netns_path: PathBuf,
    identity: SpiffeId,
    cookie: u64,
    stop: watch::Sender<bool>,
}

pub struct Agent {
    node: String,
    capture: Capture,
    shared: Arc<Shared>,
    pods: BTreeMap<WorkloadKey, Enrolled>,
    /// Workloads that should be enrolled but are not yet (last attempt failed).
    pending: BTreeSet<WorkloadKey>,
}

impl Agent {
    pub fn new(node: String, capture: Capture, shared: Arc<Shared>) -> Self {
        Agent {
            node,
            capture,
            shared,
            pods: BTreeMap::new(),
            pending: BTreeSet::new(),
        }
    }

    /// Whether some enrollment failed and should be tried again.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn enrolled(&self) -> impl Iterator<Item = &WorkloadKey> {
        self.pods.keys()
    }

    /// Entries per eBPF map, into the metrics.
    pub fn count_map_entries(&self) {
        crate::stats::STATS.set_map_entries(&self.capture.map_entries());
    }

    /// The enrolled pods and their namespace cookies.
    pub fn enrolled_pods(&self) -> BTreeMap<WorkloadKey, u64> {
        self.pods
            .iter()
            .map(|(k, e)| (k.clone(), e.cookie))
            .collect()
    }

    /// Brings the enrolled set in line with `config`.
    pub fn apply(&mut self, config: &MeshConfig) {
        self.shared.set_view(config.clone());
        let desired: BTreeMap<WorkloadKey, (PathBuf, SpiffeId)> = config
            .enrolled_on(&self.node)
            .filter_map(|w| {
                let id = w.identity(&config.trust_domain).ok()?;
                Some((w.key(), (w.netns.clone()?, id)))
            })
            .collect();
        // Certificates: exactly the identities of this node's enrolled pods, fetched
        // ahead of their first connection.
        let mut ids: Vec<SpiffeId> = desired.values().map(|(_, id)| id.clone()).collect();
        ids.sort();
        ids.dedup();
        self.shared.certs.retain(&ids);

        let gone: Vec<WorkloadKey> = self
            .pods
            .iter()
            .filter(|(k, e)| {
                desired.get(*k).map(|(p, id)| (p, id)) != Some((&e.netns_path, &e.identity))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            self.remove(&key);
        }

        self.pending.clear();
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
                    self.pending.insert(key);
                }
            }
        }
        self.forget_stale();
    }

    fn add(&mut self, key: &WorkloadKey, path: &Path, identity: SpiffeId) -> Result<u64, Error> {
        let netns = Netns::open(path).map_err(|source| Error::Netns {
            path: path.to_owned(),
            source,
        })?;
        let cookie = netns.cookie();
        let pod = Arc::new(proxy::Pod {
            workload: key.clone(),
            identity: identity.clone(),
            netns,
        });
        let listen_err = |source| Error::Listen {
            path: path.to_owned(),
            source,
        };
        let addresses = pod.netns.addresses().map_err(|source| Error::Netns {
            path: path.to_owned(),
            source,
        })?;
        let outbound =
            OutboundListener::new(pod.clone(), self.capture.orig_dst(), self.shared.clone())
                .map_err(listen_err)?;
        let inbound = InboundListener::new(pod.clone(), self.shared.clone()).map_err(listen_err)?;
        let served = Arc::new(Served::new(pod.clone(), &addresses));
        let hbone = HboneListener::new(served.clone(), self.shared.clone()).map_err(listen_err)?;
        self.capture
            .enroll(&pod.netns, &addresses, inbound.socket())?;

        let (stop, stopped) = watch::channel(false);
        // The accept loops run on the workers, which serve what they accept.
        crate::workers::spawn_listener(outbound.run(stopped.clone()));
        crate::workers::spawn_listener(hbone.run(stopped.clone()));
        crate::workers::spawn_listener(inbound.run(stopped));
        self.shared.serve(served);
        self.pods.insert(
            key.clone(),
            Enrolled {
                netns_path: path.to_owned(),
                identity,
                cookie,
                stop,
            },
        );
        Ok(cookie)
    }

    fn remove(&mut self, key: &WorkloadKey) {
        let Some(e) = self.pods.remove(key) else {
            return;
        };
        self.shared.unserve(Some(key));
        if let Err(err) = self.capture.unenroll(e.cookie) {
            error!(workload = %key, error = %err, "cannot unenroll pod in the kernel");
        }
        let _ = e.stop.send(true);
        info!(workload = %key, "pod unenrolled");
    }

    /// Drops kernel state for namespaces this agent no longer serves: what a
    /// previous run enrolled for pods that have since left the config.
    fn forget_stale(&mut self) {
        let ours: BTreeSet<u64> = self.pods.values().map(|e| e.cookie).collect();
        let mut stale: BTreeSet<u64> = self.capture.enrolled_cookies().into_iter().collect();
        stale.extend(self.capture.pinned_lookup_cookies());
        for cookie in stale.difference(&ours) {
            match self.capture.unenroll(*cookie) {
                Ok(()) => info!(
                    netns_cookie = cookie,
                    "removed capture of a namespace no longer enrolled"
                ),
                Err(e) => warn!(netns_cookie = cookie, error = %e, "cannot remove stale capture"),
            }
        }
    }

    /// Stops every listener. Capture stays attached and pinned: enrolled pods fail
    /// closed until an agent serves them again.
    pub fn shutdown(&mut self) {
        self.shared.unserve(None);
        for (_, e) in std::mem::take(&mut self.pods) {
            let _ = e.stop.send(true);
        }
    }
}
