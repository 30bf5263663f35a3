//! Dead peers are noticed (issue 19 item 4): when the path between two nodes
//! silently drops everything, the pooled HBONE connection over it is closed
//! within seconds (an unanswered HTTP/2 PING), and once the path is back, new
//! connections go on a fresh one at once instead of queueing behind the dead
//! connection until TCP's backed-off retransmissions get through.
//!
//! The black hole: a `blackhole` route on each node for the other node's pod
//! range, which drops the forwarded packets of both directions without a word
//! (no ICMP; the kernel answers an `unreachable` route with one, which TCP would
//! hear). `tc netem` or an nftables drop rule would do the same on the uplink,
//! but this kernel has neither `sch_netem` nor `act_gact`, and `nft` is not
//! installed; routes need nothing more than iproute2.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use serde_json::Value;
use weft_tests::{Cluster, Mesh, Pod, cluster::Host as _, eventually, tk};

const PORT: u16 = 9000;

/// How long the path stays black-holed. More than the default PING interval
/// plus its timeout (15 s), so the agent has noticed by the end; and long
/// enough that TCP alone would not: the old connection's retransmissions back
/// off to 0.2 × 2^k s, so after a 30 s outage the next one is ~20 s away.
const OUTAGE: Duration = Duration::from_secs(30);

/// New connections must work again within this of the path coming back: a
/// connect made during the outage may still be waiting for its next SYN (1, 3,
/// 7 s after it started), nothing else should.
const RECOVERY: Duration = Duration::from_secs(10);

/// How long the test watches for the recovery before giving up, so a failure
/// reports how long it really took.
const WATCH: Duration = Duration::from_secs(40);

fn addr(ip: impl Into<IpAddr>) -> String {
    SocketAddr::new(ip.into(), PORT).to_string()
}

/// Black-holes (or restores) the pod traffic between nodes 0 and 1, both ways.
fn black_hole(c: &Cluster, on: bool) -> Result<()> {
    for (from, to) in [(0, 1), (1, 0)] {
        let (node, other) = (c.node(from), c.node(to));
        for (net, len, via) in [
            (
                other.pod_cidr.0.to_string(),
                other.pod_cidr.1,
                other.ip.to_string(),
            ),
            (
                other.pod_cidr6.0.to_string(),
                other.pod_cidr6.1,
                other.ip6.to_string(),
            ),
        ] {
            let dst = format!("{net}/{len}");
            let mut args = vec!["route", "replace"];
            if on {
                args.extend(["blackhole", &dst]);
            } else {
                args.extend([dst.as_str(), "via", &via]);
            }
            node.exec_ok("ip", &args)?;
        }
    }
    Ok(())
}

/// One new connection from the client pod, as an application makes it.
#[derive(Debug)]
struct Try {
    started: Instant,
    ended: Instant,
    ok: bool,
    report: Value,
}

