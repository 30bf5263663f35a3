//! Kernel capture end to end, in the virtual cluster: enrolled pods' TCP is handed
//! to their node's agent by the eBPF programs, forwarded to where the application
//! meant it to go, and steered into the destination's agent on arrival. Everything
//! here is real: programs loaded into the kernel, namespaces, veths, `weft agent`
//! processes, and `weft-tk` moving verified bytes.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::tk;
use weft_tests::{
    Cluster, Mesh, PATIENCE, Pod, Proc,
    cluster::Host as _,
    eventually, require_privileged,
    tk::{accepted, client, wait_accepted},
};

const PORT: u16 = 9000;
const HEADER: u64 = 24; // weft-tk's request header
const MIB: u64 = 1 << 20;

fn server(pod: &Pod) -> Result<Proc> {
    tk::serve(pod, PORT)
}

fn client_ok(from: &Pod, to: &str, upload: u64, download: u64, extra: &[&str]) -> Result<Value> {
    let r = client(from, to, upload, download, extra)?;
    ensure!(r["ok"] == true, "{} → {to} failed: {r}", from.name);
    Ok(r)
}

fn peer_ip(line: &Value) -> IpAddr {
    let a: SocketAddr = line["accepted"].as_str().unwrap().parse().unwrap();
    a.ip().to_canonical()
}

fn addr(ip: impl Into<IpAddr>) -> String {
    SocketAddr::new(ip.into(), PORT).to_string()
}

/// Waits for an access-log line of `node`'s agent matching `pred`.
fn wait_access(mesh: &Mesh, node: usize, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let mut found = None;
    eventually(PATIENCE, || {
        found = mesh.access_logs(node).into_iter().find(|v| pred(v));
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "node {node}: no access log for {what}; have: {:#?}",
            mesh.access_logs(node)
        )
    })
}

fn is(v: &Value, direction: &str, dst: &str) -> bool {
    v["direction"] == direction && v["dst.addr"] == dst
}

#[test]
fn bulk_64mib_each_way_arrives_intact_across_nodes_and_on_one_node() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_bulk", 2, 2)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let client_pod = c.pod(0, 0);
    for dst_pod in [c.pod(1, 0), c.pod(0, 1)] {
        let srv = server(dst_pod)?;
        let to = addr(dst_pod.ip);
        let r = client_ok(client_pod, &to, 64 * MIB, 64 * MIB, &[])?;
        // The application sees the address it dialed, not the agent's listener.
        assert_eq!(r["peer"], to);

        let out = wait_access(&mesh, 0, "outbound", |v| is(v, "outbound", &to));
        assert_eq!(out["workload"], format!("default/{}", client_pod.name));
        assert_eq!(out["bytes_sent"], 64 * MIB + HEADER);
        assert_eq!(out["bytes_received"], 64 * MIB);
        assert_eq!(out["end"], "closed");

        let inb = wait_access(&mesh, dst_pod.node, "inbound", |v| is(v, "inbound", &to));
        assert_eq!(inb["workload"], format!("default/{}", dst_pod.name));
        assert_eq!(inb["bytes_sent"], 64 * MIB + HEADER);
        assert_eq!(inb["bytes_received"], 64 * MIB);
        // The server verified every byte, and was reached through its own agent.
        let seen = wait_accepted(&srv, 1);
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0]["upload_ok"], true);
        assert_eq!(seen[0]["bytes"], 64 * MIB);
        // From the client's own address (see `--inbound-source`).
        assert_eq!(peer_ip(&seen[0]), IpAddr::from(client_pod.ip));
    }
    Ok(())
}

#[test]
fn pods_not_enrolled_connect_directly_and_the_agent_sees_nothing() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_not_enrolled", 2, 2)?;
    // Only n0p1 is enrolled: the agents run and capture, but not these pods.
    let mesh = Mesh::start(&c, |p| p.node == 0 && p.index == 1)?;
    let srv = server(c.pod(1, 0))?;
    client_ok(c.pod(0, 0), &addr(c.pod(1, 0).ip), MIB, MIB, &[])?;
    client_ok(c.pod(0, 0), &addr(c.pod(1, 0).ip6), MIB, MIB, &[])?;
    let seen = wait_accepted(&srv, 2);
    assert_eq!(seen.len(), 2);
    assert_eq!(peer_ip(&seen[0]), IpAddr::from(c.pod(0, 0).ip));
    assert_eq!(peer_ip(&seen[1]), IpAddr::from(c.pod(0, 0).ip6));
    // Give a wrongly captured connection time to show up in the logs.
    std::thread::sleep(Duration::from_millis(300));
    assert!(mesh.access_logs(0).is_empty(), "{:?}", mesh.access_logs(0));
    assert!(mesh.access_logs(1).is_empty(), "{:?}", mesh.access_logs(1));
    Ok(())
}

