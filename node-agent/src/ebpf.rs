//! Loading, attaching and pinning the kernel programs, and typed access to their
//! maps. No other module sees a map or program name.
//!
//! Everything lives under the pin directory (`/sys/fs/bpf/weft` by default):
//! `maps/<MAP>` and `links/<program>` for the cgroup programs, `links/lookup-<netns
//! cookie>` for each pod's `sk_lookup`. A restarting agent reuses what is pinned, so
//! capture stays attached while it is away (enrolled pods fail closed: their
//! connects reach no listener and are refused); `uninstall` removes it all.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use tracing::{info, warn};
use weft_common::{
    ConnKey, Handover, LISTENER_INBOUND_PLAINTEXT, ListenerKey, MAP_ENROLLED, MAP_HANDOVER,
    MAP_LISTENERS, MAP_ORIG_DST, OrigDst, PROG_CONNECT4, PROG_CONNECT6, PROG_GETPEERNAME4,
    PROG_GETPEERNAME6, PROG_SK_LOOKUP, PROG_SOCK_OPS, PodInfo, v4_mapped,
};

use crate::net::Netns;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "this weft binary was built without its eBPF object; build it with `cargo xtask build-ebpf` and rebuild the agent (or run `cargo xtask demo`, which does both)"
    )]
    NoObject,
    #[error("bpffs is not mounted at /sys/fs/bpf and mounting it failed: {0}")]
    Bpffs(io::Error),
    #[error(
        "cannot create pin directory {path}: {source} (under `ip netns exec`, which mounts a fresh /sys without the cgroup2 and bpffs mounts, run the agent with `nsenter --net=/var/run/netns/NAME` instead)"
    )]
    PinDir { path: PathBuf, source: io::Error },
    #[error(
        "cannot open cgroup {path} (is cgroup v2 mounted there?): {source} (under `ip netns exec`, which mounts a fresh /sys without the cgroup2 and bpffs mounts, run the agent with `nsenter --net=/var/run/netns/NAME` instead)"
    )]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("loading the eBPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name} is missing from the object or has the wrong type: {detail}")]
    Map { name: &'static str, detail: String },
    #[error("map {name}: {source}")]
    MapOp {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {detail}")]
    Pin { path: PathBuf, detail: String },
    #[error("removing pins under {path}: {source}")]
    Unpin { path: PathBuf, source: io::Error },
}

/// The object built by `cargo xtask build-ebpf`, embedded at build time.
#[cfg(weft_ebpf_object)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("WEFT_EBPF_OBJECT_PATH")));
#[cfg(not(weft_ebpf_object))]
static OBJECT: Option<&[u8]> = None;

/// The embedded kernel object, or the error that says how to build it.
pub fn object() -> Result<&'static [u8], Error> {
    OBJECT.ok_or(Error::NoObject)
}

/// The cgroup programs: (name, kind). Attached once to the node's cgroup.
const CGROUP_PROGRAMS: [(&str, CgroupKind); 5] = [
    (PROG_CONNECT4, CgroupKind::SockAddr),
    (PROG_CONNECT6, CgroupKind::SockAddr),
    (PROG_GETPEERNAME4, CgroupKind::SockAddr),
    (PROG_GETPEERNAME6, CgroupKind::SockAddr),
    (PROG_SOCK_OPS, CgroupKind::SockOps),
];

#[derive(Clone, Copy)]
enum CgroupKind {
    SockAddr,
    SockOps,
}

/// The original-destination map, shared by every proxy task.
#[derive(Clone)]
pub struct OrigDstTable(Arc<OrigDstMap>);

struct OrigDstMap {
    map: HashMap<MapData, ConnKey, OrigDst>,
    /// The same map, for the one call aya does not offer on a hash map.
    fd: OwnedFd,
}

