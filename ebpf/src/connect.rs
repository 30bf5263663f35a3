//! Outbound capture: `connect4/6` rewrite an enrolled pod's TCP connect to the
//! agent's outbound listener inside that pod's namespace; `getpeername4/6` give the
//! application back the address it dialed.
//!
//! The agent's own sockets never reach the rewrite: the agent runs outside the pod
//! cgroups these programs attach to, and it marks its sockets, which is checked too.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
};
use weft_common::{
    AF_INET, AF_INET6, AGENT_SOCKET_MARK, HANDOVER_MARK, OUTBOUND_PORT, OrigDst, ip6_bytes,
    v4_mapped,
};

use crate::maps::{WEFT_ENROLLED, WEFT_SOCK_DST};

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
/// `127.0.0.1` as the kernel stores it (network order).
const LOOPBACK4_NET: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// `::ffff:0:0/96` word, network order.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
const IPV6_LOOPBACK_WORD3: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// Whether this connect belongs to an enrolled pod and is ours to capture.
#[inline(always)]
fn capturable(ctx: &SockAddrContext) -> bool {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; reads of these fields are allowed
    // for sock_addr programs.
    unsafe {
        if (*sa).type_ != SOCK_STREAM || (*sa).protocol != IPPROTO_TCP {
            return false;
        }
        let sk = (*sa).__bindgen_anon_1.sk;
        if !sk.is_null() {
            let mark = (*sk).mark;
            if mark == AGENT_SOCKET_MARK || mark == HANDOVER_MARK {
                return false;
            }
        }
    }
    // SAFETY: the helper only reads the context's socket.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    WEFT_ENROLLED.get_ptr(netns).is_some()
}

use aya_ebpf::programs::SockAddrContext;

#[inline(always)]
fn remember(ctx: &SockAddrContext, dst: &OrigDst) -> Result<(), i64> {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    WEFT_SOCK_DST.insert(cookie, dst, 0).map_err(i64::from)
}

pub fn connect4(ctx: &SockAddrContext) -> Result<(), i64> {
    if !capturable(ctx) {
        return Ok(());
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: kernel context; 4-byte reads of user_ip4/user_port are allowed.
    let (ip, port) = unsafe {
        (
            read_volatile(&(*sa).user_ip4),
            read_volatile(&(*sa).user_port),
        )
    };
    let octets = ip.to_ne_bytes();
    if octets[0] == 127 {
        return Ok(()); // the pod's own loopback is never ours
    }
    let dst = OrigDst {
        addr: v4_mapped(octets),
        port: u16::from_be(port as u16),
        family: AF_INET,
        _pad: 0,
    };
    remember(ctx, &dst)?;
    // SAFETY: kernel context; each field is written with its own 4-byte store
    // (LLVM may otherwise merge adjacent stores into an 8-byte one the verifier
    // rejects).
    unsafe {
        write_volatile(&mut (*sa).user_ip4, LOOPBACK4_NET);
        write_volatile(&mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
    }
    Ok(())
}

pub fn connect6(ctx: &SockAddrContext) -> Result<(), i64> {
    if !capturable(ctx) {
        return Ok(());
    }
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: kernel context; 4-byte reads of user_ip6[i] and user_port are allowed.
    let (w, port) = unsafe {
        (
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ],
            read_volatile(&(*sa).user_port),
        )
    };
    let mapped = w[0] == 0 && w[1] == 0 && w[2] == V4_MAPPED_WORD;
    if mapped && w[3].to_ne_bytes()[0] == 127 {
        return Ok(());
    }
    if w[0] == 0 && w[1] == 0 && w[2] == 0 && w[3] == IPV6_LOOPBACK_WORD3 {
        return Ok(());
    }
    let addr = ip6_bytes(w);
    let dst = OrigDst {
        addr,
        port: u16::from_be(port as u16),
        family: AF_INET6,
        _pad: 0,
    };
    remember(ctx, &dst)?;
    // An IPv4-mapped destination goes to the IPv4 listener (::ffff:127.0.0.1), a
    // native IPv6 one to the IPv6 listener (::1).
    let (w2, w3) = if mapped {
        (V4_MAPPED_WORD, LOOPBACK4_NET)
    } else {
        (0, IPV6_LOOPBACK_WORD3)
    };
    // SAFETY: kernel context; one 4-byte store per word.
    unsafe {
        write_volatile(&mut (*sa).user_ip6[0], 0);
        write_volatile(&mut (*sa).user_ip6[1], 0);
        write_volatile(&mut (*sa).user_ip6[2], w2);
        write_volatile(&mut (*sa).user_ip6[3], w3);
        write_volatile(&mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
    }
    Ok(())
}

#[inline(always)]
fn captured_dst(ctx: &SockAddrContext) -> Option<OrigDst> {
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain data copied out at once.
    unsafe { WEFT_SOCK_DST.get(cookie).copied() }
}

pub fn getpeername4(ctx: &SockAddrContext) -> Result<(), i64> {
    let Some(dst) = captured_dst(ctx) else {
        return Ok(());
    };
    if dst.family != AF_INET {
        return Ok(());
    }
    let sa = ctx.sock_addr;
    let ip = u32::from_ne_bytes([dst.addr[12], dst.addr[13], dst.addr[14], dst.addr[15]]);
    // SAFETY: kernel context; getpeername programs may rewrite user_ip4/user_port.
    unsafe {
        write_volatile(&mut (*sa).user_ip4, ip);
        write_volatile(&mut (*sa).user_port, u32::from(dst.port.to_be()));
    }
    Ok(())
}

pub fn getpeername6(ctx: &SockAddrContext) -> Result<(), i64> {
    let Some(dst) = captured_dst(ctx) else {
        return Ok(());
    };
    if dst.family != AF_INET6 {
        return Ok(());
    }
    let sa = ctx.sock_addr;
    let a = dst.addr;
    // SAFETY: kernel context; one 4-byte store per word.
    unsafe {
        write_volatile(
            &mut (*sa).user_ip6[0],
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        );
        write_volatile(
            &mut (*sa).user_ip6[1],
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        );
        write_volatile(
            &mut (*sa).user_ip6[2],
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        );
        write_volatile(
            &mut (*sa).user_ip6[3],
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        );
        write_volatile(&mut (*sa).user_port, u32::from(dst.port.to_be()));
    }
    Ok(())
}