#[test]
fn ipv6_and_ipv4_mapped_destinations_are_captured_and_getpeername_shows_them() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_ipv6", 2, 1)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let dst = c.pod(1, 0);
    let srv = server(dst)?;
    let v6 = addr(dst.ip6);
    let mapped = format!("[::ffff:{}]:{PORT}", dst.ip);
    for (dialed, forwarded_to) in [(v6.clone(), v6.clone()), (mapped, addr(dst.ip))] {
        let r = client_ok(c.pod(0, 0), &dialed, 4 * MIB, 4 * MIB, &[])?;
        assert_eq!(r["peer"], dialed, "getpeername must return what was dialed");
        let out = wait_access(&mesh, 0, &dialed, |v| is(v, "outbound", &forwarded_to));
        assert_eq!(out["bytes_received"], 4 * MIB);
    }
    assert_eq!(wait_accepted(&srv, 2).len(), 2);
    Ok(())
}

#[test]
fn half_close_client_still_receives_the_full_response() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_half_close", 2, 1)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let _srv = server(c.pod(1, 0))?;
    let to = addr(c.pod(1, 0).ip);
    // The server answers only after it has seen the client's FIN: the proxy must
    // pass the FIN on and keep the response direction open.
    client_ok(c.pod(0, 0), &to, MIB, 8 * MIB, &["--respond-after-eof"])?;
    let out = wait_access(&mesh, 0, "half-closed", |v| is(v, "outbound", &to));
    assert_eq!(out["end"], "closed");
    assert_eq!(out["bytes_received"], 8 * MIB);
    Ok(())
}

#[test]
fn the_agents_own_connections_are_never_captured_even_inside_the_capture_cgroup() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_no_loop", 2, 1)?;
    let mesh = Mesh::start(&c, |_| true)?;
    // Move each agent into the cgroup its programs are attached to (as when they
    // attach at the cgroup root in production): only the socket mark now keeps
    // its own connects, including those made inside pod namespaces, from capture.
    for n in c.nodes() {
        let pid = mesh.agent(n.index).pid();
        std::fs::write(n.cgroup.join("cgroup.procs"), pid.to_string())?;
    }
    let _srv = server(c.pod(1, 0))?;
    let to = addr(c.pod(1, 0).ip);
    for _ in 0..3 {
        client_ok(c.pod(0, 0), &to, MIB, MIB, &[])?;
    }
    let count = |node: usize, dir: &str| {
        mesh.access_logs(node)
            .iter()
            .filter(|v| v["direction"] == dir)
            .count()
    };
    eventually(PATIENCE, || {
        count(0, "outbound") >= 3 && count(1, "inbound") >= 3
    });
    // Then give a loop time to show: as extra (or endless) outbound entries on node 0.
    std::thread::sleep(Duration::from_millis(300));
    let outbound: Vec<_> = mesh
        .access_logs(0)
        .into_iter()
        .filter(|v| v["direction"] == "outbound")
        .collect();
    assert_eq!(outbound.len(), 3, "{outbound:#?}");
    assert!(outbound.iter().all(|v| v["dst.addr"] == to));
    let inbound = mesh.access_logs(1);
    assert_eq!(inbound.len(), 3, "{inbound:#?}");
    Ok(())
}

