//! The agent's side of the chained CNI plugin (`weft cni`, see `crate::cni`):
//! a Unix socket on which the plugin hands over each new pod's network
//! namespace, and the answers the plugin waits for before the pod may start.
//!
//! The server ([`CniServer`]) only reads and checks requests: only root may
//! connect (the socket is 0600 and each peer's uid is checked with
//! `SO_PEERCRED`), a request is one JSON line of at most 64 KiB read within
//! [`READ_TIMEOUT`], and at most [`MAX_CONNECTIONS`] are served at once.
//! Everything that touches pods happens in the agent's follow loop, which gets
//! each request through a channel with a reply slot ([`Cni`]): it records the
//! namespace in the registry, applies the model, and answers `enrolled` only
//! once the pod is captured (its listeners up, its namespace in the capture
//! maps), or `not_meshed` once the model says the pod is not in the mesh. A pod
//! the model does not know yet (the API watch may trail the runtime by a
//! moment) waits for model changes up to [`WAIT_FOR_MODEL`], then is refused:
//! the runtime retries it rather than start it unmeshed.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Semaphore, mpsc, oneshot},
};
use tracing::{debug, info, warn};

use super::{
    pods::Pods,
    registry::{Entry, Registry, Source},
};
use crate::{
    cni::proto::{self, Command, Request, Response},
    model::WorkloadKey,
    stats::STATS,
    view::View,
};

/// A request must arrive whole within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a pod the model does not know yet waits for it to.
pub const WAIT_FOR_MODEL: Duration = Duration::from_secs(5);
/// The server gives up on the follow loop's answer after this (the plugin
/// waits 10 s): the loop answers within [`WAIT_FOR_MODEL`] and an apply.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(9);
/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 64;
/// Requests queued for the follow loop.
const QUEUE: usize = 256;

/// A request on its way to the follow loop, with the slot for its answer.
#[derive(Debug)]
pub struct Call {
    pub request: Request,
    reply: oneshot::Sender<Response>,
}

impl Call {
    fn answer(self, response: Response) {
        let _ = self.reply.send(response);
    }
}

/// The socket, bound; [`CniServer::run`] serves it.
pub struct CniServer {
    listener: UnixListener,
    path: PathBuf,
    ready: Arc<AtomicBool>,
    calls: mpsc::Sender<Call>,
}

impl CniServer {
    /// Binds `path` (mode 0600, created under another name and renamed into
    /// place, so there is no moment when anyone else may connect). A socket
    /// left at `path` by an earlier run is replaced; anything else there is an
    /// error. Returns the server and the follow loop's end.
    pub fn bind(path: &Path, node: &str) -> io::Result<(CniServer, Cni)> {
        use std::os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _};
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(m) if !m.file_type().is_socket() => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a socket", path.display()),
                ));
            }
            _ => {}
        }
        let name = path
            .file_name()
            .map_or_else(|| "cni.sock".into(), |n| n.to_string_lossy().into_owned());
        // Unique per agent: two on one node (an upgrade's, see
        // `app::succession`) may both be PID 1 of their containers.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = path.with_file_name(format!(".{name}.{}.{nanos}", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let ready = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(QUEUE);
        let server = CniServer {
            listener,
            path: path.to_owned(),
            ready: ready.clone(),
            calls: tx,
        };
        let cni = Cni {
            calls: Some(rx),
            ready,
            node: node.to_owned(),
            waiting: Vec::new(),
        };
        Ok((server, cni))
    }

    /// Accepts until the follow loop is gone.
    pub async fn run(self) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        info!(path = %self.path.display(), "CNI socket listening");
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        warn!(error = %e, "CNI socket: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = self.calls.closed() => return,
            };
            let (ready, calls) = (self.ready.clone(), self.calls.clone());
            tokio::spawn(async move {
                serve(stream, &ready, &calls).await;
                drop(slot);
            });
        }
    }
}

