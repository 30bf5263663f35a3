//! The watches and the publisher: one task per watched kind turns its watch
//! stream into translated [`Change`]s; one task applies them to the [`State`]
//! and publishes a new mesh at most every [`super::COALESCE`].

use std::{fmt::Debug, time::Duration};

use futures_util::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    core::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::watcher,
};
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use super::{
    COALESCE,
    state::{Change, Res, State, Update, change},
    translate::{self, Entry},
};

/// After a failed watch, the first retry waits this long, doubling up to
/// [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A kind whose CRD is not installed is looked for again this often.
const ABSENT_RETRY: Duration = Duration::from_secs(60);

pub(super) fn spawn_all(client: &Client, kinds: &[Res], tx: &mpsc::Sender<(Res, Change)>) {
    for &res in kinds {
        let tx = tx.clone();
        match res {
            Res::Namespace => spawn(
                vec![(Api::<Namespace>::all(client.clone()), res.api_version())],
                res,
                translate::namespace,
                tx,
            ),
            Res::Pod => spawn(
                vec![(Api::<Pod>::all(client.clone()), res.api_version())],
                res,
                translate::pod,
                tx,
            ),
            Res::Service => spawn(
                vec![(Api::<Service>::all(client.clone()), res.api_version())],
                res,
                translate::service,
                tx,
            ),
            Res::EndpointSlice => spawn(
                vec![(Api::<EndpointSlice>::all(client.clone()), res.api_version())],
                res,
                translate::endpoint_slice,
                tx,
            ),
            _ => {
                // The version read, then the older one a CRD may serve alone
                // (Istio's before 1.22): a 404 at one is no "none" until every
                // one has said it.
                let (group, version) = res.api_version().split_once('/').unwrap_or(("", "v1"));
                let apis = std::iter::once((version, res.api_version()))
                    .chain(res.older_version())
                    .map(|(version, label)| {
                        let gvk = GroupVersionKind::gvk(group, version, res.kind());
                        let ar = ApiResource::from_gvk_with_plural(&gvk, res.plural());
                        (Api::<DynamicObject>::all_with(client.clone(), &ar), label)
                    })
                    .collect();
                let translate: fn(&DynamicObject) -> Entry = match res {
                    Res::HttpRoute => translate::http_route,
                    Res::GrpcRoute => translate::grpc_route,
                    Res::AuthorizationPolicy(_) => translate::authorization_policy,
                    Res::PeerAuthentication(_) => translate::peer_authentication,
                    _ => translate::request_authentication,
                };
                spawn(apis, res, translate, tx);
            }
        }
    }
}

/// Watches `res` at the first of `apis` (each with its `group/version`)
/// that the API serves, in order, translating every event.
fn spawn<K>(
    apis: Vec<(Api<K>, &'static str)>,
    res: Res,
    translate: fn(&K) -> Entry,
    tx: mpsc::Sender<(Res, Change)>,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
{
    tokio::spawn(async move {
        let mut at = 0;
        let open = |at: usize| Box::pin(watcher(apis[at].0.clone(), watcher::Config::default()));
        let mut stream = open(at);
        let mut backoff = MIN_BACKOFF;
        // Absent at every version; `announce`: say so when one is served.
        let (mut absent, mut announce) = (false, false);
        while let Some(item) = stream.next().await {
            let api = apis[at].1;
            let change = match item {
                Ok(ev) => {
                    backoff = MIN_BACKOFF;
                    if announce {
                        info!(kind = res.kind(), api, "now served; watching it");
                        announce = false;
                    }
                    absent = false;
                    change(ev, translate)
                }
                // Not at this version: the next one, at once.
                Err(e) if res.optional() && not_found(&e) && at + 1 < apis.len() => {
                    debug!(
                        kind = res.kind(),
                        api, "not served at this version; trying the next"
                    );
                    at += 1;
                    announce = true;
                    stream = open(at);
                    continue;
                }
                Err(e) if res.optional() && not_found(&e) => {
                    if !absent {
                        info!(
                            kind = res.kind(),
                            api = res.api_version(),
                            retry_secs = ABSENT_RETRY.as_secs(),
                            "not served by this cluster (its CRD is not installed); taken as none"
                        );
                        absent = true;
                    }
                    announce = true;
                    if tx.send((res, Change::Absent)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(ABSENT_RETRY).await;
                    if at > 0 {
                        at = 0;
                        stream = open(at);
                    }
                    continue;
                }
                Err(e) => {
                    warn!(kind = res.kind(), api, error = %e, retry_ms = backoff.as_millis() as u64, "watch failed; the last good objects keep serving");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            if tx.send((res, change)).await.is_err() {
                return;
            }
        }
    });
}

pub(super) fn not_found(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// A namespace whose deletion is watched for ([`State::namespace_going`]).
pub(super) struct Going {
    pub namespace: String,
    pub tx: watch::Sender<bool>,
}

/// Applies changes as they come and sends every update to `out` in order
/// (a whole mesh, or a delta), at most every [`COALESCE`], and never before
/// every kind is synced.
pub(super) async fn publish(
    mut state: State,
    mut rx: mpsc::Receiver<(Res, Change)>,
    out: mpsc::Sender<Update>,
    going: Option<Going>,
) {
    let mut last = tokio::time::Instant::now() - COALESCE;
    let mut waiting_logged = tokio::time::Instant::now();
    loop {
        let ready = state.dirty() && state.synced();
        tokio::select! {
            msg = rx.recv() => {
                let Some((res, c)) = msg else { return };
                state.apply(res, c);
                // Take whatever else is queued before looking at the clock: a
                // burst becomes one mesh.
                for _ in 0..4096 {
                    match rx.try_recv() {
                        Ok((res, c)) => state.apply(res, c),
                        Err(_) => break,
                    }
                }
                if let Some(g) = &going {
                    let now = state.namespace_going(&g.namespace);
                    if g.tx.send_if_modified(|was| std::mem::replace(was, now) != now) && now {
                        info!(namespace = %g.namespace, "Weft's namespace is being deleted");
                    }
                }
                if !state.synced() && waiting_logged.elapsed() > Duration::from_secs(10) {
                    let kinds: Vec<String> = state.unsynced().iter().map(|r| format!("{} ({})", r.kind(), r.api_version())).collect();
                    info!(?kinds, "waiting for the first complete list; nothing is published until then");
                    waiting_logged = tokio::time::Instant::now();
                }
            }
            _ = tokio::time::sleep_until(last + COALESCE), if ready => {
                let started = std::time::Instant::now();
                if let Some(update) = state.next_update() {
                    match &update {
                        Update::Mesh(m) => debug!(workloads = m.workloads.len(), services = m.services.len(), build_ms = started.elapsed().as_millis() as u64, "mesh assembled"),
                        Update::Delta(d) => debug!(changed = d.upserts.len(), removed = d.removes.len(), build_us = started.elapsed().as_micros() as u64, "workloads changed"),
                    }
                    if out.send(update).await.is_err() {
                        return;
                    }
                }
                last = tokio::time::Instant::now();
            }
        }
    }
}