#[test]
fn enroll_and_unenroll_at_runtime_and_a_bad_config_keeps_the_last_good_one() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_runtime", 2, 1)?;
    let mut mesh = Mesh::start(&c, |_| false)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let srv = server(b)?;
    let to = addr(b.ip);
    let outbound = |mesh: &Mesh| {
        mesh.access_logs(0)
            .iter()
            .filter(|v| v["direction"] == "outbound")
            .count()
    };

    client_ok(a, &to, MIB, MIB, &[])?;
    assert_eq!(peer_ip(&wait_accepted(&srv, 1)[0]), IpAddr::from(a.ip));
    assert_eq!(outbound(&mesh), 0);

    mesh.set_enrolled(a, true)?;
    client_ok(a, &to, MIB, MIB, &[])?;
    wait_access(&mesh, 0, "after enroll", |v| is(v, "outbound", &to));

    // A broken file is reported and changes nothing.
    let good = mesh.config_text();
    mesh.write_raw_config("workloads:\n- name: [broken\n")?;
    let rejected = eventually(PATIENCE, || {
        !mesh
            .logs(0, |v| {
                v["message"] == "config rejected; the last good config keeps serving"
            })
            .is_empty()
    });
    assert!(rejected, "the agent did not report the broken config");
    client_ok(a, &to, MIB, MIB, &[])?;
    assert!(eventually(PATIENCE, || outbound(&mesh) == 2));
    mesh.write_raw_config(&good)?;

    mesh.set_enrolled(a, false)?;
    client_ok(a, &to, MIB, MIB, &[])?;
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(outbound(&mesh), 2, "capture must stop after unenroll");
    let seen = wait_accepted(&srv, 4);
    assert_eq!(peer_ip(seen.last().unwrap()), IpAddr::from(a.ip));
    Ok(())
}

/// Issue 19 item 1: a file that would empty the mesh (0 bytes, whitespace, a
/// valid file without the enrolled workloads) is refused while the enrolled pods
/// keep talking over mutual TLS; one that says `allow_shrink: true` is applied,
/// and the pods whose entries vanished are kept captured, failing closed, never
/// falling back to plaintext.
#[test]
fn a_config_that_empties_the_mesh_is_refused_and_pods_never_fall_back_to_plaintext() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_empty", 2, 1)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let srv = server(b)?;
    let to = addr(b.ip);
    let mtls_in = |mesh: &Mesh| {
        mesh.access_logs(1)
            .iter()
            .filter(|v| v["direction"] == "inbound" && v["security"] == "mutual_tls")
            .count()
    };
    let rejected = |mesh: &Mesh| {
        mesh.logs(0, |v| {
            v["message"] == "config rejected; the last good config keeps serving"
        })
        .len()
    };
    let reload_ok = |node: usize| -> Result<String> {
        let out = c
            .node(node)
            .exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .find(|l| l.starts_with("weft_config_last_reload_successful "))
            .unwrap_or_default()
            .to_string())
    };
    assert_eq!(reload_ok(0)?, "weft_config_last_reload_successful 1");

    client_ok(a, &to, MIB, MIB, &[])?;
    assert!(eventually(PATIENCE, || mtls_in(&mesh) == 1));

    let good = mesh.config_text();
    let emptying = [
        "",
        "  \n\n\t\n",
        "# truncated by a careless rewrite\n",
        "workloads: []\n",
    ];
    for (round, text) in (1..).zip(emptying) {
        mesh.write_raw_config(text)?;
        assert!(
            eventually(PATIENCE, || rejected(&mesh) >= round),
            "the agent did not refuse {text:?}"
        );
        assert_eq!(reload_ok(0)?, "weft_config_last_reload_successful 0");
        client_ok(a, &to, MIB, MIB, &[])?;
        assert!(
            eventually(PATIENCE, || mtls_in(&mesh) == round + 1),
            "after {text:?} the connection did not go over mutual TLS"
        );
    }
    let served = accepted(&srv).len();

    // Said on purpose: applied, yet the vanished pods stay captured and refuse
    // rather than send in plaintext.
    mesh.write_raw_config("allow_shrink: true\nworkloads: []\n")?;
    assert!(eventually(PATIENCE, || {
        reload_ok(0).is_ok_and(|l| l == "weft_config_last_reload_successful 1")
    }));
    let r = client(a, &to, MIB, MIB, &["--timeout-secs", "5"])?;
    assert_eq!(
        r["ok"], false,
        "a vanished enrolled pod sent in plaintext: {r}"
    );
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        accepted(&srv).len(),
        served,
        "the server saw a plaintext connection"
    );

    mesh.write_raw_config(&good)?;
    assert!(eventually(PATIENCE, || {
        client(a, &to, MIB, MIB, &["--timeout-secs", "5"]).is_ok_and(|r| r["ok"] == true)
    }));
    assert!(eventually(PATIENCE, || mtls_in(&mesh) > emptying.len() + 1));
    Ok(())
}

