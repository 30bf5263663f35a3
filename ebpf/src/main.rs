//! Weft's kernel programs: outbound capture (`cgroup/connect4/6`), the original
//! destination (`sock_ops`, `cgroup/getpeername4/6`) and inbound steering
//! (`sk_lookup`).
//!
//! Entry points are thin and never fail a socket call: whatever goes wrong inside,
//! the program returns the value that lets the kernel carry on as if it were not
//! there. The only way traffic is diverted is an explicit decision for an enrolled
//! pod. Map layouts and names come from `weft-common`.
#![no_std]
#![no_main]

mod connect;
mod lookup;
mod maps;
mod sockops;

use aya_ebpf::{
    macros::{cgroup_sock_addr, sk_lookup, sock_ops},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
};

/// `cgroup/*` sock_addr programs: 1 lets the call proceed.
const SOCK_ADDR_PROCEED: i32 = 1;
/// `sk_lookup`: `SK_PASS` with no socket selected continues the normal lookup.
const SK_PASS: u32 = 1;
/// `sock_ops`: the return value is ignored for the ops we handle.
const SOCK_OPS_OK: u32 = 1;

/// `cgroup/*` sock_addr programs: 0 fails the call with `EPERM`.
const SOCK_ADDR_REFUSE: i32 = 0;

/// Fail closed: a capturable connect whose original destination could not be
/// recorded fails (`EPERM`) rather than leave the pod directly, in plaintext,
/// past the mesh and its policy.
#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    match connect::connect4(&ctx) {
        Ok(()) => SOCK_ADDR_PROCEED,
        Err(_) => SOCK_ADDR_REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    match connect::connect6(&ctx) {
        Ok(()) => SOCK_ADDR_PROCEED,
        Err(_) => SOCK_ADDR_REFUSE,
    }
}

#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeer4(ctx: SockAddrContext) -> i32 {
    let _ = connect::getpeername4(&ctx);
    SOCK_ADDR_PROCEED
}

#[cgroup_sock_addr(getpeername6)]
pub fn weft_getpeer6(ctx: SockAddrContext) -> i32 {
    let _ = connect::getpeername6(&ctx);
    SOCK_ADDR_PROCEED
}

#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    let _ = sockops::sock_ops(&ctx);
    SOCK_OPS_OK
}

#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    // On error, carry on with the normal lookup: steering decisions that *refuse*
    // are made explicitly inside, never by accident.
    lookup::sk_lookup(&ctx).unwrap_or(SK_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier proves there is no panic path; this is never reached.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
