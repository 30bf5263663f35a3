//! Inbound connections in flight, with what policy decided them on: when a new
//! config arrives, each is checked again, and those the new policy denies are
//! closed (Istio's semantics: a policy change applies to live connections too).
//!
//! No connection slips between a decision and a change: [`LiveConns::authorize`]
//! reads the view in force *under the registry's lock* and registers the
//! connection before letting go of it, and a new view is installed before the
//! re-check takes that lock. So a connection decided on the old view is in the
//! registry when the re-check walks it, and one decided after the swap was
//! decided on the new view.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

use tokio::sync::Notify;
use tracing::info;

use crate::{
    authz::{Conn, Decision},
    identity::SpiffeId,
    model::{PeerMode, WorkloadKey},
    view::View,
};

/// What a connection was authorized on.
#[derive(Debug, Clone)]
pub struct Facts {
    pub workload: WorkloadKey,
    /// The peer's identity (mutual TLS), or `None` for plaintext.
    pub src_identity: Option<SpiffeId>,
    pub src_ip: IpAddr,
    pub dst_port: u16,
}

impl Facts {
    /// The decision `view` makes on these facts; `None` for an allowed connection,
    /// else what refused it (`peer_authentication` or `authorization_policy`) and
    /// why. A workload gone from the config is left to unenrollment.
    pub fn denied_by(&self, view: &View) -> Option<(&'static str, String)> {
        let w = view.workload(&self.workload)?;
        if self.src_identity.is_none() && view.authz.peer_mode(w) == PeerMode::Strict {
            return Some((
                "peer_authentication",
                "plaintext refused: peer authentication is STRICT".into(),
            ));
        }
        match view.authz.check(
            w,
            &Conn {
                src_identity: self.src_identity.as_ref(),
                src_ip: self.src_ip,
                dst_port: self.dst_port,
            },
        ) {
            Decision::Allow => None,
            Decision::Deny { reason, .. } => Some(("authorization_policy", reason)),
        }
    }
}

struct Entry {
    facts: Facts,
    kill: Arc<Signal>,
}

#[derive(Default)]
struct Signal {
    notify: Notify,
    reason: Mutex<Option<String>>,
}

/// Tells a connection's copy loop to stop.
pub struct Kill {
    id: u64,
    signal: Arc<Signal>,
    conns: Arc<Inner>,
}

impl Kill {
    /// Completes when policy closes the connection, with the reason.
    pub async fn killed(&self) -> String {
        self.signal.notify.notified().await;
        self.signal
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_default()
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        self.conns
            .map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

#[derive(Default)]
struct Inner {
    next: AtomicU64,
    map: Mutex<HashMap<u64, Entry>>,
}

#[derive(Default)]
pub struct LiveConns(Arc<Inner>);

impl LiveConns {
    /// Decides a new inbound connection on `facts` under the view `current`
    /// returns (read while the registry is locked, see the module's doc): a
    /// denial is counted in the metrics and its reason returned; an allowed
    /// connection is registered until the returned handle drops.
    pub fn authorize(
        &self,
        facts: Facts,
        current: impl FnOnce() -> Arc<View>,
    ) -> Result<Kill, String> {
        let mut map = self.0.map.lock().unwrap_or_else(|e| e.into_inner());
        let view = current();
        if let Some((kind, reason)) = facts.denied_by(&view) {
            drop(map);
            crate::stats::STATS.policy_denied(&facts.workload.to_string(), kind);
            return Err(reason);
        }
        let id = self.0.next.fetch_add(1, Relaxed);
        let signal = Arc::new(Signal::default());
        map.insert(
            id,
            Entry {
                facts,
                kill: signal.clone(),
            },
        );
        Ok(Kill {
            id,
            signal,
            conns: self.0.clone(),
        })
    }

    /// How many inbound connections are registered.
    pub fn len(&self) -> usize {
        self.0.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Checks every connection against `view`; closes the ones it denies.
    pub fn recheck(&self, view: &View) {
        self.recheck_to(view, |_| true);
    }

    /// [`LiveConns::recheck`], for the connections to workloads `to` picks
    /// (those a change of workloads alone can affect: the policies are the
    /// same, and only a destination's labels choose among them).
    pub fn recheck_to(&self, view: &View, to: impl Fn(&WorkloadKey) -> bool) {
        let map = self.0.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0usize;
        for e in map.values().filter(|e| to(&e.facts.workload)) {
            if let Some((_, reason)) = e.facts.denied_by(view) {
                *e.kill.reason.lock().unwrap_or_else(|e| e.into_inner()) =
                    Some(format!("closed by a policy change: {reason}"));
                // A stored permit: the copy loop sees it even if not waiting yet.
                e.kill.notify.notify_one();
                closed += 1;
            }
        }
        if closed > 0 {
            info!(
                closed,
                checked = map.len(),
                "policy change: closed connections it denies"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        path::Path,
        sync::{Barrier, RwLock},
        time::Duration,
    };

    use super::*;
    use crate::view::{Balancers, View};

    fn view(policies: &str) -> Arc<View> {
        let mesh = crate::discovery::file::parse(
            Path::new("t.yaml"),
            &format!("workloads:\n- {{name: web, node: n0, addresses: [10.0.0.2]}}\n{policies}"),
        )
        .unwrap()
        .mesh;
        Arc::new(View::new(mesh, "n0", &Balancers::default()))
    }

    /// The race a policy change must not lose: a connection is decided on the
    /// view in force, and a new view (that denies it) is installed and
    /// re-checked between that decision and the connection's registration. The
    /// re-check must still close it.
    #[test]
    fn a_connection_decided_just_before_a_policy_change_is_rechecked_against_it() {
        let live = Arc::new(LiveConns::default());
        let old = view("");
        let denying =
            view("authorization_policies:\n- {name: deny-all, action: DENY, rules: [{}]}\n");
        let current = Arc::new(RwLock::new(old.clone()));
        let swap = Arc::new(Barrier::new(2));
        let changer = {
            let (live, current, swap, denying) =
                (live.clone(), current.clone(), swap.clone(), denying.clone());
            std::thread::spawn(move || {
                swap.wait();
                // The agent's `set_view`: install, then re-check.
                *current.write().unwrap() = denying.clone();
                live.recheck(&denying);
            })
        };
        let facts = Facts {
            workload: WorkloadKey {
                namespace: "default".into(),
                name: "web".into(),
            },
            src_identity: None,
            src_ip: "10.9.9.9".parse().unwrap(),
            dst_port: 80,
        };
        let kill = live
            .authorize(facts, || {
                // The view is read; the change happens right after, before the
                // registration.
                let read = current.read().unwrap().clone();
                swap.wait();
                std::thread::sleep(Duration::from_millis(50));
                read
            })
            .expect("allowed by the view it was decided on");
        changer.join().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let reason = runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), kill.killed()).await });
        assert!(
            reason.as_deref().is_ok_and(|r| r.contains("deny-all")),
            "the new policy never closed it: {reason:?}"
        );
    }
}
