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
    Cluster, Mesh, PATIENCE, Pod, Proc,
    cluster::Host as _,
    eventually,
    mesh::identity,
    probe::{CertKey, HBONE_PORT, Probe},
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
        // Between pods of one node, the agent connects them itself.
        let security = if src.node == dst.node {
            "node_local"
        } else {
            "mutual_tls"
        };
        assert_eq!(line["security"], security);
        assert_eq!(line["end"], "closed", "{line}");
        let outbound = wait_access(&mesh, src.node, 1, |v| {
            v["direction"] == "outbound"
                && v["src.identity"] == identity(src)
                && v["dst.addr"] == addr(dst.ip)
        });
        let line = outbound.first().context("no outbound log")?;
        assert_eq!(line["dst.identity"], identity(dst));
        assert_eq!(line["security"], security);
    }
    Ok(())
}

/// Sockets in TIME_WAIT inside `pod` from the agent's inbound source address.
fn agent_time_waits(pod: &Pod) -> usize {
    pod.exec("ss", ["-Htn", "state", "time-wait", "src", "127.0.0.6"])
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
        .unwrap_or(0)
}

#[test]
fn finished_connections_do_not_use_up_the_ports_the_agent_reaches_applications_from() -> Result<()>
{
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_ports", 2, 2)?;
    // The shared loopback source is the one whose ports could run out.
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.agent_args = vec!["--inbound-source".into(), "loopback".into()];
    mesh.start_all()?;
    let dst = c.pod(1, 0);
    // Two local ports in the destination pod: what thousands of connections a
    // second leave behind, made small. The agent closes its side to the
    // application first, so each finished connection keeps one of them in
    // TIME_WAIT for a minute.
    let range = dst.exec("sysctl", ["-w", "net.ipv4.ip_local_port_range=40000 40001"])?;
    ensure!(range.status.success(), "sysctl: {range:?}");
    let (_a, _b) = (tk::echo(dst, PORT)?, tk::echo(dst, PORT + 1)?);
    let to = |port: u16| SocketAddr::new(dst.ip.into(), port).to_string();
    for i in 0..2 {
        say_ok(c.pod(0, 0), &to(PORT), &format!("filling port {i}"))?;
    }
    ensure!(
        eventually(PATIENCE, || agent_time_waits(dst) == 2),
        "expected both ports in TIME_WAIT, found {}",
        agent_time_waits(dst)
    );
    // Another application port, at once: a port in TIME_WAIT is only taken for
    // the same destination, so both are free for this one. From the other node
    // over HBONE, and from this node in-process.
    say_ok(c.pod(0, 0), &to(PORT + 1), "another port, over HBONE")?;
    say_ok(c.pod(1, 1), &to(PORT + 1), "another port, on this node")?;
    // The same application port again, once the TIME_WAITs are a second old:
    // the kernel may reuse them for a loopback source (`tcp_tw_reuse`).
    std::thread::sleep(Duration::from_millis(1500));
    say_ok(c.pod(0, 0), &to(PORT), "the same port again")?;
    Ok(())
}

/// The address each connection to `server` (an echo server) came from, as
/// the application saw it.
fn accepted_from(server: &Proc) -> Vec<IpAddr> {
    tk::accepted(server)
        .iter()
        .filter_map(|v| v["accepted"].as_str()?.parse::<SocketAddr>().ok())
        .map(|a| a.ip().to_canonical())
        .collect()
}

