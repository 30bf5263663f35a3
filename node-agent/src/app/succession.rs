//! Two agents on one node, for the seconds of an upgrade: the successor starts
//! beside its predecessor and takes over without a moment when nothing serves
//! the node's pods (the DaemonSet rolls with `maxSurge: 1`).
//!
//! What the two share, and how:
//! - The pods' listeners (15001, 15006, 15008 in each pod) are `SO_REUSEPORT`
//!   ([`crate::net::socket::listen`]): the successor listens beside the
//!   predecessor and the kernel spreads new connections over both; when the
//!   predecessor stops, what waits in its queues moves to the successor
//!   (`tcp_migrate_req`), its HBONE connections say GOAWAY and finish their
//!   streams, and the rest is its drain.
//! - The kernel's programs and maps are pinned, so both use the same ones; the
//!   successor only leaves the predecessor's handover entries alone (see
//!   `ebpf::Capture::clear_stale_handovers`).
//! - The CNI socket is taken over by the successor when it is ready (a rename
//!   over the old path), so from then on new pods are the successor's.
//! - The node's own endpoints (metrics, readiness, admin) are not shared: two
//!   processes answering one port in turn would give the kubelet's readiness
//!   probe for the new pod the old agent's answer, and Prometheus two
//!   processes' counters in turn. So the successor, before anything else, asks
//!   the predecessor to let go of them, over a Unix socket in the abstract
//!   namespace of the node's network namespace (the agents are on the host
//!   network), named after the pin directory: one per node's capture. From then
//!   on the node's endpoints speak for the successor: it is ready when it is.
//!
//! The predecessor serves its pods on until it is stopped (the DaemonSet stops
//! it once the successor is ready). The successor keeps the connection open
//! for as long as it runs: if it goes first (it failed to start, say), the
//! predecessor takes the endpoints back, so the node never stays without
//! them. Only a process of the agent's own user may ask (checked on the
//! socket's peer credentials).

use std::{
    io,
    net::SocketAddr,
    path::Path,
    sync::{Arc, OnceLock},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{UnixListener, UnixStream},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::metrics::{Handler, Reply};

/// How long a successor waits for the predecessor to let go.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
const REQUEST: &[u8] = b"take the node's endpoints\n";
const ANSWER: &[u8] = b"released\n";

/// The socket's address: abstract, named after the pin directory.
fn address(pin_dir: &Path) -> io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt as _;
    let name = format!("weft-agent:{}", pin_dir.display());
    std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
}

/// Asks an agent already serving this node's capture (`pin_dir`) to let go of
/// the node's endpoints, and waits until it has. `None`: there is none.
/// Otherwise keep the connection for as long as this agent runs: when it
/// closes (this agent gone, say it failed to start), the predecessor takes
/// its endpoints back.
async fn claim(pin_dir: &Path) -> anyhow::Result<Option<UnixStream>> {
    let addr = address(pin_dir)?;
    let std = match std::os::unix::net::UnixStream::connect_addr(&addr) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(None),
        Err(e) => return Err(e).context("asking the agent already on this node to let go"),
    };
    std.set_nonblocking(true)?;
    let mut stream = UnixStream::from_std(std)?;
    let exchange = async {
        stream.write_all(REQUEST).await?;
        let mut answer = [0u8; ANSWER.len()];
        stream.read_exact(&mut answer).await?;
        io::Result::Ok(answer)
    };
    let answer = tokio::time::timeout(ANSWER_WITHIN, exchange)
        .await
        .context("the agent already on this node did not let go of its endpoints in time")?
        .context("asking the agent already on this node to let go")?;
    anyhow::ensure!(
        answer == ANSWER,
        "the agent already on this node refused to let go of its endpoints"
    );
    Ok(Some(stream))
}

/// The node's endpoints (metrics, readiness, admin), bound as the agent
/// starts and answering "starting" (503) until [`NodeEndpoints::serve`] gives
/// them their handlers.
pub struct NodeEndpoints {
    handlers: Arc<OnceLock<[Handler; 3]>>,
    /// The predecessor's connection, kept open while this agent runs.
    _predecessor: Option<UnixStream>,
}