#[test]
fn agent_restart_keeps_capture_attached_and_fails_closed_meanwhile() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_restart", 2, 1)?;
    let mut mesh = Mesh::start(&c, |_| true)?;
    let srv = server(c.pod(1, 0))?;
    let to = addr(c.pod(1, 0).ip);
    client_ok(c.pod(0, 0), &to, MIB, MIB, &[])?;

    // `served`: connections the server has completed before this round.
    for (served, node) in (1..).zip([0, 1]) {
        // A crash: nothing gets to clean up.
        mesh.stop_agent(node, true)?;
        assert!(mesh.pin_dir(node).join("links/weft_connect4").exists());
        // While the agent is away, the enrolled pods' traffic is refused (outbound
        // capture and inbound steering are still attached) and never bypasses
        // the mesh to reach the application.
        let before = wait_accepted(&srv, served).len();
        let r = client(c.pod(0, 0), &to, MIB, MIB, &["--timeout-secs", "5"])?;
        assert_eq!(r["ok"], false, "node {node} agent down, yet: {r}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(accepted(&srv).len(), before);

        mesh.start_agent(node)?;
        let reused = mesh.logs(node, |v| v["message"] == "reusing pinned link");
        assert_eq!(reused.len(), 5, "all cgroup links are reused: {reused:?}");
        client_ok(c.pod(0, 0), &to, MIB, MIB, &[])?;
        wait_access(&mesh, node, "after restart", |v| v["dst.addr"] == to);
    }
    Ok(())
}

/// An upgrade as the DaemonSet rolls it (`maxSurge: 1`): the successor starts
/// beside the running agent, takes the node's endpoints from it, and serves
/// the pods beside it until the predecessor is stopped. Connections made one
/// after another both ways through the node the whole time (outbound from
/// the pod, inbound to it over HBONE) must all get through.
#[test]
fn an_agent_hands_its_node_to_a_successor_without_refusing_a_connection() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    const ECHO: u16 = 9100;
    let c = Cluster::new("capture_succession", 2, 1)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::start(&c, |_| true)?;
    let _echo_a = tk::echo(a, ECHO)?;
    let _echo_b = tk::echo(b, ECHO)?;
    let load = |from: &Pod, to: std::net::Ipv4Addr| -> Result<Proc> {
        let mut cmd = from.command(weft_tests::bin_path("weft-tk"));
        let to = SocketAddr::new(to.into(), ECHO).to_string();
        cmd.args(["conn-rate", "--connect", &to, "--count", "1000000"])
            .args(["--size", "64", "--for-secs", "8", "--timeout-secs", "5"]);
        from.spawn(&mut cmd)
    };
    let out = load(a, b.ip)?;
    let inbound = load(b, a.ip)?;
    std::thread::sleep(Duration::from_millis(500));

    let mut old = mesh.start_successor(0)?;
    old.wait_for_json(PATIENCE, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("a successor agent started on this node"))
    })?;
    let ready = |node: usize| {
        c.node(node)
            .exec_ok("curl", ["-sS", "http://127.0.0.1:15021/healthz/ready"])
    };
    ensure!(
        ready(0)? == "ready\n",
        "the node's readiness is not the successor's"
    );
    // Both serve the pods for a while.
    std::thread::sleep(Duration::from_secs(2));
    old.signal(libc::SIGTERM)?;
    let status = old.wait_timeout(Duration::from_secs(15))?;
    ensure!(status.success(), "the predecessor exited with {status}");
    let stopped = old.wait_for_json(PATIENCE, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("agent stopped"))
    })?;
    ensure!(
        stopped["connections_cut"] == 0,
        "the predecessor cut connections: {stopped}"
    );

    for (what, load) in [("a → b", out), ("b → a", inbound)] {
        let r = load.wait_for_json(Duration::from_secs(30), |v| v.get("ok").is_some())?;
        ensure!(r["ok"] == true, "{what} failed during the handover: {r}");
        ensure!(
            r["count"].as_u64().unwrap_or(0) >= 100,
            "{what}: too few connections to say anything: {r}"
        );
    }
    // The successor alone serves the node now, endpoints and pods.
    ensure!(ready(0)? == "ready\n");
    let served = |dir: &str| {
        mesh.access_logs(0)
            .iter()
            .filter(|v| v["direction"] == dir)
            .count()
    };
    ensure!(
        served("outbound") > 0 && served("inbound") > 0,
        "the successor served no connection: {} out, {} in",
        served("outbound"),
        served("inbound")
    );
    for (from, to) in [(a, b), (b, a)] {
        let r = tk::say(
            from,
            &SocketAddr::new(to.ip.into(), ECHO).to_string(),
            "after",
            &[],
        )?;
        ensure!(r["ok"] == true, "after the handover: {r}");
    }
    Ok(())
}

