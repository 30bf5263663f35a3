//! Outbound: the pod's captured connects arrive on 15001 (`127.0.0.1` and `[::1]`
//! inside its namespace). The original destination comes from the kernel (one map
//! lookup keyed by the pod's namespace and the client's own address and port).
//!
//! A destination that is an enrolled workload gets an HBONE stream (mutual TLS with
//! the source pod's certificate, checking the destination's identity). A service's
//! virtual IP is resolved to one of its endpoints by the service's balancer (an
//! enrolled endpoint over HBONE, any other in plaintext), with retries on other
//! endpoints and outlier detection. Any other destination is outside the mesh: by
//! the source pod's `outside_mesh` setting it goes direct in plaintext, or is
//! refused.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use tokio::io::AsyncWriteExt;
use tracing::{debug, warn};
use weft_common::{AF_INET, ConnKey, OUTBOUND_PORT, OrigDst, v4_mapped};

use super::{
    Pod, Shared,
    access::{AccessLog, Direction, End, MUTUAL_TLS, NODE_LOCAL},
    admit::{Admitted, admit},
    forward,
    listener::accept_loop,
};
use crate::{
    ebpf::OrigDstTable,
    hbone::{
        self,
        client::{Early, Target},
        server::Refusal,
        stream,
    },
    identity::SpiffeId,
    model::{OutsideMesh, Workload},
    net::{
        copy,
        limit::Limit,
        socket::{canonical, connect_from, listen, reset},
    },
    stats::{self, Flags, Peer, Reporter, STATS, ServiceName, TcpLabels},
};

pub struct OutboundListener {
    pod: Arc<Pod>,
    listeners: Vec<std::net::TcpListener>,
    orig_dst: OrigDstTable,
    shared: Arc<Shared>,
}

impl OutboundListener {
    /// Binds 15001 on the pod's IPv4 loopback, and on its IPv6 loopback when the pod
    /// has IPv6.
    pub fn new(
        pod: Arc<Pod>,
        orig_dst: OrigDstTable,
        shared: Arc<Shared>,
    ) -> std::io::Result<Self> {
        let v4 = listen(
            &pod.netns,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), OUTBOUND_PORT),
        )?;
        let mut listeners = vec![v4];
        match listen(
            &pod.netns,
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), OUTBOUND_PORT),
        ) {
            Ok(v6) => listeners.push(v6),
            Err(e) => {
                warn!(workload = %pod.key, error = %e, "no IPv6 outbound listener; IPv6 connects from this pod will be refused")
            }
        }
        Ok(OutboundListener {
            pod,
            listeners,
            orig_dst,
            shared,
        })
    }

    /// Accepts until the pod stops; run it with [`crate::workers::spawn_listener`].
    pub async fn run(self) {
        let OutboundListener {
            pod,
            listeners,
            orig_dst,
            shared,
        } = self;
        let cap = Limit::total(shared.settings.caps.per_listener);
        let (p, s) = (pod.clone(), shared.clone());
        accept_loop(
            listeners,
            &pod,
            &shared.budget,
            stats::Listener::Outbound,
            // Every peer is the pod itself, on loopback: a total cap only.
            cap,
            move |stream, peer| handle(p.clone(), orig_dst.clone(), s.clone(), stream, peer),
        )
        .await;
    }
}