impl NodeEndpoints {
    /// Takes the node's endpoints (from a predecessor if one serves the node:
    /// see the module's doc) and binds `addrs` (metrics, readiness, admin).
    pub async fn start(pin_dir: &Path, addrs: [SocketAddr; 3]) -> anyhow::Result<NodeEndpoints> {
        let predecessor = claim(pin_dir).await?;
        if predecessor.is_some() {
            info!(
                "another agent serves this node: it has let go of the node's metrics, readiness and admin endpoints; both serve its pods until it is stopped"
            );
        }
        let handlers: Arc<OnceLock<[Handler; 3]>> = Arc::default();
        let late = handlers.clone();
        let bind: Bind = Box::new(move || {
            let mut listeners = Vec::with_capacity(3);
            for (addr, what) in addrs.into_iter().zip(["metrics", "readiness", "admin"]) {
                listeners.push(
                    bind_now(addr)
                        .with_context(|| format!("binding the {what} endpoint {addr}"))?,
                );
            }
            Ok(listeners
                .into_iter()
                .enumerate()
                .map(|(i, listener)| {
                    let late = late.clone();
                    let handler: Handler = Arc::new(
                        move |method: &str, path: &str, query: &str| match late.get() {
                            Some(h) => h[i](method, path, query),
                            None => Reply::text(503, "starting\n"),
                        },
                    );
                    tokio::spawn(crate::metrics::serve_http(listener, handler))
                })
                .collect())
        });
        bind_and_hand_over(pin_dir, bind).await?;
        Ok(NodeEndpoints {
            handlers,
            _predecessor: predecessor,
        })
    }

    /// From now on the endpoints answer with these.
    pub fn serve(&self, metrics: Handler, readiness: Handler, admin: Handler) {
        let _ = self.handlers.set([metrics, readiness, admin]);
    }
}

/// A listening socket on `addr`, now, for the runtime this runs on.
fn bind_now(addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// Binds the node's endpoints and spawns the tasks that serve them; every one
/// bound, or none.
type Bind = Box<dyn Fn() -> anyhow::Result<Vec<JoinHandle<()>>> + Send>;

/// Listens for a successor. A name just given up (or held by an agent that
/// just exited) may be taken for an instant: tried for up to a second.
async fn listen(pin_dir: &Path) -> anyhow::Result<UnixListener> {
    let addr = address(pin_dir)?;
    let mut tries = 0;
    let std = loop {
        match std::os::unix::net::UnixListener::bind_addr(&addr) {
            Ok(l) => break l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 20 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(e).context(
                    "listening for a successor: another agent serves this node's pin directory",
                );
            }
        }
    };
    std.set_nonblocking(true)?;
    Ok(UnixListener::from_std(std)?)
}

/// Binds the node's endpoints (`bind`) and serves them; then, whenever a
/// successor asks, stops them (their listeners close as their tasks end) and
/// answers, and takes them back if that successor goes before this agent
/// does. The agent serves its pods throughout.
async fn bind_and_hand_over(pin_dir: &Path, bind: Bind) -> anyhow::Result<()> {
    let mut serving = bind()?;
    let mut listener = listen(pin_dir).await?;
    let pin_dir = pin_dir.to_owned();
    tokio::spawn(async move {
        loop {
            let stream = successor(&listener).await;
            drop(listener);
            for task in std::mem::take(&mut serving) {
                task.abort();
                // Ends once the task is dropped, its listener with it.
                let _ = task.await;
            }
            let mut stream = stream;
            if stream.write_all(ANSWER).await.is_err() {
                warn!("the successor agent left before it was answered");
            } else {
                info!(
                    "a successor agent started on this node: it answers the node's metrics, readiness and admin endpoints now; this one serves its pods on until it is stopped"
                );
                // It keeps the connection open for as long as it runs.
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest).await;
                warn!(
                    "the successor agent on this node is gone before this one: this one answers the node's endpoints again"
                );
            }
            // Its sockets close as it exits, not all at once.
            let mut tries = 0;
            serving = loop {
                match bind() {
                    Ok(tasks) => break tasks,
                    Err(e) if tries < 50 => {
                        tries += 1;
                        if tries == 1 {
                            warn!(error = %format!("{e:#}"), "the node's endpoints are still taken; retrying");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "cannot take the node's endpoints back: this agent serves its pods without them");
                        break Vec::new();
                    }
                }
            };
            listener = match listen(&pin_dir).await {
                Ok(l) => l,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "cannot listen for a successor again: a later agent on this node will fail to start until this one stops");
                    return;
                }
            };
        }
    });
    Ok(())
}

