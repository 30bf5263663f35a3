//! Enrollment through the chained CNI plugin, and of running pods found in
//! /proc, in the virtual cluster: Debian's reference plugins (`bridge`,
//! `host-local`) set up the pod's interface, `weft-cni` runs after them as a
//! runtime runs a chain (`weft_tests::cni`), and the mesh file lists the pod
//! without `netns`: the agent learns it from the plugin alone.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::{
    Cluster, Mesh, PATIENCE, Pod,
    cluster::Host as _,
    cni::{Runtime, Sandbox},
    eventually, require_privileged, tk,
};

const PORT: u16 = 9000;
/// The sandboxes' subnet: inside node 0's pod range, which the other nodes
/// route to node 0 already.
const SUBNET: (Ipv4Addr, u8) = (Ipv4Addr::new(10, 1, 200, 0), 24);
const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 200, 10);
const POD: &str = "cni-pod";

/// A mesh on a 2-node cluster (a server pod on node 1) whose file lists the
/// CNI pod (on node 0, address `POD_IP`, no `netns`), agents with a CNI
/// socket each; and node 0's runtime, whose weft-cni talks to node 0's agent.
fn setup(c: &Cluster) -> Result<(Mesh<'_>, Runtime)> {
    let mesh = mesh(c)?;
    let rt = Runtime::new(c, 0, SUBNET, POD_IP, &mesh.cni_socket(0))?;
    Ok((mesh, rt))
}

fn mesh(c: &Cluster) -> Result<Mesh<'_>> {
    let mut mesh = Mesh::new(c, |_| true)?;
    mesh.add_workloads(&format!(
        "- name: {POD}\n  namespace: default\n  service_account: {POD}\n  node: {}\n  addresses: [{POD_IP}]\n  enrolled: true\n",
        c.node(0).name
    ))?;
    mesh.cni_sockets = true;
    Ok(mesh)
}

fn identity(name: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{name}")
}

fn is_event(v: &Value, message: &str, pod: &str) -> bool {
    v["message"] == message && v["workload"] == format!("default/{pod}")
}