async fn handle(
    pod: Arc<Pod>,
    orig_dst: OrigDstTable,
    shared: Arc<Shared>,
    down: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let mut log = AccessLog::new(Direction::Outbound, pod.clone(), canonical(peer));
    let key = conn_key(pod.netns.cookie(), peer);
    let Some(dst) = orig_dst.take(&key).map(|d| to_socket_addr(&d)) else {
        // Not captured by our programs (someone dialed 15001 directly), or the
        // entry was evicted: there is nowhere safe to send it.
        log.fail(End::Refused, "no original destination for this connection");
        reset(down);
        return;
    };
    log.set_dst(dst);
    let view = shared.view();
    let Some(me) = view.workload(&pod.key) else {
        log.fail(End::Refused, "this pod is no longer in the config");
        reset(down);
        return;
    };
    // The pod's own address in the destination's family: what the peer sees.
    let source_ip = me
        .addresses
        .iter()
        .copied()
        .find(|a| a.is_ipv4() == dst.is_ipv4());
    if let Some(ip) = source_ip {
        log.src = SocketAddr::new(ip, peer.port());
    }
    let source = Peer::of(me, Some(pod.identity.to_string()));
    let outside = me.outside_mesh;
    let from = Source {
        client: log.src,
        ip: source_ip,
        baggage: hbone::headers::baggage(
            &me.namespace,
            &me.name,
            source.app.as_deref().unwrap_or_default(),
            source.version.as_deref().unwrap_or_default(),
        ),
    };
    if weft_common::is_mesh_port(dst.port()) {
        log.fail(End::Refused, "destination port is reserved for the mesh");
        reset(down);
        return;
    }
    let _ = down.set_nodelay(true);

    if let Some(w) = view.workload_by_address(dst.ip()).filter(|w| w.enrolled) {
        let endpoint = Endpoint::of(&shared, &view, w, dst);
        let Ok(endpoint) = endpoint else {
            log.fail(End::Refused, "the destination has no valid identity");
            reset(down);
            return;
        };
        drop(view);
        let labels = labels(source, &endpoint, None);
        let timeout = shared.settings.connect_timeout;
        log.identities(&endpoint);
        let mut early = Early::default();
        match connect(&shared, &pod, &from, &endpoint, timeout, &down, &mut early).await {
            Ok(up) => carry(log, down, up, early, labels, &endpoint).await,
            Err(e) => {
                log.opened(labels);
                log.fail(e.end(), e);
                reset(down);
            }
        }
        return;
    }

    if let Some((svc, balancer)) = view.service_by_vip(dst.ip()) {
        let (svc, balancer) = (svc.clone(), balancer.clone());
        let waypoint = view.waypoint_of(&svc).cloned();
        to_service(
            log,
            down,
            (&pod, &shared, view),
            (&svc, balancer, waypoint),
            (source, from, dst),
            outside,
        )
        .await;
        return;
    }

    let destination = view
        .workload_by_address(dst.ip())
        .map(|w| Peer::of(w, None))
        .unwrap_or_default();
    drop(view);
    match outside {
        OutsideMesh::Passthrough => {
            log.opened(TcpLabels {
                reporter: Reporter::Source,
                source,
                destination,
                service: None,
                mutual_tls: false,
                flags: Flags::None,
            });
            forward(log, down, dst, None, &shared, None).await
        }
        OutsideMesh::Refuse => {
            log.fail(
                End::Refused,
                "destination is outside the mesh (outside_mesh: refuse)",
            );
            reset(down);
        }
    }
}

/// A destination pod, as the data path needs it.
struct Endpoint {
    workload: Peer,
    /// What the connection asks for (`CONNECT addr`).
    addr: SocketAddr,
    /// Where its HBONE stream goes when not to `addr`'s port 15008 (a
    /// waypoint's replica, for a service bound to it).
    via: Option<SocketAddr>,
    /// Its identity when it is in the mesh (HBONE); `None` for plaintext.
    identity: Option<SpiffeId>,
    /// The pod, when this agent serves it and connects such pods in-process.
    local: Option<Arc<Pod>>,
}

impl Endpoint {
    fn of(
        shared: &Shared,
        view: &crate::view::View,
        w: &crate::model::Workload,
        addr: SocketAddr,
    ) -> Result<Endpoint, crate::identity::Error> {
        let identity = if w.enrolled || w.native_tunnel {
            Some(w.identity(view.trust_domain())?)
        } else {
            None
        };
        Ok(Endpoint {
            workload: Peer::of(w, identity.as_ref().map(ToString::to_string)),
            addr,
            via: None,
            local: identity
                .as_ref()
                .filter(|_| w.enrolled)
                .and_then(|_| shared.served(w)),
            identity,
        })
    }
}

impl AccessLog {
    /// Both identities and how the connection is secured, when the endpoint
    /// is in the mesh (also for failed attempts and refusals: the log then says
    /// who was expected, and that the peer that refused was reached over mutual
    /// TLS).
    fn identities(&mut self, ep: &Endpoint) {
        self.src_identity = ep.identity.as_ref().map(|_| self.pod.identity.to_string());
        self.dst_identity = ep.identity.as_ref().map(ToString::to_string);
        self.security = match (&ep.identity, &ep.local) {
            (Some(_), Some(_)) => NODE_LOCAL,
            (Some(_), None) => MUTUAL_TLS,
            (None, _) => "none",
        };
    }
}