/// What an agent of an earlier build leaves: a pinned link whose program is
/// not this build's. Here one that lets everything through untouched (`r0 =
/// 1; exit`), of `prog_type` for `attach_type`, attached to `target` (a
/// cgroup or a network namespace) and pinned at `pin`, with raw `bpf()`
/// calls.
fn pin_a_pass_through(prog_type: u32, attach_type: u32, target: &Path, pin: &Path) -> Result<()> {
    use std::os::{fd::AsRawFd, unix::ffi::OsStrExt};
    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<i32> {
        // SAFETY: a live attribute struct of the size given; its pointers
        // point at memory that outlives the call.
        let rc =
            unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
        ensure!(rc >= 0, "bpf({cmd}): {}", std::io::Error::last_os_error());
        Ok(rc as i32)
    }
    // mov64 r0, 1; exit
    let insns: [u64; 2] = [0x0000_0001_0000_00b7, 0x0000_0000_0000_0095];
    let license = c"GPL";
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let mut load = ProgLoad {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
        prog_name: *b"weft_old_build\0\0",
        prog_ifindex: 0,
        expected_attach_type: attach_type,
    };
    let prog = bpf(5, &mut load)?; // BPF_PROG_LOAD
    let target = std::fs::File::open(target)?;
    #[repr(C)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
    }
    let mut create = LinkCreate {
        prog_fd: prog as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    let link = bpf(28, &mut create)?; // BPF_LINK_CREATE
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())?;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut obj = ObjPin {
        pathname: path.as_ptr() as u64,
        bpf_fd: link as u32,
        file_flags: 0,
    };
    let pinned = bpf(6, &mut obj); // BPF_OBJ_PIN
    // SAFETY: descriptors the kernel returned above, closed once; the pin
    // keeps the link (and its program) alive.
    unsafe {
        libc::close(link);
        libc::close(prog);
    }
    pinned.map(drop)
}

/// An upgrade whose build changes a program: the new agent finds the links
/// pinned (the capture stays attached through it) and gives each its own
/// program in place, so the fix reaches the node without an uninstall.
#[test]
fn an_agent_gives_a_pinned_link_its_own_build_of_the_program() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_refresh", 2, 2)?;
    let (a, outsider, b) = (c.pod(0, 0), c.pod(0, 1), c.pod(1, 0));
    // `outsider` is not in the mesh: its connections arrive in plaintext,
    // which only `sk_lookup` steers to the agent.
    let mut mesh = Mesh::new(&c, |p| p.name != outsider.name)?;
    let links = mesh.pin_dir(0).join("links");
    std::fs::create_dir_all(&links)?;
    const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
    const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    pin_a_pass_through(
        BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        BPF_CGROUP_INET4_CONNECT,
        &c.node(0).cgroup,
        &links.join("weft_connect4"),
    )?;
    mesh.start_all()?;
    let replaced = mesh.logs(0, |v| {
        v["message"]
            == "reusing pinned link; its program was another build's and is replaced in place"
    });
    ensure!(
        replaced.len() == 1 && replaced[0]["program"] == "weft_connect4",
        "{replaced:?}"
    );
    // The other four were this build's already.
    ensure!(
        mesh.logs(0, |v| v["message"] == "attached").len() == 4,
        "{:?}",
        mesh.logs(0, |v| v["message"] == "attached")
    );
    // The capture is this build's: a connect goes through the agent.
    let _srv = server(b)?;
    let to = addr(b.ip);
    client_ok(a, &to, MIB, MIB, &[])?;
    wait_access(&mesh, 0, "outbound after the replacement", |v| {
        v["direction"] == "outbound" && v["dst.addr"] == to
    });

    // A pod's sk_lookup link likewise, as the pod is enrolled: node 1's
    // agent away, the server pod's link is another build's.
    let cookie = mesh.logs(1, |v| {
        v["message"] == "pod enrolled" && v["workload"] == format!("default/{}", b.name)
    })[0]["netns_cookie"]
        .as_u64()
        .context("no cookie logged")?;
    mesh.stop_agent(1, true)?;
    let lookup = mesh.pin_dir(1).join(format!("links/lookup-{cookie}"));
    std::fs::remove_file(&lookup)?;
    const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
    const BPF_SK_LOOKUP: u32 = 36;
    pin_a_pass_through(
        BPF_PROG_TYPE_SK_LOOKUP,
        BPF_SK_LOOKUP,
        Path::new(&format!("/var/run/netns/{}", b.netns)),
        &lookup,
    )?;
    mesh.start_agent(1)?;
    ensure!(
        mesh.logs(1, |v| v["message"]
            == "the pod's sk_lookup link ran another build's program: replaced in place"
            && v["netns_cookie"] == cookie)
            .len()
            == 1,
        "the pod's link was not given this build's program"
    );
    // Inbound to the pod is the agent's again: a plaintext client outside
    // the mesh is steered to it (and logged), not let through to the server.
    client_ok(outsider, &to, MIB, MIB, &[])?;
    let from = outsider.ip.to_string();
    wait_access(&mesh, 1, "plaintext inbound after the replacement", |v| {
        v["direction"] == "inbound"
            && v["dst.addr"] == to
            && v["src.addr"]
                .as_str()
                .is_some_and(|s| s.starts_with(&format!("{from}:")))
    });
    Ok(())
}

