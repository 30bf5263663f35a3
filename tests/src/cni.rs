//! A tiny container runtime for the CNI tests: it runs a conflist's chain
//! exactly as containerd or CRI-O do (libcni's order and inputs), with the real
//! reference plugins from Debian's `containernetworking-plugins`
//! (`/usr/lib/cni`: `bridge`, `host-local`) and `weft-cni` after them.
//!
//! For each plugin in order, ADD execs `<CNI_PATH>/<type>` with the CNI
//! environment and, on stdin, the plugin's entry plus the list's `name` and
//! `cniVersion` and the previous plugin's result as `prevResult`; its stdout
//! is the next `prevResult`. If one fails, the runtime runs DEL of the whole
//! chain (in reverse) and reports the failure, as a runtime does before it
//! retries the pod. DEL runs the chain in reverse with the ADD's result; CHECK
//! in order. Plugins run in the node's network namespace, as the runtime
//! does on a node; a sandbox is a network namespace of its own
//! (`weft-<cluster id>-cni<k>`, swept like the cluster's if a test dies) and a
//! cgroup under the node's, removed on drop.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{Cluster, Pod, bin_path, cluster::NETNS_DIR, process::namespaced_command};

/// Where Debian puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A plugin that failed: what it printed (the CNI error) and how it exited.
#[derive(Debug, Clone)]
pub struct Failure {
    pub plugin: String,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// The CNI error it printed, if its stdout was one.
    pub error: Option<Value>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exited {:?}: {} {}",
            self.plugin, self.code, self.stdout, self.stderr
        )
    }
}

/// The runtime of one node: its conflist and the directories of its plugins.
pub struct Runtime {
    chain: Chain,
    node_cgroup: PathBuf,
    dir: PathBuf,
}

/// What running the chain takes; each sandbox keeps a copy, to DEL itself
/// if a test ends without.
#[derive(Debug, Clone)]
struct Chain {
    node_netns: PathBuf,
    /// `CNI_PATH`: a directory with `weft-cni` (a link to the built `weft`,
    /// so it runs under that name), then the reference plugins.
    cni_path: String,
    conflist: Value,
}

