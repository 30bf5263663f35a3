//! The destination side of a mesh connection: what the agent checks before it
//! connects a peer to an application in one of its pods.
//!
//! Two paths share it, so they decide alike: an HBONE stream that another node's
//! agent (or this one) opened (`hbone_in`), and a node-local connection, where
//! source and destination pods are both served by this agent and the outbound
//! side hands the connection over in-process (`outbound`, see
//! [`SameNode`](super::SameNode)).

use std::net::SocketAddr;

use http::StatusCode;
use tokio::net::TcpStream;

use super::{
    Pod, Shared,
    access::AccessLog,
    connect_app,
    live::{Facts, Kill},
};
use crate::{
    hbone::server::Refusal,
    identity::SpiffeId,
    net::limit::{Permit, Refused},
    stats::{Flags, Peer, Reporter, TcpLabels},
};

/// A connection the destination admitted: the socket to the application, and
/// the handle that closes it if a later policy denies it.
pub struct Admitted {
    pub up: TcpStream,
    pub kill: Kill,
    /// The socket to the application's slot in the node's budget.
    pub socket: Permit,
}

/// Admits a connection from `peer` (its address as the destination sees it,
/// and the identity it proved) to `dst` in `to`, or says why not: `dst` must be
/// one of the pod's addresses on a port that is not the mesh's own, and the
/// pod's peer authentication and authorization policy must allow it. Then
/// connects to the application inside the pod, from the peer's own address
/// where the pod is set up for it (see [`connect_app`]). Counts the connection as opened (destination
/// reporter) in `log` once both ends are known.
pub(crate) async fn admit(
    shared: &Shared,
    to: &Pod,
    peer_id: &SpiffeId,
    peer: SocketAddr,
    dst: SocketAddr,
    log: &mut AccessLog,
) -> Result<Admitted, Refusal> {
    log.set_dst(dst);
    if !to.addresses.contains(&dst.ip()) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("{} is not an address of this pod", dst.ip()),
        ));
    }
    if weft_common::is_mesh_port(dst.port()) {
        return Err(Refusal::new(
            StatusCode::BAD_REQUEST,
            format!("port {} is reserved for the mesh", dst.port()),
        ));
    }
    // Policy, on the identity the peer proved and the address the connection
    // came from (not on what a peer's headers claim).
    let view = shared.view();
    let Some(me) = view.workload(&to.key) else {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this pod is no longer in the config",
        ));
    };
    let by_addr = view
        .workload_by_address(peer.ip())
        .filter(|w| w.identity(view.trust_domain()).ok().as_ref() == Some(peer_id));
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
        destination: Peer::of(me, Some(to.identity.to_string())),
        service: None,
        // An authenticated peer: over mutual TLS, or on this node (where the
        // agent itself holds the source's identity).
        mutual_tls: true,
        flags: Flags::None,
    });
    drop(view);
    let facts = Facts {
        workload: to.key.clone(),
        src_identity: Some(peer_id.clone()),
        src_ip: peer.ip(),
        dst_port: dst.port(),
    };
    let kill = shared
        .authorize(facts)
        .map_err(|reason| Refusal::new(StatusCode::UNAUTHORIZED, reason))?;
    // The socket to the application spends the node's budget.
    let Ok(socket) = shared.budget.admit(peer.ip()) else {
        crate::stats::STATS.refused(crate::stats::Listener::Hbone, Refused::NodeLimit);
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the node's connection budget is spent",
        ));
    };
    match connect_app(shared, to, dst, peer.ip()).await {
        Ok(up) => Ok(Admitted { up, kill, socket }),
        Err(e) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("application: {e}"),
        )),
    }
}