impl OrigDstTable {
    /// Takes the entry for an accepted connection: one
    /// `bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM)`. Deleting it as it is read keeps
    /// the map to connections not yet accepted, so a busy node does not fill
    /// the LRU map with spent entries that every new connect must evict, and the
    /// map's size (a metric) says something. A kernel that refuses the call on
    /// this map (older than 5.14) gets a plain lookup.
    pub fn take(&self, key: &ConnKey) -> Option<OrigDst> {
        let mut value = std::mem::MaybeUninit::<OrigDst>::zeroed();
        // The value has room for one `OrigDst`, the map's value type (the
        // kernel checks sizes against the map, which the object and `OrigDst`
        // share).
        match map_elem(
            BPF_MAP_LOOKUP_AND_DELETE_ELEM,
            &self.0.fd,
            key as *const ConnKey as u64,
            value.as_mut_ptr() as u64,
            0,
        ) {
            // SAFETY: the kernel filled the value; `OrigDst` is plain data.
            Ok(()) => Some(unsafe { value.assume_init() }),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => None,
            Err(_) => self.0.map.get(key, 0).ok(),
        }
    }

    /// Entries now (a walk of the map, one `bpf()` call per entry).
    fn len(&self) -> usize {
        self.0.map.keys().count()
    }
}

/// `enum bpf_cmd`: `BPF_MAP_LOOKUP_AND_DELETE_ELEM`.
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;

/// `union bpf_attr` for the map element commands: map_fd, pad, key, value,
/// flags.
#[repr(C)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// One `bpf()` map element command on `fd`.
fn map_elem(cmd: libc::c_long, fd: &OwnedFd, key: u64, value: u64, flags: u64) -> io::Result<()> {
    // `key` (and `value`) point at a live key of the map's sizes, which
    // callers take from the types the object shares.
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key,
        value,
        flags,
    };
    sys_bpf(cmd, &mut attr).map(drop)
}

/// The connections the agent is handing to applications from their clients'
/// addresses, which `sk_lookup` lets through (see `weft_common::MAP_HANDOVER`).
/// Shared by every worker; one `bpf()` call to file a connection before its
/// `connect` and one to strike it off after, with no lock of ours.
#[derive(Clone)]
pub struct HandoverTable(Arc<OwnedFd>);

impl HandoverTable {
    /// Files the connection `key` names (fails when the map is full).
    pub fn insert(&self, key: &Handover) -> io::Result<()> {
        let one = 1u8;
        map_elem(
            BPF_MAP_UPDATE_ELEM,
            &self.0,
            key as *const Handover as u64,
            &one as *const u8 as u64,
            0,
        )
    }

    /// Strikes it off; whether it was there (a missing entry is not an
    /// error).
    pub fn remove(&self, key: &Handover) -> bool {
        map_elem(
            BPF_MAP_DELETE_ELEM,
            &self.0,
            key as *const Handover as u64,
            0,
            0,
        )
        .is_ok()
    }
}

/// The loaded capture: programs attached, maps open.
pub struct Capture {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, PodInfo>,
    listeners: SockHash<MapData, ListenerKey>,
    orig_dst: OrigDstTable,
    handover: HandoverTable,
    /// The handover entries found at start, and when: struck off later if
    /// still there ([`Capture::clear_stale_handovers`]).
    found_handovers: Option<(Instant, Vec<Handover>)>,
    links_dir: PathBuf,
}