fn labels(source: Peer, ep: &Endpoint, service: Option<ServiceName>) -> TcpLabels {
    TcpLabels {
        reporter: Reporter::Source,
        source,
        destination: ep.workload.clone(),
        service,
        mutual_tls: ep.identity.is_some(),
        flags: Flags::None,
    }
}

/// An upstream: an HBONE stream, a pod of this node's admitted in-process, or a
/// plaintext socket.
enum Upstream {
    Hbone(hbone::client::Tunnel),
    Local(Box<Local>),
    Plain(tokio::net::TcpStream),
}

/// A node-local connection: the socket to the destination application, and its
/// destination side (its own access-log line and metrics, and the handle that
/// closes it when policy changes), as an HBONE stream would have on the
/// destination's agent.
struct Local {
    admitted: Admitted,
    log: AccessLog,
}

#[derive(Debug, thiserror::Error)]
enum ConnectError {
    #[error(transparent)]
    Hbone(#[from] hbone::client::Error),
    #[error("refused by the destination: {0}")]
    Local(Refusal),
    #[error("connecting to {addr}: {source}")]
    Plain {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        timeout: std::time::Duration,
    },
}

impl ConnectError {
    fn end(&self) -> End {
        use hbone::client::Error as H;
        match self {
            ConnectError::Hbone(H::Certificate(_) | H::Setup(_)) => End::NoCertificate,
            ConnectError::Hbone(H::Tls { .. }) => End::TlsError,
            ConnectError::Hbone(H::Downstream(_)) => End::DownstreamError,
            ConnectError::Hbone(e) if e.is_denied() => End::Denied,
            ConnectError::Local(r) if End::of_status(r.status) == End::Denied => End::Denied,
            _ => End::UpstreamConnectFailed,
        }
    }

    /// Whether the failure is the destination's: what outlier detection may
    /// count against it. The source's own trouble (no certificate of its own
    /// yet, its CA unreachable), a client that went away and a policy refusal
    /// are not.
    fn blames_destination(&self) -> bool {
        match self {
            ConnectError::Hbone(e) if e.is_local() => false,
            _ => !matches!(self.end(), End::Denied | End::DownstreamError),
        }
    }

    /// Whether another endpoint might do better: only when this one was to
    /// blame.
    fn retryable(&self) -> bool {
        self.blames_destination()
    }
}

/// Who a connection comes from, as its destination is told.
struct Source {
    /// The source pod's address and port, as a peer sees them.
    client: SocketAddr,
    /// The pod's own address in the destination's family (`forwarded`).
    ip: Option<std::net::IpAddr>,
    /// The source workload, as ztunnel names it (`baggage`).
    baggage: Option<http::HeaderValue>,
}

/// Connects `from` to `ep`. An HBONE stream already carries what the client
/// sent while it was being opened (kept in `early`); a node-local or plaintext
/// connection gets what an earlier attempt kept before anything else.
///
/// Its state (an HBONE handshake's, when it opens a connection; the retry
/// loop's) lives in a box freed once connected, instead of sizing the task
/// each idle connection keeps for its life.
async fn connect(
    shared: &Shared,
    pod: &Pod,
    from: &Source,
    ep: &Endpoint,
    timeout: std::time::Duration,
    down: &tokio::net::TcpStream,
    early: &mut Early,
) -> Result<Upstream, ConnectError> {
    Box::pin(connect_boxed(shared, pod, from, ep, timeout, down, early)).await
}

/// [`connect`]'s body.
async fn connect_boxed(
    shared: &Shared,
    pod: &Pod,
    from: &Source,
    ep: &Endpoint,
    timeout: std::time::Duration,
    down: &tokio::net::TcpStream,
    early: &mut Early,
) -> Result<Upstream, ConnectError> {
    if ep.identity.is_some() && ep.local.is_none() {
        // The source's own certificate first, outside the attempt's deadline:
        // waiting for the CA is this side's trouble, never the endpoint's.
        shared
            .certs
            .get(&pod.identity, timeout)
            .await
            .map_err(|e| ConnectError::Hbone(e.into()))?;
    }
    let attempt = async {
        match (&ep.identity, &ep.local) {
            (Some(dst_id), Some(to)) => {
                // Boxed, so that its state does not enlarge every connection's task.
                Box::pin(connect_local(
                    shared,
                    pod,
                    from.client,
                    to,
                    dst_id,
                    ep.addr,
                    early,
                ))
                .await
            }
            (Some(dst_id), None) => shared
                .pool
                .open(
                    Target {
                        netns: &pod.netns,
                        src: &pod.identity,
                        dst: dst_id,
                        hbone: ep.via.unwrap_or(SocketAddr::new(
                            ep.addr.ip(),
                            weft_common::INBOUND_HBONE_PORT,
                        )),
                        authority: ep.addr,
                        source_ip: from.ip,
                        baggage: from.baggage.clone(),
                    },
                    Some(down),
                    early,
                )
                .await
                .map(Upstream::Hbone)
                .map_err(ConnectError::from),
            (None, _) => {
                let plain = |source| ConnectError::Plain {
                    addr: ep.addr,
                    source,
                };
                let mut up = connect_from(&pod.netns, ep.addr, None, timeout)
                    .await
                    .map_err(plain)?;
                for chunk in early.chunks() {
                    up.write_all(chunk).await.map_err(plain)?;
                }
                Ok(Upstream::Plain(up))
            }
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            addr: ep.addr,
            timeout,
        }),
    }
}

