//! A Weft mesh on a virtual cluster: the config file, one `weft agent` per node, and
//! their logs.
//!
//! Each agent attaches to its node's cgroup (the parent of that node's pod cgroups)
//! and pins under its own directory, `/sys/fs/bpf/weft-<cluster id>-n<i>`, so meshes
//! of tests running in parallel never meet. On drop the agents are killed and
//! `weft agent --uninstall` removes everything they pinned.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Cluster, Pod, Proc, bin_path};

/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// How long an agent may take to report ready.
const AGENT_START: Duration = Duration::from_secs(20);

pub struct Mesh<'c> {
    cluster: &'c Cluster,
    weft: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    enrolled: BTreeSet<String>,
    agents: Vec<Option<Proc>>,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
}

impl<'c> Mesh<'c> {
    /// Writes the config with the pods `enroll` picks and starts an agent per node.
    pub fn start(cluster: &'c Cluster, enroll: impl Fn(&Pod) -> bool) -> Result<Self> {
        let mut mesh = Self::new(cluster, enroll)?;
        for i in 0..cluster.nodes().len() {
            mesh.start_agent(i)?;
        }
        Ok(mesh)
    }

    /// Like `start`, without starting the agents.
    pub fn new(cluster: &'c Cluster, enroll: impl Fn(&Pod) -> bool) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("weft-{}", cluster.id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mesh = Mesh {
            cluster,
            weft: bin_path("weft"),
            config: dir.join("mesh.yaml"),
            dir,
            enrolled: cluster
                .pods()
                .iter()
                .filter(|p| enroll(p))
                .map(|p| p.name.clone())
                .collect(),
            agents: (0..cluster.nodes().len()).map(|_| None).collect(),
            agent_args: Vec::new(),
        };
        mesh.write_config()?;
        Ok(mesh)
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn pin_dir(&self, node: usize) -> PathBuf {
        Path::new(BPFFS).join(format!("weft-{}-n{node}", self.cluster.id()))
    }

    /// The config text for the current enrollment.
    pub fn config_text(&self) -> String {
        let mut out = String::from("# written by the weft test harness\nworkloads:\n");
        for pod in self.cluster.pods() {
            let node = &self.cluster.node(pod.node).name;
            let _ = write!(
                out,
                "- name: {}\n  namespace: default\n  node: {node}\n  netns: {}\n  addresses: [{}, {}]\n  enrolled: {}\n",
                pod.name,
                pod.netns_path.display(),
                pod.ip,
                pod.ip6,
                self.enrolled.contains(&pod.name),
            );
        }
        out
    }

    /// Writes the config atomically (write + rename, as editors and config
    /// management do), so an agent never reads half a file.
    pub fn write_config(&self) -> Result<()> {
        self.write_raw_config(&self.config_text())
    }

    /// Writes arbitrary text as the config (atomically).
    pub fn write_raw_config(&self, text: &str) -> Result<()> {
        let tmp = self.dir.join(".mesh.yaml.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config)?;
        Ok(())
    }

    /// Changes one pod's enrollment in the config and waits until its agent has
    /// applied it.
    pub fn set_enrolled(&mut self, pod: &Pod, enrolled: bool) -> Result<()> {
        let changed = if enrolled {
            self.enrolled.insert(pod.name.clone())
        } else {
            self.enrolled.remove(&pod.name)
        };
        if !changed {
            return Ok(());
        }
        let message = if enrolled {
            "pod enrolled"
        } else {
            "pod unenrolled"
        };
        let before = self.count_logs(pod.node, |v| is_pod_event(v, message, &pod.name));
        self.write_config()?;
        let node = pod.node;
        let ok = crate::eventually(crate::PATIENCE, || {
            self.count_logs(node, |v| is_pod_event(v, message, &pod.name)) > before
        });
        if !ok {
            bail!(
                "agent of node {node} did not log {message:?} for {}",
                pod.name
            );
        }
        Ok(())
    }

    pub fn is_enrolled(&self, pod: &Pod) -> bool {
        self.enrolled.contains(&pod.name)
    }

    /// The command that runs this node's agent (in the node's namespace, outside
    /// every pod cgroup).
    pub fn agent_command(&self, node: usize) -> Command {
        let n = self.cluster.node(node);
        let mut cmd = n.command(&self.weft);
        cmd.env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .arg("agent")
            .arg("--config")
            .arg(&self.config)
            .arg("--node")
            .arg(&n.name)
            .arg("--cgroup")
            .arg(&n.cgroup)
            .arg("--bpf-pin-dir")
            .arg(self.pin_dir(node))
            .arg("--config-poll-ms")
            .arg("100")
            .args(&self.agent_args);
        cmd
    }

    /// Starts node `node`'s agent and waits until it reports ready.
    pub fn start_agent(&mut self, node: usize) -> Result<()> {
        if self.agents[node].is_some() {
            bail!("agent of node {node} is already running");
        }
        let mut cmd = self.agent_command(node);
        let proc = Proc::spawn(&mut cmd, format!("weft agent n{node}"))?;
        let ready = proc.wait_for_json(AGENT_START, |v| v["message"] == "agent ready");
        self.agents[node] = Some(proc);
        if let Err(e) = ready {
            let p = self.agents[node].as_ref().unwrap();
            bail!(
                "agent of node {node} did not become ready: {e:#}\nstdout:\n{}\nstderr:\n{}",
                p.stdout_lines().join("\n"),
                p.stderr()
            );
        }
        Ok(())
    }

    /// Stops node `node`'s agent: SIGTERM (graceful) or SIGKILL (a crash).
    pub fn stop_agent(&mut self, node: usize, kill: bool) -> Result<()> {
        let Some(mut p) = self.agents[node].take() else {
            return Ok(());
        };
        if kill {
            p.kill()?;
        } else {
            p.signal(libc::SIGTERM)?;
            p.wait_timeout(Duration::from_secs(10))?;
        }
        Ok(())
    }

    pub fn agent(&self, node: usize) -> &Proc {
        self.agents[node].as_ref().expect("agent is running")
    }

    /// Every JSON log line of node `node`'s agent that `pred` accepts.
    pub fn logs(&self, node: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.agents[node]
            .as_ref()
            .map(|p| p.json_lines().into_iter().filter(|v| pred(v)).collect())
            .unwrap_or_default()
    }

    fn count_logs(&self, node: usize, pred: impl Fn(&Value) -> bool) -> usize {
        self.logs(node, pred).len()
    }

    /// Access-log lines (one per proxied connection) of node `node`'s agent.
    pub fn access_logs(&self, node: usize) -> Vec<Value> {
        self.logs(node, |v| v["target"] == "weft::access")
    }

    /// Runs `weft agent --uninstall` for node `node`.
    pub fn uninstall(&self, node: usize) -> Result<()> {
        let out = self
            .cluster
            .node(node)
            .command(&self.weft)
            .args(["agent", "--uninstall", "--bpf-pin-dir"])
            .arg(self.pin_dir(node))
            .output()?;
        if !out.status.success() {
            bail!(
                "weft agent --uninstall failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }
}

fn is_pod_event(v: &Value, message: &str, pod: &str) -> bool {
    v["message"] == message
        && v["workload"]
            .as_str()
            .is_some_and(|w| w.ends_with(&format!("/{pod}")))
}

impl Drop for Mesh<'_> {
    fn drop(&mut self) {
        for node in 0..self.agents.len() {
            let _ = self.stop_agent(node, true);
            let _ = self.uninstall(node);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
