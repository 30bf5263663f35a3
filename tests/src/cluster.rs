//! The virtual cluster: nodes and pods as network namespaces, one cgroup v2
//! per pod.
//!
//! Topology, for node `i` and pod `j` on it (numbers in addresses are `i+1`
//! and `j+1`, so they are never zero):
//!
//! ```text
//!   pod netns n<i>p<j>            node netns n<i>                      fabric netns
//!  ┌───────────────────┐        ┌─────────────────────────┐        ┌──────────────┐
//!  │ eth0 10.I.J.2/24  │──veth──│ p<j> 10.I.J.1/24        │        │              │
//!  │  fd00:I:J::2/64   │        │      fd00:I:J::1/64     │        │  br0 bridge  │
//!  │ default via .1    │        │ eth0 172.30.0.I/24      │──veth──│  port n<i>   │
//!  └───────────────────┘        │      fd00:ffff::I/64    │        │              │
//!                               │ 10.K.0.0/16, fd00:K::/32│        └──────────────┘
//!                               │   via node k's uplink   │
//!                               └─────────────────────────┘
//! ```
//!
//! Nodes forward (ip_forward, IPv6 forwarding), so pod-to-pod traffic across
//! nodes really travels pod → node veth → node uplink → bridge → other node's
//! uplink → pod. Interfaces are created directly inside their namespaces, so
//! the short fixed names (`eth0`, `p0`, `n0`, `br0`) never clash between
//! clusters; namespaces and cgroups carry a per-process, per-cluster id.
//!
//! cgroups: `<cgroup2>/weft-<id>/n<i>/p<j>`. Node cgroups hold no processes
//! themselves; they exist so that Weft can attach its cgroup programs to a
//! node and have them apply to exactly that node's pods.

use std::collections::HashSet;
use std::ffi::{CString, OsStr};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::{self, Proc, namespaced_command};

/// Where `ip netns` keeps its named namespaces.
pub const NETNS_DIR: &str = "/var/run/netns";

/// Name of every node's uplink interface (towards the fabric bridge) and of
/// every pod's interface (towards its node).
pub const UPLINK_IF: &str = "eth0";

/// Used when /proc/self/mountinfo lists no cgroup2 mount.
const FALLBACK_CGROUP2: &str = "/sys/fs/cgroup/unified";

/// Prefix of everything a cluster creates; followed by `w<pid>x<counter>`.
const PREFIX: &str = "weft-";

/// Addresses put node and pod numbers in single octets / IPv6 groups, and
/// node numbers start at 1.
const MAX_NODES: usize = 250;
const MAX_PODS_PER_NODE: usize = 250;

/// Upper bound for waiting on the kernel during teardown (processes dying,
/// cgroups becoming removable).
const TEARDOWN_PATIENCE: Duration = Duration::from_secs(5);

/// `statfs` magic of the nsfs file system (namespace files bind-mounted by
/// `ip netns add`).
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Process-wide counter making cluster ids unique among the tests (threads)
/// of one test process; the pid makes them unique across processes.
static NEXT_CLUSTER: AtomicU32 = AtomicU32::new(0);

/// sysctls (paths below /proc/sys) for every namespace, set before any
/// interface exists so that new interfaces inherit the `default` values.
const COMMON_SYSCTLS: &[(&str, &str)] = &[
    // Addresses must be usable at once, not after ~1 s of duplicate detection.
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    // IPv4 settings of a new namespace are inherited from the host, which may
    // use strict reverse-path filtering; redirected packets must not be
    // dropped by it.
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
];

/// Extra sysctls for node namespaces: nodes route between pods and uplink.
const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/ipv6/conf/default/forwarding", "1"),
];

/// A set of network namespaces and cgroups forming a small cluster, removed
/// again on drop. See the [module documentation](self) for the topology.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    test_name: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    pods_per_node: usize,
    fabric_netns: String,
    fabric_netns_path: PathBuf,
    cgroup: PathBuf,
    /// Every namespace this cluster may have created: teardown deletes them.
    netns: Vec<String>,
}

