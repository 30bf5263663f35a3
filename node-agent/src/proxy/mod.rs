//! The data path: per-pod listeners and the byte copy between a pod's socket and the
//! upstream. `outbound` serves 15001 (captured connects), `inbound` serves 15006
//! (connections steered in by `sk_lookup`).
//!
//! Every socket here is made inside the pod's network namespace (see `netns`), so
//! outbound traffic leaves with the pod's own address and routes, and the inbound
//! connection to the application stays on the pod's loopback.

pub mod admit;
pub(crate) mod buffer;
pub mod copy;
pub mod inbound;
pub mod live;
pub mod outbound;

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tracing::{info, warn};
use weft_common::{AGENT_SOCKET_MARK, INBOUND_HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use self::admit::Served;
use crate::{
    certs::CertManager,
    config::{MeshConfig, WorkloadKey},
    hbone::client::Pool,
    identity::SpiffeId,
    netns::Netns,
    stats::{Flags, STATS, TcpLabels},
    telemetry::ACCESS_LOG,
    tls::TrustBundle,
    view::{Balancers, View},
};

/// What a listener needs to know about the pod it serves.
#[derive(Debug)]
pub struct Pod {
    pub workload: WorkloadKey,
    pub identity: SpiffeId,
    pub netns: Netns,
}

/// Proxy settings shared by every listener.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub connect_timeout: Duration,
    pub same_node: SameNode,
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
    view: std::sync::RwLock<Arc<View>>,
    pub balancers: Balancers,
    pub certs: CertManager,
    pub bundle: Arc<std::sync::RwLock<TrustBundle>>,
    pub pool: Pool,
    pub live: live::LiveConns,
    /// The pods this agent serves, for node-local connections.
    served: std::sync::RwLock<HashMap<WorkloadKey, Arc<Served>>>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        node: &str,
        certs: CertManager,
        bundle: Arc<std::sync::RwLock<TrustBundle>>,
        pool: Pool,
    ) -> Self {
        let balancers = Balancers::default();
        let view = View::new(MeshConfig::default(), node, &balancers);
        Shared {
            settings,
            node: node.to_owned(),
            view: std::sync::RwLock::new(Arc::new(view)),
            balancers,
            certs,
            bundle,
            pool,
            live: live::LiveConns::default(),
            served: Default::default(),
        }
    }

    /// Takes node-local connections to `pod` from now on.
    pub fn serve(&self, pod: Arc<Served>) {
        self.served
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.pod.workload.clone(), pod);
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

    /// The pod `w` if this agent serves it and node-local connections go
    /// in-process.
    pub fn served(&self, w: &crate::config::Workload) -> Option<Arc<Served>> {
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

    /// Compiles and installs `config`, then closes inbound connections it now
    /// denies.
    pub fn set_view(&self, config: MeshConfig) {
        let view = Arc::new(View::new(config, &self.node, &self.balancers));
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = view.clone();
        self.live.recheck(&view);
    }

    pub fn bundle(&self) -> TrustBundle {
        self.bundle
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Opens a listening socket inside `netns` (non-blocking; its accept loop
/// registers it with the runtime it runs on, see [`crate::workers::spawn_listener`]).
pub(crate) fn listen(netns: &Netns, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = netns.run(|| {
        Socket::new(
            Domain::for_address(addr),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )
    })??;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // [::1] is IPv6 only; [::] takes IPv4 too (one socket for sk_lookup).
        socket.set_only_v6(!addr.ip().is_unspecified())?;
    }
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Listens on `port` of every address inside `netns`: `[::]` (IPv4 too), or
/// `0.0.0.0` for a pod without IPv6.
pub(crate) fn listen_any(netns: &Netns, port: u16) -> io::Result<std::net::TcpListener> {
    listen(netns, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port))
        .or_else(|_| listen(netns, SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port)))
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

/// Connects to `dst` from inside `netns`, with the agent's socket mark, from
/// `source` if given.
pub(crate) async fn connect_from(
    netns: &Netns,
    dst: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let socket = netns.run(|| {
        Socket::new(
            Domain::for_address(dst),
            Type::STREAM.nonblocking().cloexec(),
            Some(Protocol::TCP),
        )
    })??;
    socket.set_mark(AGENT_SOCKET_MARK)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        // The port is left to `connect`, which picks one unique for the whole
        // 4-tuple (and may take over a port in TIME_WAIT, `tcp_tw_reuse`). A
        // `bind` to port 0 would pick one free of every other socket on this
        // address: the agent closes first, so every finished connection leaves
        // one in TIME_WAIT for a minute. Past about 200 new connections a
        // second to one pod that search grew slow, and at about 470 a second
        // it would run out of ports (see ARCHITECTURE.md).
        bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (IPv4 and IPv6 sockets alike): a later
/// `bind` to port 0 takes only the address, and `connect` chooses the port.
fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor, and a pointer to an int with its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&raw const on).cast(),
            std::mem::size_of_val(&on) as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Ports of the agent itself: never a destination through the mesh.
pub(crate) fn is_reserved_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_HBONE_PORT
    )
}

