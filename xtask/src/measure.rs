//! `cargo xtask measure`: what the mesh costs, mesh versus direct, on a
//! 2-node × 2-pod virtual cluster with release builds. (A first cut of
//! `cargo xtask bench`.)
//!
//! The client is n0p0, the server n1p0 (cross-node). "Mesh" runs have both
//! enrolled, so the connection is captured on node 0 and crosses to node 1 over
//! HBONE (HTTP/2 CONNECT over mutual TLS); "direct" runs have neither enrolled.
//! The two alternate, so that drift (CPU frequency, other load) hits both alike,
//! and each metric reports the median. The agents' access logs prove the labels:
//! every mesh connection is logged on both nodes with `security: mutual_tls`, and
//! a direct run leaves no access-log line at all.
//!
//! Metrics: connect() latency (`weft-tk connect-time`), request/response latency
//! over one connection (a small Python ping-pong, 64-byte messages), and iperf3
//! throughput with 1 and 4 streams.

use std::fmt::Write as _;
use std::time::Duration;
use weft_tests::Host as _;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::{Cluster, Mesh, Pod, Proc, bin_path, eventually};

use crate::cmd;
use crate::lab::{self, Profile};

const ROUNDS: usize = 3;
const CONNECTS: &str = "2000";
const TK_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;
const IPERF_SECONDS: &str = "5";
const RR_PORT: u16 = 9100;
const RR_COUNT: &str = "2000";
const RR_WARMUP: &str = "200";
const RR_SIZE: usize = 64;

/// Request/response ping-pong: `serve ADDR PORT` echoes fixed-size messages;
/// `client ADDR PORT COUNT WARMUP` sends one message at a time over one TCP
/// connection (TCP_NODELAY), waits for the echo, times each round trip with
/// `perf_counter_ns`, and prints p50/p99 as JSON.
const RR_SCRIPT: &str = r#"
import json, socket, sys, time
SIZE = 64
mode, addr, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
def recv_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)
if mode == "serve":
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(16)
    print(json.dumps({"listening": "%s:%d" % (addr, port)}), flush=True)
    while True:
        c, peer = srv.accept()
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        n = 0
        while True:
            m = recv_exact(c, SIZE)
            if m is None:
                break
            c.sendall(m)
            n += 1
        c.close()
        print(json.dumps({"accepted": str(peer), "round_trips": n}), flush=True)
else:
    count, warmup = int(sys.argv[4]), int(sys.argv[5])
    s = socket.create_connection((addr, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = bytes(i % 256 for i in range(SIZE))
    samples = []
    for i in range(warmup + count):
        t0 = time.perf_counter_ns()
        s.sendall(msg)
        r = recv_exact(s, SIZE)
        t1 = time.perf_counter_ns()
        if r != msg:
            print(json.dumps({"ok": False, "error": "bad or missing echo at %d" % i}))
            sys.exit(1)
        if i >= warmup:
            samples.append((t1 - t0) / 1000.0)
    s.close()
    samples.sort()
    pct = lambda p: samples[round((len(samples) - 1) * p)]
    print(json.dumps({"ok": True, "count": count, "p50_us": pct(0.50),
                      "p99_us": pct(0.99), "mean_us": sum(samples) / len(samples)}))
"#;

/// How to read the connect() numbers.
const CONNECT_NOTE: &str = "a mesh connect() completes at the agent's listener inside the client pod; \
the agent connects to the server after accepting, so this is the latency the app sees for \
connect(), not the time until the server has the connection";

/// How to read the request/response numbers.
const RR_NOTE: &str = "request/response: 64-byte messages, one at a time, over one TCP connection \
opened before timing (after 200 untimed round trips), timed in the client with Python's \
perf_counter_ns, so every sample includes the interpreter's own cost on both ends, in both modes";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Mesh,
    Direct,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Mesh => "mesh",
            Mode::Direct => "direct",
        }
    }
}

/// One metric: its samples per mode, and how to show it.
struct Metric {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    /// Divides samples for display (samples are stored in the JSON unit).
    scale: f64,
    mesh: Vec<f64>,
    direct: Vec<f64>,
}

impl Metric {
    fn new(key: &'static str, label: &'static str, unit: &'static str, scale: f64) -> Metric {
        Metric {
            key,
            label,
            unit,
            scale,
            mesh: Vec::new(),
            direct: Vec::new(),
        }
    }

