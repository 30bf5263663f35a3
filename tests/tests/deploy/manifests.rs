//! The Kubernetes manifests in `deploy/` as the tests see them: rendered by the
//! real `kubectl kustomize`, parsed into JSON values, and checked against the
//! typed API objects of k8s-openapi.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Whether `kubectl` can run here. Without it the tests skip, except under
/// `CI=true`, where a missing kubectl is a broken setup and fails them.
pub fn require_kubectl() -> bool {
    let found = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true, but kubectl cannot run: the deploy/ tests need it");
    }
    eprintln!("skipping: kubectl is not installed (set CI=true to turn this into a failure)");
    false
}

/// `kubectl kustomize <dir>`: every object the directory renders, in order.
pub fn render(dir: &Path) -> Result<Vec<Value>> {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    parse_documents(&String::from_utf8(out.stdout)?)
}

/// The documents of a YAML stream (comments and empty documents dropped).
pub fn parse_documents(text: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).context("parsing YAML")?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// Deserializes `object` into `T` and serializes it back: the result must be
/// exactly `object`. A field k8s-openapi does not know (a misspelling, or a
/// field of a newer Kubernetes) is dropped by the deserializer, so the round
/// trip tells it apart.
pub fn round_trip<T: DeserializeOwned + Serialize>(object: &Value) -> Result<T> {
    let typed: T = serde_json::from_value(object.clone()).context("deserializing")?;
    let back = serde_json::to_value(&typed)?;
    if let Some(diff) = first_difference(object, &back, "") {
        bail!("not the same after a round trip: {diff}");
    }
    Ok(typed)
}

/// The first place where `a` and `b` differ, as a path and both sides.
pub fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for (k, v) in x {
                let child = format!("{path}.{k}");
                match y.get(k) {
                    Some(w) => {
                        if let Some(d) = first_difference(v, w, &child) {
                            return Some(d);
                        }
                    }
                    None => return Some(format!("{child} is lost")),
                }
            }
            y.keys()
                .find(|k| !x.contains_key(*k))
                .map(|k| format!("{path}.{k} appears"))
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} became {b}")),
    }
}

/// `metadata.name` of an object.
pub fn name(object: &Value) -> &str {
    object["metadata"]["name"].as_str().unwrap_or_default()
}

/// `kind/name`, for messages.
pub fn describe(object: &Value) -> String {
    format!(
        "{}/{}",
        object["kind"].as_str().unwrap_or("?"),
        name(object)
    )
}
