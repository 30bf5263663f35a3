//! Pod network namespaces: making sockets inside them.
//!
//! A socket belongs to the network namespace of the thread that created it, for its
//! whole life. So the agent enters a pod's namespace only for the `socket()` call
//! (`setns` there and back on the current thread, which Linux allows per thread for
//! network namespaces) and then uses the socket from any thread. The agent's own
//! namespace is captured once at start-up and is where every thread returns to.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    sync::OnceLock,
};

use tracing::error;

/// The agent's own network namespace, opened once.
static HOME: OnceLock<File> = OnceLock::new();

fn home() -> io::Result<&'static File> {
    if let Some(f) = HOME.get() {
        return Ok(f);
    }
    let f = File::open("/proc/thread-self/ns/net")?;
    Ok(HOME.get_or_init(|| f))
}

/// An open handle on a pod's network namespace.
#[derive(Debug)]
pub struct Netns {
    path: PathBuf,
    file: File,
    cookie: u64,
}

impl Netns {
    /// Opens the namespace at `path` and reads its cookie (the kernel's unique id
    /// for it, which the eBPF programs see through `bpf_get_netns_cookie`).
    pub fn open(path: &Path) -> io::Result<Self> {
        home()?;
        let file = File::open(path)?;
        let mut netns = Netns {
            path: path.to_owned(),
            file,
            cookie: 0,
        };
        let probe = netns
            .run(|| socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None))??;
        netns.cookie = netns_cookie(&probe)?;
        Ok(netns)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// Whether the path it was opened from still names this namespace. When it
    /// does not (`ip netns del`, the pod's process gone), the pod is gone: the
    /// handle the agent holds keeps the namespace itself alive, so its path is
    /// the only sign.
    pub fn still_at_path(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(held), Ok(now)) = (self.file.metadata(), std::fs::metadata(&self.path)) else {
            return false;
        };
        (held.dev(), held.ino()) == (now.dev(), now.ino())
    }

    /// The namespace's inode: what `/proc/<pid>/ns/net` of every process in it
    /// names, and what tells two paths to one namespace apart from two
    /// namespaces.
    pub fn inode(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        Ok(self.file.metadata()?.ino())
    }

    /// Whether `path` names this very namespace.
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(held), Ok(there)) = (self.file.metadata(), std::fs::metadata(path)) else {
            return false;
        };
        (held.dev(), held.ino()) == (there.dev(), there.ino())
    }

    /// Runs `f` with the current thread inside this namespace, then returns the
    /// thread home. Keep `f` to socket creation: it must not block or yield.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = home()?;
        setns(self.file.as_fd().as_raw_fd())?;
        let out = f();
        if let Err(e) = setns(home.as_raw_fd()) {
            // A thread stuck in a pod's namespace would make every later socket on
            // it in the wrong place; there is no safe way to continue.
            error!(error = %e, "cannot return to the agent's network namespace");
            std::process::abort();
        }
        Ok(out)
    }
}

impl Netns {
    /// The namespace's non-loopback interface addresses (read with `getifaddrs`,
    /// whose netlink socket is made inside the namespace).
    pub fn addresses(&self) -> io::Result<Vec<IpAddr>> {
        self.run(|| {
            let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
            // SAFETY: getifaddrs allocates a list that freeifaddrs releases below.
            if unsafe { libc::getifaddrs(&mut head) } != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut out = Vec::new();
            let mut cur = head;
            while !cur.is_null() {
                // SAFETY: `cur` walks the list getifaddrs returned; `ifa_addr` is
                // null or points to a sockaddr of the family it names.
                unsafe {
                    let addr = (*cur).ifa_addr;
                    if !addr.is_null() {
                        match i32::from((*addr).sa_family) {
                            libc::AF_INET => {
                                let sin = &*addr.cast::<libc::sockaddr_in>();
                                out.push(IpAddr::from(
                                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                                ));
                            }
                            libc::AF_INET6 => {
                                let sin6 = &*addr.cast::<libc::sockaddr_in6>();
                                out.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                            }
                            _ => {}
                        }
                    }
                    cur = (*cur).ifa_next;
                }
            }
            // SAFETY: `head` came from getifaddrs and is freed once.
            unsafe { libc::freeifaddrs(head) };
            out.retain(|ip| !ip.is_loopback());
            out.sort();
            out.dedup();
            Ok(out)
        })?
    }
}

fn setns(fd: i32) -> io::Result<()> {
    // SAFETY: plain syscall on a valid namespace fd; affects only this thread.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14+) of the namespace a socket lives in.
pub fn netns_cookie(socket: &impl AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `cookie`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}