/// `weft-tk say` from the sandbox to the server, and the server side's
/// access-log line for it: mutual TLS with the sandbox's identity.
fn say_over_mtls(mesh: &Mesh, from: &Pod, server: &Pod, message: &str) -> Result<()> {
    let to = SocketAddr::new(server.ip.into(), PORT).to_string();
    let r = tk::say(from, &to, message, &[])?;
    ensure!(r["ok"] == true, "{} → {to}: {r}", from.name);
    let mut line = None;
    eventually(PATIENCE, || {
        line = mesh
            .access_logs(server.node)
            .into_iter()
            .find(|v| v["direction"] == "inbound" && v["src.identity"] == identity(&from.name));
        line.is_some()
    });
    let line = line.with_context(|| {
        format!(
            "no inbound access log for {}: {:#?}",
            from.name,
            mesh.access_logs(server.node)
        )
    })?;
    ensure!(line["security"] == "mutual_tls", "{line}");
    ensure!(
        line["src.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&POD_IP.to_string())),
        "{line}"
    );
    Ok(())
}

/// ADD through bridge, host-local and weft-cni: the pod is enrolled before
/// the ADD returns, and its connection to a pod on another node goes over
/// mutual TLS with its own identity. CHECK agrees; DEL unenrolls it. Garbage
/// for the plugin or the agent's socket is a clear error and leaves the agent
/// serving.
#[test]
fn add_enrolls_the_pod_and_del_releases_it() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("cni_add", 2, 1)?;
    let (mut mesh, rt) = setup(&c)?;
    mesh.start_all()?;
    let socket = mesh.cni_socket(0);
    let server = c.pod(1, 0);
    let _echo = tk::echo(server, PORT)?;
    let mut sandbox = rt.sandbox(&c, "default", POD)?;

    // Before any ADD: the agent does not know the namespace.
    ensure!(
        mesh.logs(0, |v| is_event(v, "pod enrolled", POD))
            .is_empty(),
        "enrolled before the ADD"
    );

    // Garbage on the plugin's stdin: a CNI error, exit non-zero.
    let garbage = rt.exec_weft("ADD", &sandbox, b"{not json")?;
    let failure = garbage.err().context("garbage on stdin succeeded")?;
    let error = failure.error.clone().context("no CNI error JSON")?;
    ensure!(failure.code == Some(1), "{failure}");
    ensure!(error["code"] == 6, "{error}");
    ensure!(
        error["msg"].as_str().unwrap_or("").contains("decode"),
        "{error}"
    );
    ensure!(error["cniVersion"].is_string() && error["details"].is_string());
    // Garbage on the agent's socket: answered with a refusal, nothing else.
    {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&socket)?;
        s.write_all(b"\x00\x01 garbage\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        ensure!(
            answer.contains("refused") && answer.contains("bad request"),
            "{answer}"
        );
    }

    // Only root is answered: with the socket opened to everyone, a peer of
    // another uid is cut off without a word (SO_PEERCRED), and logged.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let set = |mode| std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(mode));
        set(0o666)?;
        let script = format!(
            "import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({:?})\n\
             try:\n  s.sendall(b'{{}}\\n')\n  r = s.recv(4096)\n\
             except (ConnectionResetError, BrokenPipeError):\n  r = b''\nprint(repr(r))\n",
            socket.display().to_string()
        );
        let out = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(&script)
            .output()?;
        set(0o600)?;
        ensure!(out.status.success(), "{out:?}");
        ensure!(
            String::from_utf8_lossy(&out.stdout).trim() == "b''",
            "{out:?}"
        );
        ensure!(
            eventually(PATIENCE, || !mesh
                .logs(0, |v| v["message"]
                    == "CNI socket: a peer that is not root; closed"
                    && v["uid"] == 65534)
                .is_empty()),
            "the refusal was not logged"
        );
    }

    let result = rt
        .add(&mut sandbox)?
        .map_err(|f| anyhow::anyhow!("ADD failed: {f}"))?;
    // weft-cni printed bridge's result unchanged: the sandbox's address.
    ensure!(sandbox.ip() == Some(POD_IP), "{result}");
    ensure!(result["interfaces"].is_array(), "{result}");
    let mut enrolled = Vec::new();
    eventually(PATIENCE, || {
        enrolled = mesh.logs(0, |v| is_event(v, "pod enrolled", POD));
        !enrolled.is_empty()
    });
    ensure!(enrolled.len() == 1, "{enrolled:?}");
    ensure!(
        enrolled[0]["netns"] == sandbox.netns_path.display().to_string(),
        "{}",
        enrolled[0]
    );
    let pod = sandbox.as_pod(0)?;
    say_over_mtls(&mesh, &pod, server, "through the CNI chain")?;
    rt.check(&sandbox)?
        .map_err(|f| anyhow::anyhow!("CHECK failed: {f}"))?;
    // Each request counted by command and result, the bad ones too.
    let metrics = c
        .node(0)
        .exec_ok("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    for series in [
        r#"weft_cni_requests_total{command="unknown",result="bad_request"} 1"#,
        r#"weft_cni_requests_total{command="unknown",result="not_root"} 1"#,
        r#"weft_cni_requests_total{command="add",result="enrolled"} 1"#,
        r#"weft_cni_requests_total{command="check",result="enrolled"} 1"#,
    ] {
        ensure!(metrics.contains(series), "no {series} in:\n{metrics}");
    }

    rt.del(&mut sandbox)?;
    ensure!(
        eventually(PATIENCE, || {
            mesh.logs(0, |v| is_event(v, "pod unenrolled", POD)).len() == 1
        }),
        "not unenrolled by the DEL"
    );
    ensure!(mesh.exited_agents().is_empty(), "an agent died");
    Ok(())
}

