//! Inbound connections in flight, with what policy decided them on: when a new
//! config arrives, each is checked again, and those the new policy denies are
//! closed (Istio's semantics: a policy change applies to live connections too).

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
    config::{PeerMode, WorkloadKey},
    identity::SpiffeId,
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
    /// Registers an authorized connection until the returned handle drops.
    pub fn register(&self, facts: Facts) -> Kill {
        let id = self.0.next.fetch_add(1, Relaxed);
        let signal = Arc::new(Signal::default());
        self.0.map.lock().unwrap_or_else(|e| e.into_inner()).insert(
            id,
            Entry {
                facts,
                kill: signal.clone(),
            },
        );
        Kill {
            id,
            signal,
            conns: self.0.clone(),
        }
    }

    /// Decides a new inbound connection on `facts` under `view`: a denial is
    /// counted in the metrics and its reason returned; an allowed connection is
    /// registered (see [`LiveConns::register`]).
    pub fn authorize(&self, facts: Facts, view: &View) -> Result<Kill, String> {
        if let Some((kind, reason)) = facts.denied_by(view) {
            crate::stats::STATS.policy_denied(&facts.workload.to_string(), kind);
            return Err(reason);
        }
        Ok(self.register(facts))
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
        let map = self.0.map.lock().unwrap_or_else(|e| e.into_inner());
        let mut closed = 0usize;
        for e in map.values() {
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
