//! The CA in a cluster: its root lives in a Secret, so every replica signs
//! with the same one and a rescheduled CA keeps it, and the trust bundle is
//! published in a ConfigMap that agents and waypoints mount (the kubelet
//! updates the mounted file, which they already watch).
//!
//! A pod mounts only ConfigMaps of its own namespace, and waypoints run in the
//! namespaces they serve: with Kubernetes discovery, the CA publishes the
//! bundle too in every namespace where a waypoint pod runs
//! ([`follow_waypoints`]), as istiod publishes its root in every namespace.
//!
//! The state directory ([`super::store`]) stays the CA's working copy: at
//! start the Secret is written into it, or, on the very first start of the
//! mesh, the root the directory makes is stored in the Secret. Two replicas
//! starting at once race on the Secret's creation; the one that loses takes
//! the winner's root, so there is only ever one.

use std::{collections::BTreeSet, path::Path, time::Duration};

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use tracing::{info, warn};

use super::{Authority, store};

/// The keys of the root Secret, the file names of the state directory.
const CERT: &str = "root.pem";
const KEY: &str = "root-key.pem";
/// The key of the bundle ConfigMap.
pub const BUNDLE_KEY: &str = "roots.pem";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Secret {namespace}/{name}: {message}")]
    Secret {
        namespace: String,
        name: String,
        message: String,
    },
    #[error("ConfigMap {namespace}/{name}: {message}")]
    ConfigMap {
        namespace: String,
        name: String,
        message: String,
    },
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Makes `dir` hold the mesh's root: the one in Secret `namespace/name`, or a
/// new one that is then stored there.
pub async fn root_from_secret(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    dir: &Path,
    trust_domain: &str,
) -> Result<(), Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let bad = |message: String| Error::Secret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        message,
    };
    if let Some(secret) = api.get_opt(name).await.map_err(|e| bad(e.to_string()))? {
        return write_root(&secret, dir).map_err(bad);
    }
    // The first start of the mesh: make the root here, then store it.
    for file in [CERT, KEY] {
        let _ = std::fs::remove_file(dir.join(file));
    }
    let authority = store::load_authority(dir, trust_domain)?;
    let secret = root_secret(name, &authority);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(namespace, name, "new root stored");
            Ok(())
        }
        Err(kube::Error::Api(e)) if e.code == 409 => {
            // Another replica stored its root first: take that one.
            let secret = api.get(name).await.map_err(|e| bad(e.to_string()))?;
            write_root(&secret, dir).map_err(bad)
        }
        Err(e) => Err(bad(e.to_string())),
    }
}

/// Publishes the trust bundle (every trusted root, the signing one first) in
/// ConfigMap `namespace/name`, owned by the CA's field manager.
pub async fn publish_bundle(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    bundle_pem: &str,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let map = bundle_config_map(name, bundle_pem);
    api.patch(
        name,
        &PatchParams::apply("weft-ca").force(),
        &Patch::Apply(&map),
    )
    .await
    .map_err(|e| Error::ConfigMap {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        message: e.to_string(),
    })?;
    info!(namespace, name, "trust bundle published");
    Ok(())
}

/// How soon a namespace the bundle could not be published in is tried again.
const REPUBLISH_AFTER: Duration = Duration::from_secs(30);

/// How often the bundle is published again everywhere it is wanted, so that
/// a ConfigMap deleted or edited by hand is restored (a server-side apply
/// that changes nothing writes nothing).
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);