impl Capture {
    /// Loads the object, reusing pinned maps and links, and attaches what is not
    /// attached yet to `cgroup`.
    pub fn install(pin_dir: &Path, cgroup: &Path) -> Result<Self, Error> {
        let object = object()?;
        ensure_bpffs()?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        for dir in [pin_dir, &maps_dir, &links_dir] {
            std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let cgroup_file = File::open(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(object)?;

        for (name, kind) in CGROUP_PROGRAMS {
            let pin = links_dir.join(name);
            if pin.exists() {
                match PinnedLink::from_pin(&pin) {
                    Ok(_) => {
                        // The link stays (the programs stay attached through
                        // a restart or an upgrade); the program it runs is
                        // this build's.
                        let refreshed = load_cgroup(&mut ebpf, name, kind).and_then(|prog| {
                            refresh_link(&pin, prog.as_fd()).map_err(|e| Error::Pin {
                                path: pin.clone(),
                                detail: e.to_string(),
                            })
                        });
                        match refreshed {
                            Ok(false) => info!(program = name, "reusing pinned link"),
                            Ok(true) => info!(
                                program = name,
                                "reusing pinned link; its program was another build's and is replaced in place"
                            ),
                            Err(e) => warn!(
                                program = name,
                                error = %e,
                                "reusing pinned link; its program could not be checked or replaced, and runs as an earlier agent loaded it"
                            ),
                        }
                        continue;
                    }
                    Err(e) => {
                        warn!(program = name, error = %e, "pinned link unusable, attaching anew");
                        let _ = std::fs::remove_file(&pin);
                    }
                }
            }
            let link = attach_cgroup(&mut ebpf, name, kind, &cgroup_file)?;
            link.pin(&pin).map_err(|e| Error::Pin {
                path: pin.clone(),
                detail: e.to_string(),
            })?;
            info!(program = name, cgroup = %cgroup.display(), "attached");
        }

        let lookup: &mut SkLookup = program(&mut ebpf, PROG_SK_LOOKUP)?;
        lookup.load().map_err(|source| Error::Program {
            name: PROG_SK_LOOKUP,
            source,
        })?;

        let enrolled = typed_map(&mut ebpf, MAP_ENROLLED)?;
        let listeners = typed_map(&mut ebpf, MAP_LISTENERS)?;
        let orig_fd = match ebpf.map(MAP_ORIG_DST) {
            Some(aya::maps::Map::LruHashMap(m) | aya::maps::Map::HashMap(m)) => m
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::Map {
                    name: MAP_ORIG_DST,
                    detail: e.to_string(),
                })?,
            _ => {
                return Err(Error::Map {
                    name: MAP_ORIG_DST,
                    detail: "not a hash map in the object".to_owned(),
                });
            }
        };
        let orig_dst = typed_map(&mut ebpf, MAP_ORIG_DST)?;
        let (handover, found) = handover_table(&mut ebpf)?;
        Ok(Capture {
            found_handovers: (!found.is_empty()).then(|| (Instant::now(), found)),
            ebpf,
            enrolled,
            listeners,
            orig_dst: OrigDstTable(Arc::new(OrigDstMap {
                map: orig_dst,
                fd: orig_fd,
            })),
            handover,
            links_dir,
        })
    }

    pub fn orig_dst(&self) -> OrigDstTable {
        self.orig_dst.clone()
    }

    pub fn handover(&self) -> HandoverTable {
        self.handover.clone()
    }

    /// Strikes off the handover entries found at start that are still there
    /// `after` it: no `connect` lasts that long, so no agent is using them (a
    /// previous one died between its two `bpf()` calls). Once; later calls do
    /// nothing.
    pub fn clear_stale_handovers(&mut self, after: Duration) {
        let Some((since, found)) = self.found_handovers.take_if(|(t, _)| t.elapsed() >= after)
        else {
            return;
        };
        let stale = found.iter().filter(|k| self.handover.remove(k)).count();
        if stale > 0 {
            warn!(
                entries = stale,
                found_for = ?since.elapsed(),
                "cleared handovers a previous agent left"
            );
        }
    }

    /// Enrolls a pod: registers its inbound listener, attaches `sk_lookup` to its
    /// namespace (or reuses the pinned link), then switches outbound capture on. The
    /// pod's listeners must already be open, so no connect is ever refused for want
    /// of them.
    pub fn enroll(
        &mut self,
        netns: &Netns,
        addresses: &[IpAddr],
        inbound: &impl AsRawFd,
    ) -> Result<(), Error> {
        let cookie = netns.cookie();
        for ip in addresses {
            let key = ListenerKey {
                addr: match ip {
                    IpAddr::V4(v4) => v4_mapped(v4.octets()),
                    IpAddr::V6(v6) => v6.octets(),
                },
                kind: LISTENER_INBOUND_PLAINTEXT,
                _pad: 0,
            };
            self.listeners
                .insert(key, inbound.as_raw_fd(), 0)
                .map_err(|source| Error::MapOp {
                    name: MAP_LISTENERS,
                    source,
                })?;
        }

        let pin = self.lookup_pin(cookie);
        let pinned = pin.exists() && PinnedLink::from_pin(&pin).is_ok();
        if pinned {
            // Another build's program (an upgrade): this one's, in place.
            let prog: &mut SkLookup = program(&mut self.ebpf, PROG_SK_LOOKUP)?;
            let replaced = prog
                .fd()
                .map_err(io::Error::other)
                .and_then(|fd| refresh_link(&pin, fd.as_fd()));
            match replaced {
                Ok(false) => {}
                Ok(true) => info!(
                    netns_cookie = cookie,
                    "the pod's sk_lookup link ran another build's program: replaced in place"
                ),
                Err(e) => warn!(
                    netns_cookie = cookie,
                    error = %e,
                    "cannot check or replace the program of the pod's sk_lookup link: it runs as an earlier agent loaded it"
                ),
            }
        }
        if !pinned {
            let _ = std::fs::remove_file(&pin);
            let ns = File::open(netns.path()).map_err(|e| Error::Pin {
                path: netns.path().to_owned(),
                detail: e.to_string(),
            })?;
            let prog: &mut SkLookup = program(&mut self.ebpf, PROG_SK_LOOKUP)?;
            let id = prog.attach(&ns).map_err(|source| Error::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
            let link = prog.take_link(id).map_err(|source| Error::Program {
                name: PROG_SK_LOOKUP,
                source,
            })?;
            let link: FdLink = link.into();
            link.pin(&pin).map_err(|e| Error::Pin {
                path: pin.clone(),
                detail: e.to_string(),
            })?;
        }

        let info = PodInfo {
            flags: weft_common::POD_CAPTURE_OUTBOUND | weft_common::POD_CAPTURE_INBOUND,
            _pad: 0,
        };
        self.enrolled
            .insert(cookie, info, 0)
            .map_err(|source| Error::MapOp {
                name: MAP_ENROLLED,
                source,
            })
    }

    /// Unenrolls a pod: outbound capture off first (new connects go direct), then
    /// inbound steering. Connections already through the agent carry on.
    pub fn unenroll(&mut self, cookie: u64) -> Result<(), Error> {
        match self.enrolled.remove(&cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(Error::MapOp {
                    name: MAP_ENROLLED,
                    source,
                });
            }
        }
        let pin = self.lookup_pin(cookie);
        match std::fs::remove_file(&pin) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Unpin { path: pin, source }),
        }
    }

    /// Network-namespace cookies enrolled in the kernel right now, whoever put them
    /// there (after a restart: the previous run).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// How many entries each map holds now, for the metrics. Walks the keys
    /// (one `bpf()` call per entry): call it at scrape-like intervals, not per
    /// connection.
    pub fn map_entries(&self) -> Vec<(&'static str, usize)> {
        vec![
            (MAP_ENROLLED, self.enrolled.keys().count()),
            (MAP_LISTENERS, self.listeners.keys().count()),
            (MAP_ORIG_DST, self.orig_dst.len()),
        ]
    }

    /// Cookies with a pinned `sk_lookup` link.
    pub fn pinned_lookup_cookies(&self) -> Vec<u64> {
        let Ok(dir) = std::fs::read_dir(&self.links_dir) else {
            return Vec::new();
        };
        dir.filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix("lookup-")?
                    .parse()
                    .ok()
            })
            .collect()
    }

    /// Whether the namespace of `cookie` still lives, by its pinned `sk_lookup`
    /// link: the kernel detaches a namespace's links when the namespace goes
    /// (the link's info then names no namespace). Without a pinned link there
    /// is nothing keeping its traffic from the application: `false`.
    pub fn captured_namespace_lives(&self, cookie: u64) -> bool {
        link_netns_ino(&self.lookup_pin(cookie)).is_ok_and(|ino| ino != 0)
    }

    fn lookup_pin(&self, cookie: u64) -> PathBuf {
        self.links_dir.join(format!("lookup-{cookie}"))
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, Error>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(Error::Program {
        name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    prog.try_into()
        .map_err(|source| Error::Program { name, source })
}

/// The network-namespace inode a pinned netns link (`sk_lookup`) is attached
/// to; 0 once that namespace is gone.
fn link_netns_ino(pin: &Path) -> io::Result<u32> {
    pinned_link(pin).map(|(_, info)| info.netns_ino)
}

/// `struct bpf_link_info`'s head: type, id, prog_id, then (8-byte aligned)
/// the union, whose netns member is { netns_ino, attach_type }.
#[repr(C)]
#[derive(Default)]
struct LinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    netns_ino: u32,
    attach_type: u32,
    _rest: [u64; 6],
}

/// One `bpf()` command with `attr`; what it returns (a descriptor, for some).
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live `repr(C)` attribute struct of the size given,
    // whose pointers (if any) point at memory that outlives the call; the
    // kernel reads it, and writes only what the command's output fields say.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A descriptor the kernel just returned, owned from here on.
fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: `sys_bpf` returned it for a command that makes a descriptor.
    unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) }
}

