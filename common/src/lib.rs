//! Types and names shared by Weft's kernel programs (`weft-ebpf`) and the node agent.
//!
//! Everything here crosses the kernel boundary through BPF maps, so every type is
//! `#[repr(C)]`, built from fixed-width integers, with explicit padding (the kernel
//! compares keys byte for byte: padding must always be zero). Byte order is stated on
//! each field. Map and program names live here as constants; the agent's tests check
//! that each one exists in the built object.
#![no_std]

/// Map: network-namespace cookie (`u64`) → [`PodInfo`]. A pod is enrolled exactly
/// when its network namespace has an entry; the programs leave every other
/// namespace alone.
pub const MAP_ENROLLED: &str = "WEFT_ENROLLED";
/// Map (LRU): socket cookie (`u64`) → [`OrigDst`], written by `connect4/6` for each
/// captured socket and read by `getpeername4/6` and `sock_ops`.
pub const MAP_SOCK_DST: &str = "WEFT_SOCK_DST";
/// Map (LRU): [`ConnKey`] of a captured client socket → [`OrigDst`]; written by
/// `sock_ops` once the client's port is known, read by the agent after `accept`.
pub const MAP_ORIG_DST: &str = "WEFT_ORIG_DST";
/// Map (SOCKHASH): [`ListenerKey`] → the agent's listening socket that `sk_lookup`
/// steers a pod's inbound connections to.
pub const MAP_LISTENERS: &str = "WEFT_LISTENERS";

/// Map: [`Handover`] → `u8`, the connections the agent is making to a pod's
/// application from the real client's address (a transparent socket): `sk_lookup`
/// lets exactly these through to the application instead of steering them back to
/// the agent. The agent adds an entry just before its `connect` and removes it
/// as soon as the connect is done (only a SYN is looked up).
pub const MAP_HANDOVER: &str = "WEFT_HANDOVER";

/// Every map the agent opens, for the object check.
pub const MAP_NAMES: [&str; 5] = [
    MAP_ENROLLED,
    MAP_SOCK_DST,
    MAP_ORIG_DST,
    MAP_LISTENERS,
    MAP_HANDOVER,
];

pub const PROG_CONNECT4: &str = "weft_connect4";
pub const PROG_CONNECT6: &str = "weft_connect6";
pub const PROG_GETPEERNAME4: &str = "weft_getpeer4";
pub const PROG_GETPEERNAME6: &str = "weft_getpeer6";
pub const PROG_SOCK_OPS: &str = "weft_sockops";
pub const PROG_SK_LOOKUP: &str = "weft_sk_lookup";

/// Every program the agent loads, for the object check.
pub const PROG_NAMES: [&str; 6] = [
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_GETPEERNAME4,
    PROG_GETPEERNAME6,
    PROG_SOCK_OPS,
    PROG_SK_LOOKUP,
];

/// Outbound capture port: the agent listens on `127.0.0.1` and `[::1]` inside each
/// enrolled pod's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
/// Inbound plaintext port; `sk_lookup` steers inbound TCP here.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// Inbound HBONE (mTLS) port.
pub const INBOUND_HBONE_PORT: u16 = 15008;

/// Ports of the agent itself inside a pod: never a destination through the mesh
/// (a peer must not reach the agent's listeners by naming them).
pub const fn is_mesh_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND_PORT | INBOUND_PLAINTEXT_PORT | INBOUND_HBONE_PORT
    )
}

/// `SO_MARK` set on every socket the agent opens. The capture programs skip marked
/// sockets, a second guard beside the agent running outside the pod cgroups.
pub const AGENT_SOCKET_MARK: u32 = 0x0000_0539;

/// `AF_INET` / `AF_INET6` as the kernel numbers them.
pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// [`ListenerKey::kind`] of the inbound plaintext listener.
pub const LISTENER_INBOUND_PLAINTEXT: u32 = 1;

