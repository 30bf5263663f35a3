//! `cargo xtask bench`: what Weft adds to every byte, request and connection,
//! measured against direct TCP between the same pods on the same machine.
//!
//! A 2-node × 2-pod virtual cluster (release builds). The client is `n0p0`; the
//! servers are `n0p1` (same node) and `n1p0` (across nodes). In **direct** runs
//! no pod is enrolled, so the agents run but capture nothing; in **Weft** runs
//! all three are, so a connection is captured on the client's node and carried
//! over HBONE (HTTP/2 CONNECT over mutual TLS 1.3) to the server's agent. The
//! modes alternate round by round (and which goes first alternates too), so
//! drift in the machine hits both alike; every scenario reports the median over
//! rounds, the spread, and the ratio Weft/direct.
//!
//! Scenarios, per path:
//! 1. iperf3 throughput, 1 and 4 streams;
//! 2. 1 KiB request/response on one persistent connection (`weft-tk rr` against
//!    `weft-tk echo`), p50/p90/p99/p99.9, at a fixed 1,000/s and back to back;
//! 3. new connections per second, each with one 1 KiB exchange (`weft-tk
//!    conn-rate`), with connect-time percentiles;
//! 4. HTTP/1.1: wrk against nginx in the server pod, requests per second and
//!    latency percentiles;
//! 5. CPU: machine CPU seconds per GiB (iperf3, 1 stream) and per 10,000 HTTP
//!    requests, and the agents' own share; agent RSS idle and with 1,000 and
//!    10,000 idle connections held through it, and with 1,000 node-local ones
//!    (Weft only).
//!
//! The agents' access logs prove the labels: a Weft run leaves a line per
//! connection on both nodes (cross-node ones `mutual_tls`, same-node ones
//! `node_local`), a direct run none.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::Host as _;
use weft_tests::l7::{self as tl7, Nginx};
use weft_tests::{Cluster, Mesh, Pod, Proc, bin_path, eventually};

use crate::cmd;
use crate::lab::{self, Profile};
use crate::setup;

mod l7;

/// `weft-tk echo` on a pool of workers: request/response and connection rate.
const ECHO_PORT: u16 = 9000;
/// `weft-tk echo`, one thread per connection: the held idle connections.
const HOLD_PORT: u16 = 9001;
const IPERF_PORT: u16 = 5201;
const HTTP_PORT: u16 = 8080;
/// The minimal relay's ports (the yardstick, cross-node only): a service's port
/// plus this, on both pods.
const RELAY_OFFSET: u16 = 20_000;
/// The request and the response of scenarios 2 and 3.
const MESSAGE: &str = "1K";
/// The fixed, moderate request rate of scenario 2.
const RR_RATE: u32 = 1000;
/// Bytes of nginx's response body.
const HTTP_BODY: usize = 1024;
const GIB: f64 = (1u64 << 30) as f64;

/// How much of everything to run.
#[derive(Debug, Clone)]
struct Plan {
    quick: bool,
    /// `perf record` both agents during the cross-node Weft scenarios.
    perf: bool,
    rounds: usize,
    iperf_secs: u32,
    rr_fixed: u32,
    rr_saturated: u32,
    conns: u32,
    http_secs: u32,
    http_connections: u32,
    held: &'static [usize],
    /// Seconds of each L7 saturation run, after a second's warm-up.
    l7_secs: u32,
    /// Requests of each L7 fixed-rate run.
    l7_fixed: u32,
    /// Idle HTTP connections held through each L7 proxy.
    l7_held: usize,
    /// Extra arguments for `weft waypoint`.
    waypoint_args: Vec<String>,
}

impl Plan {
    fn full() -> Plan {
        Plan {
            quick: false,
            perf: false,
            rounds: 3,
            iperf_secs: 5,
            rr_fixed: 5000,
            rr_saturated: 20_000,
            conns: 3000,
            http_secs: 5,
            http_connections: 32,
            held: &[1000, 10_000],
            l7_secs: 5,
            l7_fixed: 5000,
            l7_held: 1000,
            waypoint_args: Vec::new(),
        }
    }

    fn quick() -> Plan {
        Plan {
            quick: true,
            perf: false,
            rounds: 1,
            iperf_secs: 2,
            rr_fixed: 1000,
            rr_saturated: 5000,
            conns: 1000,
            http_secs: 2,
            http_connections: 32,
            held: &[1000],
            l7_secs: 2,
            l7_fixed: 2000,
            l7_held: 1000,
            waypoint_args: Vec::new(),
        }
    }

    fn json(&self) -> Value {
        json!({
            "quick": self.quick,
            "rounds": self.rounds,
            "iperf3_seconds": self.iperf_secs,
            "rr_message_bytes": 1024,
            "rr_fixed_rate_per_s": RR_RATE,
            "rr_fixed_count": self.rr_fixed,
            "rr_saturated_count": self.rr_saturated,
            "new_connections": self.conns,
            "http_seconds": self.http_secs,
            "http_connections": self.http_connections,
            "http_body_bytes": HTTP_BODY,
            "held_connections": self.held,
            "l7_saturation_seconds": self.l7_secs,
            "l7_fixed_rate_per_s": l7::RATE,
            "l7_fixed_count": self.l7_fixed,
            "l7_held_connections": self.l7_held,
            "waypoint_args": self.waypoint_args,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Direct,
    /// No pod enrolled; the client connects to a minimal plaintext relay in its
    /// own pod, which connects to one in the server's pod: the bench's yardstick
    /// for what any proxy on each node costs here.
    Relay,
    Weft,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Relay => "relay",
            Mode::Weft => "weft",
        }
    }
}

/// Where the server is, seen from the client `n0p0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Cross,
    Same,
}

impl Route {
    const ALL: [Route; 2] = [Route::Cross, Route::Same];

    fn key(self) -> &'static str {
        match self {
            Route::Cross => "cross_node",
            Route::Same => "same_node",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Route::Cross => "cross-node",
            Route::Same => "same-node",
        }
    }

    fn server(self, cluster: &Cluster) -> &Pod {
        match self {
            Route::Cross => cluster.pod(1, 0),
            Route::Same => cluster.pod(0, 1),
        }
    }
}

/// One scenario's samples, one per round and mode.
#[derive(Debug)]
struct Row {
    key: String,
    name: String,
    unit: &'static str,
    direct: Vec<f64>,
    /// Through the minimal relay; only the cross-node scenarios the targets
    /// judge have it.
    relay: Vec<f64>,
    weft: Vec<f64>,
}

impl Row {
    fn direct_median(&self) -> f64 {
        median(&self.direct)
    }

    fn relay_median(&self) -> f64 {
        median(&self.relay)
    }

    fn weft_median(&self) -> f64 {
        median(&self.weft)
    }

    fn ratio(&self) -> f64 {
        self.weft_median() / self.direct_median()
    }

    fn is_latency(&self) -> bool {
        self.unit == "µs" || self.unit == "ms"
    }

    fn json(&self) -> Value {
        let mut v = json!({
            "key": self.key,
            "name": self.name,
            "unit": self.unit,
            "direct_median": finite(self.direct_median()),
            "weft_median": finite(self.weft_median()),
            "ratio": finite(self.ratio()),
            "direct": self.direct,
            "weft": self.weft,
            "direct_spread": finite(spread(&self.direct)),
            "weft_spread": finite(spread(&self.weft)),
        });
        if self.is_latency() {
            v["added"] = finite(self.weft_median() - self.direct_median());
        }
        if !self.relay.is_empty() {
            v["relay_median"] = finite(self.relay_median());
            v["relay"] = json!(self.relay);
            v["relay_spread"] = finite(spread(&self.relay));
            v["relay_ratio"] = finite(self.relay_median() / self.direct_median());
            v["weft_to_relay"] = finite(self.weft_median() / self.relay_median());
            if self.is_latency() {
                v["relay_added"] = finite(self.relay_median() - self.direct_median());
            }
        }
        v
    }
}

/// All rows, in the order they were first measured.
#[derive(Debug, Default)]
struct Results {
    rows: Vec<Row>,
}

impl Results {
    fn add(&mut self, key: &str, name: &str, unit: &'static str, mode: Mode, value: f64) {
        let i = match self.rows.iter().position(|r| r.key == key) {
            Some(i) => i,
            None => {
                self.rows.push(Row {
                    key: key.to_owned(),
                    name: name.to_owned(),
                    unit,
                    direct: Vec::new(),
                    relay: Vec::new(),
                    weft: Vec::new(),
                });
                self.rows.len() - 1
            }
        };
        match mode {
            Mode::Direct => self.rows[i].direct.push(value),
            Mode::Relay => self.rows[i].relay.push(value),
            Mode::Weft => self.rows[i].weft.push(value),
        }
    }

