//! Proves the virtual cluster itself, with no Weft component involved: real
//! cross-node and same-node connectivity over IPv4 and IPv6, commands landing
//! in the right namespace and cgroup, and complete teardown — also when the
//! test panics.

use std::net::{IpAddr, SocketAddr};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use weft_tests::Host as _;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::cluster::{NETNS_DIR, cgroup2_mount};
use weft_tests::{Cluster, PATIENCE, Pod, Proc, assert_eventually, require_privileged};

const TK: &str = env!("CARGO_BIN_EXE_weft-tk");
const PORT: u16 = 7000;
const EIGHT_MIB: u64 = 8 << 20;

/// Starts `weft-tk serve` on all addresses (v4 and v6) in `pod`.
fn start_server(pod: &Pod) -> Result<Proc> {
    weft_tests::tk::serve(pod, PORT)
}

/// The address with IPv4-mapped IPv6 turned back into IPv4, as a dual-stack
/// server reports IPv4 peers as `[::ffff:a.b.c.d]`.
fn canonical(addr: &str) -> Result<SocketAddr> {
    let a: SocketAddr = addr
        .parse()
        .with_context(|| format!("bad address {addr:?}"))?;
    Ok(SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// Moves 8 MiB each way from `from` to the server at `to` and checks both
/// ends: the client verified everything, the server verified the upload, and
/// the server saw the client pod's own address (nothing rewrote it).
fn transfer(from: &Pod, server: &Proc, to: SocketAddr, extra: &[&str]) -> Result<()> {
    let to = to.to_string();
    let mut args = vec![
        "client",
        "--connect",
        &to,
        "--upload",
        "8M",
        "--download",
        "8M",
    ];
    args.extend(extra);
    let out = from.exec(TK, &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .with_context(|| format!("client printed no report: {stdout:?}"))?;
    ensure!(
        out.status.success() && report["ok"] == true,
        "client {} → {to} failed: {report}\nstderr: {}",
        from.name,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        report["uploaded"] == EIGHT_MIB && report["downloaded"] == EIGHT_MIB,
        "{report}"
    );

    let local = canonical(report["local"].as_str().context("no local address")?)?;
    let expected: IpAddr = if to.starts_with('[') {
        from.ip6.into()
    } else {
        from.ip.into()
    };
    ensure!(
        local.ip() == expected,
        "client bound {local}, expected {expected}"
    );

    let seen = server.wait_for_json(PATIENCE, |v| {
        v["accepted"]
            .as_str()
            .and_then(|a| canonical(a).ok())
            .is_some_and(|a| a == local)
    })?;
    ensure!(
        seen["upload_ok"] == true && seen["bytes"] == EIGHT_MIB,
        "server: {seen}"
    );
    Ok(())
}

/// Bytes received so far by bridge port `port` (`n<i>`: traffic from node i).
fn fabric_rx_bytes(cluster: &Cluster, port: &str) -> Result<u64> {
    let out = Command::new("ip")
        .args([
            "-n",
            cluster.fabric_netns(),
            "-j",
            "-s",
            "link",
            "show",
            "dev",
            port,
        ])
        .output()?;
    ensure!(out.status.success(), "ip link show {port} failed");
    let links: Value = serde_json::from_slice(&out.stdout)?;
    links[0]["stats64"]["rx"]["bytes"]
        .as_u64()
        .with_context(|| format!("no rx bytes in {links}"))
}

#[test]
fn pods_talk_across_and_within_nodes() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let cluster = Cluster::new("pods_talk_across_and_within_nodes", 2, 2)?;
    let target = cluster.pod(1, 0);
    let server = start_server(target)?;
    let v4 = SocketAddr::new(target.ip.into(), PORT);
    let v6 = SocketAddr::new(target.ip6.into(), PORT);

    // Cross-node traffic really crosses the fabric: node 0's bridge port
    // carries at least the 8 MiB upload.
    let before = fabric_rx_bytes(&cluster, "n0")?;
    transfer(cluster.pod(0, 0), &server, v4, &[])?;
    let after = fabric_rx_bytes(&cluster, "n0")?;
    ensure!(
        after - before >= EIGHT_MIB,
        "only {} bytes crossed the fabric",
        after - before
    );

    transfer(cluster.pod(0, 0), &server, v6, &[])?;
    transfer(cluster.pod(0, 1), &server, v6, &["--respond-after-eof"])?;

    // Same-node traffic stays on the node: the node's bridge port sees
    // little more than neighbour discovery.
    let before = fabric_rx_bytes(&cluster, "n1")?;
    transfer(cluster.pod(1, 1), &server, v4, &[])?;
    transfer(cluster.pod(1, 1), &server, v6, &["--respond-after-eof"])?;
    let after = fabric_rx_bytes(&cluster, "n1")?;
    ensure!(
        after - before < EIGHT_MIB,
        "same-node traffic crossed the fabric"
    );
    Ok(())
}

#[test]
fn commands_run_in_the_pod_netns_and_cgroup() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let cluster = Cluster::new("commands_run_in_the_pod_netns_and_cgroup", 1, 2)?;
    let pod = cluster.pod(0, 1);
    let node = cluster.node(0);
    let relative = |p: &Path| -> Result<String> {
        Ok(format!(
            "0::/{}",
            p.strip_prefix(cgroup2_mount()?)?.display()
        ))
    };

    let cgroups = pod.exec_ok("cat", ["/proc/self/cgroup"])?;
    let expected = relative(&pod.cgroup)?;
    ensure!(
        cgroups.lines().any(|l| l == expected),
        "{cgroups} lacks {expected}"
    );

    let addrs = pod.exec_ok("ip", ["-o", "addr", "show", "dev", "eth0"])?;
    for ip in [pod.ip.to_string(), pod.ip6.to_string()] {
        ensure!(
            addrs.contains(&format!(" {ip}/")),
            "{ip} missing in\n{addrs}"
        );
    }

    // Node commands: node namespace, but no cluster cgroup.
    let cgroups = node.exec_ok("cat", ["/proc/self/cgroup"])?;
    ensure!(
        !cgroups.contains(cluster.id()),
        "node command in a cluster cgroup: {cgroups}"
    );
    let addrs = node.exec_ok("ip", ["-o", "addr", "show", "dev", "eth0"])?;
    ensure!(addrs.contains(&format!(" {}/", node.ip)), "{addrs}");

    // The harness reports failures with the program's stderr.
    let err = pod.exec_ok("ls", ["/nonexistent"]).unwrap_err();
    ensure!(format!("{err:#}").contains("nonexistent"), "{err:#}");
    Ok(())
}

/// Asserts that nothing of a cluster with these namespaces and root cgroup
/// is left on the system.
fn assert_gone(netns: &[String], cgroup: &Path) -> Result<()> {
    ensure!(!netns.is_empty());
    let listed = Command::new("ip").args(["netns", "list"]).output()?;
    let listed = String::from_utf8_lossy(&listed.stdout);
    for ns in netns {
        ensure!(
            !Path::new(NETNS_DIR).join(ns).exists(),
            "{ns} still in {NETNS_DIR}"
        );
        ensure!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(ns)),
            "{ns} listed"
        );
    }
    ensure!(!cgroup.exists(), "{} still exists", cgroup.display());
    Ok(())
}