/// `BPF_OBJ_GET_INFO_BY_FD` into `info` (its size is the length asked for:
/// the kernel fills what fits).
fn info_by_fd<T>(fd: BorrowedFd<'_>, info: &mut T) -> io::Result<()> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    #[repr(C)]
    struct InfoByFd {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut query = InfoByFd {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of::<T>() as u32,
        info: info as *mut T as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut query).map(drop)
}

/// A pinned link, opened, and its info. `BPF_OBJ_GET` and
/// `BPF_OBJ_GET_INFO_BY_FD` (aya offers no link info for netns links).
fn pinned_link(pin: &Path) -> io::Result<(OwnedFd, LinkInfo)> {
    use std::os::unix::ffi::OsStrExt;
    const BPF_OBJ_GET: libc::c_long = 7;
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("a pin path with a NUL byte"))?;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    let fd = owned(sys_bpf(BPF_OBJ_GET, &mut get)?);
    let mut info = LinkInfo::default();
    info_by_fd(fd.as_fd(), &mut info)?;
    Ok((fd, info))
}

/// A program by its id (`BPF_PROG_GET_FD_BY_ID`).
fn prog_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
    #[repr(C)]
    struct ById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut by_id = ById {
        id,
        next_id: 0,
        open_flags: 0,
    };
    sys_bpf(BPF_PROG_GET_FD_BY_ID, &mut by_id).map(owned)
}

