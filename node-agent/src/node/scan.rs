//! Pods that ran before the agent: their network namespaces found in `/proc`.
//!
//! The CNI plugin reports each pod as it starts; a pod that started while no
//! agent listened (a restart of the agent, an install onto a running node) is
//! reported by nobody. So the agent looks for itself: every process below its
//! capture cgroup (`--cgroup`; a process elsewhere could not be captured
//! anyway) is in some network namespace; each namespace other than the
//! agent's own is entered once to read its addresses, and a namespace holding
//! an address of a workload the model enrolls on this node, whose namespace
//! is not known yet, is that workload's. Its path is a named one
//! (`/var/run/netns/...`, where runtimes bind-mount them) when there is one,
//! else `/proc/<pid>/ns/net` of a process in it; the agent holds the namespace
//! open while the pod is enrolled, and a path that no longer names it means the
//! pod is gone.
//!
//! A scan runs at start and whenever such a workload still has no namespace,
//! at most every [`SCAN_EVERY`]. An address found in two namespaces names
//! neither (logged): a wrong guess would capture another pod.
//! Namespaces the runtime deleted a pod from (CNI DEL) are skipped while
//! their last processes exit.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::{debug, error, info};

use super::registry::{Entry, Registry, Source};
use crate::{model::WorkloadKey, net::Netns, view::View};

/// The least time between two scans that are not forced.
pub const SCAN_EVERY: Duration = Duration::from_secs(5);

/// Where runtimes keep named network namespaces (bind mounts).
const NAMED: &[&str] = &["/var/run/netns", "/run/netns"];

/// A network namespace some process below the cgroup is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub inode: u64,
    /// A named path if one exists, else a process's `/proc/<pid>/ns/net`.
    pub path: PathBuf,
}

pub struct Scanner {
    cgroup: PathBuf,
    proc: PathBuf,
    last: Option<Instant>,
}

impl Scanner {
    /// `proc`: the node's `/proc` (the host's, mounted into the agent's
    /// container, when the agent has a PID namespace of its own).
    pub fn new(cgroup: &Path, proc: &Path) -> Scanner {
        Scanner {
            cgroup: cgroup.to_owned(),
            proc: proc.to_owned(),
            last: None,
        }
    }

    /// Scans if a workload enrolled on this node has no namespace in the
    /// registry and the last scan is [`SCAN_EVERY`] old (or `force`); files
    /// what it finds in the registry. Returns how many workloads it found.
    pub fn scan_if_needed(&mut self, view: &View, registry: &mut Registry, force: bool) -> usize {
        let mut wanted: BTreeMap<IpAddr, WorkloadKey> = BTreeMap::new();
        for w in view.enrolled_here() {
            if registry.netns(&w.key()).is_none() {
                for a in &w.addresses {
                    wanted.insert(a.to_canonical(), w.key());
                }
            }
        }
        if wanted.is_empty() {
            return 0;
        }
        if !force && self.last.is_some_and(|t| t.elapsed() < SCAN_EVERY) {
            return 0;
        }
        self.last = Some(Instant::now());
        let started = Instant::now();
        let found = namespaces(&self.cgroup, &self.proc);
        let alive: BTreeSet<u64> = found.iter().map(|f| f.inode).collect();
        registry.retain_released(|i| alive.contains(&i));
        let mut candidates: BTreeMap<WorkloadKey, Vec<PathBuf>> = BTreeMap::new();
        for ns in &found {
            if registry.is_released(ns.inode) {
                continue;
            }
            let addresses = match Netns::open(&ns.path).and_then(|n| n.addresses()) {
                Ok(a) => a,
                // The process may have exited since.
                Err(e) => {
                    debug!(path = %ns.path.display(), error = %e, "scan: cannot read a namespace's addresses");
                    continue;
                }
            };
            let mut keys: BTreeSet<&WorkloadKey> = BTreeSet::new();
            for a in addresses {
                if let Some(key) = wanted.get(&a.to_canonical()) {
                    keys.insert(key);
                }
            }
            for key in keys {
                candidates
                    .entry(key.clone())
                    .or_default()
                    .push(ns.path.clone());
            }
        }
        let mut filed = 0;
        for (key, paths) in candidates {
            if let [path] = paths.as_slice() {
                info!(workload = %key, netns = %path.display(), "scan: found a running pod's network namespace");
                registry.insert(
                    Source::Proc,
                    key,
                    Entry {
                        path: path.clone(),
                        container_id: None,
                    },
                );
                filed += 1;
            } else {
                let paths: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
                error!(workload = %key, netns = ?paths, "scan: the workload's addresses are in several network namespaces; enrolling none of them");
            }
        }
        debug!(
            namespaces = found.len(),
            found = filed,
            micros = started.elapsed().as_micros() as u64,
            "scan of /proc done"
        );
        filed
    }
}