/// Flags of [`PodInfo`].
pub const POD_CAPTURE_OUTBOUND: u32 = 1 << 0;
pub const POD_CAPTURE_INBOUND: u32 = 1 << 1;

/// What the programs know about an enrolled pod. Value of [`MAP_ENROLLED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// `POD_*` flags.
    pub flags: u32,
    pub _pad: u32,
}

/// A destination as the application asked for it.
///
/// `addr` holds the 16 address bytes in network order, IPv4 as IPv4-mapped IPv6
/// (`::ffff:a.b.c.d`). `family` is the family of the application's socket
/// (`AF_INET` or `AF_INET6`, so an IPv4-mapped connect on an IPv6 socket stays
/// `AF_INET6`). `port` is in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// Identifies a captured client socket from the agent's side of the accept: the
/// pod's network namespace and the client's own address and port (which is what the
/// agent's accepted socket sees as its peer).
///
/// `addr` in network order, IPv4 as IPv4-mapped IPv6; `port` in host order;
/// `netns_cookie` in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub netns_cookie: u64,
    pub addr: [u8; 16],
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key of [`MAP_LISTENERS`]: which listener of which pod.
///
/// `sk_lookup` cannot read the network-namespace cookie (the kernel does not offer
/// that helper to it), so a pod is found by its own address: `sk_lookup` runs only
/// in the pod's namespace, where all that arrives from outside is addressed to the
/// pod. `addr` in network order, IPv4 as IPv4-mapped IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ListenerKey {
    pub addr: [u8; 16],
    /// `LISTENER_*`.
    pub kind: u32,
    pub _pad: u32,
}

/// Key of [`MAP_HANDOVER`]: one TCP connection the agent is opening to an
/// application inside a pod, by its full 4-tuple as the pod sees it (the pod's
/// address and port, the original client's address and the port the agent's
/// socket is bound to). A 4-tuple names one connection at a time, so no other
/// connection can match an entry while the agent's socket holds it.
///
/// Addresses in network order, IPv4 as IPv4-mapped IPv6; ports in host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Handover {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
}

/// `SO_MARK` of the agent's sockets that connect to an application from the
/// client's address. A routing rule in the pod (`fwmark` → a table whose only
/// route is `local` on `lo`) brings the application's replies, which carry the
/// mark too (`tcp_fwmark_accept`), back to the agent's socket instead of out of
/// the pod. Not [`AGENT_SOCKET_MARK`]: the agent's HBONE connections out of the
/// pod carry that one and must leave it.
pub const HANDOVER_MARK: u32 = 0x0000_053a;

/// IPv4-mapped IPv6 bytes of an IPv4 address given in network order.
#[inline(always)]
pub const fn v4_mapped(octets: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, octets[0], octets[1], octets[2], octets[3],
    ]
}

/// The 16 bytes of an IPv6 address the kernel hands a program as four `u32` words
/// (each word holds 4 bytes in network order).
#[inline(always)]
pub fn ip6_bytes(w: [u32; 4]) -> [u8; 16] {
    let (a, b, c, d) = (
        w[0].to_ne_bytes(),
        w[1].to_ne_bytes(),
        w[2].to_ne_bytes(),
        w[3].to_ne_bytes(),
    );
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all four are #[repr(C)] plain integers and arrays with explicit padding
    // fields, valid for any bit pattern.
    unsafe impl aya::Pod for super::PodInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenerKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Handover {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<PodInfo>(), 8);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<ConnKey>(), 32);
        assert_eq!(size_of::<ListenerKey>(), 24);
    }

    #[test]
    fn names_fit_the_kernel() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL.
        for name in MAP_NAMES.iter().chain(PROG_NAMES.iter()) {
            assert!(name.len() <= 15, "{name} is longer than the kernel keeps");
        }
    }

    #[test]
    fn v4_mapped_layout() {
        assert_eq!(
            v4_mapped([10, 1, 2, 3]),
            [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]
        );
    }
}
