//! The CA in a cluster: its root lives in a Secret, so every replica signs
//! with the same one and a rescheduled CA keeps it, and the trust bundle is
//! published in a ConfigMap that agents and waypoints mount (the kubelet
//! updates the mounted file, which they already watch).
//!
//! The state directory ([`super::store`]) stays the CA's working copy: at
//! start the Secret is written into it, or, on the very first start of the
//! mesh, the root the directory makes is stored in the Secret. Two replicas
//! starting at once race on the Secret's creation; the one that loses takes
//! the winner's root, so there is only ever one.

use std::path::Path;

use k8s_openapi::{
    ByteString,
    api::core::v1::{ConfigMap, Secret},
};
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
};
use tracing::info;

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
}
