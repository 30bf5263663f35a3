//! A Weft mesh on a virtual cluster: the config file, a `weft ca` (in node 0's
//! namespace, on its uplink address, as a CA pod would run on some node), one
//! `weft agent` per node with its own CA token, and their logs.
//!
//! Every pod's service account is its own name, so every pod has its own SPIFFE
//! identity: `spiffe://cluster.local/ns/default/sa/<pod name>`.
//!
//! Each agent attaches to its node's cgroup (the parent of that node's pod cgroups)
//! and pins under its own directory, `/sys/fs/bpf/weft-<cluster id>-n<i>`, so meshes
//! of tests running in parallel never meet. On drop the agents are killed and
//! `weft agent --uninstall` removes everything they pinned.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{Cluster, Pod, Proc, bin_path};

/// Whether an agent's log line is an access-log line (one per connection).
fn is_access_log(v: &Value) -> bool {
    v["target"] == weft::telemetry::ACCESS_LOG
}

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
    /// Per pod name: extra YAML lines for its workload entry.
    extra: std::collections::BTreeMap<String, String>,
    /// Per pod name: its namespace, when not `default`.
    namespaces: std::collections::BTreeMap<String, String>,
    /// YAML appended after the workloads: `services:`, `authorization_policies:`...
    sections: String,
    /// Workload entries of pods the cluster did not make (a CNI sandbox),
    /// listed after the cluster's pods.
    more_workloads: String,
    agents: Vec<Option<Proc>>,
    ca: Option<Proc>,
    /// Extra arguments for every agent.
    pub agent_args: Vec<String>,
    /// Extra environment for every agent (e.g. `RUST_LOG`).
    pub agent_env: Vec<(String, String)>,
    /// A program (and its arguments) that every agent runs under, given the
    /// `weft` command line after them: `setpriv` with the DaemonSet's
    /// capabilities, say. Empty: the agent runs directly.
    pub agent_wrapper: Vec<String>,
    /// Extra arguments for the CA (with `--discovery kubernetes`, it is not
    /// given the mesh file).
    pub ca_args: Vec<String>,
    /// Extra environment for the CA (e.g. `KUBECONFIG`).
    pub ca_env: Vec<(String, String)>,
    /// Run the CA inside node 0's agent (`--embedded-ca-dir`) instead of as its
    /// own `weft ca` process. Set before `start_all`.
    pub embedded_ca: bool,
    /// Give each agent a CNI socket (`--cni-socket`, at [`Mesh::cni_socket`]).
    pub cni_sockets: bool,
}

/// Where the CA listens: node 0's uplink, reachable from every node.
pub const CA_PORT: u16 = 15012;

/// The SPIFFE identity the harness gives `pod`.
pub fn identity(pod: &Pod) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{}", pod.name)
}

impl<'c> Mesh<'c> {
    /// Writes the config with the pods `enroll` picks and starts an agent per node.
    pub fn start(cluster: &'c Cluster, enroll: impl Fn(&Pod) -> bool) -> Result<Self> {
        let mut mesh = Self::new(cluster, enroll)?;
        mesh.start_all()?;
        Ok(mesh)
    }

    /// Starts the CA and every agent (after `new`, and changes to the arguments).
    pub fn start_all(&mut self) -> Result<()> {
        if !self.embedded_ca {
            self.start_ca()?;
        }
        for i in 0..self.cluster.nodes().len() {
            self.start_agent(i)?;
        }
        Ok(())
    }

