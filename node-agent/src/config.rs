//! The mesh model as the local YAML file declares it, and its validation.
//!
//! One file describes the whole (local) mesh; each agent serves the workloads the
//! file places on its node. Parsing is strict (unknown fields are errors, so a typo
//! is never silently ignored), and every error names where it is.

use std::{
    collections::HashSet,
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::identity::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {}", .problems.join("; "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The whole mesh, as one file declares it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfig {
    /// The trust domain of every identity in this mesh.
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub workloads: Vec<Workload>,
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig {
            trust_domain: default_trust_domain(),
            workloads: Vec::new(),
        }
    }
}

fn default_trust_domain() -> String {
    crate::identity::DEFAULT_TRUST_DOMAIN.to_owned()
}

/// Where an enrolled workload's connections go when their destination is not in
/// the mesh (not an enrolled workload, or unknown).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutsideMesh {
    /// Connect directly, in plaintext, as the pod would without the mesh. The
    /// default: enrolling a pod must not cut it off from DNS, package mirrors or
    /// databases outside the cluster; there is no identity there to check.
    #[default]
    Passthrough,
    /// Refuse (reset) the connection: for pods that must only talk inside the mesh.
    Refuse,
}

/// A workload (a pod, in Kubernetes terms).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// The node the workload runs on.
    pub node: String,
    /// Its network namespace (a path such as `/var/run/netns/<name>` or
    /// `/proc/<pid>/ns/net`). Needed to enroll it.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Whether the mesh captures its traffic.
    #[serde(default)]
    pub enrolled: bool,
    /// What its connections to destinations outside the mesh do.
    #[serde(default)]
    pub outside_mesh: OutsideMesh,
}

fn default_namespace() -> String {
    "default".to_owned()
}

fn default_service_account() -> String {
    "default".to_owned()
}

/// A workload's identity in the config: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkloadKey {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

impl Workload {
    pub fn key(&self) -> WorkloadKey {
        WorkloadKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }

    /// Its SPIFFE identity in `trust_domain`. Validation makes this infallible for
    /// a loaded config.
    pub fn identity(&self, trust_domain: &str) -> Result<SpiffeId, crate::identity::Error> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

impl MeshConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates config text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, Error> {
        let config: MeshConfig = if text.trim().is_empty() {
            MeshConfig::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| Error::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?
        };
        let problems = config.problems();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(Error::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// Cross-field rules; each problem names the entry it is about.
    fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = SpiffeId::new(&self.trust_domain, "default", "default") {
            problems.push(format!("trust_domain: {e}"));
        }
        let mut seen = HashSet::new();
        let mut addresses = std::collections::HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let at = format!("workloads[{i}] ({}/{})", w.namespace, w.name);
            if !is_dns_label(&w.name) {
                problems.push(format!("{at}: name must be a DNS label (a-z, 0-9, '-')"));
            }
            if !is_dns_label(&w.namespace) {
                problems.push(format!("{at}: namespace must be a DNS label"));
            }
            if !is_dns_label(&w.service_account) {
                problems.push(format!("{at}: service_account must be a DNS label"));
            }
            if w.node.is_empty() {
                problems.push(format!("{at}: node must not be empty"));
            }
            if w.enrolled && w.netns.is_none() {
                problems.push(format!("{at}: an enrolled workload needs `netns`"));
            }
            if !seen.insert(w.key()) {
                problems.push(format!("{at}: duplicate workload"));
            }
            for a in &w.addresses {
                if let Some(other) = addresses.insert(*a, w.key())
                    && other != w.key()
                {
                    problems.push(format!("{at}: address {a} is also {other}'s"));
                }
            }
        }
        problems
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_address(&self, ip: IpAddr) -> Option<&Workload> {
        let ip = ip.to_canonical();
        self.workloads.iter().find(|w| w.addresses.contains(&ip))
    }

    /// Whether some workload on `node` has identity `id` (what the CA signs for
    /// that node's agent).
    pub fn identity_on_node(&self, id: &SpiffeId, node: &str) -> bool {
        id.trust_domain() == self.trust_domain
            && self.workloads.iter().any(|w| {
                w.node == node
                    && w.namespace == id.namespace()
                    && w.service_account == id.service_account()
            })
    }

    /// The enrolled workloads placed on `node`.
    pub fn enrolled_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads
            .iter()
            .filter(move |w| w.enrolled && w.node == node)
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MeshConfig, Error> {
        MeshConfig::parse(Path::new("mesh.yaml"), text)
    }

    #[test]
    fn parses_a_workload_with_defaults() {
        let c = parse(
            "workloads:\n- name: a\n  node: n0\n  netns: /var/run/netns/a\n  enrolled: true\n",
        )
        .unwrap();
        let w = &c.workloads[0];
        assert_eq!(w.namespace, "default");
        assert_eq!(w.service_account, "default");
        assert_eq!(c.enrolled_on("n0").count(), 1);
        assert_eq!(c.enrolled_on("n1").count(), 0);
    }

    #[test]
    fn empty_file_is_an_empty_mesh() {
        assert_eq!(parse("").unwrap(), MeshConfig::default());
    }

    #[test]
    fn unknown_field_is_an_error_with_a_location() {
        let e = parse("workloads:\n- name: a\n  node: n0\n  enroled: true\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("enroled"), "{msg}");
        assert!(msg.contains("line 4"), "{msg}");
    }

    #[test]
    fn every_problem_is_reported() {
        let e = parse(
            "workloads:\n- name: A\n  node: n0\n  enrolled: true\n- name: b\n  node: n0\n- name: b\n  node: n0\n",
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("workloads[0] (default/A): name must be a DNS label"),
            "{msg}"
        );
        assert!(msg.contains("needs `netns`"), "{msg}");
        assert!(
            msg.contains("workloads[2] (default/b): duplicate workload"),
            "{msg}"
        );
    }
}