/// A program's tag: the kernel's hash of its instructions (map references
/// left out), equal for two loads of the same build's program.
fn prog_tag(fd: BorrowedFd<'_>) -> io::Result<[u8; 8]> {
    /// `struct bpf_prog_info`'s head: type, id, tag.
    #[repr(C)]
    #[derive(Default)]
    struct ProgInfo {
        kind: u32,
        id: u32,
        tag: [u8; 8],
    }
    let mut info = ProgInfo::default();
    info_by_fd(fd, &mut info)?;
    Ok(info.tag)
}

/// Has `link` run `prog` from now on (`BPF_LINK_UPDATE`: atomic, the link
/// stays attached throughout).
fn link_update(link: &OwnedFd, prog: BorrowedFd<'_>) -> io::Result<()> {
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct Update {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut update = Update {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    sys_bpf(BPF_LINK_UPDATE, &mut update).map(drop)
}

/// Gives the pinned link at `pin` the program `prog` if it runs another
/// (by tag); whether it did.
fn refresh_link(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<bool> {
    let (link, info) = pinned_link(pin)?;
    let old = prog_fd_by_id(info.prog_id)?;
    if prog_tag(old.as_fd())? == prog_tag(prog)? {
        return Ok(false);
    }
    link_update(&link, prog)?;
    Ok(true)
}

/// Loads the cgroup program `name` (not attached), for a pinned link.
fn load_cgroup(ebpf: &mut Ebpf, name: &'static str, kind: CgroupKind) -> Result<OwnedFd, Error> {
    let err = |source| Error::Program { name, source };
    macro_rules! load {
        ($ty:ty) => {{
            let prog: &mut $ty = program(ebpf, name)?;
            prog.load().map_err(err)?;
            prog.fd()
                .map_err(err)?
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::Pin {
                    path: PathBuf::from(name),
                    detail: e.to_string(),
                })?
        }};
    }
    Ok(match kind {
        CgroupKind::SockAddr => load!(CgroupSockAddr),
        CgroupKind::SockOps => load!(SockOps),
    })
}

/// The handover map, and what it holds as this agent starts. An entry a
/// previous agent left (killed between its `bpf()` calls) would let one
/// connection with that exact 4-tuple past `sk_lookup`, so those are struck
/// off ([`Capture::clear_stale_handovers`]); but not at once: a predecessor
/// still serving beside this agent (`app::succession`) has entries of its own
/// in there, each for the time of one `connect`.
fn handover_table(ebpf: &mut Ebpf) -> Result<(HandoverTable, Vec<Handover>), Error> {
    let fd = match ebpf.map(MAP_HANDOVER) {
        Some(aya::maps::Map::HashMap(m)) => {
            m.fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::Map {
                    name: MAP_HANDOVER,
                    detail: e.to_string(),
                })?
        }
        _ => {
            return Err(Error::Map {
                name: MAP_HANDOVER,
                detail: "not a hash map in the object".to_owned(),
            });
        }
    };
    let map: HashMap<MapData, Handover, u8> = typed_map(ebpf, MAP_HANDOVER)?;
    let found: Vec<Handover> = map.keys().filter_map(Result::ok).collect();
    Ok((HandoverTable(Arc::new(fd)), found))
}

/// Takes map `name` out of the object as its typed wrapper.
fn typed_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(Error::Map {
        name,
        detail: "not in the object".to_owned(),
    })?;
    T::try_from(map).map_err(|e| Error::Map {
        name,
        detail: e.to_string(),
    })
}

