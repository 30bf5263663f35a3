//! Outbound: the pod's captured connects arrive on 15001 (`127.0.0.1` and `[::1]`
//! inside its namespace). The original destination comes from the kernel (one map
//! lookup keyed by the pod's namespace and the client's own address and port), and
//! for now the connection is forwarded to it in plaintext.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use tokio::{net::TcpListener, sync::watch};
use tracing::{debug, warn};
use weft_common::{AF_INET, ConnKey, OUTBOUND_PORT, OrigDst, v4_mapped};

use super::{
    AcceptBackoff, AccessLog, Direction, Pod, Settings, canonical, forward, listen, reset, stopped,
};
use crate::ebpf::OrigDstTable;

pub struct OutboundListener {
    pod: Arc<Pod>,
    listeners: Vec<TcpListener>,
    orig_dst: OrigDstTable,
    settings: Settings,
}

impl OutboundListener {
    /// Binds 15001 on the pod's IPv4 loopback, and on its IPv6 loopback when the pod
    /// has IPv6.
    pub fn new(pod: Arc<Pod>, orig_dst: OrigDstTable, settings: Settings) -> std::io::Result<Self> {
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
            settings,
        })
    }

    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let OutboundListener {
            pod,
            listeners,
            orig_dst,
            settings,
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
            tokio::spawn(async move {
                handle(pod, orig_dst, settings, stream, peer).await;
            });
        }
        debug!(workload = %pod.workload, "outbound listener stopped");
    }
}

async fn handle(
    pod: Arc<Pod>,
    orig_dst: OrigDstTable,
    settings: Settings,
    down: tokio::net::TcpStream,
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
    forward(log, down, dst, None, settings).await;
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