/// IPv4-mapped IPv6 addresses as plain IPv4.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Aborts the connection with a reset rather than a clean close, so the peer knows
/// it did not complete.
pub(crate) fn reset(stream: TcpStream) {
    let _ = stream.set_zero_linger();
    drop(stream);
}

/// Connections in flight (an access-log guard is alive for each).
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Connections in flight now.
pub fn in_flight() -> usize {
    ACTIVE.load(Relaxed)
}

/// Waits until no connection is in flight, or `deadline` passes; returns how many
/// were still open.
pub async fn drain(deadline: Duration) -> usize {
    let until = Instant::now() + deadline;
    loop {
        let n = ACTIVE.load(Relaxed);
        if n == 0 || Instant::now() >= until {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Which way a connection goes through this agent.
#[derive(Debug, Clone, Copy)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// One access-log line per connection, written when the guard drops, so that no
/// path (early refusal, error, panic unwinding a task) forgets it.
pub(crate) struct AccessLog {
    pub(crate) direction: Direction,
    pub(crate) pod: Arc<Pod>,
    pub(crate) src: SocketAddr,
    dst: Option<SocketAddr>,
    start: Instant,
    /// The SPIFFE identities of the two ends, when known.
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// How the connection crossed the network: `mutual_tls` (HBONE) or `none`.
    pub security: &'static str,
    /// The pooled HBONE connection that carried it.
    pub connection: Option<u64>,
    pub sent: u64,
    pub received: u64,
    pub end: &'static str,
    pub error: Option<String>,
    /// The service the client dialed, when it dialed one.
    pub service: Option<String>,
    /// The metric labels, once both ends are known (see [`AccessLog::opened`]).
    tcp: Option<TcpLabels>,
}

impl AccessLog {
    pub fn new(direction: Direction, pod: Arc<Pod>, src: SocketAddr) -> Self {
        ACTIVE.fetch_add(1, Relaxed);
        AccessLog {
            direction,
            pod,
            src,
            dst: None,
            start: Instant::now(),
            src_identity: None,
            dst_identity: None,
            security: "none",
            connection: None,
            sent: 0,
            received: 0,
            end: "unknown",
            error: None,
            service: None,
            tcp: None,
        }
    }

    /// Both ends are known: counts the connection as opened under `labels`; its
    /// close is counted when the log is written.
    pub fn opened(&mut self, labels: TcpLabels) {
        STATS.opened(&labels);
        self.tcp = Some(labels);
    }

    /// The response flag an end maps to.
    fn flags(&self) -> Flags {
        match self.end {
            "denied" => Flags::Deny,
            "upstream_connect_failed" | "no_healthy_endpoint" | "tls_error" | "no_certificate" => {
                Flags::Connect
            }
            _ => Flags::None,
        }
    }

    pub fn set_dst(&mut self, dst: SocketAddr) {
        self.dst = Some(dst);
    }

    pub fn fail(&mut self, end: &'static str, error: impl ToString) {
        self.end = end;
        self.error = Some(error.to_string());
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Relaxed);
        let flags = self.flags();
        if let Some(mut labels) = self.tcp.take() {
            labels.flags = flags;
            STATS.closed(&labels, self.sent, self.received);
        }
        let dst = self.dst.map(|a| a.to_string());
        info!(
            target: ACCESS_LOG,
            direction = self.direction.as_str(),
            workload = %self.pod.workload,
            src.addr = %self.src,
            dst.addr = dst.as_deref().unwrap_or("-"),
            service = self.service.as_deref(),
            src.identity = self.src_identity.as_deref(),
            dst.identity = self.dst_identity.as_deref(),
            security = self.security,
            hbone.connection = self.connection,
            bytes_sent = self.sent,
            bytes_received = self.received,
            duration_ms = self.start.elapsed().as_secs_f64() * 1e3,
            end = self.end,
            error = self.error.as_deref(),
            "connection closed"
        );
    }
}

/// Pacing for an accept loop whose `accept` fails (typically out of file
/// descriptors): waits 10 ms, doubling up to 1 s while failures continue, and warns
/// once per run of failures rather than on every retry.
#[derive(Default)]
pub(crate) struct AcceptBackoff {
    delay: Duration,
}

impl AcceptBackoff {
    pub async fn failed(&mut self, workload: &WorkloadKey, direction: Direction, e: io::Error) {
        if self.delay.is_zero() {
            warn!(%workload, direction = direction.as_str(), error = %e, "accept failed; backing off");
            self.delay = Duration::from_millis(10);
        } else {
            self.delay = (self.delay * 2).min(Duration::from_secs(1));
        }
        tokio::time::sleep(self.delay).await;
    }

    pub fn succeeded(&mut self) {
        self.delay = Duration::ZERO;
    }
}

/// A pod listener's accept loop, until `stop` says so: registers `listeners`
/// (made by [`listen`]; one or two) with the runtime this runs on (a worker's,
/// see [`crate::workers::spawn_listener`]), takes connections from whichever is
/// ready, paces failures, and gives each connection to `accepted`. `name` says
/// which listener stopped, in the log.
pub(crate) async fn accept_loop(
    listeners: Vec<std::net::TcpListener>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    workload: &WorkloadKey,
    direction: Direction,
    name: &'static str,
    mut accepted: impl FnMut(TcpStream, SocketAddr),
) {
    let listeners = match listeners
        .into_iter()
        .map(TcpListener::from_std)
        .collect::<io::Result<Vec<_>>>()
    {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%workload, ?direction, error = %e, "cannot accept on this listener: its connections will wait and time out");
            return;
        }
    };
    let accept_any = async |ls: &[TcpListener]| match ls {
        // At most two listeners: poll both, take whichever is ready.
        [a] => a.accept().await,
        [a, b, ..] => tokio::select! {
            r = a.accept() => r,
            r = b.accept() => r,
        },
        [] => std::future::pending().await,
    };
    let mut backoff = AcceptBackoff::default();
    loop {
        tokio::select! {
            _ = stopped(&mut stop) => break,
            r = accept_any(&listeners) => match r {
                Ok((stream, peer)) => {
                    backoff.succeeded();
                    accepted(stream, peer);
                }
                Err(e) => backoff.failed(workload, direction, e).await,
            },
        }
    }
    tracing::debug!(%workload, "{name} listener stopped");
}