async fn serve(mut stream: UnixStream, ready: &AtomicBool, calls: &mpsc::Sender<Call>) {
    // Only root may hand the agent a namespace to enter: the plugin runs as
    // root, as the runtime does.
    match stream.peer_cred() {
        Ok(cred) if cred.uid() == 0 => {}
        Ok(cred) => {
            warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "CNI socket: a peer that is not root; closed"
            );
            STATS.cni_request("unknown", "not_root");
            return;
        }
        Err(e) => {
            warn!(error = %e, "CNI socket: cannot tell who the peer is; closed");
            STATS.cni_request("unknown", "not_root");
            return;
        }
    }
    let command;
    let response = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Err(_) => {
            warn!("CNI socket: no whole request in time; closed");
            STATS.cni_request("unknown", "bad_request");
            return;
        }
        Ok(Err(e)) => {
            warn!(error = %e, "CNI socket: bad request");
            STATS.cni_request("unknown", "bad_request");
            let _ = tokio::time::timeout(
                READ_TIMEOUT,
                stream.write_all(&proto::encode(&Response::Refused {
                    reason: format!("bad request: {e}"),
                })),
            )
            .await;
            return;
        }
        Ok(Ok(request)) if !ready.load(Ordering::Acquire) => {
            command = command_name(request.command);
            Response::NotReady
        }
        // Answered here: the agent has its model, so it enrolls pods.
        Ok(Ok(request)) if request.command == Command::Status => {
            command = command_name(request.command);
            Response::Ready
        }
        Ok(Ok(request)) => {
            command = command_name(request.command);
            let (reply, answer) = oneshot::channel();
            let queued = calls.try_send(Call { request, reply });
            match queued {
                Err(mpsc::error::TrySendError::Full(_)) => Response::Refused {
                    reason: "the agent has too many CNI requests queued; retry".into(),
                },
                Err(mpsc::error::TrySendError::Closed(_)) => Response::NotReady,
                Ok(()) => match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
                    Ok(Ok(r)) => r,
                    Ok(Err(_)) => Response::NotReady,
                    Err(_) => Response::Refused {
                        reason: "the agent did not decide in time".into(),
                    },
                },
            }
        }
    };
    STATS.cni_request(command, result_name(&response));
    let _ = tokio::time::timeout(READ_TIMEOUT, stream.write_all(&proto::encode(&response))).await;
}

fn command_name(c: Command) -> &'static str {
    match c {
        Command::Add => "add",
        Command::Del => "del",
        Command::Check => "check",
        Command::Status => "status",
        Command::Gc => "gc",
    }
}

fn result_name(r: &Response) -> &'static str {
    match r {
        Response::Enrolled => "enrolled",
        Response::NotMeshed => "not_meshed",
        Response::Released => "released",
        Response::Ready => "ready",
        Response::NotReady => "not_ready",
        Response::Refused { .. } => "refused",
    }
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, proto::Error> {
    let mut buf = Vec::new();
    BufReader::new(stream.take(proto::MAX_MESSAGE as u64))
        .read_until(b'\n', &mut buf)
        .await?;
    let request: Request = proto::decode(&buf)?;
    let pod = &request.pod;
    if request.command.of_a_pod()
        && (pod.namespace.is_empty() || pod.name.is_empty() || request.container_id.is_empty())
    {
        return Err(proto::Error::Io(io::Error::new(
            io::ErrorKind::InvalidData,
            "empty pod namespace, name or container id",
        )));
    }
    Ok(request)
}

/// A pod waiting for the model to learn of it.
#[derive(Debug)]
struct Waiting {
    call: Call,
    key: WorkloadKey,
    inode: u64,
    deadline: Instant,
}

/// The follow loop's end of the socket: its requests, and the ADDs waiting
/// for the model.
#[derive(Debug)]
pub struct Cni {
    calls: Option<mpsc::Receiver<Call>>,
    ready: Arc<AtomicBool>,
    node: String,
    waiting: Vec<Waiting>,
}

impl Cni {
    /// No socket (`--cni-socket` not given): nothing ever arrives.
    pub fn off(node: &str) -> Cni {
        Cni {
            calls: None,
            ready: Arc::new(AtomicBool::new(false)),
            node: node.to_owned(),
            waiting: Vec::new(),
        }
    }