/// Publishes the bundle as ConfigMap `name` in `home` (where it was published
/// at start) and in every namespace `waypoints` names (where pods that speak
/// HBONE themselves run: the label `weft.dev/role: waypoint`), once per
/// namespace as they appear, and again everywhere every `refresh`. A failed
/// publication is tried again after [`REPUBLISH_AFTER`] or at the next
/// change. Runs until the sender of `waypoints` is gone. The waypoint mounts
/// the ConfigMap as optional and waits for the file, which the kubelet
/// writes once it exists.
pub async fn follow_waypoints(
    client: kube::Client,
    name: String,
    bundle_pem: String,
    mut waypoints: tokio::sync::watch::Receiver<BTreeSet<String>>,
    home: BTreeSet<String>,
    refresh: Duration,
) {
    let mut done = home.clone();
    let mut again = tokio::time::interval_at(tokio::time::Instant::now() + refresh, refresh);
    again.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let wanted: BTreeSet<String> = waypoints
            .borrow_and_update()
            .iter()
            .chain(&home)
            .cloned()
            .collect();
        let mut failed = false;
        for ns in wanted.difference(&done.clone()) {
            match publish_bundle(&client, ns, &name, &bundle_pem).await {
                Ok(()) => {
                    done.insert(ns.clone());
                }
                Err(e) => {
                    warn!(error = %e, "cannot publish the trust bundle for a waypoint; will retry");
                    failed = true;
                }
            }
        }
        let retry = async {
            if failed {
                tokio::time::sleep(REPUBLISH_AFTER).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            changed = waypoints.changed() => if changed.is_err() { return },
            () = retry => {}
            _ = again.tick() => done.clear(),
        }
    }
}

fn root_secret(name: &str, authority: &Authority) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "weft".to_owned())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(
            [
                (
                    CERT.to_owned(),
                    ByteString(authority.root_pem().as_bytes().to_vec()),
                ),
                (
                    KEY.to_owned(),
                    ByteString(authority.key_pem().as_bytes().to_vec()),
                ),
            ]
            .into(),
        ),
        ..Default::default()
    }
}

fn bundle_config_map(name: &str, bundle_pem: &str) -> ConfigMap {
    ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some([("app.kubernetes.io/part-of".to_owned(), "weft".to_owned())].into()),
            ..Default::default()
        },
        data: Some([(BUNDLE_KEY.to_owned(), bundle_pem.to_owned())].into()),
        ..Default::default()
    }
}

