//! Zero-trust L4 in the virtual cluster: workload identities issued by `weft ca`,
//! HBONE (HTTP/2 CONNECT over mutual TLS 1.3) between the agents, and the pool of
//! connections it rides on. Real programs, real TLS, real tcpdump.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::{
    Cluster, Mesh, PATIENCE, Pod, Proc, cluster::Host as _, eventually, mesh::identity,
    require_privileged, tk,
};

const PORT: u16 = 9000;

fn addr(ip: impl Into<IpAddr>) -> String {
    SocketAddr::new(ip.into(), PORT).to_string()
}

fn say_ok(from: &Pod, to: &str, message: &str) -> Result<Value> {
    let r = tk::say(from, to, message, &[])?;
    ensure!(r["ok"] == true, "{} → {to}: {r}", from.name);
    Ok(r)
}

/// Access-log lines of `node`'s agent that `pred` accepts, once there are at
/// least `n`.
fn wait_access(mesh: &Mesh, node: usize, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let mut found = Vec::new();
    eventually(PATIENCE, || {
        found = mesh
            .access_logs(node)
            .into_iter()
            .filter(|v| pred(v))
            .collect();
        found.len() >= n
    });
    found
}

/// `tcpdump` writing every TCP packet on node `node`'s uplink (the wire between
/// the nodes) to a file.
struct Wire {
    proc: Proc,
    file: PathBuf,
}

impl Wire {
    fn start(c: &Cluster, node: usize) -> Result<Wire> {
        let file = std::env::temp_dir().join(format!("{}-n{node}.pcap", c.id()));
        let mut cmd = c.node(node).command("tcpdump");
        cmd.args([
            "-i",
            "eth0",
            "--immediate-mode",
            "-U",
            "-nn",
            "-s",
            "0",
            "-w",
        ])
        .arg(&file)
        .arg("tcp");
        let proc = Proc::spawn(&mut cmd, "tcpdump")?;
        ensure!(
            eventually(PATIENCE, || proc.stderr().contains("listening on")),
            "tcpdump did not start: {}",
            proc.stderr()
        );
        Ok(Wire { proc, file })
    }

    /// Stops the capture; returns the raw capture and the packet summary lines.
    fn finish(mut self) -> Result<(Vec<u8>, String)> {
        // Let the last packets reach the file.
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(libc::SIGINT)?;
        self.proc.wait_timeout(Duration::from_secs(10))?;
        let raw = std::fs::read(&self.file).context("reading the capture")?;
        let out = std::process::Command::new("tcpdump")
            .args(["-nn", "-r"])
            .arg(&self.file)
            .output()?;
        let summary = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            !summary.is_empty(),
            "the capture is empty ({} bytes); tcpdump said: {}",
            raw.len(),
            self.proc.stderr()
        );
        Ok((raw, summary))
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.file);
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn cross_node_traffic_is_mutual_tls_and_never_shows_the_plaintext() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_wire", 2, 1)?;
    let mut mesh = Mesh::start(&c, |_| true)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(b, PORT)?;
    let marker = format!("WEFT-PLAINTEXT-MARKER-{}", c.id());

    let wire = Wire::start(&c, 0)?;
    say_ok(a, &addr(b.ip), &marker)?;
    let (raw, summary) = wire.finish()?;
    assert!(
        !contains(&raw, marker.as_bytes()),
        "the marker crossed the wire in plaintext"
    );
    let to_hbone = summary
        .lines()
        .filter(|l| l.contains(&format!("{}.15008", b.ip)))
        .count();
    assert!(to_hbone > 0, "no packet to {}:15008:\n{summary}", b.ip);
    assert!(
        !summary.contains(&format!("{}.{PORT}", b.ip)),
        "a direct connection to the application port crossed the wire:\n{summary}"
    );
    // TLS 1.3 on the wire: a handshake record (ClientHello) and application-data
    // records (0x17 0x03 0x03).
    assert!(contains(&raw, &[0x16, 0x03, 0x01]) && contains(&raw, &[0x17, 0x03, 0x03]));

    // The control: once the destination leaves the mesh, the same message goes
    // direct (outside_mesh: passthrough) and the capture does see it. So the
    // check above can fail.
    mesh.set_enrolled(b, false)?;
    let wire = Wire::start(&c, 0)?;
    say_ok(a, &addr(b.ip), &marker)?;
    let (raw, _) = wire.finish()?;
    assert!(
        contains(&raw, marker.as_bytes()),
        "control capture missed the plaintext marker"
    );
    Ok(())
}