    fn get(&self, key: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.key == key)
    }
}

/// One target of the issue, judged on this run.
#[derive(Debug)]
struct Target {
    what: String,
    goal: &'static str,
    value: Option<f64>,
    shown: String,
    met: Option<bool>,
    /// What the minimal relay reached on the same measure, where it has one.
    relay: Option<f64>,
    relay_shown: String,
}

/// Which parts of the bench to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// The L4 data path: Weft, direct and the minimal relay.
    L4,
    /// The L7 path: the waypoint, direct and nginx in its place.
    L7,
}

pub fn run(quick: bool, perf: bool, only: Option<Part>, waypoint_args: Vec<String>) -> Result<()> {
    lab::require_root("bench")?;
    lab::prepare(Profile::Release)?;
    setup::packages(setup::Apt::Install, setup::BENCH_PACKAGES)?;
    let mut plan = if quick { Plan::quick() } else { Plan::full() };
    plan.perf = perf;
    plan.waypoint_args = waypoint_args;
    let (do_l4, do_l7) = (only != Some(Part::L7), only != Some(Part::L4));

    let machine = machine();
    println!("  machine: {}", machine_line(&machine));
    let commit = git_head();
    let l4 = if do_l4 {
        Some(run_l4(&plan, quick)?)
    } else {
        None
    };
    let l7 = if do_l7 { Some(l7::run(&plan)?) } else { None };

    if let Some((results, _, targets)) = &l4 {
        cmd::step("results (medians over rounds; spread = (max - min) / median)");
        println!("{}", table(results));
        println!("{}", relay_table(results));
        println!("{}", targets_table(targets));
    }
    if let Some(l7) = &l7 {
        cmd::step("L7 results (medians over rounds; spread = (max - min) / median)");
        println!("{}", l7::table(&l7.results));
        println!("{}", l7::targets_table(&l7.targets));
    }

    let when = cmd::output(cmd::tool("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"]))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mut report = json!({
        "what": "Weft vs direct TCP: client n0p0, servers n0p1 (same node) and n1p0 (cross node); \
                 Weft = all three enrolled (HBONE, HTTP/2 CONNECT over mutual TLS 1.3), direct = none enrolled; \
                 relay (cross node only) = none enrolled, through a minimal plaintext relay in each of the two pods",
        "when": when,
        "commit": commit,
        "machine": machine,
        "plan": plan.json(),
    });
    if let Some((results, proof, targets)) = &l4 {
        report["scenarios"] = json!(results.rows.iter().map(Row::json).collect::<Vec<_>>());
        report["targets"] = targets_json(targets);
        report["access_log_proof"] = json!(proof);
    }
    if let Some(l7) = &l7 {
        report["l7"] = json!({
            "what": "HTTP through the waypoint (client n0p0 -> its agent -> HBONE -> waypoint n1p0 -> \
                     HBONE with the waypoint's identity -> the server's agent -> server n2p0, nginx) \
                     vs direct (client -> server) vs nginx as a reverse proxy in n1p1; in each \
                     scenario `relay` is nginx and `weft` the waypoint",
            "scenarios": l7.results.rows.iter().map(Row::json).collect::<Vec<_>>(),
            "targets": targets_json(&l7.targets),
            "access_log_proof": l7.proof,
        });
    }
    let dir = cmd::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let stamp = when.replace(':', "");
    let part = match only {
        Some(Part::L4) => "-l4",
        Some(Part::L7) => "-l7",
        None => "",
    };
    let name = format!(
        "bench-{stamp}{part}{}.json",
        if quick { "-quick" } else { "" }
    );
    let text = serde_json::to_string_pretty(&report)? + "\n";
    for path in [dir.join(&name), dir.join("latest.json")] {
        std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    }
    cmd::done(&format!(
        "written to target/bench/{name} and target/bench/latest.json"
    ));
    if !quick {
        let path = cmd::repo_root().join("BENCHMARKS.md");
        if let Some((results, _, targets)) = &l4 {
            let md = markdown(results, targets, &machine, commit.as_deref(), &when, &plan);
            update_benchmarks_md(&path, (BEGIN, END), &md)?;
            cmd::done("BENCHMARKS.md: the \"Latest results\" section is updated");
        }
        if let Some(l7) = &l7 {
            let header = format!(
                "Run at {when} on commit `{}`: {}. {} rounds,",
                commit.as_deref().unwrap_or("?"),
                machine_line(&machine),
                plan.rounds,
            );
            update_benchmarks_md(&path, (L7_BEGIN, L7_END), &l7::markdown(l7, &header))?;
            cmd::done("BENCHMARKS.md: the \"Latest L7 results\" section is updated");
        }
    }
    Ok(())
}

fn targets_json(targets: &[Target]) -> Value {
    json!(
        targets
            .iter()
            .map(|t| json!({
                "what": t.what, "goal": t.goal, "value": t.value.and_then(finite_opt), "met": t.met,
                "relay": t.relay.and_then(finite_opt),
            }))
            .collect::<Vec<_>>()
    )
}

/// The L4 part on its own 2-node x 2-pod cluster: its rows, the access-log
/// proof and the targets.
fn run_l4(plan: &Plan, quick: bool) -> Result<(Results, Vec<Value>, Vec<Target>)> {
    cmd::step(&format!(
        "benchmarking on a 2-node x 2-pod cluster: n0p0 -> n0p1 (same node) and n1p0 (cross node), \
         {} round(s) of direct/relay/Weft{}",
        plan.rounds,
        if quick { " (--quick)" } else { "" }
    ));
    let cluster = Cluster::new("bench", 2, 2).context("building the virtual cluster")?;
    let id = cluster.id().to_owned();
    let cgroup = cluster.cgroup().to_path_buf();
    let result = bench(&cluster, plan);
    drop(cluster);
    lab::check_clean(&id, &cgroup)?;
    let (results, proof) = result?;
    let targets = targets(&results, plan);
    Ok((results, proof, targets))
}

/// The servers of one pod, stopped when dropped.
struct Servers {
    _procs: Vec<Proc>,
    _nginx: Nginx,
}

fn start_servers(pod: &Pod) -> Result<Servers> {
    let tk = bin_path("weft-tk");
    let mut procs = Vec::new();
    for (port, extra) in [
        (ECHO_PORT, &["--workers", "4", "--quiet"][..]),
        (HOLD_PORT, &["--quiet"][..]),
    ] {
        let mut c = pod.command(&tk);
        c.args(["echo", "--listen", &format!("0.0.0.0:{port}")])
            .args(extra);
        let p = pod.spawn(&mut c)?;
        p.wait_for_json(Duration::from_secs(20), |v| v.get("listening").is_some())?;
        procs.push(p);
    }
    let mut c = pod.command("iperf3");
    c.args(["-s", "-p", &IPERF_PORT.to_string()]);
    procs.push(pod.spawn(&mut c)?);
    // nginx is ready when l7::nginx returns; iperf3 prints no line when
    // ready: wait for its socket.
    let nginx = start_nginx(pod)?;
    let listening = || {
        pod.exec_ok("ss", ["-Htln", &format!("sport = :{IPERF_PORT}")])
            .is_ok_and(|out| !out.trim().is_empty())
    };
    if !eventually(Duration::from_secs(20), listening) {
        bail!("nothing listens on port {IPERF_PORT} in {}", pod.name);
    }
    Ok(Servers {
        _procs: procs,
        _nginx: nginx,
    })
}

/// The minimal relays of the yardstick, stopped when dropped: for the echo and
/// iperf3 servers of `server`, one in the client's pod listening on loopback
/// and one in `server`'s pod, both on the service's port + `RELAY_OFFSET`.
fn start_relays(client: &Pod, server: &Pod) -> Result<Vec<Proc>> {
    let tk = bin_path("weft-tk");
    let mut procs = Vec::new();
    for port in [ECHO_PORT, IPERF_PORT] {
        let relay = port + RELAY_OFFSET;
        for (pod, listen, to) in [
            (
                server,
                format!("0.0.0.0:{relay}"),
                format!("127.0.0.1:{port}"),
            ),
            (
                client,
                format!("127.0.0.1:{relay}"),
                format!("{}:{relay}", server.ip),
            ),
        ] {
            let mut c = pod.command(&tk);
            c.args(["relay", "--listen", &listen, "--connect", &to]);
            let p = pod.spawn(&mut c)?;
            p.wait_for_json(Duration::from_secs(20), |v| v.get("listening").is_some())?;
            procs.push(p);
        }
    }
    Ok(procs)
}