#[test]
fn applications_see_the_real_client_address() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_client_addr", 2, 2)?;
    let (remote, outsider, dst, neighbour) = (c.pod(0, 0), c.pod(0, 1), c.pod(1, 0), c.pod(1, 1));
    let mut mesh = Mesh::new(&c, |p| p.name != outsider.name)?;
    mesh.start_all()?;
    let echo = tk::echo(dst, PORT)?;
    let to = addr(dst.ip);
    // Over HBONE from another node, in-process from this node, and in
    // plaintext from a pod outside the mesh: each delivered from its own
    // address, and each still through the agent (the access log has it).
    for (from, security) in [
        (remote, "mutual_tls"),
        (neighbour, "node_local"),
        (outsider, "none"),
    ] {
        let before = accepted_from(&echo).len();
        say_ok(from, &to, "who am I")?;
        let seen = tk::wait_accepted(&echo, before + 1);
        let got = accepted_from(&echo);
        ensure!(
            got.last() == Some(&IpAddr::from(from.ip)),
            "from {}: the application saw {:?} ({seen:?})",
            from.name,
            got.last()
        );
        let line = wait_access(&mesh, 1, 1, |v| {
            v["direction"] == "inbound"
                && v["src.addr"]
                    .as_str()
                    .is_some_and(|a| a.starts_with(&format!("{}:", from.ip)))
        });
        let line = line.first().with_context(|| {
            format!(
                "no inbound access log for {}: {:?}",
                from.name,
                mesh.access_logs(1)
            )
        })?;
        ensure!(line["security"] == security, "{line}");
    }
    // Every connection still went through the agent: nothing reached the
    // application around it (the handover entries are gone once used).
    let inbound = mesh
        .access_logs(1)
        .into_iter()
        .filter(|v| v["direction"] == "inbound")
        .count();
    ensure!(inbound >= 3, "{inbound} inbound access-log lines");

    // The old behaviour, by switch: every peer is 127.0.0.6.
    mesh.stop_agent(1, false)?;
    mesh.agent_args = vec!["--inbound-source".into(), "loopback".into()];
    mesh.start_agent(1)?;
    let before = accepted_from(&echo).len();
    say_ok(remote, &to, "who am I now")?;
    tk::wait_accepted(&echo, before + 1);
    ensure!(
        accepted_from(&echo).last() == Some(&IpAddr::from([127, 0, 0, 6])),
        "with --inbound-source loopback: {:?}",
        accepted_from(&echo).last()
    );
    Ok(())
}

#[test]
fn with_same_node_hbone_pods_of_one_node_talk_over_mutual_tls_to_their_own_agent() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_same_hbone", 1, 2)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.agent_args = ["--same-node", "hbone"].map(String::from).to_vec();
    mesh.start_all()?;
    let (src, dst) = (c.pod(0, 0), c.pod(0, 1));
    let _echo = tk::echo(dst, PORT)?;
    say_ok(src, &addr(dst.ip), "over HBONE")?;
    for direction in ["outbound", "inbound"] {
        let lines = wait_access(&mesh, 0, 1, |v| {
            v["direction"] == direction && v["end"] == "closed"
        });
        let line = lines
            .first()
            .with_context(|| format!("no {direction} log"))?;
        assert_eq!(line["security"], "mutual_tls", "{line}");
        assert_eq!(line["src.identity"], identity(src), "{line}");
    }
    let out = wait_access(&mesh, 0, 1, |v| v["direction"] == "outbound");
    assert!(out[0]["hbone.connection"].as_u64().is_some(), "{}", out[0]);
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
    // It shares node 0's namespace with the honest agent: ports of its own.
    for flag in ["--metrics-addr", "--readiness-addr", "--admin-addr"] {
        fixed.extend([flag.into(), "127.0.0.1:0".into()]);
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

/// Starts `weft-tk say` in `from` in the background; its report is its last
/// stdout line.
fn say_bg(from: &Pod, to: &str, message: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = from.command(weft_tests::bin_path("weft-tk"));
    cmd.args(["say", "--connect", to, "--message", message])
        .args(extra);
    from.spawn(&mut cmd)
}

fn report(p: &Proc, within: Duration) -> Result<Value> {
    p.wait_for_json(within, |v| v.get("ok").is_some())
}

/// Outbound access-log lines of `node` to `dst`, with the pooled connection each
/// rode on.
fn connections_used(mesh: &Mesh, node: usize, dst: &str, n: usize) -> Vec<u64> {
    wait_access(mesh, node, n, |v| {
        v["direction"] == "outbound" && v["dst.addr"] == dst && v["end"] == "closed"
    })
    .iter()
    .filter_map(|v| v["hbone.connection"].as_u64())
    .collect()
}

#[test]
fn concurrent_connections_share_pooled_connections_up_to_the_cap_then_open_more() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_pool_cap", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    // One worker: one pool (each worker has its own).
    mesh.agent_args = [
        "--hbone-max-streams",
        "4",
        "--hbone-spread",
        "1",
        "--workers",
        "1",
    ]
    .map(String::from)
    .to_vec();
    mesh.start_all()?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(b, PORT)?;
    let to = addr(b.ip);
    // Ten connections held open together (the pool picks under a per-key lock,
    // so how they interleave does not matter).
    let held: Vec<Proc> = (0..10)
        .map(|i| say_bg(a, &to, &format!("held-{i}"), &["--hold-secs", "4"]))
        .collect::<Result<_>>()?;
    // While all ten are open: ceil(10 / 4) = 3 TLS connections from a to b:15008.
    let count = || -> usize {
        a.exec("ss", ["-Htn", "state", "established", "( dport = :15008 )"])
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0)
    };
    eventually(PATIENCE, || count() >= 3);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), 3, "HBONE connections from a to b");
    for p in &held {
        let r = report(p, Duration::from_secs(30))?;
        assert_eq!(r["ok"], true, "{r}");
    }
    let used = connections_used(&mesh, 0, &to, 10);
    let mut per_conn = std::collections::BTreeMap::new();
    for id in &used {
        *per_conn.entry(*id).or_insert(0) += 1;
    }
    assert_eq!(per_conn.len(), 3, "{per_conn:?}");
    assert!(per_conn.values().all(|n| *n <= 4), "{per_conn:?}");
    Ok(())
}