/// What the destination's agent does with an HBONE stream, done here for a pod
/// of this node: admits `client` to `dst` in `to`, then sends what an earlier
/// attempt kept.
async fn connect_local(
    shared: &Shared,
    pod: &Pod,
    client: SocketAddr,
    to: &Arc<Pod>,
    dst_id: &SpiffeId,
    dst: SocketAddr,
    early: &Early,
) -> Result<Upstream, ConnectError> {
    let mut log = AccessLog::new(Direction::Inbound, to.clone(), client);
    log.src_identity = Some(pod.identity.to_string());
    log.dst_identity = Some(dst_id.to_string());
    log.security = NODE_LOCAL;
    let mut admitted = match admit(shared, to, &pod.identity, client, dst, &mut log).await {
        Ok(a) => a,
        Err(refused) => {
            log.fail(End::of_status(refused.status), &refused.why);
            return Err(ConnectError::Local(refused));
        }
    };
    for chunk in early.chunks() {
        if let Err(e) = admitted.up.write_all(chunk).await {
            log.fail(End::UpstreamError, &e);
            return Err(ConnectError::Plain {
                addr: dst,
                source: e,
            });
        }
    }
    Ok(Upstream::Local(Box::new(Local { admitted, log })))
}

/// Copies between the pod's socket and the upstream until both are done.
async fn carry(
    mut log: AccessLog,
    mut down: tokio::net::TcpStream,
    up: Upstream,
    early: Early,
    labels: TcpLabels,
    ep: &Endpoint,
) {
    log.set_dst(ep.addr);
    log.opened(labels);
    log.identities(ep);
    // The early bytes are sent; keep only their count, not the buffers, for the
    // life of the connection.
    let (early_len, sent_all) = (early.len() as u64, early.eof());
    drop(early);
    let t = match up {
        Upstream::Hbone(tunnel) => {
            log.connection = Some(tunnel.connection);
            stream::bidirectional(&mut down, tunnel.send, tunnel.recv, sent_all).await
        }
        Upstream::Local(local) => {
            // Boxed, so that its state does not enlarge every connection's task.
            match Box::pin(carry_local(&mut log, &mut down, *local, early_len)).await {
                Some(t) => t,
                None => return,
            }
        }
        Upstream::Plain(mut up) => {
            if let Ok(local) = up.local_addr() {
                log.src = canonical(local);
            }
            copy::bidirectional(&mut down, &mut up).await
        }
    };
    log.sent = early_len;
    log.finish(&t, false);
}

