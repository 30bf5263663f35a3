//! What only this node knows about its pods: where each one's network namespace
//! is. The model is cluster-wide and says nothing of it; sources that know fill
//! this registry, and enrollment needs both: a workload the model enrolls on
//! this node, and its namespace here.
//!
//! Three sources, each with its own entries: the local file (`netns:` per
//! workload, replaced whole on each reload), the chained CNI plugin (one entry
//! per ADD, gone with its DEL: `node::cni`), and the scan of `/proc` for pods
//! that ran before the agent (`node::scan`). Where two know a pod, the file
//! wins (an operator's explicit word), then the CNI plugin (the runtime's own),
//! then `/proc` (found by address).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use crate::model::WorkloadKey;

/// Where an entry came from; earlier ones win.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Source {
    File,
    Cni,
    Proc,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: PathBuf,
    /// The sandbox the CNI plugin reported it for.
    pub container_id: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Registry {
    netns: BTreeMap<WorkloadKey, BTreeMap<Source, Entry>>,
    /// Namespaces (by inode) the runtime has deleted pods from (CNI DEL): a
    /// scan must not take them up again while their last process exits.
    released: BTreeSet<u64>,
}

/// Released namespaces remembered at most; a scan forgets those that are gone.
const MAX_RELEASED: usize = 4096;

impl Registry {
    /// Replaces every entry of the file (which reports them all at once).
    pub fn replace(&mut self, netns: BTreeMap<WorkloadKey, PathBuf>) {
        for entries in self.netns.values_mut() {
            entries.remove(&Source::File);
        }
        for (key, path) in netns {
            self.insert(
                Source::File,
                key,
                Entry {
                    path,
                    container_id: None,
                },
            );
        }
        self.netns.retain(|_, e| !e.is_empty());
    }

    pub fn insert(&mut self, source: Source, key: WorkloadKey, entry: Entry) {
        self.netns.entry(key).or_default().insert(source, entry);
    }

    pub fn remove(&mut self, source: Source, key: &WorkloadKey) -> Option<Entry> {
        let entries = self.netns.get_mut(key)?;
        let gone = entries.remove(&source);
        if entries.is_empty() {
            self.netns.remove(key);
        }
        gone
    }

    /// `source`'s entry for `pod`.
    /// Every entry of `source`.
    pub fn entries(&self, source: Source) -> impl Iterator<Item = (&WorkloadKey, &Entry)> {
        self.netns
            .iter()
            .filter_map(move |(key, e)| Some((key, e.get(&source)?)))
    }

    pub fn get(&self, source: Source, pod: &WorkloadKey) -> Option<&Entry> {
        self.netns.get(pod)?.get(&source)
    }

    /// The network namespace of `pod`, if known (from the source that wins).
    pub fn netns(&self, pod: &WorkloadKey) -> Option<&Path> {
        let (_, entry) = self.netns.get(pod)?.first_key_value()?;
        Some(&entry.path)
    }

    /// Remembers that the runtime deleted a pod from the namespace `inode`.
    pub fn release(&mut self, inode: u64) {
        if self.released.len() >= MAX_RELEASED {
            self.released.pop_first();
        }
        self.released.insert(inode);
    }

    pub fn is_released(&self, inode: u64) -> bool {
        self.released.contains(&inode)
    }

    /// Forgets released namespaces that no process holds any more (the inode
    /// may be given to a new namespace).
    pub fn retain_released(&mut self, alive: impl Fn(u64) -> bool) {
        self.released.retain(|i| alive(*i));
    }

    /// Takes back the release of `inode` (an ADD for it: the runtime uses it
    /// again).
    pub fn unrelease(&mut self, inode: u64) {
        self.released.remove(&inode);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> WorkloadKey {
        WorkloadKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn entry(path: &str) -> Entry {
        Entry {
            path: path.into(),
            container_id: None,
        }
    }

    #[test]
    fn sources_keep_their_own_entries_and_the_file_wins() {
        let mut r = Registry::default();
        r.insert(Source::Proc, key("a"), entry("/proc/7/ns/net"));
        assert_eq!(r.netns(&key("a")), Some(Path::new("/proc/7/ns/net")));
        r.insert(Source::Cni, key("a"), entry("/var/run/netns/cni-1"));
        assert_eq!(r.netns(&key("a")), Some(Path::new("/var/run/netns/cni-1")));
        r.replace(BTreeMap::from([(key("a"), "/var/run/netns/a".into())]));
        assert_eq!(r.netns(&key("a")), Some(Path::new("/var/run/netns/a")));
        // The file's next set leaves the others alone.
        r.replace(BTreeMap::new());
        assert_eq!(r.netns(&key("a")), Some(Path::new("/var/run/netns/cni-1")));
        assert!(r.remove(Source::Cni, &key("a")).is_some());
        assert!(r.remove(Source::Proc, &key("a")).is_some());
        assert_eq!(r.netns(&key("a")), None);
        assert_eq!(r, Registry::default());
    }

    #[test]
    fn released_namespaces_are_bounded_and_forgotten_when_gone() {
        let mut r = Registry::default();
        for i in 0..(MAX_RELEASED as u64 + 10) {
            r.release(i);
        }
        assert_eq!(r.released.len(), MAX_RELEASED);
        assert!(r.is_released(MAX_RELEASED as u64 + 9));
        r.retain_released(|i| i == 100);
        assert!(r.is_released(100) && !r.is_released(101));
        r.unrelease(100);
        assert!(!r.is_released(100));
    }
}