impl Runtime {
    /// A runtime on node `node` of `cluster` whose conflist is `bridge`
    /// (host-local IPAM handing out exactly `ip` from `subnet`, the bridge
    /// the pods' gateway) then `weft-cni` talking to `agent_socket`.
    pub fn new(
        cluster: &Cluster,
        node: usize,
        subnet: (Ipv4Addr, u8),
        ip: Ipv4Addr,
        agent_socket: &Path,
    ) -> Result<Runtime> {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("weft-{}-cni{k}", cluster.id()));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        std::os::unix::fs::symlink(bin_path("weft"), bin.join("weft-cni"))
            .context("linking weft-cni")?;
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": format!("weft-test-{}-{k}", cluster.id()),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": format!("cni{k}"),
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{
                            "subnet": format!("{}/{}", subnet.0, subnet.1),
                            "rangeStart": ip.to_string(),
                            "rangeEnd": ip.to_string(),
                        }]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                        "dataDir": dir.join("ipam"),
                    },
                },
                {"type": "weft-cni", "agent_socket": agent_socket},
            ],
        });
        let n = cluster.node(node);
        Ok(Runtime {
            chain: Chain {
                node_netns: n.netns_path.clone(),
                cni_path: format!("{}:{REFERENCE_PLUGINS}", bin.display()),
                conflist,
            },
            node_cgroup: n.cgroup.clone(),
            dir,
        })
    }

    /// The conflist the chain runs.
    pub fn conflist(&self) -> &Value {
        &self.chain.conflist
    }

    /// Where host-local records the addresses it handed out.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }

    /// A new sandbox for pod `namespace/name`: its network namespace and
    /// cgroup, nothing run yet.
    pub fn sandbox(&self, cluster: &Cluster, namespace: &str, name: &str) -> Result<Sandbox> {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let netns = format!("weft-{}-cni{k}", cluster.id());
        let out = Command::new("ip").args(["netns", "add", &netns]).output()?;
        if !out.status.success() {
            bail!(
                "ip netns add {netns}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Runtimes bring the sandbox's loopback up themselves (containerd and
        // CRI-O do, outside the conflist).
        let out = Command::new("ip")
            .args(["-n", &netns, "link", "set", "lo", "up"])
            .output()?;
        if !out.status.success() {
            let _ = Command::new("ip").args(["netns", "del", &netns]).status();
            bail!("lo up in {netns}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let cgroup = self.node_cgroup.join(format!("cni{k}"));
        let sandbox = Sandbox {
            netns_path: Path::new(NETNS_DIR).join(&netns),
            netns,
            cgroup,
            container_id: format!(
                "{:064x}",
                u128::from(k) << 64 | u128::from(std::process::id())
            ),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            uid: format!("uid-{k}"),
            result: None,
            chain: self.chain.clone(),
        };
        std::fs::create_dir(&sandbox.cgroup)
            .with_context(|| format!("creating {}", sandbox.cgroup.display()))?;
        Ok(sandbox)
    }

    /// ADD: the chain in order. On a failure, DEL of the chain (as a runtime
    /// does before it retries the pod), then the failure.
    pub fn add(&self, sandbox: &mut Sandbox) -> Result<std::result::Result<Value, Failure>> {
        let chain = &self.chain;
        let mut prev: Option<Value> = None;
        for plugin in &chain.plugins()? {
            match chain.exec("ADD", sandbox, plugin, prev.as_ref())? {
                Ok(out) => {
                    prev = Some(serde_json::from_str(&out).with_context(|| {
                        format!("{} printed no result: {out:?}", plugin["type"])
                    })?);
                }
                Err(failure) => {
                    chain.del(sandbox, prev.as_ref())?;
                    return Ok(Err(failure));
                }
            }
        }
        let result = prev.context("an empty chain")?;
        sandbox.result = Some(result.clone());
        Ok(Ok(result))
    }

    /// DEL: the chain in reverse, with the ADD's result. Every plugin must
    /// succeed.
    pub fn del(&self, sandbox: &mut Sandbox) -> Result<()> {
        let result = sandbox.result.take();
        self.chain.del(sandbox, result.as_ref())
    }

    /// CHECK: the chain in order, with the ADD's result.
    pub fn check(&self, sandbox: &Sandbox) -> Result<std::result::Result<(), Failure>> {
        let result = sandbox.result.as_ref().context("CHECK before ADD")?;
        for plugin in &self.chain.plugins()? {
            if let Err(f) = self.chain.exec("CHECK", sandbox, plugin, Some(result))? {
                return Ok(Err(f));
            }
        }
        Ok(Ok(()))
    }

    /// Runs `weft-cni` alone as the runtime would, with `stdin` as its config.
    pub fn exec_weft(
        &self,
        command: &str,
        sandbox: &Sandbox,
        stdin: &[u8],
    ) -> Result<std::result::Result<String, Failure>> {
        let chain = &self.chain;
        let dir = chain.cni_path.split(':').next().unwrap_or_default();
        let mut cmd = namespaced_command(Path::new(dir).join("weft-cni"), &chain.node_netns, None);
        chain.env(&mut cmd, command, sandbox);
        run(cmd, "weft-cni", stdin)
    }
}

impl Chain {
    fn env(&self, cmd: &mut Command, command: &str, sandbox: &Sandbox) {
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &sandbox.container_id)
            .env("CNI_NETNS", &sandbox.netns_path)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                    sandbox.namespace, sandbox.name, sandbox.container_id, sandbox.uid
                ),
            )
            .env("CNI_PATH", &self.cni_path);
    }

    /// Runs one plugin of the chain.
    fn exec(
        &self,
        command: &str,
        sandbox: &Sandbox,
        plugin: &Value,
        prev: Option<&Value>,
    ) -> Result<std::result::Result<String, Failure>> {
        let kind = plugin["type"].as_str().context("a plugin without a type")?;
        let mut conf = plugin.clone();
        conf["name"] = self.conflist["name"].clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let program = self
            .cni_path
            .split(':')
            .map(|d| Path::new(d).join(kind))
            .find(|p| p.exists())
            .with_context(|| format!("no plugin {kind} in {}", self.cni_path))?;
        let mut cmd = namespaced_command(&program, &self.node_netns, None);
        self.env(&mut cmd, command, sandbox);
        run(cmd, kind, conf.to_string().as_bytes())
    }

    fn del(&self, sandbox: &Sandbox, result: Option<&Value>) -> Result<()> {
        for plugin in self.plugins()?.iter().rev() {
            if let Err(f) = self.exec("DEL", sandbox, plugin, result)? {
                bail!("DEL failed: {f}");
            }
        }
        Ok(())
    }

    fn plugins(&self) -> Result<Vec<Value>> {
        Ok(self.conflist["plugins"]
            .as_array()
            .context("a conflist without plugins")?
            .clone())
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a plugin with `stdin`, within a minute.
fn run(mut cmd: Command, kind: &str, stdin: &[u8]) -> Result<std::result::Result<String, Failure>> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("running {kind}"))?;
    let mut input = child.stdin.take().context("no stdin")?;
    let stdin = stdin.to_vec();
    // A plugin may exit before reading all of its input. Every plugin here
    // bounds its own time (weft-cni waits at most 10 s for the agent).
    let writer = std::thread::spawn(move || {
        let _ = input.write_all(&stdin);
    });
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {kind}"))?;
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(Ok(stdout));
    }
    Ok(Err(Failure {
        plugin: kind.to_owned(),
        code: out.status.code(),
        error: serde_json::from_str(&stdout).ok(),
        stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }))
}

/// A pod's sandbox: its network namespace and cgroup. On drop, the chain's
/// DEL runs if an ADD succeeded and no DEL followed, and both are removed.
pub struct Sandbox {
    pub netns: String,
    pub netns_path: PathBuf,
    pub cgroup: PathBuf,
    pub container_id: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The chain's result, while added.
    pub result: Option<Value>,
    chain: Chain,
}

impl Sandbox {
    /// The pod as the cluster's helpers take it (`tk::say` and the like run
    /// in its namespace and cgroup), with the address the chain gave it.
    pub fn as_pod(&self, node: usize) -> Result<Pod> {
        let ip: Ipv4Addr = self
            .ip()
            .context("the sandbox has no IPv4 address (no ADD yet?)")?;
        Ok(Pod {
            node,
            index: usize::MAX,
            name: self.name.clone(),
            netns: self.netns.clone(),
            netns_path: self.netns_path.clone(),
            cgroup: self.cgroup.clone(),
            ip,
            ip6: std::net::Ipv6Addr::UNSPECIFIED,
            gateway: Ipv4Addr::UNSPECIFIED,
            gateway6: std::net::Ipv6Addr::UNSPECIFIED,
            host_veth: String::new(),
        })
    }

    /// The IPv4 address of the ADD's result.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.result.as_ref()?["ips"]
            .as_array()?
            .iter()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .next()
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(result) = self.result.take() {
            let _ = self.chain.del(self, Some(&result));
        }
        // Processes of the pod first: a namespace lives while one holds it.
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        for _ in 0..500 {
            if std::fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .stderr(Stdio::null())
            .status();
    }
}
