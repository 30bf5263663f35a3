//! A stand-in for the Kubernetes API server, as far as an agent's watches
//! reach it: list and watch (HTTP/1.1, plain, `watch=true` streamed as
//! chunked JSON lines) of Namespaces, Pods, Services and EndpointSlices, and
//! 404 for every other path (the kinds whose CRDs are not installed, which
//! the agent takes as none). No API server can run on these machines; this
//! serves the agent's real client (kube's watcher, a real kubeconfig) the
//! objects a test puts, so the agent's Kubernetes mode runs end to end.
//!
//! Not a conformance fake: no selectors, no pagination (`limit` is ignored:
//! every list fits), no authentication (the bearer token is not checked),
//! every watch from its `resourceVersion` with the events since.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// The collections served, with their list's `apiVersion` and `kind`.
const COLLECTIONS: [(&str, &str, &str); 4] = [
    ("/api/v1/namespaces", "v1", "NamespaceList"),
    ("/api/v1/pods", "v1", "PodList"),
    ("/api/v1/services", "v1", "ServiceList"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSliceList",
    ),
];

/// A running fake API server; stops (its watches end) when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

#[derive(Default)]
struct State {
    /// The last resourceVersion given out.
    rv: u64,
    /// Per collection: `namespace/name` → object.
    objects: BTreeMap<&'static str, BTreeMap<String, Value>>,
    /// Every change: (resourceVersion, collection, type, object).
    events: Vec<(u64, &'static str, &'static str, Value)>,
}

impl FakeApi {
    /// Listens on loopback inside the network namespace at `netns` (where
    /// the agent that talks to it runs).
    pub fn start_in(netns: &Path) -> Result<FakeApi> {
        FakeApi::start_at(netns, Ipv4Addr::LOCALHOST.into())
    }

    /// Listens on `ip` (any port) inside the network namespace at `netns`:
    /// a node's uplink address, which every node reaches.
    pub fn start_at(netns: &Path, ip: IpAddr) -> Result<FakeApi> {
        let ns =
            std::fs::File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
        // The socket keeps the namespace it was made in: a thread that joins
        // it binds, then the listener serves from anywhere.
        let listener = thread::scope(|s| {
            s.spawn(|| -> Result<TcpListener> {
                // SAFETY: setns only reads the fd, which `ns` keeps open.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    bail!(
                        "entering {}: {}",
                        netns.display(),
                        std::io::Error::last_os_error()
                    );
                }
                Ok(TcpListener::bind((ip, 0))?)
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        listener.set_nonblocking(true)?;
        let s = shared.clone();
        thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let s = s.clone();
                        thread::spawn(move || {
                            let _ = serve(conn, &s);
                        });
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(FakeApi { addr, shared })
    }

    /// A kubeconfig in `dir` that points a client here.
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 users:\n- name: agent\n  user:\n    token: not-checked\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n\
                 current-context: fake\n",
                self.addr
            ),
        )?;
        Ok(path)
    }

    /// Adds `object` to `collection` (a path of [`COLLECTIONS`]), or replaces
    /// the one of its namespace and name: watchers get ADDED or MODIFIED.
    pub fn put(&self, collection: &str, mut object: Value) -> Result<()> {
        let collection = known(collection)?;
        let key = key_of(&object);
        let mut state = self.lock();
        state.rv += 1;
        let rv = state.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let objects = state.objects.entry(collection).or_default();
        let kind = if objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.events.push((rv, collection, kind, object));
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Removes the object of `object`'s namespace and name: watchers get
    /// DELETED.
    pub fn delete(&self, collection: &str, object: &Value) -> Result<()> {
        let collection = known(collection)?;
        let mut state = self.lock();
        let Some(mut gone) = state
            .objects
            .entry(collection)
            .or_default()
            .remove(&key_of(object))
        else {
            bail!("no such object in {collection}");
        };
        state.rv += 1;
        let rv = state.rv;
        gone["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.events.push((rv, collection, "DELETED", gone));
        drop(state);
        self.shared.changed.notify_all();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.changed.notify_all();
    }
}

fn known(collection: &str) -> Result<&'static str> {
    COLLECTIONS
        .iter()
        .find(|(path, _, _)| *path == collection)
        .map(|(path, _, _)| *path)
        .with_context(|| format!("{collection} is not served"))
}

fn key_of(object: &Value) -> String {
    let meta = &object["metadata"];
    format!(
        "{}/{}",
        meta["namespace"].as_str().unwrap_or_default(),
        meta["name"].as_str().unwrap_or_default()
    )
}

/// Answers the requests of one connection (HTTP/1.1 keeps it open) until it
/// closes, or a watch on it ends.
fn serve(conn: TcpStream, shared: &Shared) -> Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let target = line
            .split_whitespace()
            .nth(1)
            .unwrap_or_default()
            .to_owned();
        // The headers: none matters (a GET has no body).
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
                break;
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        let Some(&(collection, api_version, list_kind)) =
            COLLECTIONS.iter().find(|(p, _, _)| *p == path)
        else {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "NotFound", "code": 404,
                "message": format!("the server could not find the requested resource ({path})"),
            });
            respond(&mut out, "404 Not Found", &status)?;
            continue;
        };
        if param("watch") == Some("true") {
            let since = param("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            return watch(out, shared, collection, since);
        }
        let state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let items: Vec<&Value> = state
            .objects
            .get(collection)
            .map(|o| o.values().collect())
            .unwrap_or_default();
        let list = json!({
            "apiVersion": api_version,
            "kind": list_kind,
            "metadata": {"resourceVersion": state.rv.to_string()},
            "items": items,
        });
        drop(state);
        respond(&mut out, "200 OK", &list)?;
    }
}

fn respond(out: &mut TcpStream, status: &str, body: &Value) -> Result<()> {
    let body = body.to_string();
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(out.flush()?)
}

/// Streams the events of `collection` after `since`, one JSON line per
/// chunk, until the client goes or the server stops.
fn watch(mut out: TcpStream, shared: &Shared, collection: &str, mut since: u64) -> Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    out.flush()?;
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        let new: Vec<String> = state
            .events
            .iter()
            .filter(|(rv, c, _, _)| *rv > since && *c == collection)
            .map(|(_, _, kind, object)| json!({"type": kind, "object": object}).to_string())
            .collect();
        since = state.rv;
        if !new.is_empty() {
            drop(state);
            for event in new {
                let line = format!("{event}\n");
                write!(out, "{:x}\r\n{line}\r\n", line.len())?;
            }
            out.flush()?;
            state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        state = shared
            .changed
            .wait_timeout(state, Duration::from_millis(500))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}