/// A CNI 1.1 runtime's STATUS and GC, run on `weft-cni` as containerd 2 runs
/// them (no pod; Debian's reference plugins speak only 1.0, so the chain is
/// not 1.1 here): STATUS fails with 50 while no agent can enroll, succeeds
/// once one can; GC keeps the sandboxes the runtime lists and releases the
/// one it does not, as its DEL would have.
#[test]
fn status_and_gc_as_a_1_1_runtime_runs_them() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("cni_gc", 2, 1)?;
    let (mut mesh, rt) = setup(&c)?;
    let mut sandbox = rt.sandbox(&c, "default", POD)?;
    let socket = mesh.cni_socket(0);
    // The environment a runtime gives these has no pod; one that names
    // another sandbox changes nothing.
    let env = rt.sandbox(&c, "default", "no-pod")?;
    let pod_less = |command: &str, valid: Option<&[&str]>| {
        let mut conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": rt.conflist()["name"],
            "type": "weft-cni",
            "agent_socket": socket,
        });
        if let Some(valid) = valid {
            conf["cni.dev/valid-attachments"] = valid
                .iter()
                .map(|id| serde_json::json!({"containerID": id, "ifname": "eth0"}))
                .collect();
        }
        rt.exec_weft(command, &env, conf.to_string().as_bytes())
    };

    // No agent: not available.
    let failure = pod_less("STATUS", None)?
        .err()
        .context("STATUS succeeded with no agent")?;
    let error = failure.error.clone().context("no CNI error JSON")?;
    ensure!(error["code"] == 50, "{error}");
    mesh.start_all()?;
    let ok = pod_less("STATUS", None)?.map_err(|f| anyhow::anyhow!("STATUS failed: {f}"))?;
    ensure!(ok.is_empty(), "STATUS printed {ok:?}");

    rt.add(&mut sandbox)?
        .map_err(|f| anyhow::anyhow!("ADD failed: {f}"))?;
    ensure!(eventually(PATIENCE, || {
        mesh.logs(0, |v| is_event(v, "pod enrolled", POD)).len() == 1
    }));
    // Listed by the runtime: kept.
    let id = sandbox.container_id.clone();
    pod_less("GC", Some(&[&id, "another-sandbox"]))?
        .map_err(|f| anyhow::anyhow!("GC failed: {f}"))?;
    ensure!(
        eventually(PATIENCE, || !mesh
            .logs(0, |v| v["message"] == "CNI GC" && v["released"] == 0)
            .is_empty()),
        "no GC logged"
    );
    ensure!(
        mesh.logs(0, |v| is_event(v, "pod unenrolled", POD))
            .is_empty(),
        "a listed sandbox was released"
    );
    let pod = sandbox.as_pod(0)?;
    let server = c.pod(1, 0);
    let _echo = tk::echo(server, PORT)?;
    say_over_mtls(&mesh, &pod, server, "kept by GC")?;
    // Not listed (its DEL was lost): released.
    pod_less("GC", Some(&["another-sandbox"]))?.map_err(|f| anyhow::anyhow!("GC failed: {f}"))?;
    ensure!(
        eventually(PATIENCE, || {
            mesh.logs(0, |v| is_event(v, "pod unenrolled", POD)).len() == 1
        }),
        "not unenrolled by the GC"
    );
    // Without a list, nothing is released and the runtime is told why.
    let failure = pod_less("GC", None)?
        .err()
        .context("GC without a list succeeded")?;
    let error = failure.error.clone().context("no CNI error JSON")?;
    ensure!(error["code"] == 7, "{error}");
    let metrics = c
        .node(0)
        .exec_ok("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    for series in [
        r#"weft_cni_requests_total{command="status",result="ready"} 1"#,
        r#"weft_cni_requests_total{command="gc",result="released"} 2"#,
    ] {
        ensure!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    ensure!(mesh.exited_agents().is_empty(), "an agent died");
    Ok(())
}