    /// From now on requests are answered (the agent has its first model);
    /// before, each is told `not_ready`.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// The next request; never returns while the socket is off.
    pub async fn next(&mut self) -> Call {
        if let Some(calls) = self.calls.as_mut()
            && let Some(call) = calls.recv().await
        {
            return call;
        }
        self.calls = None;
        std::future::pending().await
    }

    /// Whether ADDs wait for the model (so [`Cni::expire`] must be called).
    pub fn waiting(&self) -> bool {
        !self.waiting.is_empty()
    }

    /// Handles one request: the registry and the pods change, the answer is
    /// sent or the request waits for the model.
    pub fn handle(&mut self, call: Call, view: &View, pods: &mut Pods, registry: &mut Registry) {
        let req = &call.request;
        let key = WorkloadKey {
            namespace: req.pod.namespace.clone(),
            name: req.pod.name.clone(),
        };
        debug!(command = ?req.command, workload = %key, container_id = %req.container_id, "CNI request");
        match req.command {
            Command::Add => self.add(call, key, view, pods, registry),
            Command::Del => {
                self.del(&call.request, &key, view, pods, registry);
                call.answer(Response::Released);
            }
            Command::Status => call.answer(Response::Ready),
            Command::Gc => {
                self.gc(&call.request.valid, view, pods, registry);
                call.answer(Response::Released);
            }
            Command::Check => {
                let inode = req.netns.as_deref().and_then(inode_of);
                let answer = match inode {
                    None => Response::Refused {
                        reason: "no such network namespace".into(),
                    },
                    Some(inode) => {
                        self.decide(&key, inode, view, pods)
                            .unwrap_or_else(|| Response::Refused {
                                reason: format!(
                                    "the mesh model does not know pod {key} on this node"
                                ),
                            })
                    }
                };
                call.answer(answer);
            }
        }
    }

    fn add(
        &mut self,
        call: Call,
        key: WorkloadKey,
        view: &View,
        pods: &mut Pods,
        registry: &mut Registry,
    ) {
        let req = &call.request;
        let Some(path) = req.netns.clone().filter(|p| p.is_absolute()) else {
            call.answer(Response::Refused {
                reason: "an ADD needs the absolute path of the pod's network namespace".into(),
            });
            return;
        };
        let Some(inode) = inode_of(&path) else {
            call.answer(Response::Refused {
                reason: format!("cannot open network namespace {}", path.display()),
            });
            return;
        };
        registry.unrelease(inode);
        registry.insert(
            Source::Cni,
            key.clone(),
            Entry {
                path: path.clone(),
                container_id: Some(req.container_id.clone()),
            },
        );
        info!(workload = %key, netns = %path.display(), container_id = %req.container_id, ips = ?req.ips, "CNI ADD: pod's network namespace reported");
        pods.apply(view, registry);
        match self.decide(&key, inode, view, pods) {
            Some(answer) => {
                log_answer(&key, &answer);
                call.answer(answer);
            }
            None => self.waiting.push(Waiting {
                call,
                key,
                inode,
                deadline: Instant::now() + WAIT_FOR_MODEL,
            }),
        }
    }

    /// What to answer an ADD or CHECK of `key` in namespace `inode`, once the
    /// model is applied; `None` while the model does not place the pod here.
    fn decide(&self, key: &WorkloadKey, inode: u64, view: &View, pods: &Pods) -> Option<Response> {
        let w = view.workload(key)?;
        if w.node != self.node {
            return None;
        }
        if !w.enrolled {
            return Some(Response::NotMeshed);
        }
        Some(match pods.netns_of(key) {
            Some(netns) if netns.inode().ok() == Some(inode) => Response::Enrolled,
            Some(netns) => Response::Refused {
                reason: format!(
                    "the pod is enrolled in another network namespace ({})",
                    netns.path().display()
                ),
            },
            None => Response::Refused {
                reason: pods
                    .failure(key)
                    .unwrap_or("the pod could not be enrolled")
                    .to_owned(),
            },
        })
    }

