//! What only this node knows about its pods: where each one's network namespace
//! is. The model is cluster-wide and says nothing of it; a source that knows
//! (the local file lists it; a CNI plugin will report it) fills this registry,
//! and enrollment needs both: a workload the model enrolls on this node, and its
//! namespace here.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::model::WorkloadKey;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Registry {
    netns: BTreeMap<WorkloadKey, PathBuf>,
}

impl Registry {
    /// Replaces every entry (a source that reports them all at once, as the
    /// file does).
    pub fn replace(&mut self, netns: BTreeMap<WorkloadKey, PathBuf>) {
        self.netns = netns;
    }

    /// The network namespace of `pod`, if known.
    pub fn netns(&self, pod: &WorkloadKey) -> Option<&Path> {
        self.netns.get(pod).map(PathBuf::as_path)
    }
}