/// Copies between the pod's socket and the destination application's, and
/// fills in the destination side's access log; `None` when a policy change
/// closed the connection (both sockets are reset).
async fn carry_local(
    log: &mut AccessLog,
    down: &mut tokio::net::TcpStream,
    local: Local,
    early_len: u64,
) -> Option<copy::Transfer> {
    let Local {
        admitted:
            Admitted {
                mut up,
                kill,
                socket: _socket,
            },
        log: mut inbound,
    } = local;
    let t = tokio::select! {
        t = copy::bidirectional(down, &mut up) => t,
        reason = kill.killed() => {
            log.fail(End::UpstreamError, format!("closed by the destination's policy: {reason}"));
            inbound.fail(End::Denied, reason);
            let _ = up.set_zero_linger();
            let _ = down.set_zero_linger();
            return None;
        }
    };
    inbound.sent = early_len;
    inbound.finish(&t, false);
    Some(t)
}

type Balancer = crate::lb::Balancer;
/// A service with its balancer (a waypoint's, here).
type Bound = (Arc<crate::model::Service>, Arc<Balancer>);

/// A connection to a service's virtual IP: picks an endpoint, tries another on
/// a refused or timed-out connect (up to the service's `retries`), reports each
/// outcome to the balancer's outlier detection.
///
/// For a service bound to a waypoint, the picks are the waypoint's replicas
/// and the stream asks each for the original `VIP:port`; when none can take
/// it the connection is refused (`no_waypoint`), never sent around it.
async fn to_service(
    mut log: AccessLog,
    down: tokio::net::TcpStream,
    (pod, shared, view): (&Pod, &Shared, Arc<crate::view::View>),
    (svc, balancer, waypoint): (&crate::model::Service, Arc<Balancer>, Option<Bound>),
    (source, from, dst): (Peer, Source, SocketAddr),
    outside: OutsideMesh,
) {
    let name = format!("{}/{}", svc.namespace, svc.name);
    log.service = Some(name.clone());
    let service = crate::view::service_name(svc);
    let Some(port) = svc.ports.iter().find(|p| p.port == dst.port()) else {
        log.fail(
            End::Refused,
            format!("port {} is not a port of service {name}", dst.port()),
        );
        reset(down);
        return;
    };
    let (balancer, lb) = match &waypoint {
        Some((wp, b)) => (b.clone(), &wp.load_balancing),
        None => (balancer, &svc.load_balancing),
    };
    let timeout = lb
        .connect_timeout
        .unwrap_or(shared.settings.connect_timeout);
    let attempts = 1 + lb.retries as usize;
    let client = from.ip.unwrap_or(dst.ip());
    let mut tried: Vec<Arc<Workload>> = Vec::new();
    let mut last: Option<String> = None;
    let mut early = Early::default();
    loop {
        let Some(pick) = balancer.pick(client, &tried, Instant::now()) else {
            if let Some((wp, _)) = &waypoint {
                STATS.no_waypoint(&name);
                log.opened(TcpLabels {
                    reporter: Reporter::Source,
                    source,
                    destination: Peer::default(),
                    service: Some(service),
                    mutual_tls: false,
                    flags: Flags::None,
                });
                let why = match last {
                    Some(e) => format!(
                        "no replica of waypoint {}/{} left to try (fail closed); last: {e}",
                        wp.namespace, wp.name
                    ),
                    None => format!(
                        "waypoint {}/{} has no replica that can take it (fail closed)",
                        wp.namespace, wp.name
                    ),
                };
                log.fail(End::NoWaypoint, why);
                reset(down);
                return;
            }
            STATS.no_healthy_endpoint(&name);
            log.opened(TcpLabels {
                reporter: Reporter::Source,
                source,
                destination: Peer::default(),
                service: Some(service),
                mutual_tls: false,
                flags: Flags::None,
            });
            let why = match last {
                Some(e) => format!("no endpoint of {name} left to try; last: {e}"),
                None => format!("service {name} has no endpoint that can take it"),
            };
            log.fail(End::NoHealthyEndpoint, why);
            reset(down);
            return;
        };
        // A refcount, not a copy of the name: this is per connection.
        let key = pick.workload.clone();
        tried.push(key.clone());
        let Some(w) = view.workload(&key) else {
            continue;
        };
        let Some(ip) = w
            .addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == dst.is_ipv4())
            .or_else(|| w.addresses.first().copied())
        else {
            continue;
        };
        let ep = if waypoint.is_some() {
            if !w.native_tunnel {
                last = Some(format!(
                    "{} is not a waypoint (not native_tunnel)",
                    key.key()
                ));
                continue;
            }
            Endpoint::of(shared, &view, w, dst).map(|mut ep| {
                ep.via = Some(SocketAddr::new(ip, weft_common::INBOUND_HBONE_PORT));
                ep
            })
        } else {
            if !w.enrolled && outside == OutsideMesh::Refuse {
                last = Some(format!(
                    "{} is outside the mesh (outside_mesh: refuse)",
                    key.key()
                ));
                continue;
            }
            Endpoint::of(shared, &view, w, SocketAddr::new(ip, port.target_port))
        };
        let Ok(ep) = ep else {
            continue;
        };
        match connect(shared, pod, &from, &ep, timeout, &down, &mut early).await {
            Ok(up) => {
                balancer.report(&key, true, Instant::now());
                drop(view);
                let labels = labels(source, &ep, Some(service));
                // The pick counts as an active request until the copy ends.
                carry(log, down, up, early, labels, &ep).await;
                drop(pick);
                return;
            }
            Err(e) if !e.retryable() => {
                log.set_dst(ep.addr);
                log.identities(&ep);
                log.opened(labels(source, &ep, Some(service)));
                log.fail(e.end(), e);
                reset(down);
                return;
            }
            Err(e) => {
                drop(pick);
                if let Some(ej) = balancer.report(&key, false, Instant::now()) {
                    warn!(
                        service = %name,
                        endpoint = %key.key(),
                        ejected_for_ms = ej.duration.as_millis() as u64,
                        consecutive_failures = ej.consecutive_failures,
                        "endpoint ejected"
                    );
                    STATS.ejection(&name, &key.key().to_string());
                }
                debug!(service = %name, endpoint = %key.key(), error = %e, early_bytes = early.len(), "connect failed; trying another endpoint");
                if tried.len() >= attempts {
                    log.set_dst(ep.addr);
                    log.identities(&ep);
                    log.opened(labels(source, &ep, Some(service)));
                    if waypoint.is_some() {
                        STATS.no_waypoint(&name);
                        log.fail(
                            End::NoWaypoint,
                            format!("{e} (after {} waypoint replicas; fail closed)", tried.len()),
                        );
                        reset(down);
                        return;
                    }
                    log.fail(e.end(), format!("{e} (after {} attempts)", tried.len()));
                    reset(down);
                    return;
                }
                last = Some(e.to_string());
            }
        }
    }
}