/// A node: a network namespace that routes for its pods, plus the cgroup
/// that is the parent of its pods' cgroups.
#[derive(Debug, Clone)]
pub struct Node {
    pub index: usize,
    /// `node<i>`.
    pub name: String,
    /// `ip netns` name of the node's namespace.
    pub netns: String,
    /// `/var/run/netns/<netns>`.
    pub netns_path: PathBuf,
    /// The node cgroup, parent of its pods' cgroups.
    pub cgroup: PathBuf,
    /// IPv4 address of the uplink ([`UPLINK_IF`]), `172.30.0.<i+1>`.
    pub ip: Ipv4Addr,
    /// IPv6 address of the uplink, `fd00:ffff::<i+1>`.
    pub ip6: Ipv6Addr,
    /// The node's pod ranges: `10.<i+1>.0.0/16` and `fd00:<i+1>::/32`.
    pub pod_cidr: (Ipv4Addr, u8),
    pub pod_cidr6: (Ipv6Addr, u8),
}

/// A pod: a network namespace with one interface towards its node, and a
/// cgroup that every process started through [`Pod::command`] joins.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Index of the node this pod runs on.
    pub node: usize,
    /// Index of the pod on its node.
    pub index: usize,
    /// `n<node>p<index>`.
    pub name: String,
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    /// Address of the pod's [`UPLINK_IF`], `10.<node+1>.<index+1>.2`.
    pub ip: Ipv4Addr,
    /// `fd00:<node+1>:<index+1>::2`.
    pub ip6: Ipv6Addr,
    /// The node-side address, the pod's default gateway (`…1`).
    pub gateway: Ipv4Addr,
    pub gateway6: Ipv6Addr,
    /// Name of the node-side end of the pod's veth, in the node's namespace
    /// (`p<index>`), e.g. for attaching tc programs.
    pub host_veth: String,
}

impl Cluster {
    /// Builds a cluster of `nodes` nodes with `pods_per_node` pods each.
    ///
    /// `test_name` only labels error messages. Before building, leftovers of
    /// test processes that died without tearing down are removed.
    pub fn new(test_name: &str, nodes: usize, pods_per_node: usize) -> Result<Cluster> {
        ensure!(
            (1..=MAX_NODES).contains(&nodes),
            "a cluster has 1 to {MAX_NODES} nodes, not {nodes}"
        );
        ensure!(
            pods_per_node <= MAX_PODS_PER_NODE,
            "at most {MAX_PODS_PER_NODE} pods per node, not {pods_per_node}"
        );
        if let Some(problem) = privilege_problem() {
            bail!("cannot build a virtual cluster for `{test_name}`: {problem}");
        }
        let cgroup2 = cgroup2_mount()?;
        sweep_stale(cgroup2);

        let id = format!(
            "w{}x{}",
            std::process::id(),
            NEXT_CLUSTER.fetch_add(1, Ordering::Relaxed)
        );
        let mut cluster = Cluster::plan(id, test_name, nodes, pods_per_node, cgroup2);
        // On error `cluster` is dropped here, which removes whatever part of
        // it was already created.
        cluster.build().with_context(|| {
            format!(
                "building virtual cluster {} for test `{test_name}`",
                cluster.id
            )
        })?;
        Ok(cluster)
    }

