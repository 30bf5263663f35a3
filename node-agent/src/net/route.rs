//! The routing a pod needs for the agent to hand a connection to its application
//! from the real client's address (a transparent socket bound to that address).
//!
//! The agent's socket carries [`HANDOVER_MARK`]; with `tcp_fwmark_accept` the
//! application's accepted socket inherits the mark of the SYN, so its replies
//! carry it too; a rule sends marked packets to a table whose one route is
//! `local` on `lo`, so those replies, addressed to the client, are delivered to
//! the agent's socket inside the pod instead of leaving it. Nothing else in the
//! pod is marked, so nothing else changes. (Istio's ztunnel does the same in its
//! in-pod mode with iptables marks; here the mark rides on the socket.)
//!
//! The kernel's own replies to marked packets are marked too (`fwmark_reflect`),
//! so the RST of a closed port comes back to the agent at once.
//!
//! Set up once per pod, inside its namespace: the sysctls through `/proc/sys`
//! (which follows the calling thread's namespace), the rule and the routes with
//! three netlink messages. Hand-written rather than a netlink crate: three
//! fixed messages do not need one, and `rtnetlink` would bring its own async
//! runtime glue and a dozen crates. Idempotent: `EEXIST` counts as done, so a
//! restarted agent finds its pods ready.

use std::{
    fs::OpenOptions,
    io::{self, Write},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use weft_common::HANDOVER_MARK;

use super::Netns;

/// The routing table of the handover routes (and the rule's priority): any
/// number the pod does not use; the mark's value keeps them easy to spot.
pub const HANDOVER_TABLE: u32 = HANDOVER_MARK;
const RULE_PRIORITY: u32 = 32_000;

const FRA_PRIORITY: u16 = 6;
const FRA_FWMARK: u16 = 10;
const FRA_TABLE: u16 = 15;
const FRA_FWMASK: u16 = 16;
const FR_ACT_TO_TBL: u8 = 1;
const LOOPBACK_IFINDEX: u32 = 1;

/// The procfs the sysctls are written through: `/proc`, unless the agent runs
/// in a container, whose own `/proc/sys` is read-only; it then writes through
/// the host's procfs mounted elsewhere (`--proc-dir`). Either way the
/// `sys/net` entries follow the writing thread's network namespace.
static PROC: OnceLock<PathBuf> = OnceLock::new();

/// Sets the procfs for [`prepare_handover`]'s sysctls, once, at start.
pub fn set_proc_dir(dir: PathBuf) {
    let _ = PROC.set(dir);
}

fn proc_dir() -> &'static Path {
    PROC.get().map_or(Path::new("/proc"), PathBuf::as_path)
}

/// Has the kernel move connections waiting in a closing listener's queue to
/// another listener of its `SO_REUSEPORT` group, instead of resetting them
/// (`tcp_migrate_req`, Linux 5.14): when an agent stops beside its successor
/// (see `app::succession`), what it had not accepted yet goes to the
/// successor. With no other listener there is nowhere to move to, and they are
/// reset as before. A write of one sysctl inside the pod.
pub fn migrate_requests(netns: &Netns) -> io::Result<()> {
    netns.run(|| -> io::Result<()> {
        OpenOptions::new()
            .write(true)
            .open(proc_dir().join("sys/net/ipv4/tcp_migrate_req"))?
            .write_all(b"1")
    })?
}