#[test]
fn small_exchanges_are_not_stalled_by_a_bulk_transfer_on_the_same_connection() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_pool_hol", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    // Worst case: everything on one connection (one worker, so one pool).
    mesh.agent_args = ["--hbone-spread", "1", "--workers", "1"]
        .map(String::from)
        .to_vec();
    mesh.start_all()?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let _srv = tk::serve(b, PORT + 1)?;
    let _echo = tk::echo(b, PORT)?;
    let bulk_to = SocketAddr::new(b.ip.into(), PORT + 1).to_string();
    let mut cmd = a.command(weft_tests::bin_path("weft-tk"));
    cmd.args([
        "client",
        "--connect",
        &bulk_to,
        "--upload",
        "4G",
        "--download",
        "4G",
    ]);
    let bulk = a.spawn(&mut cmd)?;
    // The bulk stream is flowing.
    ensure!(
        eventually(PATIENCE, || !mesh
            .logs(0, |v| v["message"] == "HBONE connection opened")
            .is_empty()),
        "no HBONE connection for the bulk transfer"
    );
    std::thread::sleep(Duration::from_millis(300));
    let to = addr(b.ip);
    for i in 0..20 {
        say_ok(a, &to, &format!("small-{i}"))?;
    }
    let bulk_running = bulk.json_lines().iter().all(|v| v.get("ok").is_none());
    assert!(
        bulk_running,
        "the bulk transfer ended before the small exchanges: the test proves nothing; make it bigger"
    );
    // All of them shared the bulk transfer's connection.
    let small = connections_used(&mesh, 0, &to, 20);
    assert_eq!(small.len(), 20);
    let opened = mesh.logs(0, |v| v["message"] == "HBONE connection opened");
    assert_eq!(
        opened.len(),
        1,
        "expected one shared connection: {opened:?}"
    );
    Ok(())
}

fn issued(mesh: &Mesh, node: usize, id: &str) -> Vec<String> {
    mesh.logs(node, |v| {
        v["message"] == "certificate issued" && v["identity"] == id
    })
    .iter()
    .filter_map(|v| v["serial"].as_str().map(str::to_owned))
    .collect()
}

