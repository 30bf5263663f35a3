//! `cargo xtask measure`: what capture costs, captured versus direct, on a
//! 2-node × 2-pod virtual cluster with release builds. (A first cut of
//! `cargo xtask bench`.)
//!
//! The client is n0p0, the server n1p0 (cross-node). "Captured" runs have both
//! enrolled, "direct" runs neither; the two alternate, so that drift (CPU
//! frequency, other load) hits both alike, and each metric reports the median.

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

/// How to read the connect() numbers.
const CONNECT_NOTE: &str = "a captured connect() completes at the agent's listener inside the client pod; \
the agent connects to the server after accepting, so this is the latency the app sees for \
connect(), not the time until the server has the connection";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Captured,
    Direct,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Captured => "captured",
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
    captured: Vec<f64>,
    direct: Vec<f64>,
}

impl Metric {
    fn new(key: &'static str, label: &'static str, unit: &'static str, scale: f64) -> Metric {
        Metric {
            key,
            label,
            unit,
            scale,
            captured: Vec::new(),
            direct: Vec::new(),
        }
    }

    fn push(&mut self, mode: Mode, value: f64) {
        match mode {
            Mode::Captured => self.captured.push(value),
            Mode::Direct => self.direct.push(value),
        }
    }

    fn ratio(&self) -> f64 {
        median(&self.captured) / median(&self.direct)
    }

    fn json(&self) -> Value {
        json!({
            "unit": self.key.rsplit('_').next(),
            "captured": self.captured,
            "direct": self.direct,
            "captured_median": median(&self.captured),
            "direct_median": median(&self.direct),
            "ratio_captured_to_direct": self.ratio(),
        })
    }
}

pub fn run() -> Result<()> {
    lab::require_root("measure")?;
    lab::prepare(Profile::Release)?;

    cmd::step(&format!(
        "measuring on a 2-node x 2-pod cluster: n0p0 -> n1p0, {ROUNDS} rounds of captured/direct"
    ));
    let cluster = Cluster::new("measure", 2, 2).context("building the virtual cluster")?;
    let id = cluster.id().to_owned();
    let cgroup = cluster.cgroup().to_path_buf();
    let result = measure(&cluster);
    drop(cluster);
    lab::check_clean(&id, &cgroup)?;
    let metrics = result?;

    cmd::step("results (medians)");
    println!("{}", table(&metrics));
    println!("{}", wrap(&format!("Note: {CONNECT_NOTE}."), 88, "  "));
    let report = json!({
        "what": "capture overhead: n0p0 -> n1p0 across nodes, captured (both enrolled) vs direct (neither)",
        "cluster": { "nodes": 2, "pods_per_node": 2, "client": "n0p0", "server": "n1p0" },
        "rounds": ROUNDS,
        "connect_count": CONNECTS.parse::<u64>().unwrap_or(0),
        "iperf3_seconds": IPERF_SECONDS.parse::<u64>().unwrap_or(0),
        "kernel": uname_release(),
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "commit": git_head(),
        "notes": [CONNECT_NOTE],
        "metrics": metrics.iter().map(|m| (m.key.to_owned(), m.json())).collect::<serde_json::Map<_, _>>(),
    });
    let dir = cmd::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("capture.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    cmd::done(&format!("written to {}", path.display()));
    Ok(())
}

fn measure(cluster: &Cluster) -> Result<Vec<Metric>> {
    let client = cluster.pod(0, 0);
    let server = cluster.pod(1, 0);
    let mut mesh = Mesh::start(cluster, |p| p.index == 0).context("starting the agents")?;
    let tk = bin_path("weft-tk");
    let _tk_server = {
        let mut c = server.command(&tk);
        c.args(["serve", "--listen", &format!("[::]:{TK_PORT}")]);
        let p = server.spawn(&mut c)?;
        p.wait_for_json(Duration::from_secs(20), |v| v.get("listening").is_some())?;
        p
    };
    let _iperf_server = start_iperf3(server)?;

    let mut metrics = vec![
        Metric::new("connect_p50_us", "connect() p50", "µs", 1.0),
        Metric::new("connect_p99_us", "connect() p99", "µs", 1.0),
        Metric::new("iperf3_1_stream_bps", "iperf3, 1 stream", "Gbit/s", 1e9),
        Metric::new("iperf3_4_streams_bps", "iperf3, 4 streams", "Gbit/s", 1e9),
    ];
    let target = format!("{}:{TK_PORT}", server.ip);
    for round in 1..=ROUNDS {
        for mode in [Mode::Captured, Mode::Direct] {
            let captured = mode == Mode::Captured;
            mesh.set_enrolled(client, captured)?;
            mesh.set_enrolled(server, captured)?;
            let logs_before = mesh.access_logs(0).len();

            let ct = json_line(&client.exec_ok(
                &tk,
                ["connect-time", "--connect", &target, "--count", CONNECTS],
            )?)?;
            ensure!(ct["ok"] == true, "connect-time failed: {ct}");
            let p50 = ct["p50_us"].as_f64().context("no p50_us")?;
            let p99 = ct["p99_us"].as_f64().context("no p99_us")?;
            let one = iperf3(client, server, 1)?;
            let four = iperf3(client, server, 4)?;
            metrics[0].push(mode, p50);
            metrics[1].push(mode, p99);
            metrics[2].push(mode, one);
            metrics[3].push(mode, four);

            // The labels must be true: captured runs go through the agent
            // (access-log lines), direct runs do not.
            let proxied = mesh.access_logs(0).len() - logs_before;
            if captured && proxied == 0 {
                bail!(
                    "round {round}: the captured run produced no access-log lines: nothing was captured"
                );
            }
            if !captured && proxied > 0 {
                bail!(
                    "round {round}: the direct run went through the agent ({proxied} access-log lines)"
                );
            }
            println!(
                "  round {round} {:<8}  connect p50 {p50:>7.1} µs  p99 {p99:>7.1} µs   iperf3 {:>6.2} Gbit/s (1)  {:>6.2} Gbit/s (4)   [{proxied} connections proxied]",
                mode.name(),
                one / 1e9,
                four / 1e9
            );
        }
    }
    Ok(metrics)
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
        "metric", "captured", "direct", "captured/direct", "", "", "", ""
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
            show(median(&m.captured)),
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
            m.push(Mode::Captured, c);
            m.push(Mode::Direct, d);
        }
        let t = table(&[m]);
        assert!(t.contains("30.0 µs"), "{t}");
        assert!(t.contains("3.00x"), "{t}");
    }
}