#[test]
fn drop_removes_namespaces_cgroups_and_processes() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let cluster = Cluster::new("drop_removes_namespaces_cgroups_and_processes", 2, 1)?;
    let netns = cluster.netns_names().to_vec();
    let cgroup = cluster.cgroup().to_path_buf();
    ensure!(netns.len() == 5 && netns.iter().all(|ns| ns.contains(cluster.id())));
    ensure!(cgroup.join("n1/p0").is_dir());

    // Processes nobody cleans up: one in a pod cgroup, one only in a node
    // namespace. Teardown must kill both.
    let mut in_pod = cluster.pod(1, 0).command("sleep").arg("1000").spawn()?;
    let mut in_node = cluster.node(0).command("sleep").arg("1000").spawn()?;
    drop(cluster);

    assert_gone(&netns, &cgroup)?;
    assert_eventually!(
        in_pod.try_wait().is_ok_and(|s| s.is_some()),
        "pod process survived"
    );
    assert_eventually!(
        in_node.try_wait().is_ok_and(|s| s.is_some()),
        "node process survived"
    );
    Ok(())
}

#[test]
fn panicking_test_still_tears_down() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let created: Mutex<Option<(Vec<String>, PathBuf)>> = Mutex::new(None);
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        let cluster = Cluster::new("panicking_test_still_tears_down", 1, 1).unwrap();
        let _server = start_server(cluster.pod(0, 0)).unwrap();
        *created.lock().unwrap() = Some((
            cluster.netns_names().to_vec(),
            cluster.cgroup().to_path_buf(),
        ));
        panic!("deliberate panic while a cluster is up");
    }));
    ensure!(outcome.is_err(), "the closure should have panicked");
    let (netns, cgroup) = created
        .into_inner()
        .unwrap()
        .context("cluster never built")?;
    assert_gone(&netns, &cgroup)
}

#[test]
fn rejects_impossible_sizes() {
    assert!(Cluster::new("rejects_impossible_sizes", 0, 1).is_err());
    assert!(Cluster::new("rejects_impossible_sizes", 251, 1).is_err());
    assert!(Cluster::new("rejects_impossible_sizes", 1, 251).is_err());
}