    /// Names and addresses of everything, without touching the system.
    fn plan(
        id: String,
        test_name: &str,
        node_count: usize,
        pods_per_node: usize,
        cgroup2: &Path,
    ) -> Cluster {
        let netns_name = |suffix: &str| format!("{PREFIX}{id}-{suffix}");
        let cgroup = cgroup2.join(format!("{PREFIX}{id}"));
        let mut nodes = Vec::with_capacity(node_count);
        let mut pods = Vec::with_capacity(node_count * pods_per_node);
        for i in 0..node_count {
            let n = octet(i + 1);
            let netns = netns_name(&format!("n{i}"));
            nodes.push(Node {
                index: i,
                name: format!("node{i}"),
                netns_path: Path::new(NETNS_DIR).join(&netns),
                netns,
                cgroup: cgroup.join(format!("n{i}")),
                ip: Ipv4Addr::new(172, 30, 0, n),
                ip6: Ipv6Addr::new(0xfd00, 0xffff, 0, 0, 0, 0, 0, n.into()),
                pod_cidr: (Ipv4Addr::new(10, n, 0, 0), 16),
                pod_cidr6: (Ipv6Addr::new(0xfd00, n.into(), 0, 0, 0, 0, 0, 0), 32),
            });
            for j in 0..pods_per_node {
                let p = octet(j + 1);
                let netns = netns_name(&format!("n{i}p{j}"));
                let subnet6 = |host| Ipv6Addr::new(0xfd00, n.into(), p.into(), 0, 0, 0, 0, host);
                pods.push(Pod {
                    node: i,
                    index: j,
                    name: format!("n{i}p{j}"),
                    netns_path: Path::new(NETNS_DIR).join(&netns),
                    netns,
                    cgroup: cgroup.join(format!("n{i}")).join(format!("p{j}")),
                    ip: Ipv4Addr::new(10, n, p, 2),
                    ip6: subnet6(2),
                    gateway: Ipv4Addr::new(10, n, p, 1),
                    gateway6: subnet6(1),
                    host_veth: format!("p{j}"),
                });
            }
        }
        let fabric_netns = netns_name("fab");
        Cluster {
            test_name: test_name.to_owned(),
            fabric_netns_path: Path::new(NETNS_DIR).join(&fabric_netns),
            fabric_netns,
            nodes,
            pods,
            pods_per_node,
            cgroup,
            netns: Vec::new(),
            id,
        }
    }

    fn build(&mut self) -> Result<()> {
        fs::create_dir(&self.cgroup)
            .with_context(|| format!("creating cgroup {}", self.cgroup.display()))?;
        for dir in self
            .nodes
            .iter()
            .map(|n| &n.cgroup)
            .chain(self.pods.iter().map(|p| &p.cgroup))
        {
            fs::create_dir(dir).with_context(|| format!("creating cgroup {}", dir.display()))?;
        }

        // Record the namespaces before creating them, so that a failure half
        // way still deletes the ones that were made.
        self.netns = std::iter::once(&self.fabric_netns)
            .chain(self.nodes.iter().map(|n| &n.netns))
            .chain(self.pods.iter().map(|p| &p.netns))
            .cloned()
            .collect();
        let mut script = String::new();
        for ns in &self.netns {
            writeln!(script, "netns add {ns}")?;
        }
        ip_batch(None, &script)?;

        write_sysctls(&self.fabric_netns_path, COMMON_SYSCTLS)?;
        for node in &self.nodes {
            write_sysctls(&node.netns_path, COMMON_SYSCTLS)?;
            write_sysctls(&node.netns_path, NODE_SYSCTLS)?;
        }
        for pod in &self.pods {
            write_sysctls(&pod.netns_path, COMMON_SYSCTLS)?;
        }

        // All veth pairs, each end created directly in its namespace.
        let mut script = String::new();
        for node in &self.nodes {
            writeln!(
                script,
                "link add {UPLINK_IF} netns {} type veth peer name n{} netns {}",
                node.netns, node.index, self.fabric_netns
            )?;
        }
        for pod in &self.pods {
            writeln!(
                script,
                "link add {UPLINK_IF} netns {} type veth peer name {} netns {}",
                pod.netns, pod.host_veth, self.nodes[pod.node].netns
            )?;
        }
        ip_batch(None, &script)?;

        // Configure outside-in (fabric, nodes, pods): every route through a
        // gateway is then added on a link whose peer is already up.
        let mut script = String::from(
            // No multicast snooping: there is no MLD querier, and IPv6
            // neighbour discovery must just work.
            "link set lo up\nlink add br0 type bridge mcast_snooping 0\nlink set br0 up\n",
        );
        for node in &self.nodes {
            writeln!(script, "link set n{} master br0", node.index)?;
            writeln!(script, "link set n{} up", node.index)?;
        }
        ip_batch(Some(&self.fabric_netns), &script)?;

        for node in &self.nodes {
            let mut script = String::new();
            writeln!(script, "link set lo up")?;
            writeln!(script, "link set {UPLINK_IF} up")?;
            writeln!(script, "addr add {}/24 dev {UPLINK_IF}", node.ip)?;
            writeln!(script, "addr add {}/64 dev {UPLINK_IF} nodad", node.ip6)?;
            for pod in self.pods_of(node.index) {
                writeln!(script, "link set {} up", pod.host_veth)?;
                writeln!(script, "addr add {}/24 dev {}", pod.gateway, pod.host_veth)?;
                writeln!(
                    script,
                    "addr add {}/64 dev {} nodad",
                    pod.gateway6, pod.host_veth
                )?;
            }
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let (net, len) = other.pod_cidr;
                writeln!(script, "route add {net}/{len} via {}", other.ip)?;
                let (net6, len6) = other.pod_cidr6;
                writeln!(script, "route add {net6}/{len6} via {}", other.ip6)?;
            }
            ip_batch(Some(&node.netns), &script)?;
        }

