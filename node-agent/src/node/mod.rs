//! The node agent's data path: the pods it serves and their listeners.
//!
//! `pods` reconciles the enrolled pods with the model and the node's `registry`
//! (where each pod's network namespace is); each enrolled [`Pod`] gets three
//! listeners inside its namespace: `outbound` (15001, the pod's captured
//! connects), `inbound` (15006, plaintext steered in by `sk_lookup`) and
//! `hbone_in` (15008, HBONE from other agents, through [`crate::hbone::server`]).
//! `admit` is what the destination side checks before it connects a peer to an
//! application, `live` the inbound connections policy may have to close, and
//! `access` the one access-log line each connection writes.
//!
//! Every socket here is made inside a pod's network namespace
//! ([`crate::net::socket`]), so outbound traffic leaves with the pod's own address
//! and routes, and the inbound connection to the application stays in the pod.

pub mod access;
pub mod admit;
pub mod cni;
pub mod hbone_in;
pub mod inbound;
pub(crate) mod listener;
pub mod live;
pub mod outbound;
pub mod pod;
pub mod pods;
pub mod registry;
pub mod scan;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, RwLock},
    time::Duration,
};

use tokio::net::TcpStream;
use weft_common::Handover;

use self::access::{AccessLog, Direction, End};
pub use self::pod::Pod;
use crate::{
    certs::CertManager,
    ebpf::HandoverTable,
    hbone::client::Pool,
    model::{Mesh, Workload, WorkloadKey},
    net::{
        copy,
        limit::Limit,
        socket::{canonical, connect_from, reset},
    },
    tls::TrustBundle,
    view::{Balancers, View},
};

/// Proxy settings shared by every listener.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub same_node: SameNode,
    pub caps: Caps,
    pub inbound_source: InboundSource,
}

/// Where the agent's connection to an application inside its pod comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InboundSource {
    /// The client's own address (a transparent socket, with the routing it
    /// needs set up in the pod): the application's logs, its own allow-lists
    /// and anything that filters on addresses see who really connected.
    Client,
    /// `127.0.0.6` (`::1` for IPv6), as Istio's sidecars and ztunnel's
    /// node-level mode do: nothing to set up inside the pod, but every mesh
    /// peer looks like loopback to the application.
    Loopback,
}

/// What each pod listener lets its peers hold at once (see
/// [`crate::net::limit`]): past a cap a connection is reset at accept and an
/// HBONE stream refused (`REFUSED_STREAM`), counted in
/// `weft_listener_refusals_total`. Above them all, the node's budget
/// ([`Shared::budget`]) keeps the agent within its open-file limit.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Connections one listener holds (on 15008: also streams).
    pub per_listener: usize,
    /// Connections from one peer address (15006, 15008).
    pub per_peer: usize,
    /// HBONE streams from one peer address on one pod's 15008. A source pod's
    /// agent multiplexes all its connections to the pod into streams, so this
    /// is as many connections as one client pod may hold open to this one.
    pub streams_per_peer: usize,
    /// TLS handshakes in progress on one 15008 listener.
    pub handshakes: usize,
    /// TLS handshakes in progress from one peer address.
    pub handshakes_per_peer: usize,
    /// The TLS and HTTP/2 handshakes of 15008, together.
    pub handshake_timeout: Duration,
    /// An inbound HBONE connection with no stream is closed after this long.
    pub hbone_idle: Duration,
}

impl Default for Caps {
    fn default() -> Self {
        Caps {
            per_listener: 16_384,
            per_peer: 4096,
            streams_per_peer: 16_384,
            handshakes: 256,
            handshakes_per_peer: 32,
            handshake_timeout: crate::hbone::HANDSHAKE_TIMEOUT,
            hbone_idle: crate::hbone::SERVER_IDLE_TIMEOUT,
        }
    }
}

/// How a connection between two pods of this node travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SameNode {
    /// The agent connects the two pods itself: the destination's policy is
    /// applied to the source's identity as for HBONE, without TLS or a TCP hop
    /// through the node (Istio ztunnel's node-local fast path).
    InProcess,
    /// Over HBONE to this agent's own 15008 listener, as between nodes.
    Hbone,
}