/// Writes the Secret's root into `dir` (key mode 0600), checking it first.
fn write_root(secret: &Secret, dir: &Path) -> Result<(), String> {
    let data = secret.data.as_ref().ok_or("it has no data")?;
    let text = |key: &str| {
        let bytes = data.get(key).ok_or(format!("it has no {key:?}"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| format!("{key:?} is not text"))
    };
    let (cert, key) = (text(CERT)?, text(KEY)?);
    Authority::from_pem(&cert, &key).map_err(|e| format!("not a usable root: {e}"))?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    store::write_atomic(&dir.join(KEY), key.as_bytes(), 0o600).map_err(|e| e.to_string())?;
    store::write_atomic(&dir.join(CERT), cert.as_bytes(), 0o644).map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_round_trips_through_its_secret_and_a_broken_one_is_refused() {
        let authority =
            Authority::generate("cluster.local", std::time::Duration::from_secs(3600)).unwrap();
        let secret = root_secret("weft-ca-root", &authority);
        // As the API server returns it: JSON, data base64.
        let json = serde_json::to_string(&secret).unwrap();
        assert!(json.contains("\"root-key.pem\""));
        let back: Secret = serde_json::from_str(&json).unwrap();
        let dir = std::env::temp_dir().join(format!("weft-ca-cluster-{}", std::process::id()));
        write_root(&back, &dir).unwrap();
        let loaded = store::load_authority(&dir, "cluster.local").unwrap();
        assert_eq!(loaded.root_pem(), authority.root_pem());
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.join(KEY))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let mut broken = back.clone();
        broken
            .data
            .as_mut()
            .unwrap()
            .insert(KEY.into(), ByteString(b"not a key".to_vec()));
        assert!(
            write_root(&broken, &dir)
                .unwrap_err()
                .contains("not a usable root")
        );
        let mut empty = back;
        empty.data = None;
        assert!(write_root(&empty, &dir).is_err());
        let _ = std::fs::remove_dir_all(&dir);

        let map = bundle_config_map("weft-trust-bundle", authority.root_pem());
        assert_eq!(map.data.unwrap()[BUNDLE_KEY], authority.root_pem());
    }

    /// The bundle goes to each namespace where a waypoint runs, once, by
    /// server-side apply; a namespace whose publication failed is tried
    /// again; ordinary pods' namespaces get nothing.
    #[tokio::test]
    async fn the_bundle_follows_waypoints_into_their_namespaces() {
        use std::sync::{
            Arc,
            atomic::{AtomicBool, Ordering::Relaxed},
        };

        // The first apply in `shop` fails (403, as with a missing RBAC rule).
        let refused_once = Arc::new(AtomicBool::new(false));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (refused, seen_bodies) = (refused_once.clone(), bodies.clone());
        let (client, seen) = super::super::testapi::serve(move |parts, body| {
            let path = parts.uri.path();
            if path.contains("/namespaces/shop/") && !refused.swap(true, Relaxed) {
                return (403, r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"Forbidden","code":403,"message":"configmaps is forbidden"}"#.to_owned());
            }
            seen_bodies.lock().unwrap().push((parts.uri.to_string(), body.to_vec()));
            (200, String::from_utf8(body.to_vec()).unwrap())
        })
        .await;
        let set = |namespaces: &[&str]| -> BTreeSet<String> {
            namespaces.iter().map(|ns| ns.to_string()).collect()
        };
        let (tx, rx) = tokio::sync::watch::channel(set(&["shop"]));
        let task = tokio::spawn(follow_waypoints(
            client,
            "weft-trust-bundle".into(),
            "PEM".into(),
            rx,
            set(&["weft-system"]),
            Duration::from_secs(3600),
        ));
        let calls = |seen: &std::sync::Mutex<Vec<String>>| seen.lock().unwrap().clone();
        let path = |ns: &str| format!("PATCH /api/v1/namespaces/{ns}/configmaps/weft-trust-bundle");
        // Refused, then (a change comes first) applied.
        for _ in 0..100 {
            if !calls(&seen).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(calls(&seen), [path("shop")]);
        tx.send_replace(set(&["shop", "legacy", "weft-system"]));
        for _ in 0..100 {
            if calls(&seen).len() >= 3 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Once per namespace, never the home namespace again.
        let mut got = calls(&seen);
        got[1..].sort();
        assert_eq!(got, [path("shop"), path("legacy"), path("shop")]);
        tx.send_replace(set(&["shop"]));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(calls(&seen).len(), 3, "published once per namespace");
        // What was applied: the bundle, by the CA's field manager, forced.
        let (uri, body) = bodies.lock().unwrap()[0].clone();
        assert!(
            uri.contains("fieldManager=weft-ca") && uri.contains("force=true"),
            "{uri}"
        );
        let applied: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(applied["data"][BUNDLE_KEY], "PEM");
        drop(tx);
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops when the mesh's sender is gone")
            .unwrap();
    }

    /// A ConfigMap deleted or edited by hand comes back: every `refresh`,
    /// the bundle is applied again in the home namespace and every
    /// waypoint's.
    #[tokio::test]
    async fn the_bundle_is_published_again_everywhere_every_refresh() {
        let (client, seen) = super::super::testapi::serve(|_, body| {
            (200, String::from_utf8(body.to_vec()).unwrap())
        })
        .await;
        let (tx, rx) = tokio::sync::watch::channel(["shop".to_owned()].into());
        let task = tokio::spawn(follow_waypoints(
            client,
            "weft-trust-bundle".into(),
            "PEM".into(),
            rx,
            ["weft-system".to_owned()].into(),
            Duration::from_millis(200),
        ));
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let calls = seen.lock().unwrap().clone();
        let count = |ns: &str| {
            let path = format!("PATCH /api/v1/namespaces/{ns}/configmaps/weft-trust-bundle");
            calls.iter().filter(|c| **c == path).count()
        };
        // shop at once, then both every 200 ms: five refreshes in 1.1 s, at
        // least three counted on a busy machine.
        assert!(count("shop") >= 4, "{calls:?}");
        assert!(count("weft-system") >= 3, "{calls:?}");
        drop(tx);
        task.await.unwrap();
    }
}