/// nginx in `pod`, one worker, answering every request with a 1 KiB body.
fn start_nginx(pod: &Pod) -> Result<Nginx> {
    let body = "w".repeat(HTTP_BODY);
    tl7::nginx(
        pod,
        &format!(
            "keepalive_requests 10000000;\n\
             keepalive_timeout 300s;\n\
             server {{\n\
             \x20   listen {HTTP_PORT} reuseport;\n\
             \x20   location / {{ return 200 \"{body}\"; }}\n\
             }}"
        ),
    )
}

fn bench(cluster: &Cluster, plan: &Plan) -> Result<(Results, Vec<Value>)> {
    let client = cluster.pod(0, 0);
    let pods = [
        client,
        Route::Same.server(cluster),
        Route::Cross.server(cluster),
    ];
    let mut mesh = Mesh::new(cluster, |_| false)?;
    mesh.start_all().context("starting the CA and agents")?;
    let _servers = Route::ALL
        .iter()
        .map(|r| start_servers(r.server(cluster)))
        .collect::<Result<Vec<_>>>()?;
    let relays = start_relays(client, Route::Cross.server(cluster))?;
    let relay_pids: Vec<u32> = relays.iter().map(Proc::pid).collect();

    let mut results = Results::default();
    let mut proof = Vec::new();
    for round in 1..=plan.rounds {
        let order = if round % 2 == 1 {
            [Mode::Direct, Mode::Relay, Mode::Weft]
        } else {
            [Mode::Weft, Mode::Relay, Mode::Direct]
        };
        for mode in order {
            for pod in pods {
                mesh.set_enrolled(pod, mode == Mode::Weft)?;
            }
            let before = settled_log_counts(&mesh);
            // The relay is the yardstick for the targets, which are cross-node.
            let routes: &[Route] = match mode {
                Mode::Relay => &[Route::Cross],
                Mode::Direct | Mode::Weft => &Route::ALL,
            };
            for &route in routes {
                let server = route.server(cluster);
                let line = scenarios(
                    &mesh,
                    &relay_pids,
                    plan,
                    (mode, route),
                    (client, server),
                    &mut results,
                )
                .with_context(|| format!("round {round}, {} {}", mode.name(), route.label()))?;
                println!(
                    "  round {round} {:<6} {:<10} {line}",
                    mode.name(),
                    route.label()
                );
            }
            proof.push(check_labels(&mesh, cluster, round, mode, before)?);
        }
    }
    for pod in pods {
        mesh.set_enrolled(pod, true)?;
    }
    memory(
        &mut mesh,
        Route::Cross,
        plan.held,
        client,
        cluster,
        &mut results,
    )?;
    // Node-local connections have their own copy path: 1,000 of them show its
    // cost per connection.
    memory(
        &mut mesh,
        Route::Same,
        &[1000],
        client,
        cluster,
        &mut results,
    )?;
    Ok((results, proof))
}

/// Runs every scenario once for `mode` over `route` (through the relay: all
/// but HTTP, which no target judges); returns a one-line summary.
fn scenarios(
    mesh: &Mesh,
    relays: &[u32],
    plan: &Plan,
    (mode, route): (Mode, Route),
    (client, server): (&Pod, &Pod),
    results: &mut Results,
) -> Result<String> {
    let tk = bin_path("weft-tk");
    // Where the client connects: the server, or the relay in its own pod.
    let (host, iperf_port, echo_port) = match mode {
        Mode::Relay => (
            "127.0.0.1".to_owned(),
            IPERF_PORT + RELAY_OFFSET,
            ECHO_PORT + RELAY_OFFSET,
        ),
        Mode::Direct | Mode::Weft => (server.ip.to_string(), IPERF_PORT, ECHO_PORT),
    };
    // Whose own CPU the per-GiB, per-request and per-connection rows count.
    let proxies: Vec<u32> = match mode {
        Mode::Relay => relays.to_vec(),
        Mode::Direct | Mode::Weft => (0..2).map(|n| mesh.agent(n).pid()).collect(),
    };
    let r = route.key();
    let l = route.label();
    let mut add = |key: &str, name: &str, unit: &'static str, value: f64| {
        results.add(
            &format!("{r}.{key}"),
            &format!("{l} {name}"),
            unit,
            mode,
            value,
        );
    };

    let profile = |name: &str| -> Result<Option<Profiler>> {
        if plan.perf && mode == Mode::Weft && route == Route::Cross {
            Profiler::start(&[mesh.agent(0).pid(), mesh.agent(1).pid()], name).map(Some)
        } else {
            Ok(None)
        }
    };

    // 1. Throughput, with the CPU it costs.
    let cpu0 = Cpu::now(&proxies)?;
    let perf = profile("iperf3_1_stream")?;
    let (one, bytes) = iperf3(client, &host, iperf_port, 1, plan.iperf_secs)?;
    drop(perf);
    let cpu1 = Cpu::now(&proxies)?;
    let gib = bytes / GIB;
    add("iperf3_1_stream", "iperf3 1 stream", "Gbit/s", one / 1e9);
    add(
        "cpu_per_gib_machine",
        "machine CPU per GiB (iperf3 1 stream)",
        "CPU-s/GiB",
        (cpu1.machine - cpu0.machine) / gib,
    );
    if mode != Mode::Direct {
        add(
            "cpu_per_gib_agents",
            "agents' CPU per GiB (iperf3 1 stream)",
            "CPU-s/GiB",
            (cpu1.proxies - cpu0.proxies) / gib,
        );
    }
    let (four, _) = iperf3(client, &host, iperf_port, 4, plan.iperf_secs)?;
    add("iperf3_4_streams", "iperf3 4 streams", "Gbit/s", four / 1e9);

    // 2. Request/response on one connection, paced and back to back.
    let target = format!("{host}:{echo_port}");
    let rr = |count: u32, rate: Option<u32>| -> Result<Value> {
        let mut args = vec![
            "rr".to_owned(),
            "--connect".to_owned(),
            target.clone(),
            "--size".to_owned(),
            MESSAGE.to_owned(),
            "--count".to_owned(),
            count.to_string(),
        ];
        if let Some(rate) = rate {
            args.extend(["--rate".to_owned(), rate.to_string()]);
        }
        let v = json_line(&client.exec_ok(&tk, &args)?)?;
        ensure!(v["ok"] == true, "weft-tk rr failed: {v}");
        Ok(v)
    };
    let cpu0 = Cpu::now(&proxies)?;
    let perf = profile("rr_fixed")?;
    let fixed = rr(plan.rr_fixed, Some(RR_RATE))?;
    drop(perf);
    let cpu1 = Cpu::now(&proxies)?;
    let perf = profile("rr_saturated")?;
    let saturated = rr(plan.rr_saturated, None)?;
    drop(perf);
    let cpu2 = Cpu::now(&proxies)?;
    let fixed_ipis = (cpu1.ipis - cpu0.ipis) / f64::from(plan.rr_fixed);
    add(
        "ipis_per_request_fixed",
        "cross-CPU wake-ups per request at 1,000/s",
        "IPIs",
        fixed_ipis,
    );
    add(
        "ipis_per_request_saturated",
        "cross-CPU wake-ups per request back to back",
        "IPIs",
        (cpu2.ipis - cpu1.ipis) / f64::from(plan.rr_saturated),
    );
    if mode != Mode::Direct {
        per_unit(
            &mut add,
            "request",
            "back to back",
            (cpu1, cpu2),
            f64::from(plan.rr_saturated),
        );
    }
    for (v, key, name) in [
        (&fixed, "rr_fixed", "1 KiB req/resp at 1,000/s"),
        (&saturated, "rr_saturated", "1 KiB req/resp back to back"),
    ] {
        for p in ["p50", "p90", "p99", "p999"] {
            let shown = if p == "p999" { "p99.9" } else { p };
            add(
                &format!("{key}_{p}"),
                &format!("{name}, {shown}"),
                "µs",
                num(v, &format!("{p}_us"))?,
            );
        }
    }
    add(
        "rr_saturated_rate",
        "1 KiB req/resp back to back, rate",
        "req/s",
        num(&saturated, "rate_per_s")?,
    );

    // 3. New connections, each with one exchange.
    let cpu0 = Cpu::now(&proxies)?;
    let perf = profile("conn_rate")?;
    let conns = json_line(&client.exec_ok(
        &tk,
        [
            "conn-rate",
            "--connect",
            &target,
            "--size",
            MESSAGE,
            "--count",
            &plan.conns.to_string(),
        ],
    )?)?;
    drop(perf);
    let cpu1 = Cpu::now(&proxies)?;
    ensure!(conns["ok"] == true, "weft-tk conn-rate failed: {conns}");
    add(
        "ipis_per_connection",
        "cross-CPU wake-ups per new connection",
        "IPIs",
        (cpu1.ipis - cpu0.ipis) / f64::from(plan.conns),
    );
    if mode != Mode::Direct {
        per_unit(
            &mut add,
            "connection",
            "new connections",
            (cpu0, cpu1),
            f64::from(plan.conns),
        );
    }
    for (key, name, unit, field) in [
        (
            "conn_rate",
            "new connections (1 KiB exchange each)",
            "conn/s",
            "conns_per_s",
        ),
        ("conn_connect_p50", "connect() p50", "µs", "connect_p50_us"),
        ("conn_connect_p99", "connect() p99", "µs", "connect_p99_us"),
        (
            "conn_exchange_p50",
            "connect + 1 KiB exchange p50",
            "µs",
            "exchange_p50_us",
        ),
        (
            "conn_exchange_p99",
            "connect + 1 KiB exchange p99",
            "µs",
            "exchange_p99_us",
        ),
    ] {
        add(key, name, unit, num(&conns, field)?);
    }

    let summary = format!(
        "iperf3 {:>5.2} (1) {:>5.2} (4) Gbit/s  rr p50 {:>5.1}/{:>5.1} µs ({:.1} IPIs)  {:>6.0} conn/s",
        one / 1e9,
        four / 1e9,
        num(&fixed, "p50_us")?,
        num(&saturated, "p50_us")?,
        fixed_ipis,
        num(&conns, "conns_per_s")?,
    );
    if mode == Mode::Relay {
        // The relay stands in for the targets' scenarios; HTTP is not one.
        return Ok(summary);
    }

    // 4. HTTP with wrk against nginx, with the CPU it costs.
    let cpu0 = Cpu::now(&proxies)?;
    let perf = profile("http")?;
    let http = wrk(client, server, plan)?;
    drop(perf);
    let cpu1 = Cpu::now(&proxies)?;
    let per_10k = 10_000.0 / http.requests;
    add("http_rps", "HTTP/1.1 (wrk -> nginx)", "req/s", http.rps);
    for (p, v) in [("p50", http.p50), ("p90", http.p90), ("p99", http.p99)] {
        add(&format!("http_{p}"), &format!("HTTP/1.1 {p}"), "µs", v);
    }
    add(
        "cpu_per_10k_http_machine",
        "machine CPU per 10k HTTP requests",
        "CPU-s/10k",
        (cpu1.machine - cpu0.machine) * per_10k,
    );
    if mode == Mode::Weft {
        add(
            "cpu_per_10k_http_agents",
            "agents' CPU per 10k HTTP requests",
            "CPU-s/10k",
            (cpu1.proxies - cpu0.proxies) * per_10k,
        );
    }

    Ok(format!("{summary}  http {:>6.0} req/s", http.rps))
}