/// Waits until `stop` says so (or its sender is gone).
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Connects to `dst` from the pod's namespace and copies bytes both ways until
/// both sides are done; the access log records how it went.
pub(crate) async fn forward(
    mut log: AccessLog,
    mut down: TcpStream,
    dst: SocketAddr,
    source: Option<IpAddr>,
    settings: Settings,
    kill: Option<live::Kill>,
) {
    log.set_dst(dst);
    if is_reserved_port(dst.port()) {
        log.fail("refused", "destination port is reserved for the mesh");
        reset(down);
        return;
    }
    let _ = down.set_nodelay(true);
    let mut up = match connect_from(&log.pod.netns, dst, source, settings.connect_timeout).await {
        Ok(up) => up,
        Err(e) => {
            log.fail("upstream_connect_failed", e);
            reset(down);
            return;
        }
    };
    if matches!(log.direction, Direction::Outbound) {
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
                    log.fail("denied", reason);
                    reset(down);
                    return;
                }
            }
        }
        None => copy::bidirectional(&mut down, &mut up).await,
    };
    log.sent = t.sent;
    log.received = t.received;
    match t.result {
        Ok(()) => log.end = "closed",
        Err((copy::Side::Downstream, e)) => log.fail("downstream_error", e),
        Err((copy::Side::Upstream, e)) => log.fail("upstream_error", e),
    }
}