/// The next successor's request, from a peer of this agent's own user.
async fn successor(listener: &UnixListener) -> UnixStream {
    // SAFETY: geteuid has no preconditions.
    let own = unsafe { libc::geteuid() };
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                warn!(error = %e, "succession socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == own => {}
            Ok(cred) => {
                warn!(
                    uid = cred.uid(),
                    pid = cred.pid(),
                    "succession socket: a peer of another user; closed"
                );
                continue;
            }
            Err(e) => {
                warn!(error = %e, "succession socket: cannot tell who the peer is; closed");
                continue;
            }
        }
        let mut request = [0u8; REQUEST.len()];
        match tokio::time::timeout(ANSWER_WITHIN, stream.read_exact(&mut request)).await {
            Ok(Ok(_)) if request == REQUEST => return stream,
            _ => warn!("succession socket: not a successor's request; closed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    fn answering(name: &'static str) -> Handler {
        Arc::new(move |_: &str, _: &str, _: &str| Reply::text(200, name))
    }

    /// Who answers `addr` now (`None`: nobody, or "starting").
    fn who(addr: SocketAddr) -> Option<String> {
        match crate::metrics::get(addr, "/") {
            Ok((200, body)) => Some(body),
            _ => None,
        }
    }

    fn wait_for(addr: SocketAddr, name: &str) {
        let until = std::time::Instant::now() + Duration::from_secs(10);
        while who(addr).as_deref() != Some(name) {
            assert!(
                std::time::Instant::now() < until,
                "{addr} never answered {name}: {:?}",
                who(addr)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_successor_takes_the_endpoints_and_its_predecessor_takes_them_back() {
        let pin = std::path::PathBuf::from(format!("/test/succession/{}", std::process::id()));
        let addrs: [SocketAddr; 3] = std::array::from_fn(|_| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        });
        let serve = |e: &NodeEndpoints, name: &'static str| {
            e.serve(answering(name), answering(name), answering(name));
        };

        let old_rt = runtime();
        let old = old_rt.block_on(NodeEndpoints::start(&pin, addrs)).unwrap();
        // Bound before its handlers are: "starting".
        assert_eq!(crate::metrics::get(addrs[1], "/").unwrap().0, 503);
        serve(&old, "old");
        wait_for(addrs[1], "old");

        // Not a successor's request: closed, nothing given up.
        let addr = address(&pin).unwrap();
        let mut wrong = std::os::unix::net::UnixStream::connect_addr(&addr).unwrap();
        std::io::Write::write_all(&mut wrong, b"hello, give me your ports\n").unwrap();
        let mut rest = Vec::new();
        let _ = std::io::Read::read_to_end(&mut wrong, &mut rest);
        assert!(rest.is_empty(), "answered a stranger: {rest:?}");
        assert_eq!(who(addrs[0]).as_deref(), Some("old"));

        // A successor takes all three at once.
        let new_rt = runtime();
        let new = new_rt.block_on(NodeEndpoints::start(&pin, addrs)).unwrap();
        serve(&new, "new");
        for a in addrs {
            wait_for(a, "new");
        }

        // It goes first (its process would exit): the predecessor takes them
        // back, and listens for the next successor.
        drop(new);
        drop(new_rt);
        for a in addrs {
            wait_for(a, "old");
        }
        let third_rt = runtime();
        let third = third_rt
            .block_on(NodeEndpoints::start(&pin, addrs))
            .unwrap();
        serve(&third, "third");
        wait_for(addrs[2], "third");
        drop(old);
        drop(old_rt);
        // With its predecessor gone, it serves on.
        assert_eq!(who(addrs[2]).as_deref(), Some("third"));
    }
}