/// `text` (the harness's mesh file) with `name`'s workload entry changed by
/// `edit` (given its lines; an empty result drops the entry).
fn edit_entry(text: &str, name: &str, edit: impl Fn(Vec<&str>) -> Vec<String>) -> String {
    let mut out = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if line != format!("- name: {name}") {
            out.push(line.to_owned());
            continue;
        }
        let mut entry = vec![line];
        while let Some(next) = lines.peek() {
            if !next.starts_with("  ") {
                break;
            }
            entry.push(lines.next().unwrap_or_default());
        }
        out.extend(edit(entry));
    }
    out.join("\n") + "\n"
}

#[test]
fn a_pod_gone_from_the_config_while_its_agent_was_away_stays_captured_until_unenrolled()
-> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_gone_away", 2, 1)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::start(&c, |_| true)?;
    let srv = server(b)?;
    let to = addr(b.ip);
    client_ok(a, &to, MIB, MIB, &[])?;

    // While node 0's agent is away, `a` leaves the config (the namespace
    // lives on). The restarted agent must not release its capture: leaving the
    // config is not unenrolling.
    mesh.stop_agent(0, false)?;
    let full = mesh.config_text();
    mesh.write_raw_config(&edit_entry(&full, &a.name, |_| Vec::new()))?;
    mesh.start_agent(0)?;
    let kept = |mesh: &Mesh| {
        !mesh
            .logs(0, |v| {
                v["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("a namespace a previous run enrolled"))
            })
            .is_empty()
    };
    ensure!(kept(&mesh), "no warning that the namespace stays captured");
    let before = accepted(&srv).len();
    let r = client(a, &to, MIB, MIB, &["--timeout-secs", "5"])?;
    ensure!(r["ok"] == false, "the pod got out around the mesh: {r}");
    std::thread::sleep(Duration::from_millis(200));
    ensure!(accepted(&srv).len() == before, "the server was reached");

    // `enrolled: false` is the explicit act: capture released, logged, and the
    // pod connects directly.
    let unenrolled = edit_entry(&full, &a.name, |entry| {
        entry
            .iter()
            .map(|l| l.replace("enrolled: true", "enrolled: false"))
            .collect()
    });
    mesh.write_raw_config(&unenrolled)?;
    ensure!(
        eventually(PATIENCE, || {
            !mesh
                .logs(0, |v| {
                    v["message"] == "capture removed: the config says `enrolled: false`"
                })
                .is_empty()
        }),
        "the agent did not release the capture on `enrolled: false`"
    );
    client_ok(a, &to, MIB, MIB, &[])?;

    // A namespace that is gone when its agent comes back is released.
    mesh.stop_agent(1, false)?;
    drop(srv);
    let del = Command::new("ip")
        .args(["netns", "del", &b.netns])
        .status()?;
    ensure!(del.success(), "ip netns del {}", b.netns);
    mesh.write_raw_config(&edit_entry(&unenrolled, &b.name, |_| Vec::new()))?;
    mesh.start_agent(1)?;
    ensure!(
        eventually(PATIENCE, || {
            !mesh
                .logs(1, |v| {
                    v["message"] == "removed capture of a namespace that is gone"
                })
                .is_empty()
        }),
        "the capture of a namespace that is gone was kept"
    );
    Ok(())
}