/// The agents' CPU time and context switches per `unit` (a request, a
/// connection) over `count` of them.
fn per_unit(
    add: &mut impl FnMut(&str, &str, &'static str, f64),
    unit: &str,
    during: &str,
    (before, after): (Cpu, Cpu),
    count: f64,
) {
    add(
        &format!("agents_cpu_per_{unit}"),
        &format!("agents' CPU per {unit} ({during})"),
        "CPU-µs",
        (after.proxies - before.proxies) * 1e6 / count,
    );
    add(
        &format!("agents_switches_per_{unit}"),
        &format!("agents' context switches per {unit} ({during})"),
        "switches",
        (after.switches - before.switches) / count,
    );
}

/// Agent memory, Weft only: each size is measured on freshly started agents,
/// idle and then with that many idle connections held from the client through
/// the agents to `route`'s server (cross-node: both agents, as the source and
/// the destination; same-node: the client's agent, which carries both ends).
fn memory(
    mesh: &mut Mesh,
    route: Route,
    sizes: &[usize],
    client: &Pod,
    cluster: &Cluster,
    results: &mut Results,
) -> Result<()> {
    let tk = bin_path("weft-tk");
    let target = format!("{}:{HOLD_PORT}", route.server(cluster).ip);
    // (key, what the rows call it, node)
    let sides: &[(&str, &str, usize)] = match route {
        Route::Cross => &[
            ("source", "source node", 0),
            ("destination", "destination node", 1),
        ],
        Route::Same => &[("same_node", "node-local, one agent", 0)],
    };
    for &n in sizes {
        for node in 0..2 {
            mesh.stop_agent(node, false)?;
        }
        for node in 0..2 {
            mesh.start_agent(node)?;
        }
        // Let the first certificates and the startup work settle.
        std::thread::sleep(Duration::from_secs(2));
        let idle = sides
            .iter()
            .map(|&(_, _, node)| rss_kib(mesh, node))
            .collect::<Result<Vec<_>>>()?;
        let idle_parts = sides
            .iter()
            .map(|&(_, _, node)| {
                Ok((
                    status_kib(mesh, node, "RssAnon")?,
                    status_kib(mesh, node, "RssFile")?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut c = client.command(&tk);
        c.args([
            "hold",
            "--connect",
            &target,
            "--count",
            &n.to_string(),
            "--hold-secs",
            "600",
        ]);
        let mut holder = client.spawn(&mut c)?;
        let wait = Duration::from_secs(30 + n as u64 / 200);
        holder
            .wait_for_json(wait, |v| v.get("holding").is_some() || v["ok"] == false)
            .with_context(|| format!("holding {n} connections: {}", holder.stderr()))?;
        if let Some(v) = holder.json_lines().iter().find(|v| v["ok"] == false) {
            bail!("holding {n} connections failed: {v}");
        }
        std::thread::sleep(Duration::from_secs(1));
        let held = sides
            .iter()
            .map(|&(_, _, node)| rss_kib(mesh, node))
            .collect::<Result<Vec<_>>>()?;
        holder.kill()?;
        let mut line = String::new();
        for (i, &(key, side, _)) in sides.iter().enumerate() {
            // The cross-node keys and names are the ones earlier runs used.
            if route == Route::Cross {
                results.add(
                    &format!("memory.rss_idle_{key}"),
                    &format!("agent RSS idle ({side})"),
                    "MiB",
                    Mode::Weft,
                    idle[i] / 1024.0,
                );
                results.add(
                    &format!("memory.rss_idle_anon_{key}"),
                    &format!("  of which anonymous: heap, stacks ({side})"),
                    "MiB",
                    Mode::Weft,
                    idle_parts[i].0 / 1024.0,
                );
                results.add(
                    &format!("memory.rss_idle_file_{key}"),
                    &format!("  of which file-backed: the binary's pages, shared ({side})"),
                    "MiB",
                    Mode::Weft,
                    idle_parts[i].1 / 1024.0,
                );
            }
            results.add(
                &format!("memory.rss_{n}_{key}"),
                &format!("agent RSS, {n} idle connections ({side})"),
                "MiB",
                Mode::Weft,
                held[i] / 1024.0,
            );
            results.add(
                &format!("memory.per_connection_{n}_{key}"),
                &format!("agent memory per idle connection, {n} held ({side})"),
                "KiB",
                Mode::Weft,
                (held[i] - idle[i]) / n as f64,
            );
            let _ = write!(
                line,
                " {side}: {:.1} -> {:.1} MiB;",
                idle[i] / 1024.0,
                held[i] / 1024.0
            );
        }
        println!("  memory, {n} idle {} connections:{line}", route.label());
    }
    Ok(())
}

/// `perf record` of both agents (`--call-graph dwarf`) while it lives, into
/// `target/bench/perf-<name>.data`, and `perf stat` of their system calls and
/// context switches into `target/bench/perf-<name>.stat`.
struct Profiler(Vec<std::process::Child>);

/// What `perf stat` counts: every system call, the data-path ones by name, and
/// the scheduler's switches and wake-ups.
const PERF_STAT_EVENTS: &[&str] = &[
    "raw_syscalls:sys_enter",
    "syscalls:sys_enter_read",
    "syscalls:sys_enter_write",
    "syscalls:sys_enter_writev",
    "syscalls:sys_enter_sendto",
    "syscalls:sys_enter_recvfrom",
    "syscalls:sys_enter_epoll_wait",
    "syscalls:sys_enter_futex",
    "syscalls:sys_enter_accept4",
    "syscalls:sys_enter_connect",
    "syscalls:sys_enter_setns",
    "syscalls:sys_enter_socket",
    "syscalls:sys_enter_bind",
    "syscalls:sys_enter_setsockopt",
    "syscalls:sys_enter_getsockopt",
    "syscalls:sys_enter_getsockname",
    "syscalls:sys_enter_getpeername",
    "syscalls:sys_enter_epoll_ctl",
    "syscalls:sys_enter_shutdown",
    "syscalls:sys_enter_close",
    "syscalls:sys_enter_bpf",
    "sched:sched_switch",
    "sched:sched_wakeup",
];

impl Profiler {
    /// Records the processes `pids` as `name`.
    fn start(pids: &[u32], name: &str) -> Result<Profiler> {
        let dir = cmd::repo_root().join("target/bench");
        std::fs::create_dir_all(&dir)?;
        let pids = pids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let child = cmd::tool("perf")
            .args([
                "record",
                "-q",
                "-F",
                "1999",
                "--call-graph",
                "dwarf,16384",
                "-p",
                &pids,
                "-o",
            ])
            .arg(dir.join(format!("perf-{name}.data")))
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting perf record (is linux-perf installed?)")?;
        let mut profiler = Profiler(vec![child]);
        let mut stat = cmd::tool("perf");
        stat.args(["stat", "-p", &pids, "-o"])
            .arg(dir.join(format!("perf-{name}.stat")));
        for e in PERF_STAT_EVENTS {
            stat.args(["-e", e]);
        }
        let child = stat
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting perf stat")?;
        profiler.0.push(child);
        // perf needs a moment to attach before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(profiler)
    }
}

impl Drop for Profiler {
    fn drop(&mut self) {
        for mut child in self.0.drain(..) {
            // SAFETY: kill only sends a signal to our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            let _ = child.wait();
        }
    }
}

/// Resident memory of node `node`'s agent, in KiB.
fn rss_kib(mesh: &Mesh, node: usize) -> Result<f64> {
    status_kib(mesh, node, "VmRSS")
}

/// A `kB` field of the agent's `/proc/<pid>/status`: `VmRSS`, or its parts
/// `RssAnon` (heap, stacks: the agent's own) and `RssFile` (mapped files:
/// its binary's pages, shared with every process that maps it and
/// reclaimable; how many of them are mapped depends on how large the page
/// cache's folios of the file are, so on how it was written and read).
fn status_kib(mesh: &Mesh, node: usize, field: &str) -> Result<f64> {
    let pid = mesh.agent(node).pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// CPU seconds used so far: by the whole machine (busy time of every CPU) and by
/// the two agents; the agents' context switches; and the machine's cross-CPU
/// wake-ups.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    machine: f64,
    /// The proxies' CPU: the two agents', or the two relays' in relay mode.
    proxies: f64,
    /// Context switches of the proxies' threads.
    switches: f64,
    /// Inter-processor interrupts that wake or reschedule another CPU, all
    /// CPUs together (see [`cross_cpu_wakeups`]).
    ipis: f64,
}

impl Cpu {
    /// The counters now; `proxies` are the processes whose own CPU and
    /// switches are counted.
    fn now(proxies: &[u32]) -> Result<Cpu> {
        let tick = clock_tick();
        let stat = std::fs::read_to_string("/proc/stat")?;
        let machine = machine_busy_ticks(&stat).context("no cpu line in /proc/stat")? / tick;
        let mut cpu = 0.0;
        let mut switches = 0.0;
        for &pid in proxies {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
            cpu +=
                process_ticks(&stat).with_context(|| format!("parsing /proc/{pid}/stat"))? / tick;
            switches += context_switches(pid)?;
        }
        let interrupts = std::fs::read_to_string("/proc/interrupts")?;
        let ipis =
            cross_cpu_wakeups(&interrupts).context("no RES or CAL line in /proc/interrupts")?;
        Ok(Cpu {
            machine,
            proxies: cpu,
            switches,
            ipis,
        })
    }
}

/// Cross-CPU wake-ups so far, from `/proc/interrupts`: the rescheduling (`RES`)
/// and function-call (`CAL`) interrupts of every CPU. Waking a task that is to
/// run on another CPU costs one of them (since Linux 5.x mostly a `CAL`: the
/// wake-up is queued on the target CPU); on a VM each is an exit to the host,
/// and wakes a halted vCPU. A thread woken on the CPU that woke it costs none.
fn cross_cpu_wakeups(interrupts: &str) -> Option<f64> {
    counts_after(interrupts, &["RES:", "CAL:"])
}

/// The sum of the numbers that follow any of `labels` at the start of a line
/// of a `/proc` file (leading blanks ignored; one number per CPU in
/// `/proc/interrupts`, one in `/proc/PID/status`), up to the first word that
/// is not a number. `None` if no line has one of the labels.
fn counts_after(text: &str, labels: &[&str]) -> Option<f64> {
    let mut found = false;
    let mut total = 0.0;
    for line in text.lines() {
        let line = line.trim_start();
        let Some(counts) = labels.iter().find_map(|l| line.strip_prefix(l)) else {
            continue;
        };
        found = true;
        total += counts
            .split_whitespace()
            .map_while(|c| c.parse::<f64>().ok())
            .sum::<f64>();
    }
    found.then_some(total)
}

/// Voluntary and involuntary context switches of all of `pid`'s threads.
fn context_switches(pid: u32) -> Result<f64> {
    let mut total = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        // A thread may end between the listing and the read.
        let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else {
            continue;
        };
        total += switches_in_status(&status);
    }
    Ok(total)
}

fn switches_in_status(status: &str) -> f64 {
    counts_after(
        status,
        &["voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:"],
    )
    .unwrap_or(0.0)
}

fn clock_tick() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Busy ticks of all CPUs from `/proc/stat`: everything but idle and iowait.
fn machine_busy_ticks(stat: &str) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let busy = f.first()? + f.get(1)? + f.get(2)? + f.get(5)? + f.get(6)? + f.get(7)?;
    Some(busy)
}

/// utime + stime of a `/proc/PID/stat` line.
fn process_ticks(stat: &str) -> Option<f64> {
    // The command name may contain spaces: fields are counted after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `rest` starts at field 3.
    Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
}

/// Proves the labels of one mode's runs from the agents' access logs.
fn check_labels(
    mesh: &Mesh,
    cluster: &Cluster,
    round: usize,
    mode: Mode,
    before: (usize, usize),
) -> Result<Value> {
    let after = settled_log_counts(mesh);
    let out = mesh.access_logs(0).split_off(before.0);
    let inb = mesh.access_logs(1).split_off(before.1);
    let cross_ip = Route::Cross.server(cluster).ip.to_string();
    let to_cross = |v: &&Value| {
        v["dst.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{cross_ip}:")))
    };
    let cross_out: Vec<&Value> = out.iter().filter(to_cross).collect();
    let same_ip = Route::Same.server(cluster).ip.to_string();
    let same: Vec<&Value> = out
        .iter()
        .filter(|v| {
            v["dst.addr"]
                .as_str()
                .is_some_and(|a| a.starts_with(&format!("{same_ip}:")))
        })
        .collect();
    let not_local = same
        .iter()
        .filter(|v| v["security"] != "node_local")
        .count();
    let not_mtls = |lines: &[&Value]| {
        lines
            .iter()
            .filter(|v| v["security"] != "mutual_tls")
            .count()
    };
    let inb_refs: Vec<&Value> = inb.iter().collect();
    match mode {
        Mode::Weft => {
            ensure!(
                !cross_out.is_empty() && !inb.is_empty(),
                "round {round}: the Weft run left no access-log lines for cross-node connections \
                 on node 0 ({}) or node 1 ({}): nothing was captured",
                cross_out.len(),
                inb.len()
            );
            ensure!(
                not_mtls(&cross_out) == 0 && not_mtls(&inb_refs) == 0,
                "round {round}: cross-node connections not over mutual TLS: {} of {} on node 0, \
                 {} of {} on node 1",
                not_mtls(&cross_out),
                cross_out.len(),
                not_mtls(&inb_refs),
                inb.len()
            );
            // Both sides of each same-node connection log on node 0.
            ensure!(
                !same.is_empty() && not_local == 0,
                "round {round}: same-node connections not connected in-process: {not_local} of \
                 {} access-log lines on node 0",
                same.len()
            );
        }
        Mode::Direct | Mode::Relay => ensure!(
            out.is_empty() && inb.is_empty(),
            "round {round}: the {} run went through the agents ({} access-log lines on node 0, \
             {} on node 1)",
            mode.name(),
            out.len(),
            inb.len()
        ),
    }
    Ok(json!({
        "round": round,
        "mode": mode.name(),
        "node0_lines": out.len(),
        "node0_cross_node_mutual_tls": cross_out.len() - not_mtls(&cross_out),
        "node1_lines": inb.len(),
        "node1_mutual_tls": inb.len() - not_mtls(&inb_refs),
        "node0_same_node_local": same.len() - not_local,
        "settled_counts_after": [after.0, after.1],
    }))
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

/// Bits per second and bytes received in an iperf3 run of `streams` streams.
fn iperf3(client: &Pod, host: &str, port: u16, streams: u32, secs: u32) -> Result<(f64, f64)> {
    let out = client.exec(
        "iperf3",
        [
            "-c",
            host,
            "-p",
            &port.to_string(),
            "-t",
            &secs.to_string(),
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
    let sum = &report["end"]["sum_received"];
    Ok((num(sum, "bits_per_second")?, num(sum, "bytes")?))
}

/// What one wrk run measured (latencies in µs).
#[derive(Debug, PartialEq)]
struct Http {
    rps: f64,
    requests: f64,
    p50: f64,
    p90: f64,
    p99: f64,
}

fn wrk(client: &Pod, server: &Pod, plan: &Plan) -> Result<Http> {
    let out = client.exec_ok(
        "wrk",
        [
            "-t1",
            &format!("-c{}", plan.http_connections),
            &format!("-d{}s", plan.http_secs),
            "--latency",
            &format!("http://{}:{HTTP_PORT}/", server.ip),
        ],
    )?;
    parse_wrk(&out)
}

/// Reads wrk's `--latency` report; fails on any socket error or non-2xx answer.
fn parse_wrk(out: &str) -> Result<Http> {
    if let Some(line) = out.lines().find(|l| {
        let l = l.trim();
        l.starts_with("Non-2xx") || l.starts_with("Socket errors")
    }) {
        bail!("wrk reported errors: {}\n{out}", line.trim());
    }
    let mut pct = std::collections::HashMap::new();
    let mut requests = None;
    let mut rps = None;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if let Some((n, _)) = line.split_once(" requests in ") {
            requests = n.trim().parse::<f64>().ok();
        } else if let Some((p, v)) = line.split_once('%')
            && let (Ok(p), Some(v)) = (p.trim().parse::<u32>(), duration_us(v.trim()))
        {
            pct.insert(p, v);
        }
    }
    let get = |p: u32| {
        pct.get(&p)
            .copied()
            .with_context(|| format!("wrk printed no {p}% latency:\n{out}"))
    };
    Ok(Http {
        rps: rps.with_context(|| format!("wrk printed no Requests/sec:\n{out}"))?,
        requests: requests.with_context(|| format!("wrk printed no request count:\n{out}"))?,
        p50: get(50)?,
        p90: get(90)?,
        p99: get(99)?,
    })
}

/// `394.00us`, `1.23ms`, `2.00s` in µs.
fn duration_us(s: &str) -> Option<f64> {
    let (n, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    n.parse::<f64>().ok().map(|v| v * scale)
}

fn targets(results: &Results, plan: &Plan) -> Vec<Target> {
    let ratio = |key: &str| results.get(key).map(Row::ratio);
    let added = |key: &str| {
        results
            .get(key)
            .map(|r| r.weft_median() - r.direct_median())
    };
    let relayed = |key: &str| results.get(key).filter(|r| !r.relay.is_empty());
    let relay_ratio = |key: &str| relayed(key).map(|r| r.relay_median() / r.direct_median());
    let relay_added = |key: &str| relayed(key).map(|r| r.relay_median() - r.direct_median());
    let weft = |key: &str| results.get(key).map(Row::weft_median);
    let max_of = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let most_held = plan.held.iter().max().copied().unwrap_or(0);
    // The proxies' own CPU per GiB (the agents', or the relays') against what
    // the whole machine spends on a GiB direct.
    let direct_cpu = results
        .get("cross_node.cpu_per_gib_machine")
        .map(Row::direct_median);
    let per_direct_cpu = |proxies: Option<f64>| proxies.zip(direct_cpu).map(|(p, d)| p / d);
    let cpu = per_direct_cpu(weft("cross_node.cpu_per_gib_agents"));
    let relay_cpu = per_direct_cpu(relayed("cross_node.cpu_per_gib_agents").map(Row::relay_median));
    let shown = |value: Option<f64>, unit: &str| {
        value.filter(|v| v.is_finite()).map_or("-".into(), |v| {
            if unit == "x" {
                format!("{v:.2}x")
            } else {
                format!("{v:.1} {unit}")
            }
        })
    };
    let t = |what,
             goal,
             (value, relay): (Option<f64>, Option<f64>),
             unit: &str,
             ok: fn(f64) -> bool| Target {
        what: String::from(what),
        goal,
        value,
        shown: shown(value, unit),
        met: value.filter(|v| v.is_finite()).map(ok),
        relay,
        relay_shown: shown(relay, unit),
    };
    let both_ratio = |key: &str| (ratio(key), relay_ratio(key));
    let both_added = |key: &str| (added(key), relay_added(key));
    vec![
        t(
            "single-stream throughput, Weft/direct",
            ">= 0.55x",
            both_ratio("cross_node.iperf3_1_stream"),
            "x",
            |v| v >= 0.55,
        ),
        t(
            "4-stream throughput, Weft/direct",
            ">= 0.60x",
            both_ratio("cross_node.iperf3_4_streams"),
            "x",
            |v| v >= 0.60,
        ),
        t(
            "latency added at p50 (1 KiB at 1,000/s)",
            "<= 60 µs",
            both_added("cross_node.rr_fixed_p50"),
            "µs",
            |v| v <= 60.0,
        ),
        t(
            "latency added at p99 (1 KiB at 1,000/s)",
            "<= 300 µs",
            both_added("cross_node.rr_fixed_p99"),
            "µs",
            |v| v <= 300.0,
        ),
        t(
            "new-connection rate, Weft/direct",
            ">= 0.50x",
            both_ratio("cross_node.conn_rate"),
            "x",
            |v| v >= 0.50,
        ),
        t(
            "agent RSS idle (larger of the two)",
            "<= 16 MiB",
            (
                max_of(
                    weft("memory.rss_idle_source"),
                    weft("memory.rss_idle_destination"),
                ),
                None,
            ),
            "MiB",
            |v| v <= 16.0,
        ),
        t(
            "agent memory per idle connection (larger side, most held)",
            "<= 16 KiB",
            (
                max_of(
                    weft(&format!("memory.per_connection_{most_held}_source")),
                    weft(&format!("memory.per_connection_{most_held}_destination")),
                ),
                None,
            ),
            "KiB",
            |v| v <= 16.0,
        ),
        t(
            "agents' CPU per GiB / machine CPU per GiB direct",
            "<= 2.0x",
            (cpu, relay_cpu),
            "x",
            |v| v <= 2.0,
        ),
    ]
}

fn show(v: f64, unit: &str) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let digits = match unit {
        "Gbit/s" | "CPU-s/GiB" | "CPU-s/10k" | "IPIs" => 2,
        "vCPU" => 3,
        "req/s" | "conn/s" => 0,
        _ => 1,
    };
    format!("{v:.digits$} {unit}")
}

fn table(results: &Results) -> String {
    let mut out = format!(
        "  {:<62} {:>16} {:>7} {:>16} {:>7} {:>8}\n",
        "scenario", "direct", "spread", "Weft", "spread", "ratio"
    );
    for r in &results.rows {
        let _ = writeln!(
            out,
            "  {:<62} {:>16} {:>7} {:>16} {:>7} {:>8}",
            r.name,
            show(r.direct_median(), r.unit),
            pct(spread(&r.direct)),
            show(r.weft_median(), r.unit),
            pct(spread(&r.weft)),
            times(r.ratio(), "x"),
        );
    }
    out
}

/// The scenarios measured through the minimal relay too: direct, relay and
/// Weft side by side.
fn relay_table(results: &Results) -> String {
    let mut out = format!(
        "  {:<50} {:>16} {:>16} {:>16} {:>12} {:>11} {:>10}\n",
        "yardstick (cross-node)",
        "direct",
        "minimal relay",
        "Weft",
        "relay/direct",
        "Weft/direct",
        "Weft/relay"
    );
    for r in results.rows.iter().filter(|r| !r.relay.is_empty()) {
        let [d, rl, w, rd, wd, wr] = relay_cells(r, "x");
        let _ = writeln!(
            out,
            "  {:<50} {d:>16} {rl:>16} {w:>16} {rd:>12} {wd:>11} {wr:>10}",
            r.name
        );
    }
    out
}

/// A yardstick row's cells: direct, relay and Weft, then relay/direct,
/// Weft/direct and Weft/relay with `sign`.
fn relay_cells(r: &Row, sign: &str) -> [String; 6] {
    [
        show(r.direct_median(), r.unit),
        show(r.relay_median(), r.unit),
        show(r.weft_median(), r.unit),
        times(r.relay_median() / r.direct_median(), sign),
        times(r.ratio(), sign),
        times(r.weft_median() / r.relay_median(), sign),
    ]
}

/// `v` as a ratio with two decimals and `sign`, or "-".
fn times(v: f64, sign: &str) -> String {
    if v.is_finite() {
        format!("{v:.2}{sign}")
    } else {
        "-".into()
    }
}

fn targets_table(targets: &[Target]) -> String {
    let mut out = String::from("  targets (cross-node):\n");
    for t in targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "    {:<60} {:>10}  goal {:<10} {verdict:<8} minimal relay {}",
            t.what, t.shown, t.goal, t.relay_shown
        );
    }
    out
}

fn pct(v: f64) -> String {
    if v.is_finite() {
        format!("{:.0}%", v * 100.0)
    } else {
        "-".into()
    }
}

fn markdown(
    results: &Results,
    targets: &[Target],
    machine: &Value,
    commit: Option<&str>,
    when: &str,
    plan: &Plan,
) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "Run at {when} on commit `{}`: {}. {} rounds, direct, the minimal relay and Weft alternating; medians over \
         rounds, spread = (max − min) / median.\n",
        commit.unwrap_or("?"),
        machine_line(machine),
        plan.rounds,
    );
    md.push_str(
        "| target (cross-node) | goal | this run | | a minimal relay on each node |\n\
         |---|---|---|---|---|\n",
    );
    for t in targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "**missed**",
            None => "not measured",
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {verdict} | {} |",
            t.what, t.goal, t.shown, t.relay_shown
        );
    }
    md.push_str(
        "\nThe yardstick: the same cross-node scenarios through a minimal plaintext relay in \
         the client's pod and one in the server's pod (`weft-tk relay`: no TLS, HTTP/2, policy \
         or eBPF), no pod enrolled. In the agents' rows the relay column is the two relays' own \
         CPU and switches.\n\n\
         | scenario | direct | minimal relay | Weft | relay/direct | Weft/direct | Weft/relay |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for r in results.rows.iter().filter(|r| !r.relay.is_empty()) {
        let _ = writeln!(md, "| {} | {} |", r.name, relay_cells(r, "×").join(" | "));
    }
    md.push_str("\n| scenario | direct | spread | Weft | spread | Weft/direct |\n|---|---|---|---|---|---|\n");
    for r in &results.rows {
        let ratio = if r.ratio().is_finite() {
            format!("{:.2}×", r.ratio())
        } else {
            "—".into()
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {ratio} |",
            r.name,
            show(r.direct_median(), r.unit),
            pct(spread(&r.direct)),
            show(r.weft_median(), r.unit),
            pct(spread(&r.weft)),
        );
    }
    md
}