    fn del(
        &mut self,
        req: &Request,
        key: &WorkloadKey,
        view: &View,
        pods: &mut Pods,
        registry: &mut Registry,
    ) {
        let inode = req.netns.as_deref().and_then(inode_of);
        // An ADD of this sandbox still waiting for the model is over.
        let (gone, kept): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut self.waiting)
            .into_iter()
            .partition(|w| w.key == *key && w.call.request.container_id == req.container_id);
        self.waiting = kept;
        for w in gone {
            w.call.answer(Response::Refused {
                reason: "the runtime deleted the sandbox".into(),
            });
        }
        // Only this sandbox's entry: a DEL of an older sandbox must not take
        // a newer one's.
        if registry
            .get(Source::Cni, key)
            .is_some_and(|e| e.container_id.as_deref() == Some(&req.container_id))
        {
            registry.remove(Source::Cni, key);
        }
        // Found by the scan (the agent restarted since the ADD): the same
        // namespace, or one that is gone.
        if let Some(e) = registry.get(Source::Proc, key) {
            let there = inode_of(&e.path);
            if there.is_none() || there == inode || inode.is_none() {
                registry.remove(Source::Proc, key);
            }
        }
        if let Some(inode) = inode {
            registry.release(inode);
        }
        let release = pods.netns_of(key).is_some_and(|netns| {
            let here = netns.inode().ok();
            (inode.is_some() && here == inode) || registry.netns(key) != Some(netns.path())
        });
        if release {
            pods.release(key, "the container runtime deleted its sandbox (CNI DEL)");
        }
        info!(workload = %key, container_id = %req.container_id, released = release, "CNI DEL");
        pods.apply(view, registry);
    }

    /// CNI GC: every sandbox this agent holds from an ADD that is not in
    /// `valid` (the runtime's) is released as its DEL would have (a DEL lost
    /// while the agent was down). An ADD still waiting for the model is
    /// kept. No other grace is needed: a runtime lists its sandboxes after
    /// those it has set up (libcni itself DELs every attachment it cached
    /// that is not in the list before it sends GC to the plugins).
    fn gc(&mut self, valid: &[String], view: &View, pods: &mut Pods, registry: &mut Registry) {
        let valid: std::collections::HashSet<&str> = valid.iter().map(String::as_str).collect();
        let stale: Vec<(WorkloadKey, Request)> = registry
            .entries(Source::Cni)
            .filter_map(|(key, e)| {
                let id = e.container_id.as_deref()?;
                let in_flight = self
                    .waiting
                    .iter()
                    .any(|w| w.call.request.container_id == id);
                (!valid.contains(id) && !in_flight).then(|| {
                    let request = Request {
                        command: Command::Del,
                        pod: proto::PodRef {
                            namespace: key.namespace.clone(),
                            name: key.name.clone(),
                            uid: None,
                        },
                        container_id: id.to_owned(),
                        netns: Some(e.path.clone()),
                        ips: Vec::new(),
                        valid: Vec::new(),
                    };
                    (key.clone(), request)
                })
            })
            .collect();
        info!(valid = valid.len(), released = stale.len(), "CNI GC");
        for (key, request) in stale {
            self.del(&request, &key, view, pods, registry);
        }
    }

    /// The model changed: the ADDs waiting for it get their answer if it
    /// now has one.
    pub fn model_changed(&mut self, view: &View, pods: &Pods) {
        for w in std::mem::take(&mut self.waiting) {
            match self.decide(&w.key, w.inode, view, pods) {
                Some(answer) => {
                    log_answer(&w.key, &answer);
                    w.call.answer(answer);
                }
                None => self.waiting.push(w),
            }
        }
    }

    /// Refuses the ADDs that waited for the model too long (and forgets their
    /// namespaces: the runtime deletes the sandbox and makes a new one).
    pub fn expire(&mut self, view: &View, registry: &mut Registry) {
        let now = Instant::now();
        for w in std::mem::take(&mut self.waiting) {
            if w.deadline > now {
                self.waiting.push(w);
                continue;
            }
            let reason = match view.workload(&w.key) {
                Some(other) => format!(
                    "the mesh model places pod {} on node {}, not on this node ({})",
                    w.key, other.node, self.node
                ),
                None => format!(
                    "the mesh model does not know pod {} (waited {WAIT_FOR_MODEL:?}); the runtime will retry",
                    w.key
                ),
            };
            if registry
                .get(Source::Cni, &w.key)
                .is_some_and(|e| e.container_id.as_deref() == Some(&w.call.request.container_id))
            {
                registry.remove(Source::Cni, &w.key);
            }
            warn!(workload = %w.key, %reason, "CNI ADD refused");
            w.call.answer(Response::Refused { reason });
        }
    }
}

