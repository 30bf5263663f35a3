//! Outbound: the pod's captured connects arrive on 15001 (`127.0.0.1` and `[::1]`
//! inside its namespace). The original destination comes from the kernel (one map
//! lookup keyed by the pod's namespace and the client's own address and port).
//!
//! A destination that is an enrolled workload gets an HBONE stream (mutual TLS with
//! the source pod's certificate, checking the destination's identity). Any other
//! destination is outside the mesh: by the source pod's `outside_mesh` setting it
//! goes direct in plaintext, or is refused.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};
use weft_common::{AF_INET, ConnKey, OUTBOUND_PORT, OrigDst, v4_mapped};

use super::{
    AcceptBackoff, AccessLog, Direction, Pod, Shared, canonical, copy::Side, forward,
    is_reserved_port, listen, reset, stopped,
};
use crate::{
    config::OutsideMesh,
    ebpf::OrigDstTable,
    hbone::{client::Target, stream},
};

pub struct OutboundListener {
    pod: Arc<Pod>,
    listeners: Vec<TcpListener>,
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
                warn!(workload = %pod.workload, error = %e, "no IPv6 outbound listener; IPv6 connects from this pod will be refused")
            }
        }
        Ok(OutboundListener {
            pod,
            listeners,
            orig_dst,
            shared,
        })
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let OutboundListener {
            pod,
            listeners,
            orig_dst,
            shared,
        } = self;
        let accept_any = async |ls: &[TcpListener]| {
            // At most two listeners: poll both, take whichever is ready.
            match ls {
                [a] => a.accept().await,
                [a, b, ..] => tokio::select! {
                    r = a.accept() => r,
                    r = b.accept() => r,
                },
                [] => std::future::pending().await,
            }
        };
        let mut backoff = AcceptBackoff::default();
        loop {
            let (stream, peer) = tokio::select! {
                _ = stopped(&mut stop) => break,
                r = accept_any(&listeners) => match r {
                    Ok(c) => {
                        backoff.succeeded();
                        c
                    }
                    Err(e) => {
                        backoff.failed(&pod.workload, Direction::Outbound, e).await;
                        continue;
                    }
                },
            };
            let pod = pod.clone();
            let orig_dst = orig_dst.clone();
            let shared = shared.clone();
            tokio::spawn(async move {
                handle(pod, orig_dst, shared, stream, peer).await;
            });
        }
        debug!(workload = %pod.workload, "outbound listener stopped");
    }
}

async fn handle(
    pod: Arc<Pod>,
    orig_dst: OrigDstTable,
    shared: Arc<Shared>,
    mut down: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let mut log = AccessLog::new(Direction::Outbound, pod.clone(), canonical(peer));
    let key = conn_key(pod.netns.cookie(), peer);
    let Some(dst) = orig_dst.get(&key).map(|d| to_socket_addr(&d)) else {
        // Not captured by our programs (someone dialed 15001 directly), or the
        // entry was evicted: there is nowhere safe to send it.
        log.fail("refused", "no original destination for this connection");
        reset(down);
        return;
    };
    let view = shared.view();
    let me = view.workloads.iter().find(|w| w.key() == pod.workload);
    let peer_workload = view.workload_by_address(dst.ip()).filter(|w| w.enrolled);
    let Some(dst_workload) = peer_workload else {
        match me.map(|w| w.outside_mesh).unwrap_or_default() {
            OutsideMesh::Passthrough => forward(log, down, dst, None, shared.settings).await,
            OutsideMesh::Refuse => {
                log.set_dst(dst);
                log.fail(
                    "refused",
                    "destination is outside the mesh (outside_mesh: refuse)",
                );
                reset(down);
            }
        }
        return;
    };
    log.set_dst(dst);
    if is_reserved_port(dst.port()) {
        log.fail("refused", "destination port is reserved for the mesh");
        reset(down);
        return;
    }
    let dst_id = match dst_workload.identity(&view.trust_domain) {
        Ok(id) => id,
        Err(e) => {
            log.fail("refused", e);
            reset(down);
            return;
        }
    };
    // The pod's own address in the destination's family: what the peer sees.
    let source_ip = me.and_then(|w| {
        w.addresses
            .iter()
            .copied()
            .find(|a| a.is_ipv4() == dst.is_ipv4())
    });
    if let Some(ip) = source_ip {
        log.src = SocketAddr::new(ip, peer.port());
    }
    log.src_identity = Some(pod.identity.to_string());
    log.dst_identity = Some(dst_id.to_string());
    log.security = "mutual_tls";
    drop(view);
    let _ = down.set_nodelay(true);
    let tunnel = match shared
        .pool
        .open(Target {
            netns: &pod.netns,
            src: &pod.identity,
            dst: &dst_id,
            hbone: SocketAddr::new(dst.ip(), weft_common::INBOUND_HBONE_PORT),
            authority: dst,
            source_ip,
        })
        .await
    {
        Ok(t) => t,
        Err(e) => {
            log.fail(e.end(), e);
            reset(down);
            return;
        }
    };
    log.connection = Some(tunnel.connection);
    let t = stream::bidirectional(&mut down, tunnel.send, tunnel.recv).await;
    log.sent = t.sent;
    log.received = t.received;
    match t.result {
        Ok(()) => log.end = "closed",
        Err((Side::Downstream, e)) => log.fail("downstream_error", e),
        Err((Side::Upstream, e)) => log.fail("upstream_error", e),
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