/// The network namespaces of the processes in the cgroup subtree at
/// `cgroup`, once each, without the agent's own; `proc` is where the node's
/// processes are listed.
///
/// Below the cgroup2 root that is every process in `proc` (the production
/// case: the host's /proc works from any PID namespace). Below another
/// cgroup, its subtree's `cgroup.procs` say which (their pids are the
/// agent's PID namespace's, which must then be the one `proc` shows).
pub fn namespaces(cgroup: &Path, proc: &Path) -> Vec<Found> {
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| (m.dev(), m.ino()));
    let mut seen: BTreeMap<(u64, u64), PathBuf> = BTreeMap::new();
    // Only a non-root cgroup has `cgroup.type`.
    let pids = if cgroup.join("cgroup.type").exists() {
        cgroup_pids(cgroup)
    } else {
        all_pids(proc)
    };
    for pid in pids {
        let path = proc.join(pid.to_string()).join("ns/net");
        let Ok(m) = std::fs::metadata(&path) else {
            continue;
        };
        let id = (m.dev(), m.ino());
        if own.as_ref().is_ok_and(|o| *o == id) {
            continue;
        }
        seen.entry(id).or_insert(path);
    }
    // A named path outlives any one process of the pod.
    for dir in NAMED {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if let Ok(m) = std::fs::metadata(entry.path())
                && let Some(path) = seen.get_mut(&(m.dev(), m.ino()))
                && path.starts_with(proc)
            {
                *path = entry.path();
            }
        }
    }
    seen.into_iter()
        .map(|((_, inode), path)| Found { inode, path })
        .collect()
}

/// Every pid `proc` lists.
fn all_pids(proc: &Path) -> Vec<u32> {
    std::fs::read_dir(proc)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Every pid in the cgroup subtree at `root`.
fn cgroup_pids(root: &Path) -> Vec<u32> {
    let mut pids = Vec::new();
    let mut dirs = vec![root.to_owned()];
    while let Some(dir) = dirs.pop() {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
        if let Ok(entries) = std::fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_namespace_is_never_found() {
        // This process's cgroup: the scan sees its processes, all in the
        // agent's (the test's) own namespace, so nothing.
        let line = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let Some(rel) = line.lines().find_map(|l| l.strip_prefix("0::")) else {
            return; // no cgroup v2 here
        };
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(root) = mounts.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next()? == "cgroup2").then(|| left.split(' ').nth(4))?
        }) else {
            return;
        };
        // The root is told apart by the file only non-root cgroups have; from
        // it, every process counts.
        assert!(!Path::new(root).join("cgroup.type").exists());
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert!(
            namespaces(Path::new(root), Path::new("/proc"))
                .iter()
                .all(|f| f.inode != own && f.path.exists())
        );
        let dir = Path::new(root).join(rel.trim_start_matches('/'));
        if !dir.exists() {
            return; // a cgroup namespace that hides the path
        }
        assert!(cgroup_pids(&dir).contains(&std::process::id()));
        assert!(
            namespaces(&dir, Path::new("/proc"))
                .iter()
                .all(|f| f.inode != own)
        );
    }
}