#[test]
fn renewal_during_a_long_transfer_keeps_it_intact_and_new_connections_use_the_new_certificate()
-> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_renew", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    // 6 s certificates: renewed every ~3 s, so the original one is long expired
    // when the transfer ends.
    mesh.ca_args = ["--cert-ttl", "6s"].map(String::from).to_vec();
    mesh.agent_args = ["--cert-ttl", "6s"].map(String::from).to_vec();
    mesh.start_all()?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(b, PORT)?;
    let to = addr(b.ip);
    let first = issued(&mesh, 0, &identity(a));
    ensure!(!first.is_empty(), "no certificate issued at start");
    // 40 exchanges 250 ms apart on one connection: 10 s.
    let long = say_bg(
        a,
        &to,
        "long-lived",
        &["--repeat", "40", "--interval-ms", "250"],
    )?;
    ensure!(
        eventually(Duration::from_secs(20), || issued(&mesh, 0, &identity(a))
            .len()
            >= first.len() + 2),
        "the certificate was not renewed"
    );
    say_ok(a, &to, "after renewal")?;
    let r = report(&long, Duration::from_secs(30))?;
    assert_eq!(r["ok"], true, "the long transfer broke: {r}");
    let lines = wait_access(&mesh, 0, 2, |v| {
        v["direction"] == "outbound" && v["dst.addr"] == to && v["end"] == "closed"
    });
    let conns: Vec<u64> = lines
        .iter()
        .filter_map(|v| v["hbone.connection"].as_u64())
        .collect();
    assert_eq!(conns.len(), 2);
    assert_ne!(
        conns[0], conns[1],
        "the new connection reused the connection made with the old certificate"
    );
    Ok(())
}

#[test]
fn with_the_ca_down_existing_certificates_keep_working() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_ca_down", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.ca_args = ["--cert-ttl", "20s"].map(String::from).to_vec();
    // Idle pooled connections close after 1 s: every exchange below needs a new
    // TLS handshake, with the certificates the agents hold.
    mesh.agent_args = ["--cert-ttl", "20s", "--hbone-idle", "1s"]
        .map(String::from)
        .to_vec();
    mesh.start_all()?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(b, PORT)?;
    let _echo_a = tk::echo(a, PORT)?;
    let to = addr(b.ip);
    say_ok(a, &to, "before")?;
    mesh.stop_ca()?;
    // The renewal at half life (~10 s) fails...
    ensure!(
        eventually(Duration::from_secs(30), || !mesh
            .logs(0, |v| v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("certificate request failed"))
                && v["identity"] == identity(a))
            .is_empty()),
        "no failed renewal logged"
    );
    // ...and the current certificates keep serving new connections, both ways.
    let before = mesh
        .logs(0, |v| v["message"] == "HBONE connection opened")
        .len();
    say_ok(a, &to, "CA down")?;
    say_ok(b, &addr(a.ip), "CA down, other way")?;
    let after = mesh
        .logs(0, |v| v["message"] == "HBONE connection opened")
        .len();
    assert!(
        after > before,
        "no new TLS connection was made with the CA down"
    );
    // The agent's metrics say so: a failed request, and an expiry still ahead.
    let out = c
        .node(0)
        .exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let value = |name: &str| -> Option<f64> {
        let prefix = format!("{name}{{identity=\"{}\"}} ", identity(a));
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
    };
    assert_eq!(
        value("weft_certificate_last_request_failed"),
        Some(1.0),
        "{text}"
    );
    let expiry = value("weft_certificate_expiry_timestamp_seconds").context("no expiry metric")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs_f64();
    assert!(
        expiry > now,
        "expiry {expiry} is not ahead of {now}:\n{text}"
    );
    Ok(())
}

fn ca_counter(c: &Cluster, result: &str) -> Result<f64> {
    let out = c
        .node(0)
        .exec("curl", ["-sS", "http://127.0.0.1:15014/metrics"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("weft_ca_requests_total{{result=\"{result}\"}} ")))
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no {result} counter in:\n{text}"))
}