/// The key `sock_ops` filed the original destination under: the client's own
/// address and port, which is this accepted socket's peer.
pub(crate) fn conn_key(netns_cookie: u64, peer: SocketAddr) -> ConnKey {
    let addr = match peer.ip() {
        IpAddr::V4(ip) => v4_mapped(ip.octets()),
        IpAddr::V6(ip) => ip.octets(),
    };
    ConnKey {
        netns_cookie,
        addr,
        port: peer.port(),
        _pad: [0; 6],
    }
}

/// The destination to dial: IPv4-mapped destinations (from IPv6 sockets too) become
/// plain IPv4.
pub(crate) fn to_socket_addr(d: &OrigDst) -> SocketAddr {
    let ip = if d.family == AF_INET {
        IpAddr::V4(Ipv4Addr::new(
            d.addr[12], d.addr[13], d.addr[14], d.addr[15],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(d.addr)).to_canonical()
    };
    SocketAddr::new(ip, d.port)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_common::AF_INET6;

    #[test]
    fn keys_match_what_sock_ops_files() {
        let k = conn_key(7, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(k.addr, v4_mapped([127, 0, 0, 1]));
        assert_eq!(k.port, 40000);
        let k = conn_key(7, "[::1]:40000".parse().unwrap());
        assert_eq!(k.addr, Ipv6Addr::LOCALHOST.octets());
    }

    #[test]
    fn mapped_destinations_dial_ipv4() {
        let d = OrigDst {
            addr: v4_mapped([10, 1, 1, 2]),
            port: 80,
            family: AF_INET6,
            _pad: 0,
        };
        assert_eq!(to_socket_addr(&d), "10.1.1.2:80".parse().unwrap());
        let d = OrigDst {
            addr: "fd00::2".parse::<Ipv6Addr>().unwrap().octets(),
            port: 80,
            family: AF_INET6,
            _pad: 0,
        };
        assert_eq!(to_socket_addr(&d), "[fd00::2]:80".parse().unwrap());
    }
}