#[test]
fn a_connect_whose_destination_cannot_be_recorded_fails_and_never_goes_direct() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_unrecorded", 2, 1)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::new(&c, |_| true)?;
    // Where `connect4` records each captured socket's original destination,
    // node 0's agent finds a map that holds one entry and never evicts (the
    // agent reuses whatever is pinned under its name): the second captured
    // connect cannot be recorded, as with a map that cannot take more.
    let maps = mesh.pin_dir(0).join("maps");
    std::fs::create_dir_all(&maps)?;
    let created = Command::new("bpftool")
        .args(["map", "create"])
        .arg(maps.join("WEFT_SOCK_DST"))
        .args([
            "type",
            "hash",
            "key",
            "8",
            "value",
            "24",
            "entries",
            "1",
            "name",
            "WEFT_SOCK_DST",
        ])
        .output()?;
    ensure!(created.status.success(), "bpftool map create: {created:?}");
    mesh.start_all()?;
    let srv = server(b)?;
    let to = addr(b.ip);
    // The first is recorded and goes through the mesh.
    client_ok(a, &to, MIB, MIB, &[])?;
    let reached = wait_accepted(&srv, 1).len();
    // The next cannot be: its connect fails, and nothing reaches the server
    // directly (before, the connect went on to the destination in plaintext).
    let r = client(a, &to, MIB, MIB, &["--timeout-secs", "5"])?;
    ensure!(r["ok"] == false, "an unrecorded connect got through: {r}");
    ensure!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("Operation not permitted")),
        "the connect should fail with EPERM: {r}"
    );
    std::thread::sleep(Duration::from_millis(200));
    ensure!(
        accepted(&srv).len() == reached,
        "the server was reached around the mesh"
    );
    Ok(())
}

fn bpftool_id(kind: &str, pinned: &std::path::Path) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(["-j", kind, "show", "pinned"])
        .arg(pinned)
        .output()
        .context("bpftool (cargo xtask setup installs it)")?;
    ensure!(
        out.status.success(),
        "bpftool {kind} show pinned {}: {}",
        pinned.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout)?;
    v["id"].as_u64().context("no id")
}

fn bpftool_exists(kind: &str, id: u64) -> bool {
    Command::new("bpftool")
        .args([kind, "show", "id", &id.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn uninstall_leaves_nothing_in_the_kernel_or_on_bpffs() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("capture_uninstall", 2, 1)?;
    let mut mesh = Mesh::start(&c, |_| true)?;
    let _srv = server(c.pod(1, 0))?;
    let to = addr(c.pod(1, 0).ip);
    client_ok(c.pod(0, 0), &to, MIB, MIB, &[])?;

    let pins = mesh.pin_dir(0);
    let mut objects = Vec::new();
    for (kind, sub) in [("link", "links"), ("map", "maps")] {
        for entry in std::fs::read_dir(pins.join(sub))? {
            objects.push((kind, bpftool_id(kind, &entry?.path())?));
        }
    }
    // 5 cgroup links, 1 sk_lookup link, 5 maps.
    assert_eq!(objects.len(), 11, "{objects:?}");

    mesh.stop_agent(0, false)?;
    mesh.uninstall(0)?;
    assert!(!pins.exists(), "{} still exists", pins.display());
    let gone = eventually(PATIENCE, || {
        objects.iter().all(|(kind, id)| !bpftool_exists(kind, *id))
    });
    assert!(
        gone,
        "still in the kernel: {:?}",
        objects
            .iter()
            .filter(|(k, id)| bpftool_exists(k, *id))
            .collect::<Vec<_>>()
    );
    let out = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&c.node(0).cgroup)
        .output()?;
    let attached: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(
        attached.as_array().is_none_or(|a| a.is_empty()),
        "{attached}"
    );
    // Node 0's pods now connect directly again, and are not black-holed.
    client_ok(c.pod(0, 0), &to, MIB, MIB, &[])?;
    Ok(())
}