fn attach_cgroup(
    ebpf: &mut Ebpf,
    name: &'static str,
    kind: CgroupKind,
    cgroup: &File,
) -> Result<FdLink, Error> {
    let err = |source| Error::Program { name, source };
    let to_fd = |e: LinkError| Error::Pin {
        path: PathBuf::from(name),
        detail: e.to_string(),
    };
    // The two program types share no attach trait; the steps are the same.
    // `Single`: this agent owns the attachment on its node's cgroup.
    macro_rules! attach {
        ($ty:ty) => {{
            let prog: &mut $ty = program(ebpf, name)?;
            prog.load().map_err(err)?;
            let id = prog.attach(cgroup, CgroupAttachMode::Single).map_err(err)?;
            prog.take_link(id).map_err(err)?.try_into().map_err(to_fd)
        }};
    }
    match kind {
        CgroupKind::SockAddr => attach!(CgroupSockAddr),
        CgroupKind::SockOps => attach!(SockOps),
    }
}

/// Mounts bpffs at `/sys/fs/bpf` if nothing is mounted there.
fn ensure_bpffs() -> Result<(), Error> {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs writes into the zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return Ok(());
    }
    std::fs::create_dir_all("/sys/fs/bpf").map_err(Error::Bpffs)?;
    // SAFETY: plain mount syscall with valid C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        info!("mounted bpffs at /sys/fs/bpf");
        Ok(())
    } else {
        Err(Error::Bpffs(io::Error::last_os_error()))
    }
}

/// Removes everything under `pin_dir`: unpinning a link detaches its program once
/// no process holds it, and unpinning a map frees it once no program uses it.
pub fn uninstall(pin_dir: &Path) -> Result<usize, Error> {
    let mut removed = 0;
    for sub in ["links", "maps"] {
        let dir = pin_dir.join(sub);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Unpin { path: dir, source }),
        };
        for entry in entries {
            let entry = entry.map_err(|source| Error::Unpin {
                path: dir.clone(),
                source,
            })?;
            std::fs::remove_file(entry.path()).map_err(|source| Error::Unpin {
                path: entry.path(),
                source,
            })?;
            removed += 1;
        }
        let _ = std::fs::remove_dir(&dir);
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::Unpin {
                path: pin_dir.to_owned(),
                source,
            });
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every map and program name the agent uses exists in the built object.
    #[test]
    fn object_has_every_name() {
        let Ok(object) = object() else {
            // CI builds the object first; there, a missing object is a failure.
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "built without the eBPF object"
            );
            eprintln!("skipped: built without the eBPF object (cargo xtask build-ebpf)");
            return;
        };
        let obj = aya_obj_names(object);
        for name in weft_common::MAP_NAMES {
            assert!(
                obj.maps.iter().any(|m| m == name),
                "map {name} not in object: {:?}",
                obj.maps
            );
        }
        for name in weft_common::PROG_NAMES {
            assert!(
                obj.programs.iter().any(|p| p == name),
                "program {name} not in object: {:?}",
                obj.programs
            );
        }
    }

    struct Names {
        maps: Vec<String>,
        programs: Vec<String>,
    }

    fn aya_obj_names(data: &[u8]) -> Names {
        let obj = aya_obj::Object::parse(data).expect("object parses");
        Names {
            maps: obj.maps.keys().cloned().collect(),
            programs: obj.programs.keys().cloned().collect(),
        }
    }
}
