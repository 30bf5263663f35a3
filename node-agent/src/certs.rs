//! The agent's certificate manager: one SVID per workload identity on this node.
//!
//! For each identity it is asked about (prefetched for enrolled workloads, or on
//! demand the first time a connection needs one) a task generates a fresh P-256 key,
//! sends only a CSR to the CA, and keeps the certificate. It renews at half life; if
//! the CA cannot be reached it retries with backoff (1 s doubling to 30 s, never
//! past the expiry) and keeps serving the old certificate until it expires. An
//! expired certificate is never served: the identity then has none until the CA
//! answers again, and connections that need it fail with a clear reason.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use crate::{identity::SpiffeId, tls::Svid};

/// What signs CSRs: the CA client (or, in-process, an authority).
pub trait Signer: Send + Sync + 'static {
    /// Asks for `id` to be signed; returns the chain as PEM, leaf first.
    fn sign(&self, csr_pem: String, id: SpiffeId, ttl: Duration) -> SignFuture;
}

pub type SignFuture = Pin<Box<dyn Future<Output = Result<Vec<String>, String>> + Send>>;

impl Signer for crate::ca::client::CaClient {
    fn sign(&self, csr_pem: String, id: SpiffeId, ttl: Duration) -> SignFuture {
        let client = self.clone();
        Box::pin(async move {
            client
                .sign(&csr_pem, &id, ttl)
                .await
                .map_err(|e| e.to_string())
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no certificate for {id} yet: {reason}")]
    Unavailable { id: String, reason: String },
}

/// The state of one identity's certificate.
#[derive(Debug, Clone, Default)]
pub struct State {
    pub svid: Option<Arc<Svid>>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// Attempts made so far (successful or not).
    pub attempts: u64,
}

struct Entry {
    state: watch::Receiver<State>,
    task: JoinHandle<()>,
}

/// Cheap to clone; every clone is the same manager.
#[derive(Clone)]
pub struct CertManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertManager")
    }
}

struct Inner {
    signer: Arc<dyn Signer>,
    ttl: Duration,
    entries: Mutex<HashMap<SpiffeId, Entry>>,
}

const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(30);

impl CertManager {
    /// `ttl` is what the manager asks for; the CA may cap it.
    pub fn new(signer: Arc<dyn Signer>, ttl: Duration) -> Self {
        CertManager {
            inner: Arc::new(Inner {
                signer,
                ttl,
                entries: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Starts keeping a certificate for `id` (no-op if already kept) and returns
    /// its state.
    pub fn ensure(&self, id: &SpiffeId) -> watch::Receiver<State> {
        let mut entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(id) {
            return e.state.clone();
        }
        let (tx, rx) = watch::channel(State::default());
        let task = tokio::spawn(maintain(
            self.inner.signer.clone(),
            id.clone(),
            self.inner.ttl,
            tx,
        ));
        entries.insert(
            id.clone(),
            Entry {
                state: rx.clone(),
                task,
            },
        );
        rx
    }

    /// Keeps certificates for exactly `ids`: starts the missing ones and drops the
    /// others (their keys are forgotten).
    pub fn retain(&self, ids: &[SpiffeId]) {
        for id in ids {
            self.ensure(id);
        }
        let mut entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|id, e| {
            let keep = ids.contains(id);
            if !keep {
                e.task.abort();
                info!(identity = %id, "certificate dropped: no workload here needs it");
            }
            keep
        });
    }

    /// The current, unexpired certificate for `id`, if there is one (no waiting).
    pub fn current(&self, id: &SpiffeId) -> Option<Arc<Svid>> {
        let entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        let svid = entries.get(id)?.state.borrow().svid.clone()?;
        (!svid.expired()).then_some(svid)
    }

    /// The certificate for `id`, fetching it first if need be. Waits at most
    /// `patience` for a first certificate; fails with the CA's reason.
    pub async fn get(&self, id: &SpiffeId, patience: Duration) -> Result<Arc<Svid>, Error> {
        let mut rx = self.ensure(id);
        let wait = async {
            loop {
                {
                    let s = rx.borrow_and_update();
                    if let Some(svid) = s.svid.as_ref().filter(|s| !s.expired()) {
                        return Ok(svid.clone());
                    }
                    if s.attempts > 0
                        && let Some(reason) = &s.last_error
                    {
                        return Err(reason.clone());
                    }
                }
                if rx.changed().await.is_err() {
                    return Err("certificate manager stopped".to_owned());
                }
            }
        };
        let reason = match tokio::time::timeout(patience, wait).await {
            Ok(Ok(svid)) => return Ok(svid),
            Ok(Err(reason)) => reason,
            Err(_) => "the CA did not answer in time".to_owned(),
        };
        Err(Error::Unavailable {
            id: id.to_string(),
            reason,
        })
    }

    /// Waits until every kept identity has a certificate, or its first request
    /// failed, or `patience` runs out; returns the identities still without one.
    pub async fn settle(&self, patience: Duration) -> Vec<SpiffeId> {
        let rxs: Vec<(SpiffeId, watch::Receiver<State>)> = {
            let entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries
                .iter()
                .map(|(id, e)| (id.clone(), e.state.clone()))
                .collect()
        };
        let mut missing = Vec::new();
        let deadline = tokio::time::Instant::now() + patience;
        for (id, mut rx) in rxs {
            let settled = tokio::time::timeout_at(
                deadline,
                rx.wait_for(|s| s.svid.is_some() || s.attempts > 0),
            )
            .await;
            if !matches!(settled, Ok(Ok(s)) if s.svid.is_some()) {
                missing.push(id);
            }
        }
        missing
    }

    /// Prometheus text for the certificates kept: expiry (seconds since the epoch),
    /// whether the last request failed, and requests made.
    pub fn render_metrics(&self) -> String {
        use crate::metrics::label;
        let mut out = String::from(
            "# HELP weft_certificate_expiry_timestamp_seconds When the workload certificate in use expires (0: none).\n\
             # TYPE weft_certificate_expiry_timestamp_seconds gauge\n",
        );
        let snap = self.snapshot();
        for (id, s) in &snap {
            let expiry = s
                .svid
                .as_ref()
                .and_then(|c| c.not_after.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_secs());
            out.push_str(&format!(
                "weft_certificate_expiry_timestamp_seconds{{identity=\"{}\"}} {expiry}\n",
                label(&id.to_string())
            ));
        }
        out.push_str(
            "# HELP weft_certificate_last_request_failed 1 if the last request to the CA for this identity failed.\n\
             # TYPE weft_certificate_last_request_failed gauge\n",
        );
        for (id, s) in &snap {
            out.push_str(&format!(
                "weft_certificate_last_request_failed{{identity=\"{}\"}} {}\n",
                label(&id.to_string()),
                u8::from(s.last_error.is_some())
            ));
        }
        out.push_str(
            "# HELP weft_certificate_requests_total Requests made to the CA, by identity.\n\
             # TYPE weft_certificate_requests_total counter\n",
        );
        for (id, s) in &snap {
            out.push_str(&format!(
                "weft_certificate_requests_total{{identity=\"{}\"}} {}\n",
                label(&id.to_string()),
                s.attempts
            ));
        }
        out
    }

    /// Every identity kept, with its certificate if any (for metrics and status).
    pub fn snapshot(&self) -> Vec<(SpiffeId, State)> {
        let entries = self.inner.entries.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = entries
            .iter()
            .map(|(id, e)| (id.clone(), e.state.borrow().clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let entries = self.entries.get_mut().unwrap_or_else(|e| e.into_inner());
        for e in entries.values() {
            e.task.abort();
        }
    }
}

/// Fetches, renews and retries for one identity, for as long as it is kept.
async fn maintain(signer: Arc<dyn Signer>, id: SpiffeId, ttl: Duration, tx: watch::Sender<State>) {
    let mut retry = FIRST_RETRY;
    loop {
        let result = fetch(&*signer, &id, ttl).await;
        let now = SystemTime::now();
        let sleep = match result {
            Ok(svid) => {
                info!(
                    identity = %id,
                    serial = %svid.serial,
                    expires_in_s = svid.not_after.duration_since(now).unwrap_or_default().as_secs(),
                    "certificate issued"
                );
                let renew_in = svid.renew_after(now);
                tx.send_modify(|s| {
                    s.svid = Some(Arc::new(svid));
                    s.last_error = None;
                    s.attempts += 1;
                });
                retry = FIRST_RETRY;
                renew_in
            }
            Err(reason) => {
                let expiry = tx.borrow().svid.as_ref().map(|s| s.not_after);
                let left = expiry.and_then(|t| t.duration_since(now).ok());
                warn!(
                    identity = %id,
                    error = %reason,
                    retry_in_ms = retry.as_millis() as u64,
                    current_expires_in_s = left.map(|d| d.as_secs()),
                    "certificate request failed; keeping the current certificate until it expires"
                );
                tx.send_modify(|s| {
                    if s.svid.as_ref().is_some_and(|c| c.expired()) {
                        s.svid = None;
                    }
                    s.last_error = Some(reason);
                    s.attempts += 1;
                });
                let wait = match left {
                    // Retry no later than the moment the current one expires.
                    Some(left) if !left.is_zero() => retry.min(left),
                    _ => retry,
                };
                retry = (retry * 2).min(MAX_RETRY);
                wait
            }
        };
        tokio::time::sleep(sleep).await;
        // Expired while we slept (renewals kept failing): stop serving it.
        tx.send_if_modified(|s| {
            if s.svid.as_ref().is_some_and(|c| c.expired()) {
                s.svid = None;
                true
            } else {
                false
            }
        });
    }
}

async fn fetch(signer: &dyn Signer, id: &SpiffeId, ttl: Duration) -> Result<Svid, String> {
    let (key_pem, csr_pem) = crate::ca::new_key_and_csr(id).map_err(|e| e.to_string())?;
    let chain = signer.sign(csr_pem, id.clone(), ttl).await?;
    let svid = Svid::from_pem(&chain, &key_pem).map_err(|e| format!("bad certificate: {e}"))?;
    if &svid.id != id {
        return Err(format!("the CA signed {} instead", svid.id));
    }
    Ok(svid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Authority;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

    /// A real authority, signing in-process; can be switched off like a CA going
    /// down.
    struct Local {
        ca: Authority,
        up: AtomicBool,
        calls: AtomicUsize,
    }

    impl Signer for Arc<Local> {
        fn sign(&self, csr: String, id: SpiffeId, ttl: Duration) -> SignFuture {
            let me = self.clone();
            Box::pin(async move {
                me.calls.fetch_add(1, SeqCst);
                if !me.up.load(SeqCst) {
                    return Err("connection refused".into());
                }
                me.ca.sign(&csr, &id, ttl).map_err(|e| e.to_string())
            })
        }
    }

    fn local() -> Arc<Local> {
        Arc::new(Local {
            ca: Authority::generate("cluster.local", Duration::from_secs(86_400)).unwrap(),
            up: AtomicBool::new(true),
            calls: AtomicUsize::new(0),
        })
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[tokio::test]
    async fn fetches_on_demand_and_caches() {
        let ca = local();
        let m = CertManager::new(Arc::new(ca.clone()), Duration::from_secs(3600));
        let a = m.get(&id("a"), Duration::from_secs(5)).await.unwrap();
        assert_eq!(a.id, id("a"));
        let again = m.get(&id("a"), Duration::from_secs(5)).await.unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(ca.calls.load(SeqCst), 1);
        assert!(m.current(&id("a")).is_some());
        assert!(m.current(&id("b")).is_none());
    }

    #[tokio::test]
    async fn renews_at_half_life_and_keeps_the_old_one_while_the_ca_is_down() {
        let ca = local();
        // 4 s of life: renewal ~2 s from now.
        let m = CertManager::new(Arc::new(ca.clone()), Duration::from_secs(4));
        let first = m.get(&id("a"), Duration::from_secs(5)).await.unwrap();
        let mut rx = m.ensure(&id("a"));
        // Renewal happens by itself.
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                rx.changed().await.unwrap();
                if let Some(s) = &rx.borrow().svid
                    && s.serial != first.serial
                {
                    return;
                }
            }
        })
        .await
        .expect("renewed");
        let second = m.current(&id("a")).unwrap();
        // The CA goes down: the current certificate keeps being served while the
        // renewals fail, then it expires and is withdrawn.
        ca.up.store(false, SeqCst);
        let calls = ca.calls.load(SeqCst);
        tokio::time::timeout(Duration::from_secs(10), async {
            while ca.calls.load(SeqCst) == calls {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a renewal was attempted");
        tokio::time::sleep(Duration::from_millis(100)).await;
        if !second.expired() {
            assert_eq!(m.current(&id("a")).unwrap().serial, second.serial);
        }
        assert!(m.snapshot()[0].1.last_error.is_some());
        tokio::time::timeout(Duration::from_secs(15), async {
            while m.current(&id("a")).is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .expect("expired certificate withdrawn");
        let e = m.get(&id("a"), Duration::from_secs(3)).await.unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
    }

    #[tokio::test]
    async fn a_refusal_is_reported_not_waited_out() {
        let ca = local();
        ca.up.store(false, SeqCst);
        let m = CertManager::new(Arc::new(ca.clone()), Duration::from_secs(3600));
        let e = m.get(&id("a"), Duration::from_secs(30)).await.unwrap_err();
        assert!(e.to_string().contains("connection refused"), "{e}");
    }
}