/// Fail closed: with the agent stopped the ADD fails with a CNI error and a
/// non-zero exit, and the runtime's DEL of the chain releases the address; a
/// pod the model does not know is refused after the agent's wait.
#[test]
fn without_an_agent_the_add_fails_and_the_chain_is_undone() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("cni_closed", 2, 1)?;
    let (mut mesh, rt) = setup(&c)?;
    mesh.start_all()?;
    mesh.stop_agent(0, false)?;
    let mut sandbox = rt.sandbox(&c, "default", POD)?;

    let failure = rt
        .add(&mut sandbox)?
        .err()
        .context("ADD succeeded with no agent")?;
    ensure!(
        failure.plugin == "weft-cni" && failure.code == Some(1),
        "{failure}"
    );
    let error = failure.error.clone().context("no CNI error JSON")?;
    ensure!(error["code"] == 11, "{error}");
    ensure!(
        error["msg"]
            .as_str()
            .unwrap_or("")
            .contains("not reachable"),
        "{error}"
    );
    // The runtime's DEL ran: host-local holds no address, the pod no interface.
    ensure!(
        ipam_holds(&rt, POD_IP).is_none(),
        "the address is still allocated"
    );
    let links = c
        .node(0)
        .exec_ok("ip", ["-n", &sandbox.netns, "-o", "link"])?;
    ensure!(
        !links.contains("eth0"),
        "the interface is still there: {links}"
    );

    // An agent that runs but whose model does not know the pod: refused
    // (after its wait for the model), and undone again.
    mesh.start_agent(0)?;
    let mut stranger = rt.sandbox(&c, "default", "not-in-the-model")?;
    let started = std::time::Instant::now();
    let failure = rt
        .add(&mut stranger)?
        .err()
        .context("ADD of an unknown pod succeeded")?;
    let error = failure.error.clone().context("no CNI error JSON")?;
    ensure!(error["code"] == 100, "{error}");
    ensure!(
        error["details"]
            .as_str()
            .unwrap_or("")
            .contains("does not know"),
        "{error}"
    );
    ensure!(
        started.elapsed() >= std::time::Duration::from_secs(4),
        "refused without waiting"
    );
    ensure!(
        ipam_holds(&rt, POD_IP).is_none(),
        "the address is still allocated"
    );

    // The same pod, now with the agent up: enrolled.
    rt.add(&mut sandbox)?
        .map_err(|f| anyhow::anyhow!("ADD failed: {f}"))?;
    ensure!(eventually(PATIENCE, || {
        mesh.logs(0, |v| is_event(v, "pod enrolled", POD)).len() == 1
    }));
    Ok(())
}

/// The runtime may run a pod's ADD before the agent's model knows the pod
/// (in Kubernetes the API watch trails the kubelet): the ADD waits for the
/// model, and is answered as soon as a model that has the pod is applied.
#[test]
fn an_add_waits_for_the_model_to_learn_the_pod() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("cni_wait", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.cni_sockets = true;
    mesh.start_all()?;
    let rt = Runtime::new(&c, 0, SUBNET, POD_IP, &mesh.cni_socket(0))?;
    let mut sandbox = rt.sandbox(&c, "default", POD)?;
    let started = std::time::Instant::now();
    let added = std::thread::scope(|s| {
        let add = s.spawn(|| rt.add(&mut sandbox));
        // The model learns of the pod a second after the runtime asked.
        std::thread::sleep(std::time::Duration::from_secs(1));
        let learned = mesh.add_workloads(&format!(
            "- name: {POD}\n  namespace: default\n  service_account: {POD}\n  node: {}\n  addresses: [{POD_IP}]\n  enrolled: true\n",
            c.node(0).name
        ));
        (learned, add.join().expect("the ADD thread panicked"))
    });
    let (learned, added) = added;
    learned?;
    added?.map_err(|f| anyhow::anyhow!("ADD failed: {f}"))?;
    let took = started.elapsed();
    ensure!(
        took >= std::time::Duration::from_secs(1),
        "answered before the model knew the pod ({took:?})"
    );
    ensure!(eventually(PATIENCE, || {
        mesh.logs(0, |v| is_event(v, "pod enrolled", POD)).len() == 1
    }));
    Ok(())
}