        for pod in &self.pods {
            let mut script = String::new();
            writeln!(script, "link set lo up")?;
            writeln!(script, "link set {UPLINK_IF} up")?;
            writeln!(script, "addr add {}/24 dev {UPLINK_IF}", pod.ip)?;
            writeln!(script, "addr add {}/64 dev {UPLINK_IF} nodad", pod.ip6)?;
            writeln!(script, "route add default via {}", pod.gateway)?;
            writeln!(script, "route add ::/0 via {}", pod.gateway6)?;
            ip_batch(Some(&pod.netns), &script)?;
        }
        Ok(())
    }

    /// The cluster's unique id, `w<pid>x<n>`; part of every name it creates.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The test name given to [`Cluster::new`].
    pub fn test_name(&self) -> &str {
        &self.test_name
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// # Panics
    ///
    /// If there is no node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// All pods, node-major: node 0's pods first.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pods of node `node`.
    pub fn pods_of(&self, node: usize) -> &[Pod] {
        let start = node * self.pods_per_node;
        &self.pods[start..start + self.pods_per_node]
    }

    /// Pod `j` of node `node`.
    ///
    /// # Panics
    ///
    /// If there is no such pod.
    pub fn pod(&self, node: usize, j: usize) -> &Pod {
        assert!(
            node < self.nodes.len() && j < self.pods_per_node,
            "no pod {j} on node {node} in a {}x{} cluster",
            self.nodes.len(),
            self.pods_per_node
        );
        &self.pods[node * self.pods_per_node + j]
    }

    /// `ip netns` name of the fabric namespace holding the bridge `br0`,
    /// whose port `n<i>` leads to node `i` (e.g. to capture wire traffic).
    pub fn fabric_netns(&self) -> &str {
        &self.fabric_netns
    }

    pub fn fabric_netns_path(&self) -> &Path {
        &self.fabric_netns_path
    }

    /// A command running in the fabric namespace.
    pub fn fabric_command(&self, program: impl AsRef<OsStr>) -> Command {
        namespaced_command(program, &self.fabric_netns_path, None)
    }

    /// The cluster's root cgroup, parent of the node cgroups.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// `ip netns` names of all the cluster's namespaces (fabric, nodes, pods).
    pub fn netns_names(&self) -> &[String] {
        &self.netns
    }

    /// Removes everything; best effort, reporting problems on stderr.
    fn teardown(&mut self) {
        let warn = |what: &str, e: anyhow::Error| {
            eprintln!(
                "weft-tests: teardown of cluster {} (test `{}`): {what}: {e:#}",
                self.id, self.test_name
            );
        };
        let inodes: Vec<u64> = self
            .netns
            .iter()
            .filter_map(|ns| netns_inode(&Path::new(NETNS_DIR).join(ns)))
            .collect();
        if let Err(e) = kill_cgroup_tree(&self.cgroup) {
            warn("killing pod processes", e);
        }
        // Processes started with Node::command (or by hand) are in no
        // cluster cgroup; find them by network namespace.
        kill_netns_members(&inodes);
        if let Err(e) = remove_cgroup_tree(&self.cgroup) {
            warn("removing cgroups", e);
        }
        for ns in self.netns.iter().rev() {
            if let Err(e) = delete_netns(ns) {
                warn("deleting network namespace", e);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

impl Node {
    /// A command that runs in the node's network namespace (but in no pod
    /// cgroup: it stays in the test's own cgroup).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        namespaced_command(program, &self.netns_path, None)
    }
}

impl Host for Node {
    fn name(&self) -> &str {
        &self.name
    }

    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        Node::command(self, program)
    }
}

impl Pod {
    /// A command that runs inside the pod: in its network namespace and its
    /// cgroup (joined before `exec`, so the program never runs outside).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        namespaced_command(
            program,
            &self.netns_path,
            Some(&self.cgroup.join("cgroup.procs")),
        )
    }
}