/// Makes new connections from `from` to `to`, one after another, until `stop`
/// says so; each waits up to 15 s, longer than the agent's connect timeout
/// (10 s), so it ends with the agent's own verdict. One at a time, the way a
/// client retrying after each failure would; it also keeps the pool's choice
/// plain (no concurrent stream makes the pool open a second connection).
fn keep_connecting(from: Pod, to: String, tries: Arc<Mutex<Vec<Try>>>, stop: Arc<Mutex<bool>>) {
    while !*stop.lock().unwrap() {
        let started = Instant::now();
        let report = tk::say(&from, &to, "ping", &["--timeout-secs", "15"])
            .unwrap_or_else(|e| serde_json::json!({ "ok": false, "error": format!("{e:#}") }));
        let ok = report["ok"] == true;
        tries.lock().unwrap().push(Try {
            started,
            ended: Instant::now(),
            ok,
            report,
        });
        if !ok {
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `ss` on the TCP sockets of `pod` that match `filter`, with their timers.
fn sockets(pod: &Pod, filter: &str) -> Result<String> {
    let mut args = vec!["-tnoH", "state", "established"];
    args.extend(filter.split(' '));
    pod.exec_ok("ss", &args)
}

/// The value of `name` (a series without labels) on node `node`'s `/metrics`.
fn metric(c: &Cluster, node: usize, name: &str) -> Result<Option<f64>> {
    let page = c
        .node(node)
        .exec_ok("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    Ok(page
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok()))
}

#[test]
fn a_black_holed_hbone_connection_is_closed_and_new_connections_work_soon_after_the_path_returns()
-> Result<()> {
    if !weft_tests::require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("blackhole", 2, 1)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let (client, server) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(server, PORT)?;
    let to = addr(server.ip);

    // A pooled connection from node 0's agent to the server's 15008, idle.
    let first = tk::say(client, &to, "hello", &[])?;
    ensure!(first["ok"] == true, "before the outage: {first}");
    let closed_ok = |v: &Value| v["direction"] == "outbound" && v["end"] == "closed";
    let mut pooled = None;
    eventually(weft_tests::PATIENCE, || {
        pooled = mesh
            .access_logs(0)
            .iter()
            .filter(|v| closed_ok(v))
            .find_map(|v| v["hbone.connection"].as_u64());
        pooled.is_some()
    });
    let pooled = pooled.expect("the first connection's access-log line names its HBONE connection");
    let hbone = format!("dst {}:15008", server.ip);
    // Sampled until both are idle: a socket with bytes in flight (a frame
    // being sent as the first stream closes) shows its retransmission timer
    // instead.
    let (mut client_side, mut server_side) = (String::new(), String::new());
    eventually(weft_tests::PATIENCE, || {
        client_side = sockets(client, &hbone).unwrap_or_default();
        server_side = sockets(server, "sport = :15008").unwrap_or_default();
        [&client_side, &server_side]
            .iter()
            .all(|ss| ss.contains("timer:(keepalive"))
    });

    black_hole(&c, true)?;
    let cut = Instant::now();
    let tries = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(Mutex::new(false));
    let worker = {
        let (from, to, tries, stop) = (client.clone(), to.clone(), tries.clone(), stop.clone());
        thread::spawn(move || keep_connecting(from, to, tries, stop))
    };
    thread::sleep(OUTAGE.saturating_sub(cut.elapsed()));
    black_hole(&c, false)?;
    let restored = Instant::now();
    let recovered = || {
        tries
            .lock()
            .unwrap()
            .iter()
            .find(|t| t.ok && t.ended > restored)
            .map(|t| t.ended - restored)
    };
    eventually(WATCH, || recovered().is_some());
    *stop.lock().unwrap() = true;
    let took = recovered();
    let _ = worker.join();
    let tries = tries.lock().unwrap();
    let during: Vec<&Try> = tries.iter().filter(|t| t.started < restored).collect();
    eprintln!(
        "blackhole: new connections worked again {took:?} after the path returned \
         ({} tries during the {OUTAGE:?} outage, {} succeeded)",
        during.len(),
        during.iter().filter(|t| t.ok).count()
    );
    let log: Vec<String> = tries
        .iter()
        .map(|t| {
            format!(
                "{:+.1}s..{:+.1}s {}",
                t.started.duration_since(cut).as_secs_f64() - OUTAGE.as_secs_f64(),
                t.ended.duration_since(cut).as_secs_f64() - OUTAGE.as_secs_f64(),
                t.report
            )
        })
        .collect();
    let log = log.join("\n");
    let took = took.unwrap_or_else(|| {
        panic!("no new connection worked within {WATCH:?} of the path returning; tries (seconds from the restore):\n{log}")
    });
    assert!(
        took <= RECOVERY,
        "new connections worked again only {took:?} after the path returned (bound {RECOVERY:?}); \
         tries (seconds from the restore):\n{log}"
    );
    ensure!(
        during.iter().all(|t| !t.ok || t.ended > restored),
        "a connection worked through the black hole:\n{log}"
    );

    // The dead connection was closed for its unanswered PING, and the
    // connection that worked again went on a fresh one.
    let silenced = mesh.logs(0, |v| {
        v["message"] == "HBONE connection closed: no answer to PING"
            && v["connection"].as_u64() == Some(pooled)
    });
    assert_eq!(
        silenced.len(),
        1,
        "the pooled connection {pooled} was not closed for its PING"
    );
    let unanswered = metric(&c, 0, "weft_hbone_ping_timeouts_total")?;
    assert!(
        unanswered >= Some(1.0),
        "weft_hbone_ping_timeouts_total: {unanswered:?}"
    );
    let mut after = Vec::new();
    eventually(weft_tests::PATIENCE, || {
        after = mesh
            .access_logs(0)
            .into_iter()
            .filter(|v| closed_ok(v))
            .filter_map(|v| v["hbone.connection"].as_u64())
            .collect();
        after.len() >= 2
    });
    assert!(
        after.len() >= 2 && after[1..].iter().all(|&id| id != pooled),
        "connections after the outage went on {after:?}, the dead one was {pooled}"
    );

    // Both ends of an HBONE connection carry TCP keepalive, the kernel's own
    // floor under the PINGs (`ss` shows its timer on an idle socket).
    for (side, ss) in [("client", &client_side), ("server", &server_side)] {
        assert!(
            ss.contains("timer:(keepalive"),
            "the {side} side of the HBONE connection has no keepalive timer: {ss:?}"
        );
    }
    Ok(())
}

/// A stream in flight on a black-holed connection fails within the PING
/// interval plus its timeout (10 + 5 s by default), with a reset the
/// application sees, instead of hanging until TCP gives up (~15 min) or the
/// application's own timeout.
#[test]
fn a_flow_on_a_black_holed_hbone_connection_is_reset_within_the_ping_timeout() -> Result<()> {
    if !weft_tests::require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("blackhole-flow", 2, 1)?;
    let _mesh = Mesh::start(&c, |_| true)?;
    let (client, server) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(server, PORT)?;

    // An exchange every 200 ms for as long as it lasts, each allowed 60 s.
    let mut cmd = client.command(weft_tests::bin_path("weft-tk"));
    cmd.args(["say", "--connect", &addr(server.ip), "--message", "flow"])
        .args(["--repeat", "1000000", "--interval-ms", "200"])
        .args(["--timeout-secs", "60"]);
    let mut flow = client.spawn(&mut cmd)?;
    thread::sleep(Duration::from_secs(2));
    ensure!(
        flow.try_wait()?.is_none(),
        "the flow ended before the outage: {:?}",
        flow.stdout_lines()
    );

    black_hole(&c, true)?;
    let cut = Instant::now();
    let ended = flow.wait_timeout(Duration::from_secs(25));
    let took = cut.elapsed();
    black_hole(&c, false)?;
    let report = flow.json_lines().pop().unwrap_or_default();
    eprintln!("blackhole-flow: the flow ended {took:?} into the outage: {report}");
    ended?;
    assert!(
        report["error"]
            .as_str()
            .is_some_and(|e| e.contains("reset")),
        "the flow should end with a reset: {report}"
    );
    assert!(
        took <= Duration::from_secs(20),
        "the flow ended only {took:?} into the outage: {report}"
    );
    Ok(())
}