/// The file host-local keeps for an allocated address, if there is one.
fn ipam_holds(rt: &Runtime, ip: Ipv4Addr) -> Option<PathBuf> {
    let dir = std::fs::read_dir(rt.ipam_dir()).ok()?;
    dir.flatten()
        .flat_map(|net| {
            std::fs::read_dir(net.path())
                .into_iter()
                .flatten()
                .flatten()
        })
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n == ip.to_string().as_str()))
}

/// A pod added while an agent ran stays served by the next agent, which
/// finds its namespace in /proc (a process of the pod lives in it) without
/// any CNI call.
#[test]
fn a_restarted_agent_finds_the_running_pod_in_proc() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("cni_scan", 2, 1)?;
    let (mut mesh, rt) = setup(&c)?;
    mesh.start_all()?;
    let server = c.pod(1, 0);
    let _echo = tk::echo(server, PORT)?;
    let mut sandbox: Sandbox = rt.sandbox(&c, "default", POD)?;
    rt.add(&mut sandbox)?
        .map_err(|f| anyhow::anyhow!("ADD failed: {f}"))?;
    let pod = sandbox.as_pod(0)?;
    // The pod's own process (a server), in its namespace and cgroup.
    let _app = tk::echo(&pod, PORT)?;

    mesh.stop_agent(0, true)?;
    mesh.start_agent(0)?;
    // Found and enrolled before the agent said it was ready.
    let found = mesh.logs(0, |v| {
        v["message"] == "scan: found a running pod's network namespace"
            && v["workload"] == format!("default/{POD}")
    });
    ensure!(found.len() == 1, "the scan did not find the pod: {found:?}");
    ensure!(
        found[0]["netns"] == sandbox.netns_path.display().to_string(),
        "the scan should name the runtime's path: {}",
        found[0]
    );
    ensure!(mesh.logs(0, |v| is_event(v, "pod enrolled", POD)).len() == 1);
    ensure!(
        mesh.logs(0, |v| v["message"]
            == "CNI ADD: pod's network namespace reported")
            .is_empty(),
        "a CNI call reached the new agent"
    );
    say_over_mtls(&mesh, &pod, server, "after the restart")?;
    // And the other way: the pod's server is reached over mutual TLS too.
    let r = tk::say(
        server,
        &SocketAddr::new(POD_IP.into(), PORT).to_string(),
        "inbound",
        &[],
    )?;
    ensure!(r["ok"] == true, "{r}");
    let inbound = |v: &Value| {
        v["direction"] == "inbound"
            && v["dst.identity"] == identity(POD)
            && v["security"] == "mutual_tls"
    };
    ensure!(
        eventually(PATIENCE, || mesh.access_logs(0).iter().any(inbound)),
        "no inbound mutual TLS to the pod: {:#?}",
        mesh.access_logs(0)
    );
    Ok(())
}

/// An upgrade's successor (started beside the running agent) takes the CNI
/// socket once it is ready: the next pod's ADD is answered by it, and the pod
/// stays served when the predecessor stops.
#[test]
fn a_successor_answers_the_cni_plugin_once_ready() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("cni_succession", 2, 1)?;
    let (mut mesh, rt) = setup(&c)?;
    mesh.start_all()?;
    let server = c.pod(1, 0);
    let _echo = tk::echo(server, PORT)?;
    let mut old = mesh.start_successor(0)?;
    let mut sandbox: Sandbox = rt.sandbox(&c, "default", POD)?;
    rt.add(&mut sandbox)?
        .map_err(|f| anyhow::anyhow!("ADD failed: {f}"))?;
    let pod = sandbox.as_pod(0)?;
    let reported = |v: &Value| v["message"] == "CNI ADD: pod's network namespace reported";
    ensure!(
        mesh.logs(0, |v| is_event(v, "pod enrolled", POD)).len() == 1
            && !mesh.logs(0, reported).is_empty(),
        "the successor did not answer the ADD"
    );
    let old_lines = old.stdout_lines();
    ensure!(
        !old_lines
            .iter()
            .any(|l| l.contains("CNI ADD: pod's network namespace reported")),
        "the predecessor answered the ADD"
    );
    say_over_mtls(&mesh, &pod, server, "beside the predecessor")?;
    old.signal(libc::SIGTERM)?;
    let status = old.wait_timeout(std::time::Duration::from_secs(15))?;
    ensure!(status.success(), "the predecessor exited with {status}");
    say_over_mtls(&mesh, &pod, server, "after the predecessor")?;
    rt.del(&mut sandbox)?;
    ensure!(
        eventually(PATIENCE, || !mesh
            .logs(0, |v| is_event(v, "pod unenrolled", POD))
            .is_empty()),
        "the successor did not release the pod on DEL"
    );
    Ok(())
}