#[test]
fn a_ca_embedded_in_an_agent_serves_every_node_behind_the_same_boundary() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_embedded_ca", 3, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.embedded_ca = true;
    // Node 2's agent presents a token the CA does not know.
    std::fs::write(mesh.token_path(2), "not-a-token-the-ca-knows-0000")?;
    mesh.start_all()?;
    assert!(
        !mesh.logs(0, |v| v["message"] == "ca ready").is_empty(),
        "node 0's agent did not start the CA"
    );
    let (a, b, x) = (c.pod(0, 0), c.pod(1, 0), c.pod(2, 0));
    // Both honest nodes got their certificates from node 0's agent, over the CSR
    // protocol: node 0 from itself, node 1 across the wire.
    for (node, pod) in [(0, a), (1, b)] {
        ensure!(
            !issued(&mesh, node, &identity(pod)).is_empty(),
            "node {node} has no certificate for {}",
            pod.name
        );
    }
    assert!(ca_counter(&c, "signed")? >= 2.0);

    // The same boundary as a separate CA: an unknown token is refused, said so
    // and counted.
    let refused = mesh.agent(2).wait_for_json(PATIENCE, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("certificate request failed"))
            && v["identity"] == identity(x)
    })?;
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("UNAUTHENTICATED")),
        "{refused}"
    );
    assert!(ca_counter(&c, "unauthenticated")? >= 1.0);

    // Traffic both ways between the honest nodes is mutual TLS with the right
    // identities.
    let _echo_a = tk::echo(a, PORT)?;
    let _echo_b = tk::echo(b, PORT)?;
    say_ok(a, &addr(b.ip), "a to b")?;
    say_ok(b, &addr(a.ip), "b to a")?;
    let inbound = wait_access(&mesh, 1, 1, |v| {
        v["direction"] == "inbound" && v["end"] == "closed"
    });
    assert_eq!(inbound[0]["security"], "mutual_tls", "{}", inbound[0]);
    assert_eq!(inbound[0]["src.identity"], identity(a));

    // The CA's root outlives the agent it runs in: after a restart of node 0's
    // agent its new certificates still verify at node 1, which kept its bundle.
    mesh.stop_agent(0, false)?;
    mesh.start_agent(0)?;
    say_ok(b, &addr(a.ip), "b to a, after node 0 restarted")?;
    say_ok(a, &addr(b.ip), "a to b, after node 0 restarted")?;
    Ok(())
}

/// A fresh root certificate and key (PEM), made as docs/config.md says: a
/// `weft ca` started on an empty directory writes a pair.
fn fresh_root(mesh: &Mesh) -> Result<(String, String)> {
    let dir = mesh.ca_dir().with_extension("next-root");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut cmd = std::process::Command::new(weft_tests::bin_path("weft"));
    cmd.env("LOG_FORMAT", "json")
        .arg("ca")
        .arg("--dir")
        .arg(&dir)
        .arg("--config")
        .arg(mesh.config_path())
        .arg("--node-tokens")
        .arg(mesh.node_tokens_path())
        .args(["--listen", "127.0.0.1:0", "--metrics-addr", "127.0.0.1:0"]);
    let ca = Proc::spawn(&mut cmd, "weft ca (a new root)")?;
    ca.wait_for_json(PATIENCE, |v| v["message"] == "ca ready")?;
    drop(ca);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).with_context(|| f.to_owned());
    let pair = (read("root.pem")?, read("root-key.pem")?);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(pair)
}