/// What every listener of this agent shares: settings, the current mesh view,
/// certificates, the trust bundle, the HBONE pool, the services' balancers and
/// the inbound connections policy may have to close.
pub struct Shared {
    pub settings: Settings,
    node: String,
    view: RwLock<Arc<View>>,
    pub balancers: Balancers,
    pub certs: CertManager,
    pub bundle: Arc<RwLock<TrustBundle>>,
    pub pool: Pool,
    pub live: live::LiveConns,
    /// Sockets the agent holds for proxied connections, in all: one per
    /// accepted connection (at accept) and one per connection to an
    /// application or a plaintext destination (when it is made), so the agent
    /// stays within its open-file limit whatever a flood spread over many pods
    /// does.
    pub budget: Limit,
    /// The kernel's list of handovers in progress (set once the capture is
    /// loaded): see [`connect_app`].
    handover: std::sync::OnceLock<HandoverTable>,
    /// The pods this agent serves, for node-local connections.
    served: RwLock<HashMap<WorkloadKey, Arc<Pod>>>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        node: &str,
        certs: CertManager,
        bundle: Arc<RwLock<TrustBundle>>,
        pool: Pool,
        budget: usize,
    ) -> Self {
        let balancers = Balancers::default();
        let view = View::new(Mesh::default(), node, &balancers);
        Shared {
            settings,
            node: node.to_owned(),
            view: RwLock::new(Arc::new(view)),
            balancers,
            certs,
            bundle,
            pool,
            live: live::LiveConns::default(),
            budget: Limit::total(budget),
            handover: std::sync::OnceLock::new(),
            served: Default::default(),
        }
    }

    pub fn set_handover(&self, table: HandoverTable) {
        let _ = self.handover.set(table);
    }

    /// This agent's node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Takes node-local connections to `pod` from now on.
    pub fn serve(&self, pod: Arc<Pod>) {
        self.served
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.key.clone(), pod);
    }

    /// No more node-local connections to `workload` (`None`: to any pod).
    pub fn unserve(&self, workload: Option<&WorkloadKey>) {
        let mut served = self.served.write().unwrap_or_else(|e| e.into_inner());
        match workload {
            Some(w) => {
                served.remove(w);
            }
            None => served.clear(),
        }
    }

    /// The pod of `w` if this agent serves it and node-local connections go
    /// in-process.
    pub fn served(&self, w: &Workload) -> Option<Arc<Pod>> {
        if self.settings.same_node != SameNode::InProcess || w.node != self.node {
            return None;
        }
        self.served
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&w.key())
            .cloned()
    }

    /// The mesh as of the last good config (a cheap `Arc` clone).
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Compiles and installs `mesh`, then closes inbound connections it now
    /// denies.
    pub fn set_view(&self, mesh: Mesh) -> Arc<View> {
        let view = Arc::new(View::new(mesh, &self.node, &self.balancers));
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view.clone();
        // After the swap: a connection decided on the old view either is
        // registered by now (and is checked here) or decides on this view
        // (`authorize` reads the view under the same lock).
        self.live.recheck(&view);
        view
    }

    /// Installs the view in force with `delta` applied (see
    /// [`View::with_delta`]), then closes the inbound connections to the
    /// changed workloads it now denies. Only the follow loop changes the view.
    pub fn apply_delta(&self, delta: crate::model::MeshDelta) -> Arc<View> {
        let changed: std::collections::HashSet<WorkloadKey> = delta
            .upserts
            .iter()
            .map(|w| w.key())
            .chain(delta.removes.iter().cloned())
            .collect();
        let view = Arc::new(self.view().with_delta(delta, &self.balancers));
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view.clone();
        self.live.recheck_to(&view, |k| changed.contains(k));
        view
    }

    /// Decides a new inbound connection on the view in force, and registers it
    /// for re-checks if allowed (see [`live::LiveConns::authorize`]).
    pub fn authorize(&self, facts: live::Facts) -> Result<live::Kill, String> {
        self.live.authorize(facts, || self.view())
    }

    pub fn bundle(&self) -> TrustBundle {
        self.bundle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Source the agent binds for its connection to the application inside a pod:
/// `sk_lookup` leaves loopback sources alone, so this connection is not steered
/// back to the agent (the same address Istio uses for inbound passthrough).
pub(crate) const INBOUND_SOURCE_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6));
pub(crate) const INBOUND_SOURCE_V6: IpAddr = IpAddr::V6(Ipv6Addr::LOCALHOST);

/// The inbound source in `dst`'s family.
pub(crate) fn inbound_source(dst: SocketAddr) -> IpAddr {
    if dst.is_ipv4() {
        INBOUND_SOURCE_V4
    } else {
        INBOUND_SOURCE_V6
    }
}