/// `weft cni install` into a conf dir with the cluster's bridge conflist:
/// the binary lands as `weft-cni` (and runs as the plugin under that name),
/// weft is chained last, a second install changes nothing, uninstall gives the
/// original back. A later conflist is never touched.
#[test]
fn install_chains_weft_last_once_and_uninstall_restores() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("weft-cni-install-{}", std::process::id()));
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let (bin, conf) = (dir.join("bin"), dir.join("net.d"));
    std::fs::create_dir_all(&bin)?;
    std::fs::create_dir_all(&conf)?;
    let bridge = r#"{
  "cniVersion": "1.0.0",
  "name": "cbr0",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
  ]
}"#;
    let later = r#"{"cniVersion":"0.4.0","name":"later","plugins":[{"type":"loopback"}]}"#;
    std::fs::write(conf.join("10-bridge.conflist"), bridge)?;
    std::fs::write(conf.join("99-later.conflist"), later)?;
    let weft = weft_tests::bin_path("weft");
    let install = || -> Result<()> {
        let out = std::process::Command::new(&weft)
            .args(["cni", "install", "--bin-dir"])
            .arg(&bin)
            .arg("--conf-dir")
            .arg(&conf)
            .args(["--agent-socket", "/run/weft/cni.sock"])
            .output()?;
        ensure!(out.status.success(), "install: {out:?}");
        Ok(())
    };
    let read = |name: &str| -> Result<Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            conf.join(name),
        )?)?)
    };

    install()?;
    let list = read("10-bridge.conflist")?;
    let plugins = list["plugins"].as_array().context("no plugins")?;
    let types: Vec<&str> = plugins.iter().filter_map(|p| p["type"].as_str()).collect();
    ensure!(types == ["bridge", "portmap", "weft-cni"], "{list}");
    ensure!(plugins[2]["agent_socket"] == "/run/weft/cni.sock", "{list}");
    ensure!(
        plugins[1]["snat"] == true && list["name"] == "cbr0",
        "{list}"
    );
    ensure!(std::fs::read_to_string(conf.join("99-later.conflist"))? == later);
    // No temporary file left behind for the runtime to trip on.
    let names: Vec<String> = std::fs::read_dir(&conf)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    ensure!(names.len() == 2, "{names:?}");

    // The copy is the plugin under its new name.
    let plugin = bin.join("weft-cni");
    let out = std::process::Command::new(&plugin)
        .env("CNI_COMMAND", "VERSION")
        .output()?;
    ensure!(out.status.success(), "{out:?}");
    let version: Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        version["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&"1.0.0".into())),
        "{version}"
    );

    let first = std::fs::read_to_string(conf.join("10-bridge.conflist"))?;
    install()?;
    ensure!(
        std::fs::read_to_string(conf.join("10-bridge.conflist"))? == first,
        "a second install changed the conflist"
    );

    let out = std::process::Command::new(&weft)
        .args(["cni", "uninstall", "--bin-dir"])
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf)
        .output()?;
    ensure!(out.status.success(), "uninstall: {out:?}");
    ensure!(
        read("10-bridge.conflist")? == serde_json::from_str::<Value>(bridge)?,
        "uninstall did not restore the conflist"
    );
    ensure!(!plugin.exists(), "the binary is still there");
    ensure!(std::fs::read_to_string(conf.join("99-later.conflist"))? == later);
    Ok(())
}
