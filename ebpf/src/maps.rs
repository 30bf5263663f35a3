//! The maps, pinned by name so a restarting agent finds the same ones.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, SockHash},
};
use weft_common::{ConnKey, Handover, ListenerKey, OrigDst, PodInfo};

/// Enrolled pods by network-namespace cookie.
#[map(name = "WEFT_ENROLLED")]
pub static WEFT_ENROLLED: HashMap<u64, PodInfo> = HashMap::pinned(16_384, 0);

/// Original destination by socket cookie, for `getpeername` and `sock_ops`.
/// LRU: entries of closed sockets age out without the agent's help.
#[map(name = "WEFT_SOCK_DST")]
pub static WEFT_SOCK_DST: LruHashMap<u64, OrigDst> = LruHashMap::pinned(65_536, 0);

/// Original destination by the client's (netns, address, port), for the agent.
/// A key is reused only when the port is, and the newer connect overwrites it first.
#[map(name = "WEFT_ORIG_DST")]
pub static WEFT_ORIG_DST: LruHashMap<ConnKey, OrigDst> = LruHashMap::pinned(65_536, 0);

/// The agent's inbound listeners per pod, for `sk_lookup`.
#[map(name = "WEFT_LISTENERS")]
pub static WEFT_LISTENERS: SockHash<ListenerKey> = SockHash::pinned(16_384, 0);

/// The agent's own connections to applications from a client's address, which
/// `sk_lookup` lets through (see `weft_common::MAP_HANDOVER`).
#[map(name = "WEFT_HANDOVER")]
pub static WEFT_HANDOVER: HashMap<Handover, u8> = HashMap::pinned(65_536, 0);