    fn push(&mut self, mode: Mode, value: f64) {
        match mode {
            Mode::Mesh => self.mesh.push(value),
            Mode::Direct => self.direct.push(value),
        }
    }

    fn ratio(&self) -> f64 {
        median(&self.mesh) / median(&self.direct)
    }

    fn json(&self) -> Value {
        json!({
            "unit": self.key.rsplit('_').next(),
            "mesh": self.mesh,
            "direct": self.direct,
            "mesh_median": median(&self.mesh),
            "direct_median": median(&self.direct),
            "ratio_mesh_to_direct": self.ratio(),
        })
    }
}

pub fn run() -> Result<()> {
    lab::require_root("measure")?;
    lab::prepare(Profile::Release)?;

    cmd::step(&format!(
        "measuring on a 2-node x 2-pod cluster: n0p0 -> n1p0, {ROUNDS} rounds of mesh (HBONE mTLS)/direct"
    ));
    let cluster = Cluster::new("measure", 2, 2).context("building the virtual cluster")?;
    let id = cluster.id().to_owned();
    let cgroup = cluster.cgroup().to_path_buf();
    let result = measure(&cluster);
    drop(cluster);
    lab::check_clean(&id, &cgroup)?;
    let (metrics, proof) = result?;

    cmd::step("results (medians)");
    println!("{}", table(&metrics));
    println!("{}", wrap(&format!("Note: {CONNECT_NOTE}."), 88, "  "));
    println!("{}", wrap(&format!("Note: {RR_NOTE}."), 88, "  "));
    let report = json!({
        "what": "mesh overhead: n0p0 -> n1p0 across nodes, mesh (both enrolled: HBONE, HTTP/2 CONNECT over mutual TLS 1.3) vs direct (neither enrolled)",
        "cluster": { "nodes": 2, "pods_per_node": 2, "client": "n0p0", "server": "n1p0" },
        "rounds": ROUNDS,
        "connect_count": CONNECTS.parse::<u64>().unwrap_or(0),
        "request_response": {
            "count": RR_COUNT.parse::<u64>().unwrap_or(0),
            "warmup": RR_WARMUP.parse::<u64>().unwrap_or(0),
            "message_bytes": RR_SIZE,
        },
        "iperf3_seconds": IPERF_SECONDS.parse::<u64>().unwrap_or(0),
        "kernel": uname_release(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "commit": git_head(),
        "notes": [CONNECT_NOTE, RR_NOTE],
        "access_log_proof": proof,
        "metrics": metrics.iter().map(|m| (m.key.to_owned(), m.json())).collect::<serde_json::Map<_, _>>(),
    });
    let dir = cmd::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("mtls.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    cmd::done(&format!("written to {}", path.display()));
    Ok(())
}

fn measure(cluster: &Cluster) -> Result<(Vec<Metric>, Vec<Value>)> {
    let client = cluster.pod(0, 0);
    let server = cluster.pod(1, 0);
    let mut mesh = Mesh::start(cluster, |p| p.index == 0).context("starting the CA and agents")?;
    let tk = bin_path("weft-tk");
    let _tk_server = {
        let mut c = server.command(&tk);
        c.args(["serve", "--listen", &format!("[::]:{TK_PORT}")]);
        let p = server.spawn(&mut c)?;
        p.wait_for_json(Duration::from_secs(20), |v| v.get("listening").is_some())?;
        p
    };
    let _iperf_server = start_iperf3(server)?;
    let _rr_server = {
        let mut c = server.command("python3");
        c.args(["-c", RR_SCRIPT, "serve", "0.0.0.0", &RR_PORT.to_string()]);
        let p = server.spawn(&mut c)?;
        p.wait_for_json(Duration::from_secs(20), |v| v.get("listening").is_some())
            .with_context(|| format!("python3 ping-pong server: {}", p.stderr()))?;
        p
    };

    let mut metrics = vec![
        Metric::new("connect_p50_us", "connect() p50", "µs", 1.0),
        Metric::new("connect_p99_us", "connect() p99", "µs", 1.0),
        Metric::new("rr_p50_us", "req/resp 64 B p50", "µs", 1.0),
        Metric::new("rr_p99_us", "req/resp 64 B p99", "µs", 1.0),
        Metric::new("iperf3_1_stream_bps", "iperf3, 1 stream", "Gbit/s", 1e9),
        Metric::new("iperf3_4_streams_bps", "iperf3, 4 streams", "Gbit/s", 1e9),
    ];
    let mut proof = Vec::new();
    let target = format!("{}:{TK_PORT}", server.ip);
    for round in 1..=ROUNDS {
        for mode in [Mode::Mesh, Mode::Direct] {
            let enrolled = mode == Mode::Mesh;
            mesh.set_enrolled(client, enrolled)?;
            mesh.set_enrolled(server, enrolled)?;
            // Lines of the previous run's last connections may still be coming.
            let before = settled_log_counts(&mesh);

            let ct = json_line(&client.exec_ok(
                &tk,
                ["connect-time", "--connect", &target, "--count", CONNECTS],
            )?)?;
            ensure!(ct["ok"] == true, "connect-time failed: {ct}");
            let p50 = ct["p50_us"].as_f64().context("no p50_us")?;
            let p99 = ct["p99_us"].as_f64().context("no p99_us")?;
            let (rr50, rr99) = request_response(client, server)?;
            let one = iperf3(client, server, 1)?;
            let four = iperf3(client, server, 4)?;
            for (i, v) in [p50, p99, rr50, rr99, one, four].into_iter().enumerate() {
                metrics[i].push(mode, v);
            }

            // The labels must be true: every mesh connection went through both
            // agents over mutual TLS, and direct runs did not touch the agents.
            let after = settled_log_counts(&mesh);
            let out = mesh.access_logs(0).split_off(before.0);
            let inb = mesh.access_logs(1).split_off(before.1);
            let not_mtls = |lines: &[Value]| {
                lines
                    .iter()
                    .filter(|v| v["security"] != "mutual_tls")
                    .count()
            };
            let tls_connections = out
                .iter()
                .filter_map(|v| v["hbone.connection"].as_u64())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            if enrolled {
                ensure!(
                    !out.is_empty() && !inb.is_empty(),
                    "round {round}: the mesh run left no access-log lines on node 0 ({}) or node 1 ({}): nothing was captured",
                    out.len(),
                    inb.len()
                );
                ensure!(
                    not_mtls(&out) == 0 && not_mtls(&inb) == 0,
                    "round {round}: mesh connections not over mutual TLS: {} of {} on node 0, {} of {} on node 1; e.g. {}",
                    not_mtls(&out),
                    out.len(),
                    not_mtls(&inb),
                    inb.len(),
                    out.iter()
                        .chain(&inb)
                        .find(|v| v["security"] != "mutual_tls")
                        .map(Value::to_string)
                        .unwrap_or_default()
                );
            } else {
                ensure!(
                    out.is_empty() && inb.is_empty(),
                    "round {round}: the direct run went through the agents ({} access-log lines on node 0, {} on node 1)",
                    out.len(),
                    inb.len()
                );
            }
            proof.push(json!({
                "round": round,
                "mode": mode.name(),
                "node0_outbound_lines": out.len(),
                "node1_inbound_lines": inb.len(),
                "mutual_tls_lines": out.len() + inb.len() - not_mtls(&out) - not_mtls(&inb),
                "hbone_tls_connections": tls_connections,
                "settled_counts_after": [after.0, after.1],
            }));
            println!(
                "  round {round} {:<6}  connect p50 {p50:>6.1} p99 {p99:>7.1} µs  req/resp p50 {rr50:>6.1} p99 {rr99:>7.1} µs  iperf3 {:>5.2} (1) {:>5.2} (4) Gbit/s  [mTLS access-log lines: {} on n0, {} on n1; {tls_connections} TLS connections]",
                mode.name(),
                one / 1e9,
                four / 1e9,
                out.len() - not_mtls(&out),
                inb.len() - not_mtls(&inb),
            );
        }
    }
    Ok((metrics, proof))
}

/// The number of access-log lines of node 0's and node 1's agents, once neither
/// has changed for 300 ms (an agent logs a connection when it closes, which can
/// be just after the client has exited). Gives up waiting after 10 s.
fn settled_log_counts(mesh: &Mesh) -> (usize, usize) {
    let counts = || (mesh.access_logs(0).len(), mesh.access_logs(1).len());
    let mut last = counts();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(300));
        let now = counts();
        if now == last {
            break;
        }
        last = now;
    }
    last
}

