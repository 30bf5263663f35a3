//! A pod this agent serves: an enrolled workload of its node, with the network
//! namespace its listeners live in. The model's [`Workload`](crate::model::Workload)
//! is what the cluster says about it; a [`Pod`] is what this agent holds for it
//! while it is enrolled (its listeners share one, and stop with it).

use std::net::IpAddr;

use tokio::sync::watch;

use crate::{identity::SpiffeId, model::WorkloadKey, net::Netns};

#[derive(Debug)]
pub struct Pod {
    pub key: WorkloadKey,
    pub identity: SpiffeId,
    pub netns: Netns,
    /// Its addresses (IPv4 as IPv4), read inside its namespace: the only ones a
    /// peer may ask to reach.
    pub addresses: Box<[IpAddr]>,
    /// Whether the agent delivers inbound connections to the application from
    /// the client's own address (the pod's routing is set up for it, see
    /// [`crate::net::route`]); if not, from a loopback address.
    pub handover: bool,
    stop: watch::Sender<bool>,
}

impl Pod {
    pub fn new(
        key: WorkloadKey,
        identity: SpiffeId,
        netns: Netns,
        addresses: &[IpAddr],
        handover: bool,
    ) -> Pod {
        Pod {
            key,
            identity,
            netns,
            addresses: addresses.iter().map(|a| a.to_canonical()).collect(),
            handover,
            stop: watch::channel(false).0,
        }
    }

    /// What a listener of this pod waits on: `true` once the pod is unenrolled.
    pub fn stopped(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Stops the pod's listeners (connections already proxied run to their end).
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}