fn log_answer(key: &WorkloadKey, answer: &Response) {
    match answer {
        Response::Refused { reason } => warn!(workload = %key, %reason, "CNI ADD refused"),
        other => info!(workload = %key, answer = ?other, "CNI ADD answered"),
    }
}

/// The inode of the namespace at `path`, if there is one.
fn inode_of(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(path).ok().map(|m| m.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server's checks before anything reaches the follow loop: bad
    /// requests are refused with a reason, a silent peer is cut off, and an
    /// agent without a model says so.
    #[tokio::test]
    async fn the_socket_answers_bad_requests_and_not_ready() {
        let dir = std::env::temp_dir().join(format!("weft-cni-srv-{}", std::process::id()));
        let path = dir.join("cni.sock");
        let (server, mut cni) = CniServer::bind(&path, "n0").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        tokio::spawn(server.run());
        let exchange = |bytes: Vec<u8>| {
            let path = path.clone();
            async move {
                let mut s = UnixStream::connect(&path).await.unwrap();
                // The server stops reading at its cap: the rest of a flood
                // may not be taken.
                let _ = s.write_all(&bytes).await;
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out).await;
                out
            }
        };
        let refused = |out: &[u8]| match proto::decode::<Response>(out) {
            Ok(Response::Refused { reason }) => reason,
            other => panic!("{other:?}"),
        };
        // Tests run as root here (CI); as another user the peer check closes
        // the connection without an answer, which the last case shows.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            assert!(refused(&exchange(b"garbage\n".to_vec()).await).contains("bad request"));
            let empty =
                br#"{"command":"add","pod":{"namespace":"","name":"a"},"container_id":"c"}"#;
            let mut line = empty.to_vec();
            line.push(b'\n');
            assert!(refused(&exchange(line).await).contains("empty pod"));
            let good = proto::encode(&Request {
                command: Command::Add,
                pod: proto::PodRef {
                    namespace: "a".into(),
                    name: "b".into(),
                    uid: None,
                },
                container_id: "c".into(),
                netns: Some("/proc/self/ns/net".into()),
                ips: vec![],
                valid: vec![],
            });
            assert_eq!(
                proto::decode::<Response>(&exchange(good.clone()).await).unwrap(),
                Response::NotReady
            );
            let status = proto::encode(&Request {
                command: Command::Status,
                pod: proto::PodRef::default(),
                container_id: String::new(),
                netns: None,
                ips: vec![],
                valid: vec![],
            });
            assert_eq!(
                proto::decode::<Response>(&exchange(status.clone()).await).unwrap(),
                Response::NotReady
            );
            // Ready: STATUS says so at once; the request reaches the loop,
            // whose answer comes back.
            cni.set_ready();
            assert_eq!(
                proto::decode::<Response>(&exchange(status).await).unwrap(),
                Response::Ready
            );
            let asked = tokio::spawn(exchange(good));
            let call = cni.next().await;
            assert_eq!(call.request.pod.name, "b");
            call.answer(Response::NotMeshed);
            assert_eq!(
                proto::decode::<Response>(&asked.await.unwrap()).unwrap(),
                Response::NotMeshed
            );
            // A flood without a newline is cut at the cap.
            let flood = exchange(vec![b'x'; 1 << 20]).await;
            assert!(refused(&flood).contains("larger than"));
        } else {
            assert!(exchange(b"garbage\n".to_vec()).await.is_empty());
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(mode, 0o600);
    }
}