const BEGIN: &str = "<!-- bench:latest:begin (written by `cargo xtask bench`) -->";
const END: &str = "<!-- bench:latest:end -->";
const L7_BEGIN: &str = "<!-- bench:l7:begin (written by `cargo xtask bench`) -->";
const L7_END: &str = "<!-- bench:l7:end -->";

/// Replaces a generated section of BENCHMARKS.md (between the `markers`) with `md`.
fn update_benchmarks_md(path: &Path, markers: (&str, &str), md: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let new = replace_between(&text, markers, md).with_context(|| {
        format!(
            "{} has no `{}` … `{}` section",
            path.display(),
            markers.0,
            markers.1
        )
    })?;
    std::fs::write(path, new).with_context(|| format!("writing {}", path.display()))
}

fn replace_between(text: &str, (begin, end): (&str, &str), md: &str) -> Option<String> {
    let start = text.find(begin)? + begin.len();
    let end = start + text[start..].find(end)?;
    Some(format!("{}\n{}{}", &text[..start], md, &text[end..]))
}

/// The machine in one line: what decides how fast a wake-up and a copy are.
fn machine_line(machine: &Value) -> String {
    format!(
        "{}, {} CPUs, {} GiB, Linux {}, idle: {}, reclaim: {}",
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["cpus"],
        machine["memory_gib"],
        machine["kernel"].as_str().unwrap_or("?"),
        machine["idle"].as_str().unwrap_or("?"),
        machine["reclaim"].as_str().unwrap_or("?"),
    )
}

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kib| (kib / 1024.0 / 1024.0).round());
    json!({
        "cpu_model": model,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": mem_gib,
        "kernel": read_trimmed("/proc/sys/kernel/osrelease"),
        "idle": idle(),
        "reclaim": reclaim(),
    })
}