/// Connects to the application at `dst` inside `pod`, for a connection that
/// came from `client`: from the client's own address where the pod is set up
/// for it ([`InboundSource::Client`]), else from the loopback source.
///
/// A handover: a socket bound to the client's address (and a port of its own)
/// is filed in the kernel's handover map under its 4-tuple, so `sk_lookup` lets
/// its SYN through to the application instead of steering it back to the
/// agent; struck off as soon as the connect is done (only a SYN is looked up).
/// Two `bpf()` calls per connection. Without the entry (map full) the
/// connection goes from loopback: never around the check, never in a loop.
pub(crate) async fn connect_app(
    shared: &Shared,
    pod: &Pod,
    dst: SocketAddr,
    client: IpAddr,
) -> std::io::Result<TcpStream> {
    let timeout = shared.settings.connect_timeout;
    let client = client.to_canonical();
    let table = shared.handover.get();
    if let (true, Some(table), true) = (pod.handover, table, client.is_ipv4() == dst.is_ipv4()) {
        // Ports of the dynamic range, from a different start each time; a port
        // whose 4-tuple is taken (rare: the same client, port and destination
        // within a minute) costs one more try.
        for _ in 0..HANDOVER_TRIES {
            let from = SocketAddr::new(client, handover_port());
            let socket = match crate::net::socket::transparent_socket(&pod.netns, dst, from) {
                Ok(s) => s,
                Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => continue,
                Err(e) => return Err(e),
            };
            let key = handover_key(dst, from);
            if table.insert(&key).is_err() {
                break; // the map is full: from loopback
            }
            // Struck off when the connect is done, or when this future is
            // dropped halfway: an entry must never outlive its socket.
            let filed = Filed { table, key };
            let up = crate::net::socket::connect(socket, dst, timeout).await;
            drop(filed);
            match up {
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => continue,
                up => return up,
            }
        }
    }
    connect_from(&pod.netns, dst, Some(inbound_source(dst)), timeout).await
}

/// A handover's entry in the kernel's map, removed when dropped.
struct Filed<'a> {
    table: &'a HandoverTable,
    key: Handover,
}

impl Drop for Filed<'_> {
    fn drop(&mut self) {
        self.table.remove(&self.key);
    }
}

/// Ports a handover tries before it goes from loopback instead.
const HANDOVER_TRIES: usize = 8;

/// The next handover port: 32768–60999 (Linux's default dynamic range; the
/// client's address is not the pod's, so the pod's own range does not matter),
/// stepping by a large odd number so consecutive connections land far apart.
fn handover_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 32_768;
    const COUNT: u32 = 61_000 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(7_919, Ordering::Relaxed);
    (FIRST + n % COUNT) as u16
}

/// The handover map's key for a connection from `client` to `dst`.
fn handover_key(dst: SocketAddr, client: SocketAddr) -> Handover {
    let bytes = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => weft_common::v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    };
    Handover {
        local: bytes(dst.ip()),
        remote: bytes(client.ip()),
        local_port: dst.port(),
        remote_port: client.port(),
    }
}

/// Connects to `dst` in the pod (from `client`'s address where it can, see
/// [`connect_app`]) and copies bytes both ways until both sides are done; the
/// access log records how it went.
pub(crate) async fn forward(
    mut log: AccessLog,
    mut down: TcpStream,
    dst: SocketAddr,
    client: Option<IpAddr>,
    shared: &Shared,
    kill: Option<live::Kill>,
) {
    log.set_dst(dst);
    if weft_common::is_mesh_port(dst.port()) {
        log.fail(End::Refused, "destination port is reserved for the mesh");
        reset(down);
        return;
    }
    let _ = down.set_nodelay(true);
    // The socket to the destination spends the node's budget like the one
    // accepted did.
    let Ok(_socket) = shared.budget.admit(log.src.ip()) else {
        let kind = match log.direction {
            Direction::Inbound => crate::stats::Listener::Inbound,
            Direction::Outbound => crate::stats::Listener::Outbound,
        };
        crate::stats::STATS.refused(kind, crate::net::limit::Refused::NodeLimit);
        log.fail(End::Refused, "the node's connection budget is spent");
        reset(down);
        return;
    };
    let up = match client {
        Some(client) => connect_app(shared, &log.pod, dst, client).await,
        None => connect_from(&log.pod.netns, dst, None, shared.settings.connect_timeout).await,
    };
    let mut up = match up {
        Ok(up) => up,
        Err(e) => {
            log.fail(End::UpstreamConnectFailed, e);
            reset(down);
            return;
        }
    };
    if log.direction == Direction::Outbound {
        // The pod's own address and port, as the destination sees them; the
        // accepted socket only shows the loopback hop inside the pod.
        if let Ok(local) = up.local_addr() {
            log.src = canonical(local);
        }
    }
    let t = match &kill {
        Some(kill) => {
            tokio::select! {
                t = copy::bidirectional(&mut down, &mut up) => t,
                reason = kill.killed() => {
                    log.fail(End::Denied, reason);
                    reset(down);
                    return;
                }
            }
        }
        None => copy::bidirectional(&mut down, &mut up).await,
    };
    log.finish(&t, false);
}
