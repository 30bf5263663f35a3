//! A stand-in for the Kubernetes API server, as far as an agent's watches
//! reach it: list and watch (HTTP/1.1, plain, `watch=true` streamed as
//! chunked JSON lines) of Namespaces, Pods, Services, EndpointSlices, and
//! Weft's and (at `v1beta1`) Istio's AuthorizationPolicies, and 404 for
//! every other path (the kinds
//! whose CRDs are not installed, which the agent takes as none). No API server can run on these machines; this
//! serves the agent's real client (kube's watcher, a real kubeconfig) the
//! objects a test puts, so the agent's Kubernetes mode runs end to end.
//!
//! Not a conformance fake: no selectors, no pagination (`limit` is ignored:
//! every list fits), every watch from its `resourceVersion` with the events
//! since. The bearer token names the user; a user granted rules
//! ([`FakeApi::grant`], read from `deploy/` by [`rules_of`]) is authorized as
//! the API server's RBAC authorizer would, before anything else (a request
//! to a kind that is not served is refused if not granted, as there), and
//! each refusal is answered 403 and kept ([`FakeApi::forbidden`]): so a test
//! running the agent and the CA this way proves `deploy/`'s roles are
//! enough for them.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read as _, Write},
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

/// The collections served, with their list's `apiVersion` and `kind`: the
/// built-in kinds, Weft's AuthorizationPolicy as its CRD serves it once
/// installed, and Istio's as an Istio before 1.22 serves it (`v1beta1`
/// only); the other CRDs' paths answer 404: not installed.
const COLLECTIONS: [(&str, &str, &str); 6] = [
    ("/api/v1/namespaces", "v1", "NamespaceList"),
    ("/api/v1/pods", "v1", "PodList"),
    ("/api/v1/services", "v1", "ServiceList"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSliceList",
    ),
    (
        "/apis/weft.dev/v1/authorizationpolicies",
        "weft.dev/v1",
        "AuthorizationPolicyList",
    ),
    (
        "/apis/security.istio.io/v1beta1/authorizationpolicies",
        "security.istio.io/v1beta1",
        "AuthorizationPolicyList",
    ),
];

/// A running fake API server; stops (its watches end) when dropped.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

struct Shared {
    state: Mutex<State>,
    /// Per user (the bearer token): the rules granted.
    grants: Mutex<BTreeMap<String, Vec<Rule>>>,
    /// Every request refused: `user VERB path`.
    forbidden: Mutex<Vec<String>>,
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
            grants: Mutex::default(),
            forbidden: Mutex::default(),
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

    /// A kubeconfig in `dir` that points a client here (as a user granted
    /// nothing, so not authorized).
    pub fn kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        self.kubeconfig_as(dir, "not-checked")
    }

    /// A kubeconfig in `dir` for `user` (its bearer token), which
    /// [`FakeApi::grant`] gives rules.
    pub fn kubeconfig_as(&self, dir: &Path, user: &str) -> Result<PathBuf> {
        let path = dir.join(format!("kubeconfig-{user}"));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
                 users:\n- name: {user}\n  user:\n    token: {user}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: {user}\n\
                 current-context: fake\n",
                self.addr
            ),
        )?;
        Ok(path)
    }

    /// Authorizes `user` by `rules` from now on (added to what it has).
    pub fn grant(&self, user: &str, rules: Vec<Rule>) {
        self.shared
            .grants
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(user.to_owned())
            .or_default()
            .extend(rules);
    }

    /// The requests refused so far: `user VERB path`.
    pub fn forbidden(&self) -> Vec<String> {
        self.shared
            .forbidden
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        let mut words = line.split_whitespace();
        let method = words.next().unwrap_or_default().to_owned();
        let target = words.next().unwrap_or_default().to_owned();
        // The headers: who asks, and how long a body is (read and dropped).
        let (mut user, mut body) = (String::new(), 0usize);
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header)? == 0 || header == "\r\n" || header == "\n" {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "authorization" => {
                    user = value.strip_prefix("Bearer ").unwrap_or_default().to_owned();
                }
                "content-length" => body = value.parse().unwrap_or(0),
                _ => {}
            }
        }
        std::io::copy(&mut (&mut reader).take(body as u64), &mut std::io::sink())?;
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let param = |name: &str| {
            query
                .split('&')
                .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        };
        if let Some(refused) =
            authorize(shared, &user, &method, path, param("watch") == Some("true"))
        {
            let status = json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "reason": "Forbidden", "code": 403,
                "message": format!("user \"{user}\" cannot {refused}"),
            });
            shared
                .forbidden
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(format!("{user} {method} {target}"));
            respond(&mut out, "403 Forbidden", &status)?;
            continue;
        }
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