impl Host for Pod {
    fn name(&self) -> &str {
        &self.name
    }

    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        Pod::command(self, program)
    }
}

/// A place commands run in (a node or a pod): spawning and running to completion
/// work the same way for both once [`Host::command`] has placed the process.
pub trait Host {
    /// The name used in labels and errors.
    fn name(&self) -> &str;

    /// A command placed in this host (see `Node::command`, `Pod::command`).
    fn command(&self, program: impl AsRef<OsStr>) -> Command;

    /// Spawns a command built with [`Host::command`]; see [`Proc`].
    fn spawn(&self, cmd: &mut Command) -> Result<Proc> {
        let label = label(cmd, self.name());
        Proc::spawn(cmd, label)
    }

    /// Runs `program args…` here to completion (bounded by
    /// [`process::EXEC_TIMEOUT`]), whatever its exit status.
    fn exec<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<Output>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        let label = label(&cmd, self.name());
        process::exec(&mut cmd, label)
    }

    /// Like [`Host::exec`], but fails unless the program succeeds; returns its
    /// stdout.
    fn exec_ok<I, S>(&self, program: impl AsRef<OsStr>, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut cmd = self.command(program);
        cmd.args(args);
        let label = label(&cmd, self.name());
        process::exec_ok(&mut cmd, label)
    }
}

/// `"<program> in <where>"`, naming a process in messages.
fn label(cmd: &Command, place: &str) -> String {
    let program = Path::new(cmd.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    format!("`{}` in {place}", program.to_string_lossy())
}

/// Why privileged tests cannot run here, or `None` if they can. Computed once.
pub fn privilege_problem() -> Option<String> {
    static PROBLEM: OnceLock<Option<String>> = OnceLock::new();
    PROBLEM
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                return Some("not running as root".into());
            }
            if !Path::new("/proc/self/ns/net").exists() {
                return Some("network namespaces are not supported".into());
            }
            if let Err(e) = cgroup2_mount() {
                return Some(format!("{e:#}"));
            }
            match Command::new("ip").arg("-V").output() {
                Ok(out) if out.status.success() => None,
                _ => Some("iproute2's `ip` is not available".into()),
            }
        })
        .clone()
}

/// Where the cgroup v2 hierarchy is mounted.
pub fn cgroup2_mount() -> Result<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(find_cgroup2_mount)
        .as_deref()
        .with_context(|| {
            format!("no cgroup2 file system mounted (not in /proc/self/mountinfo, not at {FALLBACK_CGROUP2})")
        })
}

