//! `weft cni install` and `uninstall`: what the agent DaemonSet's init
//! container does on each node. The binary goes into the node's CNI bin dir as
//! `weft-cni` (the CNI `type` is the executable's name), and a
//! `{"type": "weft-cni", ...}` entry goes at the end of the conflist the
//! runtime uses, the first in file-name order, so it runs after the plugins
//! that set up the pod's interface. Every write is a new file renamed into
//! place: the runtime reads either the old file or the new one, never half.
//! Installing twice changes nothing; uninstalling leaves the conflist as it was
//! before (its keys may come back in another order: JSON objects are
//! unordered, and the file is rewritten from its parsed form).

use std::{
    fs,
    io::{self, Write as _},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value, json};

/// The executable's name in the CNI bin dir, and the `type` of its entry.
pub const PLUGIN_TYPE: &str = "weft-cni";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "no .conflist in {0}: the cluster's network plugin writes one; weft-cni is chained after it"
    )]
    NoConflist(PathBuf),
    #[error(
        "{0} comes first and is a single-plugin config, not a .conflist: weft-cni needs a plugin chain"
    )]
    NotAList(PathBuf),
    #[error("{path} is not a CNI conflist: {why}")]
    Invalid { path: PathBuf, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the plugin's entry says.
#[derive(Debug, Clone)]
pub struct Entry {
    pub agent_socket: PathBuf,
    pub exclude_namespaces: Vec<String>,
}

impl Entry {
    fn to_json(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "agent_socket": self.agent_socket,
            "exclude_namespaces": self.exclude_namespaces,
        })
    }
}

/// The config the runtime uses: the first `.conf`, `.conflist` or `.json`
/// in file-name order (what libcni, and so containerd and CRI-O, load).
pub fn active_config(conf_dir: &Path) -> Result<Option<PathBuf>, Error> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io_err(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|e| e == "conf" || e == "conflist" || e == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Copies `exe` to `<bin_dir>/weft-cni` and chains the plugin in the active
/// conflist of `conf_dir`. Returns the conflist and whether it changed.
pub fn install(
    exe: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    entry: &Entry,
) -> Result<(PathBuf, bool), Error> {
    copy_binary(exe, &bin_dir.join(PLUGIN_TYPE))?;
    let path = active_config(conf_dir)?.ok_or_else(|| Error::NoConflist(conf_dir.to_owned()))?;
    if path.extension().is_none_or(|e| e != "conflist") {
        return Err(Error::NotAList(path));
    }
    let text = fs::read_to_string(&path).map_err(io_err(&path))?;
    let new = with_entry(&path, &text, Some(entry))?;
    let changed = new != serde_json::from_str::<Value>(&text).ok();
    if let (true, Some(new)) = (changed, new) {
        write_atomically(&path, pretty(&new).as_bytes(), 0o644)?;
    }
    Ok((path, changed))
}

/// Takes the plugin's entry out of every conflist in `conf_dir` (the active
/// one may have changed since install), and the binary out of `bin_dir` if
/// given. Returns the files changed.
pub fn uninstall(bin_dir: Option<&Path>, conf_dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let mut changed = Vec::new();
    let mut lists: Vec<PathBuf> = fs::read_dir(conf_dir)
        .map_err(io_err(conf_dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "conflist"))
        .collect();
    lists.sort();
    for path in lists {
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        // A file that is not ours to understand is left alone.
        let Ok(Some(new)) = with_entry(&path, &text, None) else {
            continue;
        };
        if Some(&new) != serde_json::from_str::<Value>(&text).ok().as_ref() {
            write_atomically(&path, pretty(&new).as_bytes(), 0o644)?;
            changed.push(path);
        }
    }
    if let Some(dir) = bin_dir {
        let bin = dir.join(PLUGIN_TYPE);
        match fs::remove_file(&bin) {
            Ok(()) => changed.push(bin),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&bin)(e)),
        }
    }
    Ok(changed)
}

/// The conflist `text` with our entry last (`Some`) or gone (`None`), every
/// other entry and key kept. `Ok(None)`: the text does not parse as JSON.
pub fn with_entry(path: &Path, text: &str, entry: Option<&Entry>) -> Result<Option<Value>, Error> {
    let invalid = |why: &str| Error::Invalid {
        path: path.to_owned(),
        why: why.to_owned(),
    };
    let Ok(mut list) = serde_json::from_str::<Value>(text) else {
        return if entry.is_some() {
            Err(invalid("not JSON"))
        } else {
            Ok(None)
        };
    };
    let obj: &mut Map<String, Value> = list
        .as_object_mut()
        .ok_or_else(|| invalid("not a JSON object"))?;
    let plugins = obj
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| invalid("no `plugins` list"))?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if let Some(entry) = entry {
        if plugins.is_empty() {
            return Err(invalid(
                "no plugin to chain after (weft-cni needs the plugin that sets up the interface)",
            ));
        }
        plugins.push(entry.to_json());
    }
    Ok(Some(list))
}

fn pretty(v: &Value) -> String {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_default();
    s.push('\n');
    s
}

/// Writes `bytes` beside `path` and renames the copy over it.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), Error> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A dot-file: libcni skips names it does not recognise by extension, and
    // this one ends in `.tmp`.
    let tmp = path.with_file_name(format!(".{name}.weft-{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn copy_binary(exe: &Path, to: &Path) -> Result<(), Error> {
    let bytes = fs::read(exe).map_err(io_err(exe))?;
    // Replacing a running executable in place fails (ETXTBSY) and would change
    // it under a runtime that execs it now; a rename does neither.
    write_atomically(to, &bytes, 0o755)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "k8s-pod-network",
  "disableCheck": false,
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.22.0.0/16"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    fn entry() -> Entry {
        Entry {
            agent_socket: "/var/run/weft/cni.sock".into(),
            exclude_namespaces: vec!["kube-system".into()],
        }
    }

    #[test]
    fn the_entry_goes_last_once_and_comes_out_again() {
        let p = Path::new("10-bridge.conflist");
        let once = with_entry(p, BRIDGE, Some(&entry())).unwrap().unwrap();
        let plugins = once["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[2]["type"], PLUGIN_TYPE);
        assert_eq!(plugins[2]["agent_socket"], "/var/run/weft/cni.sock");
        assert_eq!(once["disableCheck"], false);
        let twice = with_entry(p, &pretty(&once), Some(&entry()))
            .unwrap()
            .unwrap();
        assert_eq!(twice, once);
        let out = with_entry(p, &pretty(&twice), None).unwrap().unwrap();
        assert_eq!(out, serde_json::from_str::<Value>(BRIDGE).unwrap());
    }

    #[test]
    fn lists_that_cannot_take_the_entry_are_refused() {
        let p = Path::new("x.conflist");
        for (text, why) in [
            ("nope", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"cniVersion":"1.0.0","name":"x"}"#, "no `plugins`"),
            (
                r#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
                "no plugin to chain after",
            ),
        ] {
            let err = with_entry(p, text, Some(&entry())).unwrap_err().to_string();
            assert!(err.contains(why), "{text}: {err}");
        }
    }
}
