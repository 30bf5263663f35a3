//! `sock_ops`: when a captured socket's connect leaves (`TCP_CONNECT_CB`), its local
//! port is known; file the original destination under the client's (netns, address,
//! port), which is exactly what the agent sees as the peer of the accepted socket.

use core::ptr::read_volatile;

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_SOCK_OPS_TCP_CONNECT_CB,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::SockOpsContext,
};
use weft_common::{AF_INET6, ConnKey, ip6_bytes, v4_mapped};

use crate::maps::{WEFT_ORIG_DST, WEFT_SOCK_DST};

const AF_INET_U32: u32 = 2;
const AF_INET6_U32: u32 = AF_INET6 as u32;

pub fn sock_ops(ctx: &SockOpsContext) -> Result<(), i64> {
    if ctx.op() != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(());
    }
    // SAFETY: the helper only reads the context's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the value is plain data copied out at once.
    let Some(dst) = (unsafe { WEFT_SOCK_DST.get(cookie).copied() }) else {
        return Ok(()); // not a captured socket
    };
    // Every context field is read once, at its fixed offset, before any branch:
    // otherwise LLVM merges the IPv4 and IPv6 loads behind a computed context
    // pointer, which the verifier rejects.
    let ops = ctx.ops;
    // SAFETY: kernel context; 4-byte loads of these fields are allowed for sock_ops.
    let (family, ip4, w) = unsafe {
        (
            read_volatile(&(*ops).family),
            read_volatile(&(*ops).local_ip4),
            [
                read_volatile(&(*ops).local_ip6[0]),
                read_volatile(&(*ops).local_ip6[1]),
                read_volatile(&(*ops).local_ip6[2]),
                read_volatile(&(*ops).local_ip6[3]),
            ],
        )
    };
    let addr = match family {
        AF_INET_U32 => v4_mapped(ip4.to_ne_bytes()),
        AF_INET6_U32 => ip6_bytes(w),
        _ => return Ok(()),
    };
    let key = ConnKey {
        // SAFETY: the helper only reads the context's socket.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        addr,
        // sock_ops gives local_port in host order.
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    WEFT_ORIG_DST.insert(key, dst, 0).map_err(i64::from)
}
