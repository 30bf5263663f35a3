//! The destination side of a mesh connection: what the agent checks before it
//! connects a peer to an application in one of its pods.
//!
//! Two paths share it, so they decide alike: an HBONE stream that another node's
//! agent (or this one) opened (`hbone::server`), and a node-local connection,
//! where source and destination pods are both served by this agent and the
//! outbound side hands the connection over in-process (`outbound`, see
//! [`SameNode`](super::SameNode)).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use http::StatusCode;
use tokio::net::TcpStream;

use super::{
    AccessLog, Pod, Shared, connect_from, inbound_source, is_reserved_port,
    live::{Facts, Kill},
};
use crate::{
    identity::SpiffeId,
    stats::{Flags, Peer, Reporter, TcpLabels},
};

/// A pod this agent serves, as its destination side needs it.
#[derive(Debug)]
pub struct Served {
    pub pod: Arc<Pod>,
    /// Its addresses (IPv4 as IPv4): the only ones a peer may ask for.
    pub addresses: Arc<[IpAddr]>,
}

impl Served {
    pub fn new(pod: Arc<Pod>, addresses: &[IpAddr]) -> Self {
        Served {
            pod,
            addresses: addresses.iter().map(|a| a.to_canonical()).collect(),
        }
    }
}

/// Why the destination side refused a connection: the answer an HBONE peer
/// gets, and the reason the access log keeps.
#[derive(Debug)]
pub struct Refused {
    pub status: StatusCode,
    pub why: String,
}

impl Refused {
    pub fn new(status: StatusCode, why: impl Into<String>) -> Self {
        Refused {
            status,
            why: why.into(),
        }
    }

    /// The access-log `end` on the destination side.
    pub fn end(&self) -> &'static str {
        match self.status {
            StatusCode::SERVICE_UNAVAILABLE => "upstream_connect_failed",
            StatusCode::UNAUTHORIZED => "denied",
            _ => "bad_request",
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.why, self.status)
    }
}

/// A connection the destination admitted: the socket to the application, and
/// the handle that closes it if a later policy denies it.
pub struct Admitted {
    pub up: TcpStream,
    pub kill: Kill,
}

/// Admits a connection from `peer` (its address as the destination sees it,
/// and the identity it proved) to `dst` in `to`'s pod, or says why not: `dst`
/// must be one of the pod's addresses on a port that is not the mesh's own, and
/// the pod's peer authentication and authorization policy must allow it. Then
/// connects to the application inside the pod, from the loopback source that
/// `sk_lookup` leaves alone. Counts the connection as opened (destination
/// reporter) in `log` once both ends are known.
pub(crate) async fn admit(
    shared: &Shared,
    to: &Served,
    peer_id: &SpiffeId,
    peer: SocketAddr,
    dst: SocketAddr,
    log: &mut AccessLog,
) -> Result<Admitted, Refused> {
    log.set_dst(dst);
    if !to.addresses.contains(&dst.ip()) {
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            format!("{} is not an address of this pod", dst.ip()),
        ));
    }
    if is_reserved_port(dst.port()) {
        return Err(Refused::new(
            StatusCode::BAD_REQUEST,
            format!("port {} is reserved for the mesh", dst.port()),
        ));
    }
    // Policy, on the identity the peer proved and the address the connection
    // came from (not on what a peer's headers claim).
    let pod = &to.pod;
    let view = shared.view();
    let Some(me) = view.workload(&pod.workload) else {
        return Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this pod is no longer in the config",
        ));
    };
    let by_addr = view
        .workload_by_address(peer.ip())
        .filter(|w| w.identity(&view.trust_domain).ok().as_ref() == Some(peer_id));
    log.opened(TcpLabels {
        reporter: Reporter::Destination,
        source: match by_addr {
            Some(w) => Peer::of(w, Some(peer_id.to_string())),
            None => Peer {
                namespace: Some(peer_id.namespace().to_owned()),
                principal: Some(peer_id.to_string()),
                ..Peer::default()
            },
        },
        destination: Peer::of(me, Some(pod.identity.to_string())),
        service: None,
        // An authenticated peer: over mutual TLS, or on this node (where the
        // agent itself holds the source's identity).
        mutual_tls: true,
        flags: Flags::None,
    });
    let facts = Facts {
        workload: pod.workload.clone(),
        src_identity: Some(peer_id.clone()),
        src_ip: peer.ip(),
        dst_port: dst.port(),
    };
    let kill = shared
        .live
        .authorize(facts, &view)
        .map_err(|reason| Refused::new(StatusCode::UNAUTHORIZED, reason))?;
    drop(view);
    match connect_from(
        &pod.netns,
        dst,
        Some(inbound_source(dst)),
        shared.settings.connect_timeout,
    )
    .await
    {
        Ok(up) => Ok(Admitted { up, kill }),
        Err(e) => Err(Refused::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application: {e}"),
        )),
    }
}