/// One RBAC rule, as a Role or ClusterRole lists it; a Role's rules hold
/// only in its namespace.
#[derive(Clone, Debug)]
pub struct Rule {
    groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
    names: Vec<String>,
    namespace: Option<String>,
}

/// The rules of the `kind` (`ClusterRole` or `Role`) named `name` in the
/// manifest file `file` (under `deploy/`, several documents).
pub fn rules_of(file: &str, kind: &str, name: &str) -> Result<Vec<Rule>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(String::from))
            .collect()
    };
    for doc in text.split("\n---\n") {
        let object: Value =
            weft::yaml::from_str(doc).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if object["kind"] != kind || object["metadata"]["name"] != name {
            continue;
        }
        let namespace = object["metadata"]["namespace"].as_str().map(String::from);
        return Ok(object["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| Rule {
                groups: strings(&r["apiGroups"]),
                resources: strings(&r["resources"]),
                verbs: strings(&r["verbs"]),
                names: strings(&r["resourceNames"]),
                namespace: namespace.clone(),
            })
            .collect());
    }
    bail!("no {kind} {name} in {}", path.display())
}

/// Whether `user` may make this request: `None` if so (or if `user` was
/// granted nothing: not checked), else what it may not do.
fn authorize(shared: &Shared, user: &str, method: &str, path: &str, watch: bool) -> Option<String> {
    let grants = shared.grants.lock().unwrap_or_else(|e| e.into_inner());
    let rules = grants.get(user)?;
    // /api/v1/..., /apis/GROUP/VERSION/...; anything else (discovery,
    // /version) is open to every authenticated user, as there.
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api", _version, rest @ ..] => ("", rest),
        ["apis", group, _version, rest @ ..] => (*group, rest),
        _ => return None,
    };
    let (namespace, resource, name) = match rest {
        [] => return None,
        ["namespaces", ns, resource, more @ ..] => (Some(*ns), *resource, more.first().copied()),
        ["namespaces", name] => (None, "namespaces", Some(*name)),
        [resource, more @ ..] => (None, *resource, more.first().copied()),
    };
    let verb = match (method, name, watch) {
        ("GET", _, true) => "watch",
        ("GET", Some(_), _) => "get",
        ("GET", None, _) => "list",
        ("POST", ..) => "create",
        ("PATCH", ..) => "patch",
        ("PUT", ..) => "update",
        ("DELETE", Some(_), _) => "delete",
        ("DELETE", None, _) => "deletecollection",
        _ => "unknown",
    };
    let allowed = rules.iter().any(|r| {
        let has = |list: &[String], x: &str| list.iter().any(|v| v == x || v == "*");
        has(&r.groups, group)
            && has(&r.resources, resource)
            && has(&r.verbs, verb)
            && (r.names.is_empty() || name.is_some_and(|n| r.names.iter().any(|v| v == n)))
            && r.namespace
                .as_deref()
                .is_none_or(|own| namespace == Some(own))
    });
    (!allowed).then(|| {
        format!(
            "{verb} {resource}{} in {}",
            if group.is_empty() {
                String::new()
            } else {
                format!(".{group}")
            },
            namespace.map_or("the cluster".to_owned(), |n| format!("namespace {n}"))
        )
    })
}
