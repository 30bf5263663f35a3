//! The agent with exactly the capabilities its DaemonSet grants
//! (deploy/agent/daemonset.yaml), as the container runtime would leave it:
//! root, every other capability gone from the bounding set. The virtual
//! cluster runs agents under `setpriv` with that set, and real traffic must
//! cross the mesh; with any one of them taken away, the agent must not come
//! up. So the manifest's list is both enough and not padded.

use std::process::Command;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::{Cluster, Mesh, PATIENCE, eventually, require_privileged, tk};

const PORT: u16 = 9000;

/// `securityContext.capabilities.add` of the agent container, from the
/// manifest itself.
fn daemonset_capabilities() -> Vec<String> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/agent/daemonset.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let ds: Value = serde_saphyr::from_str(&text).unwrap();
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(agent["name"], "agent");
    let sc = &agent["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

/// `setpriv` arguments that leave a root process exactly `caps` (Kubernetes
/// names, `NET_ADMIN`), as `drop: [ALL]` plus `add` does in a container.
fn setpriv(caps: &[String]) -> Vec<String> {
    let mut set = "-all".to_owned();
    for cap in caps {
        set.push_str(&format!(",+{}", cap.to_lowercase()));
    }
    vec![
        "setpriv".into(),
        format!("--bounding-set={set}"),
        "--inh-caps=-all".into(),
        "--".into(),
    ]
}

/// The capability numbers (linux/capability.h) of the names used here.
fn cap_number(name: &str) -> u32 {
    match name {
        "NET_ADMIN" => 12,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "BPF" => 39,
        other => panic!("add {other} to cap_number"),
    }
}

/// `CapEff` of a running process.
fn effective(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .context("no CapEff")?;
    Ok(u64::from_str_radix(hex.trim(), 16)?)
}

#[test]
fn the_daemonsets_capabilities_are_enough_to_capture_and_tunnel() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let caps = daemonset_capabilities();
    let c = Cluster::new("caps_enough", 2, 2)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.agent_wrapper = setpriv(&caps);
    mesh.start_all()?;
    // The agents hold these and nothing else.
    let expected = caps.iter().fold(0u64, |m, c| m | (1 << cap_number(c)));
    for node in 0..2 {
        assert_eq!(effective(mesh.agent(node).pid())?, expected, "node {node}");
    }
    // Across nodes (HBONE, mutual TLS) and within one (the agent connects
    // the pods itself), with inbound handover to the application in both.
    let (a, b, d) = (c.pod(0, 0), c.pod(1, 0), c.pod(0, 1));
    let _b = tk::echo(b, PORT)?;
    let _d = tk::echo(d, PORT)?;
    for (to, ip) in [("cross-node", b.ip), ("same-node", d.ip)] {
        let r = tk::say(a, &format!("{ip}:{PORT}"), &format!("caps-{to}"), &[])?;
        ensure!(r["ok"] == true, "{to}: {r}");
    }
    // Both connections went through node 0's agent (its access log has a
    // line per connection once it closes).
    ensure!(
        eventually(PATIENCE, || mesh.access_logs(0).len() >= 2),
        "the traffic did not go through the agent: {:?}",
        mesh.access_logs(0)
    );
    // Each pod was set up whole: the sysctls an upgrade's handover and the
    // inbound handover need were written with these capabilities too.
    for node in 0..2 {
        let warnings = mesh.logs(node, |v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("cannot"))
        });
        ensure!(warnings.is_empty(), "node {node}: {warnings:?}");
    }
    Ok(())
}

#[test]
fn without_any_one_of_them_the_agent_cannot_serve() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let caps = daemonset_capabilities();
    // SYS_PTRACE is for opening the network namespaces of pods already
    // running (see the next test); an agent of the file mode never does.
    for missing in caps.iter().filter(|c| *c != "SYS_PTRACE") {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let c = Cluster::new(&format!("caps_no_{}", missing.to_lowercase()), 1, 2)?;
        let mut mesh = Mesh::new(&c, |_| true)?;
        mesh.agent_wrapper = setpriv(&fewer);
        mesh.start_ca()?;
        // Either the agent refuses to start, or a connection through it fails.
        let outcome = match mesh.start_agent(0) {
            Err(e) => format!("does not start: {}", first_line(&format!("{e:#}"))),
            Ok(()) => {
                let (a, d) = (c.pod(0, 0), c.pod(0, 1));
                let _d = tk::echo(d, PORT)?;
                let r = tk::say(a, &format!("{}:{PORT}", d.ip), "caps-missing", &[])?;
                assert!(
                    r["ok"] != true,
                    "a connection went through without {missing}"
                );
                // And the agent says why.
                let refused = mesh.logs(0, |v| v.to_string().contains("not permitted"));
                assert!(!refused.is_empty(), "without {missing}: no EPERM logged");
                format!("starts, but connections fail: {}", refused[0])
            }
        };
        eprintln!("without {missing}: the agent {outcome}");
    }
    Ok(())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or_default()
}

/// What the agent does for a pod that was running before it: open the pod
/// process's `/proc/<pid>/ns/net` and enter it. The process runs as root with
/// capabilities the agent lacks (as a container's default set), so opening it
/// takes SYS_PTRACE.
#[test]
fn entering_a_running_processs_network_namespace_takes_sys_ptrace() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let caps = daemonset_capabilities();
    assert!(caps.contains(&"SYS_PTRACE".to_owned()));
    let mut pod_process = Command::new("sleep").arg("60").spawn()?;
    let enter = |caps: &[String]| -> Result<bool> {
        let argv = setpriv(caps);
        let status = Command::new(&argv[0])
            .args(&argv[1..])
            .arg("nsenter")
            .arg(format!("--net=/proc/{}/ns/net", pod_process.id()))
            .arg("true")
            .status()?;
        Ok(status.success())
    };
    let with = enter(&caps)?;
    let without: Vec<String> = caps
        .iter()
        .filter(|c| *c != "SYS_PTRACE")
        .cloned()
        .collect();
    let without = enter(&without)?;
    pod_process.kill()?;
    pod_process.wait()?;
    assert!(
        with,
        "the DaemonSet's capabilities cannot enter a running pod's netns"
    );
    assert!(
        !without,
        "SYS_PTRACE is not needed after all: drop it from the DaemonSet"
    );
    Ok(())
}