    /// Like `start`, without starting the CA and the agents.
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
            extra: Default::default(),
            namespaces: Default::default(),
            sections: String::new(),
            more_workloads: String::new(),
            agents: (0..cluster.nodes().len()).map(|_| None).collect(),
            ca: None,
            agent_args: Vec::new(),
            agent_env: Vec::new(),
            agent_wrapper: Vec::new(),
            ca_args: Vec::new(),
            ca_env: Vec::new(),
            embedded_ca: false,
            cni_sockets: false,
        };
        mesh.write_config()?;
        let mut tokens = String::new();
        for (i, node) in cluster.nodes().iter().enumerate() {
            let token = random_token()?;
            let _ = writeln!(tokens, "{}: {token}", node.name);
            crate::write_secret(&mesh.token_path(i), &token)?;
        }
        crate::write_secret(&mesh.node_tokens_path(), &tokens)?;
        Ok(mesh)
    }

    /// The CA's node-token file (`node-name: token` per line).
    pub fn node_tokens_path(&self) -> PathBuf {
        self.dir.join("tokens.yaml")
    }

    /// The file holding node `node`'s CA token.
    pub fn token_path(&self, node: usize) -> PathBuf {
        self.dir.join(format!("token-n{node}"))
    }

    /// The CA's state directory (root, bundle).
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The trust bundle the CA writes and the agents read.
    /// The mesh's own signing authority (its root certificate and key, as `weft
    /// ca` saved them), to issue the certificates it would issue: what a
    /// compromised workload holds.
    pub fn authority(&self) -> Result<weft::ca::Authority> {
        let dir = self.ca_dir();
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f} in {dir:?}"))
        };
        Ok(weft::ca::Authority::from_pem(
            &read("root.pem")?,
            &read("root-key.pem")?,
        )?)
    }

    /// Node `node`'s agent's CNI socket (with `cni_sockets`).
    pub fn cni_socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("run-n{node}/cni.sock"))
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.ca_dir().join("bundle.pem")
    }

    pub fn ca_addr(&self) -> String {
        format!("{}:{CA_PORT}", self.cluster.node(0).ip)
    }

    /// Adds YAML lines (indented two spaces, e.g. `"  outside_mesh: refuse\n"`)
    /// to `pod`'s workload entry, and rewrites the config.
    pub fn set_extra(&mut self, pod: &Pod, yaml: &str) -> Result<()> {
        self.extra.insert(pod.name.clone(), yaml.to_owned());
        self.write_config()
    }

    /// Puts `pod` in namespace `ns` (its identity follows), and rewrites the config.
    pub fn set_namespace(&mut self, pod: &Pod, ns: &str) -> Result<()> {
        self.namespaces.insert(pod.name.clone(), ns.to_owned());
        self.write_config()
    }

    /// `pod`'s namespace in the config.
    pub fn namespace(&self, pod: &Pod) -> &str {
        self.namespaces
            .get(&pod.name)
            .map_or("default", String::as_str)
    }

    /// `pod`'s SPIFFE identity (its namespace, its name as service account).
    pub fn identity(&self, pod: &Pod) -> String {
        format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            self.namespace(pod),
            pod.name
        )
    }

    /// Adds workload entries (YAML list items, `- name: ...`) for pods the
    /// cluster did not make, and rewrites the config.
    pub fn add_workloads(&mut self, yaml: &str) -> Result<()> {
        self.more_workloads.push_str(yaml);
        self.write_config()
    }

    /// Replaces the YAML after the workloads (services, policies, peer
    /// authentication) and rewrites the config.
    pub fn set_sections(&mut self, yaml: &str) -> Result<()> {
        self.sections = yaml.to_owned();
        self.write_config()
    }

    /// The YAML after the workloads, as last set.
    pub fn sections(&self) -> &str {
        &self.sections
    }

    /// Starts the CA (in node 0's namespace) and waits until it serves.
    pub fn start_ca(&mut self) -> Result<()> {
        if self.ca.is_some() {
            bail!("the CA is already running");
        }
        let mut cmd = self.cluster.node(0).command(&self.weft);
        cmd.env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .envs(self.ca_env.iter().map(|(k, v)| (k, v)))
            .arg("ca")
            .arg("--dir")
            .arg(self.ca_dir());
        if !self.ca_args.iter().any(|a| a == "--discovery") {
            cmd.arg("--config").arg(&self.config);
        }
        // A test that picks another way for agents to authenticate says so.
        if !self.ca_args.iter().any(|a| a == "--agent-auth") {
            cmd.arg("--node-tokens").arg(self.node_tokens_path());
        }
        cmd.arg("--listen")
            .arg(self.ca_addr())
            .arg("--metrics-addr")
            .arg("127.0.0.1:15014")
            .args(&self.ca_args);
        let proc = Proc::spawn(&mut cmd, "weft ca")?;
        let ready = proc.wait_for_json(AGENT_START, |v| v["message"] == "ca ready");
        if let Err(e) = ready {
            bail!(
                "the CA did not become ready: {e:#}\nstdout:\n{}\nstderr:\n{}",
                proc.stdout_lines().join("\n"),
                proc.stderr()
            );
        }
        self.ca = Some(proc);
        Ok(())
    }

    /// Stops the CA (SIGKILL: a crash, or the CA's node going away).
    pub fn stop_ca(&mut self) -> Result<()> {
        if let Some(mut p) = self.ca.take() {
            p.kill()?;
        }
        Ok(())
    }

    pub fn ca(&self) -> &Proc {
        self.ca.as_ref().expect("the CA is running")
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
                "- name: {}\n  namespace: {}\n  service_account: {}\n  node: {node}\n  netns: {}\n  addresses: [{}, {}]\n  enrolled: {}\n{}",
                pod.name,
                self.namespace(pod),
                pod.name,
                pod.netns_path.display(),
                pod.ip,
                pod.ip6,
                self.enrolled.contains(&pod.name),
                self.extra.get(&pod.name).map(String::as_str).unwrap_or(""),
            );
        }
        out.push_str(&self.more_workloads);
        out.push_str(&self.sections);
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
        // Every running agent applies the new config: a connection to the pod
        // from another node is only captured once that node's agent knows it.
        let running: Vec<usize> = (0..self.agents.len())
            .filter(|&n| self.agents[n].is_some())
            .collect();
        let applied_before: Vec<usize> = running
            .iter()
            .map(|&n| self.count_logs(n, is_config_applied))
            .collect();
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
        for (&n, &was) in running.iter().zip(&applied_before) {
            let ok = crate::eventually(crate::PATIENCE, || {
                self.count_logs(n, is_config_applied) > was
            });
            if !ok {
                bail!(
                    "agent of node {n} did not apply the config that {message} {}",
                    pod.name
                );
            }
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
        let mut cmd = match self.agent_wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = n.command(program);
                cmd.args(args).arg(&self.weft);
                cmd
            }
            None => n.command(&self.weft),
        };
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
            .arg("--ca-addr")
            .arg(self.ca_addr());
        if self.embedded_ca && node == 0 {
            // Its own token and the bundle come from the CA's files (the defaults).
            cmd.arg("--embedded-ca-dir")
                .arg(self.ca_dir())
                .arg("--embedded-ca-node-tokens")
                .arg(self.node_tokens_path());
        } else {
            cmd.arg("--ca-token-file")
                .arg(self.token_path(node))
                .arg("--trust-bundle")
                .arg(self.bundle_path());
        }
        if self.cni_sockets {
            cmd.arg("--cni-socket").arg(self.cni_socket(node));
        }
        cmd.args(&self.agent_args);
        cmd.envs(self.agent_env.iter().map(|(k, v)| (k, v)));
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

    /// Starts a second agent on node `node` beside the running one, as a
    /// DaemonSet rolling with `maxSurge` does, and waits until it reports
    /// ready. It takes the node's slot (logs, metrics, [`Mesh::agent`]); the
    /// predecessor is returned, still running, for the test to stop.
    pub fn start_successor(&mut self, node: usize) -> Result<Proc> {
        if self.agents[node].is_none() {
            bail!("no agent of node {node} to succeed");
        }
        let mut cmd = self.agent_command(node);
        let proc = Proc::spawn(&mut cmd, format!("weft agent n{node} (successor)"))?;
        if let Err(e) = proc.wait_for_json(AGENT_START, |v| v["message"] == "agent ready") {
            bail!(
                "the successor on node {node} did not become ready: {e:#}\nstdout:\n{}\nstderr:\n{}",
                proc.stdout_lines().join("\n"),
                proc.stderr()
            );
        }
        Ok(self.agents[node]
            .replace(proc)
            .expect("checked above: an agent runs"))
    }

    /// The command that runs `weft waypoint` in `pod` as its workload (which
    /// must be `native_tunnel: true` in the config).
    pub fn waypoint_command(&self, pod: &Pod) -> Command {
        let mut cmd = pod.command(&self.weft);
        cmd.env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .arg("waypoint")
            .arg("--config")
            .arg(&self.config)
            .arg("--workload")
            .arg(format!("{}/{}", self.namespace(pod), pod.name))
            .arg("--ca-addr")
            .arg(self.ca_addr())
            .arg("--ca-token-file")
            .arg(self.token_path(pod.node))
            .arg("--trust-bundle")
            .arg(self.bundle_path());
        cmd
    }

    /// Starts `weft waypoint` in `pod` (with `args` added) and waits until it
    /// serves.
    pub fn start_waypoint(&self, pod: &Pod, args: &[&str]) -> Result<Proc> {
        let mut cmd = self.waypoint_command(pod);
        cmd.args(args);
        let proc = Proc::spawn(&mut cmd, format!("weft waypoint {}", pod.name))?;
        if let Err(e) = proc.wait_for_json(AGENT_START, |v| v["message"] == "waypoint ready") {
            bail!(
                "the waypoint in {} did not become ready: {e:#}\nstdout:\n{}\nstderr:\n{}",
                pod.name,
                proc.stdout_lines().join("\n"),
                proc.stderr()
            );
        }
        Ok(proc)
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

    /// The agents that have exited since the last call, each with its exit
    /// status and the last lines it wrote to stderr. They are forgotten here, so
    /// each death is reported once.
    pub fn exited_agents(&mut self) -> Vec<(usize, ExitStatus, String)> {
        let mut dead = Vec::new();
        for (node, slot) in self.agents.iter_mut().enumerate() {
            let Some(p) = slot.as_mut() else { continue };
            if let Ok(Some(status)) = p.try_wait() {
                let stderr = p.stderr();
                let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
                let tail = tail.into_iter().rev().collect::<Vec<_>>().join("\n");
                dead.push((node, status, tail));
                *slot = None;
            }
        }
        dead
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
        self.logs(node, is_access_log)
    }

    /// Access-log lines of node `node`'s agent printed since `cursor` (0 at
    /// first), moving the cursor past them.
    pub fn access_logs_after(&self, node: usize, cursor: &mut usize) -> Vec<Value> {
        let Some(agent) = self.agents[node].as_ref() else {
            return Vec::new();
        };
        let (lines, next) = agent.json_lines_after(*cursor);
        *cursor = next;
        lines.into_iter().filter(is_access_log).collect()
    }

    /// A cursor for [`Mesh::access_logs_after`] past everything node `node`'s
    /// agent has printed so far.
    pub fn logs_end(&self, node: usize) -> usize {
        self.agents[node].as_ref().map_or(0, Proc::stdout_end)
    }

    /// Frees what node `node`'s agent printed before `cursor` (from
    /// [`Mesh::access_logs_after`]); [`Mesh::logs`] no longer sees it.
    pub fn forget_logs_before(&self, node: usize, cursor: usize) {
        if let Some(agent) = self.agents[node].as_ref() {
            agent.forget_stdout_before(cursor);
        }
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

/// An agent's log line for a changed config file it has taken in.
fn is_config_applied(v: &Value) -> bool {
    v["message"] == "config changed, applying"
}

fn is_pod_event(v: &Value, message: &str, pod: &str) -> bool {
    v["message"] == message
        && v["workload"]
            .as_str()
            .is_some_and(|w| w.ends_with(&format!("/{pod}")))
}

/// 32 hex characters from the kernel's random source.
fn random_token() -> Result<String> {
    use std::io::Read as _;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Drop for Mesh<'_> {
    fn drop(&mut self) {
        let _ = self.stop_ca();
        for node in 0..self.agents.len() {
            let _ = self.stop_agent(node, true);
            let _ = self.uninstall(node);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