fn find_cgroup2_mount() -> Option<PathBuf> {
    if let Ok(info) = fs::read_to_string("/proc/self/mountinfo") {
        // Fields: id parent dev root mountpoint options [optional…] - fstype source super
        let mut other_root = None;
        for line in info.lines() {
            let Some((mount, fs)) = line.split_once(" - ") else {
                continue;
            };
            if fs.split(' ').next() != Some("cgroup2") {
                continue;
            }
            let fields: Vec<&str> = mount.split(' ').collect();
            let (Some(&root), Some(&point)) = (fields.get(3), fields.get(4)) else {
                continue;
            };
            let point = PathBuf::from(unescape_mountinfo(point));
            // Prefer the mount showing the whole hierarchy.
            if root == "/" {
                return Some(point);
            }
            other_root.get_or_insert(point);
        }
        if other_root.is_some() {
            return other_root;
        }
    }
    let fallback = Path::new(FALLBACK_CGROUP2);
    fallback
        .join("cgroup.procs")
        .exists()
        .then(|| fallback.to_path_buf())
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push(
                    d.iter()
                        .fold(0u8, |acc, c| acc.wrapping_mul(8) + (c - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs `ip [-n netns] -batch -` with `script` on stdin; stops at the first
/// failing line.
fn ip_batch(netns: Option<&str>, script: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `ip`")?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    // A failing batch exits early and closes its stdin; the exit status
    // below is the error worth reporting then, not EPIPE.
    let _ = stdin.write_all(script.as_bytes());
    drop(stdin);
    let out = child.wait_with_output().context("waiting for `ip`")?;
    if !out.status.success() {
        bail!(
            "`ip{} -batch -` failed: {}\nscript:\n{script}",
            netns.map(|ns| format!(" -n {ns}")).unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Writes sysctls inside the network namespace at `netns`.
///
/// /proc/sys/net shows the namespace of the *thread* that opens the files, so
/// a short-lived thread joins the namespace instead of forking `sysctl`.
fn write_sysctls(netns: &Path, settings: &[(&str, &str)]) -> Result<()> {
    let ns = File::open(netns).with_context(|| format!("opening {}", netns.display()))?;
    thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            // SAFETY: setns only reads the fd, which `ns` keeps open.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                // Must not fall through: the writes would hit the host.
                return Err(io::Error::last_os_error())
                    .with_context(|| format!("entering {}", netns.display()));
            }
            for (key, value) in settings {
                let path = Path::new("/proc/sys").join(key);
                fs::write(&path, value).with_context(|| {
                    format!(
                        "setting {} = {value} in {}",
                        path.display(),
                        netns.display()
                    )
                })?;
            }
            Ok(())
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Inode of the namespace bind-mounted at `path`, if one is.
fn netns_inode(path: &Path) -> Option<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is a plain C struct for which all-zeroes is valid.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a live, writable statfs.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs by platform
    if stat.f_type as i64 != NSFS_MAGIC {
        return None;
    }
    fs::metadata(path).ok().map(|m| m.ino())
}

/// SIGKILLs every process (other than this one) whose network namespace has
/// one of the given inodes.
fn kill_netns_members(inodes: &[u64]) {
    if inodes.is_empty() {
        return;
    }
    let inodes: HashSet<u64> = inodes.iter().copied().collect();
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        // The link reads "net:[<inode>]".
        let Ok(link) = fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        let inode = link.to_str().and_then(|l| {
            l.strip_prefix("net:[")?
                .strip_suffix(']')?
                .parse::<u64>()
                .ok()
        });
        if inode.is_some_and(|i| inodes.contains(&i))
            && let Ok(pid) = libc::pid_t::try_from(pid)
        {
            // SAFETY: kill has no memory-safety preconditions.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Kills every process in the cgroup subtree at `root` and waits until the
/// subtree is empty.
fn kill_cgroup_tree(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    // cgroup.kill (Linux 5.14+) kills the whole subtree atomically, so a
    // process cannot escape by forking. Without it, kill what is listed
    // until nothing is.
    let has_kill = match fs::write(root.join("cgroup.kill"), "1") {
        Ok(()) => true,
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e).context("writing cgroup.kill"),
    };
    let deadline = Instant::now() + TEARDOWN_PATIENCE;
    loop {
        let events =
            fs::read_to_string(root.join("cgroup.events")).context("reading cgroup.events")?;
        if events.lines().any(|l| l == "populated 0") {
            return Ok(());
        }
        let remaining = cgroup_tree_pids(root);
        if Instant::now() >= deadline {
            bail!(
                "processes {remaining:?} still in {} after {TEARDOWN_PATIENCE:?}",
                root.display()
            );
        }
        if !has_kill {
            for pid in remaining {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Pids listed in `cgroup.procs` anywhere in the subtree at `dir`.
fn cgroup_tree_pids(dir: &Path) -> Vec<libc::pid_t> {
    let mut pids: Vec<libc::pid_t> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for sub in subdirs(dir) {
        pids.extend(cgroup_tree_pids(&sub));
    }
    pids
}

fn subdirs(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Removes the cgroup at `dir` and all cgroups below it, leaves first.
fn remove_cgroup_tree(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for sub in subdirs(dir) {
        remove_cgroup_tree(&sub)?;
    }
    // rmdir fails with EBUSY while the kernel still finishes off the last
    // exiting processes.
    let deadline = Instant::now() + TEARDOWN_PATIENCE;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }
}

/// What `ip netns del` does: detach the namespace's bind mount and remove
/// the mount point. The namespace itself disappears with its last user.
fn delete_netns(name: &str) -> Result<()> {
    let path = Path::new(NETNS_DIR).join(name);
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: valid NUL-terminated path; MNT_DETACH needs nothing else.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } != 0 {
        let e = io::Error::last_os_error();
        // EINVAL: not a mount point (e.g. creation failed half way).
        if !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) {
            return Err(e).with_context(|| format!("unmounting {}", path.display()));
        }
    }
    match fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// The pid in a name made by a cluster (`weft-w<pid>x…`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?.strip_prefix('w')?;
    let (pid, _) = rest.split_once('x')?;
    pid.parse().ok()
}

/// Whether `name` was made by a cluster of a test process that is gone.
fn is_stale(name: &str) -> bool {
    owner_pid(name).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes cgroups and namespaces of clusters whose test process died
/// without tearing them down (SIGKILL, abort, power cut…). Best effort and
/// quiet: several test processes may be sweeping at the same time.
fn sweep_stale(cgroup2: &Path) {
    let stale = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|name| is_stale(name))
                    .collect()
            })
            .unwrap_or_default()
    };
    for name in stale(cgroup2) {
        let dir = cgroup2.join(&name);
        if kill_cgroup_tree(&dir).is_ok() {
            let _ = remove_cgroup_tree(&dir);
        }
    }
    let namespaces = stale(Path::new(NETNS_DIR));
    let inodes: Vec<u64> = namespaces
        .iter()
        .filter_map(|ns| netns_inode(&Path::new(NETNS_DIR).join(ns)))
        .collect();
    kill_netns_members(&inodes);
    for ns in namespaces {
        let _ = delete_netns(&ns);
    }
    // Agents' pin directories (`weft-w<pid>x…-n<i>`, see `Mesh`): unpinning
    // detaches what a dead test left attached.
    for name in stale(Path::new(crate::mesh::BPFFS)) {
        let _ = fs::remove_dir_all(Path::new(crate::mesh::BPFFS).join(name));
    }
}

/// `n` as an address octet; callers keep `n` within bounds checked in `new`.
fn octet(n: usize) -> u8 {
    u8::try_from(n).expect("node and pod counts are bounded in Cluster::new")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_parses_cluster_names() {
        assert_eq!(owner_pid("weft-w123x0"), Some(123));
        assert_eq!(owner_pid("weft-w123x45-n0p1"), Some(123));
        assert_eq!(owner_pid("weft-w123x4-fab"), Some(123));
        assert_eq!(owner_pid("weft-node"), None);
        assert_eq!(owner_pid("other-w123x0"), None);
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn plan_addresses() {
        let c = Cluster::plan("wtest".into(), "t", 2, 2, Path::new("/cg"));
        let pod = &c.pods[3];
        assert_eq!((pod.node, pod.index, pod.name.as_str()), (1, 1, "n1p1"));
        assert_eq!(pod.ip, Ipv4Addr::new(10, 2, 2, 2));
        assert_eq!(pod.ip6.to_string(), "fd00:2:2::2");
        assert_eq!(pod.gateway6.to_string(), "fd00:2:2::1");
        assert_eq!(pod.netns, "weft-wtest-n1p1");
        assert_eq!(pod.cgroup, Path::new("/cg/weft-wtest/n1/p1"));
        assert_eq!(c.nodes[1].ip6.to_string(), "fd00:ffff::2");
        assert_eq!(c.nodes[1].pod_cidr6.0.to_string(), "fd00:2::");
        // Planning creates nothing, so dropping must not touch the system
        // either (the names don't exist).
    }
}