#[test]
fn the_server_side_sees_each_source_pods_identity() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_identity", 2, 2)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let dst = c.pod(1, 0);
    let _echo = tk::echo(dst, PORT)?;
    for src in [c.pod(0, 0), c.pod(0, 1), c.pod(1, 1)] {
        say_ok(src, &addr(dst.ip), "hello")?;
        let inbound = wait_access(&mesh, 1, 1, |v| {
            v["direction"] == "inbound" && v["src.identity"] == identity(src)
        });
        let line = inbound.first().with_context(|| {
            format!(
                "no inbound log for {}: {:#?}",
                src.name,
                mesh.access_logs(1)
            )
        })?;
        assert_eq!(line["dst.identity"], identity(dst));
        assert_eq!(line["security"], "mutual_tls");
        assert_eq!(line["end"], "closed", "{line}");
        let outbound = wait_access(&mesh, src.node, 1, |v| {
            v["direction"] == "outbound"
                && v["src.identity"] == identity(src)
                && v["dst.addr"] == addr(dst.ip)
        });
        let line = outbound.first().context("no outbound log")?;
        assert_eq!(line["dst.identity"], identity(dst));
        assert_eq!(line["security"], "mutual_tls");
    }
    Ok(())
}

#[test]
fn outside_mesh_destinations_pass_through_or_are_refused_per_pod() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_outside", 2, 2)?;
    let mut mesh = Mesh::start(&c, |p| p.index == 0)?;
    let outside = c.pod(1, 1);
    let echo = tk::echo(outside, PORT)?;
    // Default (passthrough): direct, plaintext, logged as such.
    let a = c.pod(0, 0);
    say_ok(a, &addr(outside.ip), "hi")?;
    let line = wait_access(&mesh, 0, 1, |v| v["dst.addr"] == addr(outside.ip));
    assert_eq!(line[0]["security"], "none");
    // refuse: reset, and the server never sees a connection.
    tk::wait_accepted(&echo, 1);
    mesh.set_extra(a, "  outside_mesh: refuse\n")?;
    let refused = eventually(PATIENCE, || {
        tk::say(a, &addr(outside.ip), "hi", &[]).is_ok_and(|r| r["ok"] == false)
    });
    assert!(refused, "outside_mesh: refuse did not refuse");
    let line = wait_access(&mesh, 0, 1, |v| v["end"] == "refused");
    assert!(
        line[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("outside the mesh")),
        "{:?}",
        line
    );
    // Attempts made before the agent applied the change did connect; from now on
    // none does.
    std::thread::sleep(Duration::from_millis(300));
    let seen = tk::accepted(&echo).len();
    let r = tk::say(a, &addr(outside.ip), "hi", &[])?;
    assert_eq!(r["ok"], false, "{r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tk::accepted(&echo).len(),
        seen,
        "a refused connection reached the server"
    );
    // An enrolled destination still works from the refusing pod.
    let b = c.pod(1, 0);
    let _e = tk::echo(b, PORT)?;
    say_ok(a, &addr(b.ip), "in the mesh")?;
    Ok(())
}

#[test]
fn an_agent_asking_for_an_identity_not_on_its_node_is_refused() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_ca_node", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.start_ca()?;
    mesh.start_agent(0)?;
    // The agent of node0 claims to be node1 (a compromised or misconfigured
    // agent): it asks for node1's workload with node0's token.
    let mut cmd = mesh.agent_command(1);
    // Same token as node 0's agent, pin dir of its own.
    let token0 = mesh.token_path(0);
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let mut fixed = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        fixed.push(a.clone());
        if a == "--ca-token-file" {
            it.next();
            fixed.push(token0.display().to_string());
        }
    }
    cmd = c.node(0).command(cmd.get_program());
    cmd.env("LOG_FORMAT", "json")
        .env("RUST_LOG", "info")
        .args(&fixed);
    let rogue = Proc::spawn(&mut cmd, "rogue agent")?;
    let want = identity(c.pod(1, 0));
    let refused = rogue.wait_for_json(PATIENCE, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("certificate request failed"))
            && v["identity"] == want
    })?;
    let err = refused["error"].as_str().unwrap_or_default();
    assert!(err.contains("PERMISSION_DENIED"), "{refused}");
    assert!(
        err.contains(&c.node(0).name),
        "the refusal names the node: {err}"
    );
    // The CA counted it.
    let metrics = c
        .node(0)
        .exec("curl", ["-sS", "http://127.0.0.1:15014/metrics"])?;
    let text = String::from_utf8_lossy(&metrics.stdout);
    let denied: f64 = text
        .lines()
        .find(|l| l.starts_with("weft_ca_requests_total{result=\"denied\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no denied counter in:\n{text}"))?;
    assert!(denied >= 1.0, "{text}");
    // The honest agent got its own certificate.
    assert!(eventually(PATIENCE, || !mesh
        .logs(0, |v| v["message"] == "certificate issued")
        .is_empty()));
    Ok(())
}