#[test]
fn the_documented_root_rotation_drops_no_connection_and_the_old_root_is_refused_after() -> Result<()>
{
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("mtls_rotation", 2, 1)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::new(&c, |_| true)?;
    // Short-lived certificates, so renewal (at half life) comes within the test.
    mesh.agent_args = vec!["--cert-ttl".into(), "16s".into()];
    mesh.start_all()?;
    let _echo = tk::echo(b, PORT)?;
    let to = addr(b.ip);
    say_ok(a, &to, "before the rotation")?;
    let old = mesh.authority()?;
    let ca_dir = mesh.ca_dir();
    let old_root = std::fs::read_to_string(ca_dir.join("root.pem"))?;
    // One connection that lives through the whole rotation (200 echoes, 200 ms
    // apart).
    let long = say_bg(
        a,
        &to,
        "still here",
        &["--repeat", "200", "--interval-ms", "200"],
    )?;
    let reloaded = |mesh: &Mesh, roots: u64| {
        (0..2).all(|n| {
            !mesh
                .logs(n, |v| {
                    v["message"] == "trust bundle reloaded" && v["roots"] == roots
                })
                .is_empty()
        })
    };

    // 1. The new root joins the bundle; every agent reads it.
    let (new_root, new_key) = fresh_root(&mesh)?;
    std::fs::create_dir_all(ca_dir.join("trusted"))?;
    std::fs::write(ca_dir.join("trusted/next.pem"), &new_root)?;
    mesh.stop_ca()?;
    mesh.start_ca()?;
    ensure!(
        eventually(PATIENCE, || reloaded(&mesh, 2)),
        "the agents did not read the two-root bundle"
    );

    // 2. Swap: the new root signs, the old one is only trusted. The agents
    // must trust the CA under its new root, and renew under it.
    std::fs::write(ca_dir.join("root.pem"), &new_root)?;
    std::fs::write(ca_dir.join("root-key.pem"), &new_key)?;
    std::fs::write(ca_dir.join("trusted/next.pem"), &old_root)?;
    mesh.stop_ca()?;
    mesh.start_ca()?;
    let before: Vec<usize> = [(0, a), (1, b)]
        .iter()
        .map(|(n, p)| issued(&mesh, *n, &identity(p)).len())
        .collect();
    ensure!(
        eventually(Duration::from_secs(20), || {
            [(0, a), (1, b)]
                .iter()
                .zip(&before)
                .all(|((n, p), was)| issued(&mesh, *n, &identity(p)).len() > *was)
        }),
        "the agents did not renew from the CA under its new root"
    );
    say_ok(a, &to, "after the swap")?;

    // 3. The old root leaves the bundle: nothing of it is trusted any more.
    std::fs::remove_file(ca_dir.join("trusted/next.pem"))?;
    mesh.stop_ca()?;
    mesh.start_ca()?;
    ensure!(
        eventually(PATIENCE, || reloaded(&mesh, 1)),
        "the agents did not read the one-root bundle"
    );
    say_ok(a, &to, "after the old root left")?;
    let stale = CertKey::issue(&old, &identity(a), Duration::from_secs(3600))?;
    let probe = Probe::connect(b.ip, HBONE_PORT, &to)
        .cert(stale)
        .run(&a.netns_path)?;
    ensure!(
        probe.outcome.refused_before_status(),
        "a certificate of the removed root was accepted: {probe:?}"
    );

    // The connection made before the rotation lived through all of it.
    let r = report(&long, Duration::from_secs(60))?;
    ensure!(r["ok"] == true, "the long-lived connection broke: {r}");
    Ok(())
}

#[test]
fn a_connection_to_a_port_nobody_listens_on_is_refused_at_once() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    // The agent hands a connection to the application from the client's own
    // address: the RST of a closed port must come back to the agent (it is
    // marked like the SYN it answers), not go to the real client and be lost,
    // which left the agent waiting out its 10 s connect timeout.
    let c = Cluster::new("closed-port", 2, 2)?;
    let _mesh = Mesh::start(&c, |_| true)?;
    // curl gives up after 5 s (exit 28), well before the agent's connect
    // timeout: the refusal must come first (a reset, 56, or a refused connect,
    // 7), over HBONE and in-process.
    for (from, to) in [(c.pod(0, 0), c.pod(1, 1)), (c.pod(1, 0), c.pod(1, 1))] {
        let out = from.exec(
            "curl",
            ["-sS", "-m", "5", &format!("http://{}/", addr(to.ip))],
        )?;
        assert!(
            matches!(out.status.code(), Some(7 | 56)),
            "{} -> {}: {}",
            from.name,
            to.name,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