/// Prepares `netns` for handovers: the sysctl, the rule and the `local` routes,
/// for IPv4 and IPv6 (IPv6 only where the pod has it).
pub fn prepare_handover(netns: &Netns) -> io::Result<()> {
    netns.run(|| -> io::Result<()> {
        // /proc/sys/net follows the namespace of the thread that opens it.
        OpenOptions::new()
            .write(true)
            .open(proc_dir().join("sys/net/ipv4/tcp_fwmark_accept"))?
            .write_all(b"1")?;
        // The kernel's own replies (the RST of a port nobody listens on) carry
        // the mark of the packet they answer, so a handover to a closed port is
        // refused at once instead of waiting out the connect timeout: without
        // it, the RST went to the real client's address and was lost. Only
        // marked packets get marked replies; nothing else in the pod changes.
        OpenOptions::new()
            .write(true)
            .open(proc_dir().join("sys/net/ipv4/fwmark_reflect"))?
            .write_all(b"1")?;
        match OpenOptions::new()
            .write(true)
            .open(proc_dir().join("sys/net/ipv6/fwmark_reflect"))
        {
            Ok(mut f) => f.write_all(b"1")?,
            // No IPv6 in this namespace: nothing to reflect.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let nl = Netlink::open()?;
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let done = nl
                .request(libc::RTM_NEWRULE, &rule(family))
                .and_then(|()| nl.request(libc::RTM_NEWROUTE, &local_route(family)));
            match done {
                Ok(()) => {}
                // A pod without IPv6 has no IPv6 routing to change.
                Err(e)
                    if family == libc::AF_INET6 as u8
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
                        ) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })?
}

/// `ip rule add fwmark MARK/0xffffffff lookup TABLE pref 32000`.
fn rule(family: u8) -> Vec<u8> {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2,
    // action, flags (u32).
    let mut msg = vec![family, 0, 0, 0, 0, 0, 0, FR_ACT_TO_TBL, 0, 0, 0, 0];
    attr(&mut msg, FRA_PRIORITY, &RULE_PRIORITY.to_ne_bytes());
    attr(&mut msg, FRA_FWMARK, &HANDOVER_MARK.to_ne_bytes());
    attr(&mut msg, FRA_FWMASK, &u32::MAX.to_ne_bytes());
    attr(&mut msg, FRA_TABLE, &HANDOVER_TABLE.to_ne_bytes());
    msg
}

/// `ip route add local default dev lo table TABLE`.
fn local_route(family: u8) -> Vec<u8> {
    // struct rtmsg: family, dst_len, src_len, tos, table, protocol, scope,
    // type, flags (u32).
    let mut msg = vec![
        family,
        0,
        0,
        0,
        libc::RT_TABLE_UNSPEC,
        libc::RTPROT_STATIC,
        libc::RT_SCOPE_HOST,
        libc::RTN_LOCAL,
        0,
        0,
        0,
        0,
    ];
    attr(&mut msg, libc::RTA_TABLE, &HANDOVER_TABLE.to_ne_bytes());
    attr(&mut msg, libc::RTA_OIF, &LOOPBACK_IFINDEX.to_ne_bytes());
    msg
}

/// Appends one netlink attribute (header, payload, padding to 4 bytes).
fn attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = u16::try_from(4 + payload.len()).expect("a small attribute");
    msg.extend_from_slice(&len.to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

/// A `NETLINK_ROUTE` socket of the namespace it was made in.
struct Netlink {
    fd: OwnedFd,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor just returned by socket(2), owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Netlink { fd })
    }

    /// Sends one request that creates something and waits for its answer;
    /// `EEXIST` is success.
    fn request(&self, kind: u16, body: &[u8]) -> io::Result<()> {
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        let len = u32::try_from(16 + body.len()).expect("a small message");
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags as u16).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        msg.extend_from_slice(body);
        // SAFETY: the buffer is live and its length is given; the kernel is the
        // default destination of a netlink socket.
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        // SAFETY: receives into a live buffer of the given length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        ack(&buf[..n as usize])
    }
}

/// Reads an `NLMSG_ERROR` answer: error 0 is the ack.
fn ack(answer: &[u8]) -> io::Result<()> {
    let field = |at: usize| -> io::Result<[u8; 4]> {
        answer
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| io::Error::other("short netlink answer"))
    };
    let kind = u16::from_ne_bytes([
        answer.get(4).copied().unwrap_or(0),
        answer.get(5).copied().unwrap_or(0),
    ]);
    if i32::from(kind) != libc::NLMSG_ERROR {
        return Err(io::Error::other(format!(
            "unexpected netlink answer type {kind}"
        )));
    }
    match -i32::from_ne_bytes(field(16)?) {
        0 | libc::EEXIST => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_to_four_bytes() {
        let mut msg = Vec::new();
        attr(&mut msg, 7, &[1, 2, 3]);
        assert_eq!(msg, [7, 0, 7, 0, 1, 2, 3, 0]);
        let r = rule(libc::AF_INET as u8);
        assert_eq!(r.len(), 12 + 4 * 8);
        assert_eq!(r[7], FR_ACT_TO_TBL);
    }

    #[test]
    fn an_error_answer_is_its_errno_and_eexist_is_done() {
        let answer = |errno: i32| {
            let mut a = vec![0u8; 36];
            a[4..6].copy_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
            a[16..20].copy_from_slice(&(-errno).to_ne_bytes());
            a
        };
        assert!(ack(&answer(0)).is_ok());
        assert!(ack(&answer(libc::EEXIST)).is_ok());
        assert_eq!(
            ack(&answer(libc::EPERM)).unwrap_err().raw_os_error(),
            Some(libc::EPERM)
        );
        assert!(ack(&[0u8; 3]).is_err());
    }
}