/// Kernel threads that wake on their own and hold a CPU for milliseconds set
/// the tail of every latency: a request that meets one waits. DAMON's
/// `kdamond` is one: with a `pageout` scheme it samples memory every
/// `sample_us` and reclaims cold pages, in bursts of 1 to 50 ms on this VM.
fn reclaim() -> String {
    const ADMIN: &str = "/sys/kernel/mm/damon/admin/kdamonds";
    let mut running = Vec::new();
    let count: usize = read_trimmed(&format!("{ADMIN}/nr_kdamonds"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    for k in 0..count {
        let dir = format!("{ADMIN}/{k}");
        if read_trimmed(&format!("{dir}/state")).as_deref() != Some("on") {
            continue;
        }
        let ctx = format!("{dir}/contexts/0");
        let schemes: usize = read_trimmed(&format!("{ctx}/schemes/nr_schemes"))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let actions = (0..schemes)
            .filter_map(|i| read_trimmed(&format!("{ctx}/schemes/{i}/action")))
            .collect();
        let sample_us = read_trimmed(&format!("{ctx}/monitoring_attrs/intervals/sample_us"))
            .and_then(|n| n.parse().ok());
        running.push(Kdamond { actions, sample_us });
    }
    let module = read_trimmed("/sys/module/damon_reclaim/parameters/enabled");
    describe_reclaim(&running, module.as_deref() == Some("Y"))
}

/// A running DAMON worker: what its schemes do and how often it samples.
struct Kdamond {
    actions: Vec<String>,
    sample_us: Option<u64>,
}

fn describe_reclaim(running: &[Kdamond], damon_reclaim: bool) -> String {
    let mut parts: Vec<String> = running
        .iter()
        .map(|k| {
            let actions = if k.actions.is_empty() {
                "monitoring only".to_owned()
            } else {
                k.actions.join("+")
            };
            match k.sample_us {
                Some(us) => format!("DAMON {actions}, sampling every {} ms", us / 1000),
                None => format!("DAMON {actions}"),
            }
        })
        .collect();
    if damon_reclaim {
        parts.push("DAMON_RECLAIM".to_owned());
    }
    if parts.is_empty() {
        "no DAMON".to_owned()
    } else {
        parts.join("; ")
    }
}

/// How an idle CPU waits: it sets the price of every wake-up from idle, and a
/// proxied request has more of them than a direct one. In a VM with the
/// `haltpoll` driver, `guest_halt_poll_ns` 0 means an idle vCPU halts at once, so
/// each wake-up is a VM exit and a host reschedule.
fn idle() -> String {
    describe_idle(
        read_trimmed("/sys/devices/system/cpu/cpuidle/current_driver"),
        read_trimmed("/sys/devices/system/cpu/cpuidle/current_governor_ro")
            .or_else(|| read_trimmed("/sys/devices/system/cpu/cpuidle/current_governor")),
        read_trimmed("/sys/module/haltpoll/parameters/guest_halt_poll_ns"),
    )
}

/// A one-line `/proc` or `/sys` file without its newline; `None` if unreadable.
fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
}

fn describe_idle(
    driver: Option<String>,
    governor: Option<String>,
    poll_ns: Option<String>,
) -> String {
    let mut out = match (driver, governor) {
        (Some(d), Some(g)) if d != g => format!("cpuidle {d}/{g}"),
        (Some(d), _) => format!("cpuidle {d}"),
        (None, _) => "no cpuidle driver".to_owned(),
    };
    if let Some(ns) = poll_ns {
        match ns.parse::<u64>() {
            Ok(0) => out.push_str(", guest halt polling off"),
            Ok(ns) => out.push_str(&format!(", guest halt polling up to {} µs", ns / 1000)),
            Err(_) => {}
        }
    }
    out
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

fn num(v: &Value, key: &str) -> Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("no number {key:?} in {v}"))
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

/// (max − min) / median; 0 for one sample.
fn spread(samples: &[f64]) -> f64 {
    let max = samples.iter().copied().fold(f64::NAN, f64::max);
    let min = samples.iter().copied().fold(f64::NAN, f64::min);
    (max - min) / median(samples)
}

fn finite(v: f64) -> Value {
    finite_opt(v).map_or(Value::Null, Value::from)
}

fn finite_opt(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_spread() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(spread(&[9.0, 10.0, 11.0]), 0.2);
        assert_eq!(spread(&[5.0]), 0.0);
    }

    #[test]
    fn wrk_report() {
        let out = "Running 2s test @ http://10.2.1.2:8080/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.52ms  302.11us   5.10ms   80.00%
    Req/Sec    21.10k     1.20k   23.00k    70.00%
  Latency Distribution
     50%  394.00us
     75%    1.60ms
     90%    1.90ms
     99%    2.50s
  42000 requests in 2.00s, 47.10MB read
Requests/sec:  20999.50
Transfer/sec:     23.55MB
";
        let h = parse_wrk(out).unwrap();
        assert_eq!(
            h,
            Http {
                rps: 20999.5,
                requests: 42000.0,
                p50: 394.0,
                p90: 1900.0,
                p99: 2.5e6,
            }
        );
        let bad = out.replace(
            "Requests/sec",
            "  Socket errors: connect 0, read 3, write 0, timeout 0\nRequests/sec",
        );
        assert!(parse_wrk(&bad).is_err());
        assert!(parse_wrk("Requests/sec: 5").is_err());
    }

    #[test]
    fn cpu_counters() {
        let stat = "cpu  100 5 50 1000 7 3 2 1 0 0\ncpu0 1 2 3\n";
        assert_eq!(machine_busy_ticks(stat), Some(161.0));
        let pid = "42 (weft agent) S 1 42 42 0 -1 4194560 300 0 0 0 250 75 0 0 20 0 9 0 100";
        assert_eq!(process_ticks(pid), Some(325.0));
        let status = "Name:\tweft\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(switches_in_status(status), 127.0);
        let interrupts = "           CPU0       CPU1\n LOC:   2713   2742   Local timer interrupts\n \
                          RES:     20     19   Rescheduling interrupts\n \
                          CAL:    158    151   Function call interrupts\n \
                          TLB:     28     29   TLB shootdowns\n";
        assert_eq!(cross_cpu_wakeups(interrupts), Some(348.0));
        assert_eq!(cross_cpu_wakeups("LOC: 1 2\n"), None);
    }

    #[test]
    fn generated_section_is_replaced() {
        let text = format!("# B\n\n{BEGIN}\nold\n{END}\n\nmore\n");
        let new = replace_between(&text, (BEGIN, END), "new\n").unwrap();
        assert_eq!(new, format!("# B\n\n{BEGIN}\nnew\n{END}\n\nmore\n"));
        assert!(replace_between("nothing", (BEGIN, END), "x").is_none());
    }

    #[test]
    fn idle_is_described() {
        let s = |v: &str| Some(v.to_owned());
        assert_eq!(
            describe_idle(s("haltpoll"), s("haltpoll"), s("0")),
            "cpuidle haltpoll, guest halt polling off"
        );
        assert_eq!(
            describe_idle(s("haltpoll"), s("haltpoll"), s("200000")),
            "cpuidle haltpoll, guest halt polling up to 200 µs"
        );
        assert_eq!(
            describe_idle(s("intel_idle"), s("menu"), None),
            "cpuidle intel_idle/menu"
        );
        assert_eq!(describe_idle(None, None, None), "no cpuidle driver");
    }

    #[test]
    fn reclaim_is_described() {
        let k = |actions: &[&str], sample_us| Kdamond {
            actions: actions.iter().map(|a| (*a).to_owned()).collect(),
            sample_us,
        };
        assert_eq!(describe_reclaim(&[], false), "no DAMON");
        assert_eq!(
            describe_reclaim(&[k(&["pageout"], Some(500_000))], false),
            "DAMON pageout, sampling every 500 ms"
        );
        assert_eq!(
            describe_reclaim(&[k(&[], None)], true),
            "DAMON monitoring only; DAMON_RECLAIM"
        );
        assert_eq!(
            describe_reclaim(&[k(&["pageout", "lru_deprio"], Some(5_000))], false),
            "DAMON pageout+lru_deprio, sampling every 5 ms"
        );
    }

    #[test]
    fn latency_rows_report_added_time() {
        let mut r = Results::default();
        for (d, w) in [(20.0, 80.0), (22.0, 90.0), (30.0, 70.0)] {
            r.add("x.p50", "p50", "µs", Mode::Direct, d);
            r.add("x.p50", "p50", "µs", Mode::Weft, w);
        }
        let j = r.get("x.p50").unwrap().json();
        assert_eq!(j["added"], 58.0);
        assert_eq!(j["direct_median"], 22.0);
        assert!(table(&r).contains("3.64x"), "{}", table(&r));
    }

    #[test]
    fn the_relay_is_reported_beside_the_targets() {
        let mut r = Results::default();
        for (mode, rate, p50) in [
            (Mode::Direct, 10_000.0, 25.0),
            (Mode::Relay, 4_000.0, 125.0),
            (Mode::Weft, 3_000.0, 150.0),
        ] {
            r.add(
                "cross_node.conn_rate",
                "new connections",
                "conn/s",
                mode,
                rate,
            );
            r.add("cross_node.rr_fixed_p50", "p50", "µs", mode, p50);
        }
        // A scenario the relay does not run has no relay fields.
        r.add("cross_node.http_rps", "HTTP", "req/s", Mode::Direct, 9.0);
        r.add("cross_node.http_rps", "HTTP", "req/s", Mode::Weft, 3.0);

        let j = r.get("cross_node.conn_rate").unwrap().json();
        assert_eq!(j["relay_median"], 4_000.0);
        assert_eq!(j["relay_ratio"], 0.4);
        assert_eq!(j["weft_to_relay"], 0.75);
        assert_eq!(
            r.get("cross_node.rr_fixed_p50").unwrap().json()["relay_added"],
            100.0
        );
        assert!(
            r.get("cross_node.http_rps")
                .unwrap()
                .json()
                .get("relay")
                .is_none()
        );

        let plan = Plan::quick();
        let t = targets(&r, &plan);
        let rate = t
            .iter()
            .find(|t| t.what.starts_with("new-connection"))
            .unwrap();
        assert_eq!((rate.value, rate.relay), (Some(0.3), Some(0.4)));
        assert_eq!(rate.met, Some(false));
        let p50 = t.iter().find(|t| t.what.contains("p50")).unwrap();
        assert_eq!((p50.value, p50.relay), (Some(125.0), Some(100.0)));
        // Where the relay has no measure of its own, it shows none.
        assert!(t.iter().any(|t| t.relay.is_none() && t.relay_shown == "-"));

        let md = markdown(&r, &t, &json!({}), Some("abc"), "now", &plan);
        assert!(
            md.contains(
                "| new-connection rate, Weft/direct | >= 0.50x | 0.30x | **missed** | 0.40x |"
            ),
            "{md}"
        );
        assert!(md.contains("| new connections | 10000 conn/s | 4000 conn/s | 3000 conn/s | 0.40× | 0.30× | 0.75× |"), "{md}");
        assert!(!md.contains("| HTTP | 9 req/s | -"), "{md}");
        assert!(relay_table(&r).contains("0.75x"), "{}", relay_table(&r));
    }
}