/// p50 and p99 in µs of 64-byte request/response round trips over one connection.
fn request_response(client: &Pod, server: &Pod) -> Result<(f64, f64)> {
    let out = client.exec(
        "python3",
        [
            "-c",
            RR_SCRIPT,
            "client",
            &server.ip.to_string(),
            &RR_PORT.to_string(),
            RR_COUNT,
            RR_WARMUP,
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r = json_line(&stdout).with_context(|| {
        format!(
            "ping-pong client ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    ensure!(r["ok"] == true, "ping-pong client failed: {r}");
    Ok((
        r["p50_us"].as_f64().context("no p50_us")?,
        r["p99_us"].as_f64().context("no p99_us")?,
    ))
}

fn start_iperf3(server: &Pod) -> Result<Proc> {
    let mut c = server.command("iperf3");
    c.args(["-s", "-p", &IPERF_PORT.to_string()]);
    let p = server.spawn(&mut c)?;
    // iperf3 block-buffers stdout into a pipe: wait for the socket instead.
    let listening = || {
        server
            .exec_ok("ss", ["-Htln", &format!("sport = :{IPERF_PORT}")])
            .is_ok_and(|out| !out.trim().is_empty())
    };
    if !eventually(Duration::from_secs(20), listening) {
        bail!(
            "iperf3 -s did not start listening in {}: {}",
            server.name,
            p.stderr()
        );
    }
    Ok(p)
}

/// Bits per second received in an iperf3 run of `streams` parallel streams.
fn iperf3(client: &Pod, server: &Pod, streams: u32) -> Result<f64> {
    let out = client.exec(
        "iperf3",
        [
            "-c",
            &server.ip.to_string(),
            "-p",
            &IPERF_PORT.to_string(),
            "-t",
            IPERF_SECONDS,
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    if let Some(e) = report["error"].as_str() {
        bail!("iperf3 -P {streams}: {e}");
    }
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 JSON has no end.sum_received.bits_per_second")
}

fn json_line(out: &str) -> Result<Value> {
    out.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| format!("no JSON in {out:?}"))
}

fn median(samples: &[f64]) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    }
}

fn table(metrics: &[Metric]) -> String {
    let mut out = format!(
        "  {:<20} {:>16} {:>16} {:>17}\n  {:-<20} {:->16} {:->16} {:->17}\n",
        "metric", "mesh", "direct", "mesh/direct", "", "", "", ""
    );
    for m in metrics {
        let show = |v: f64| {
            let v = v / m.scale;
            let digits = if m.scale > 1.0 { 2 } else { 1 };
            format!("{v:.digits$} {}", m.unit)
        };
        let _ = writeln!(
            out,
            "  {:<20} {:>16} {:>16} {:>16.2}x",
            m.label,
            show(median(&m.mesh)),
            show(median(&m.direct)),
            m.ratio()
        );
    }
    out
}

/// `text` word-wrapped to `width` columns, every line starting with `indent`.
fn wrap(text: &str, width: usize, indent: &str) -> String {
    let mut out = String::new();
    let mut line = String::from(indent);
    for word in text.split_whitespace() {
        if line.len() > indent.len() && line.len() + 1 + word.len() > width {
            out.push_str(line.trim_end());
            out.push('\n');
            line = String::from(indent);
        }
        if line.len() > indent.len() {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn git_head() -> Option<String> {
    cmd::output(cmd::tool("git").arg("-C").arg(cmd::repo_root()).args([
        "rev-parse",
        "--short",
        "HEAD",
    ]))
    .ok()
    .map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn wrapping() {
        assert_eq!(wrap("aa bb cc", 7, "  "), "  aa bb\n  cc");
        assert_eq!(wrap("word", 2, "> "), "> word");
    }

    #[test]
    fn table_shows_ratio() {
        let mut m = Metric::new("connect_p50_us", "connect() p50", "µs", 1.0);
        for (c, d) in [(30.0, 10.0), (40.0, 20.0), (20.0, 10.0)] {
            m.push(Mode::Mesh, c);
            m.push(Mode::Direct, d);
        }
        let t = table(&[m]);
        assert!(t.contains("30.0 µs"), "{t}");
        assert!(t.contains("3.00x"), "{t}");
    }
}
