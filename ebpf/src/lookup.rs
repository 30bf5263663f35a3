//! `sk_lookup`, attached to each enrolled pod's network namespace: TCP arriving from
//! outside the pod goes to the agent's inbound listener instead of the application.
//!
//! The agent's own connections to the application are left alone, or they would
//! loop: those from a loopback source (it binds `127.0.0.6` or `::1` when it does
//! not deliver from the client's address; nothing from outside can carry a
//! loopback source, the kernel drops such packets as martians before any
//! lookup), and those from a client's address, which the agent files in
//! `WEFT_HANDOVER` by their exact 4-tuple for the time of its `connect`. (The
//! ingress interface is no guide: a SYN to the pod's own address shows the
//! interface that holds the address, whether it came from outside or from a
//! socket inside the pod, and sk_lookup sees no socket mark.)

use core::ptr::read_volatile;

use aya_ebpf::programs::SkLookupContext;
use weft_common::{
    AF_INET, Handover, INBOUND_HBONE_PORT, LISTENER_INBOUND_PLAINTEXT, ListenerKey, ip6_bytes,
    v4_mapped,
};

use crate::{
    SK_PASS,
    maps::{WEFT_HANDOVER, WEFT_LISTENERS},
};

const IPPROTO_TCP: u32 = 6;
const SK_DROP: u32 = 0;

pub fn sk_lookup(ctx: &SkLookupContext) -> Result<u32, i64> {
    let l = ctx.lookup;
    // Every field is read once at its fixed offset before branching (see sockops.rs
    // on why the verifier needs that).
    // SAFETY: kernel context; 4-byte loads of these fields are allowed.
    let (protocol, remote4, remote6, port, family, ip4, w, remote_port) = unsafe {
        (
            read_volatile(&(*l).protocol),
            read_volatile(&(*l).remote_ip4),
            [
                read_volatile(&(*l).remote_ip6[0]),
                read_volatile(&(*l).remote_ip6[1]),
                read_volatile(&(*l).remote_ip6[2]),
                read_volatile(&(*l).remote_ip6[3]),
            ],
            read_volatile(&(*l).local_port),
            read_volatile(&(*l).family),
            read_volatile(&(*l).local_ip4),
            [
                read_volatile(&(*l).local_ip6[0]),
                read_volatile(&(*l).local_ip6[1]),
                read_volatile(&(*l).local_ip6[2]),
                read_volatile(&(*l).local_ip6[3]),
            ],
            read_volatile(&(*l).remote_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return Ok(SK_PASS);
    }
    let from_loopback = if family == u32::from(AF_INET) {
        remote4.to_ne_bytes()[0] == 127
    } else {
        is_loopback6(ip6_bytes(remote6))
    };
    if from_loopback {
        return Ok(SK_PASS);
    }
    if port == u32::from(INBOUND_HBONE_PORT) {
        return Ok(SK_PASS); // the agent's HBONE listener is bound there already
    }
    let addr = if family == u32::from(AF_INET) {
        v4_mapped(ip4.to_ne_bytes())
    } else {
        ip6_bytes(w)
    };
    let remote = if family == u32::from(AF_INET) {
        v4_mapped(remote4.to_ne_bytes())
    } else {
        ip6_bytes(remote6)
    };
    let handover = Handover {
        local: addr,
        remote,
        local_port: port as u16,
        // Network order in the context.
        remote_port: u16::from_be(remote_port),
    };
    // SAFETY: a plain lookup; the value is not read.
    if unsafe { WEFT_HANDOVER.get(handover) }.is_some() {
        return Ok(SK_PASS); // the agent delivering a client's connection
    }
    let key = ListenerKey {
        addr,
        kind: LISTENER_INBOUND_PLAINTEXT,
        _pad: 0,
    };
    match WEFT_LISTENERS.redirect_sk_lookup(ctx, key, 0) {
        Ok(()) => Ok(SK_PASS),
        // Enrolled but the agent's listener is gone (agent down or restarting):
        // refuse (the kernel answers a SYN with a reset) rather than let
        // traffic reach the application around the agent.
        Err(_) => Ok(SK_DROP),
    }
}

/// `::1`, or IPv4-mapped `127.0.0.0/8`.
#[inline(always)]
fn is_loopback6(a: [u8; 16]) -> bool {
    let head_zero = a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0;
    head_zero
        && ((a[10] | a[11] | a[12] | a[13] | a[14] == 0 && a[15] == 1)
            || (a[10] == 0xff && a[11] == 0xff && a[12] == 127))
}
