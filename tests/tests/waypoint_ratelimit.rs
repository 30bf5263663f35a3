//! Rate limits at the waypoint end to end: local GCRA (the limit holds, keyed
//! by a header, shadow mode) and global ones over a real `redis-server` that
//! two waypoint replicas share, with Redis killed and restarted mid-test.
//! Clients are curl and h2load; servers `weft-tk http-echo`.
//!
//! | pod   | role |
//! |-------|------|
//! | (0,0) | the client |
//! | (0,1) | the waypoint (service `wp`) |
//! | (0,2) | a second waypoint replica (global tests) |
//! | (1,0) | http-echo, service `echo` (bound to the waypoint) |
//! | (1,1) | `redis-server` (not in the mesh: the waypoints reach it directly) |
//!
//! Tolerances: GCRA lets `burst` through at once and then one request every
//! `unit / requests`, so over a run of `d` seconds `burst + rate × d` pass; the
//! tests measure `d` and allow ±3 (the run's start and end are not the
//! first and last request's).

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use weft_tests::l7::{self, CurlResult};
use weft_tests::{Cluster, Host as _, Mesh, Proc, require_privileged};

const ECHO: &str = "10.96.0.20";
const HTTP: u16 = 8080;
const REDIS: u16 = 6379;

struct Rl<'c> {
    c: &'c Cluster,
    _mesh: Mesh<'c>,
    _procs: Vec<Proc>,
    waypoints: Vec<Proc>,
}

impl<'c> Rl<'c> {
    fn start(c: &'c Cluster, limits: &str, replicas: usize, wp_args: &[&str]) -> Result<Rl<'c>> {
        let wps: Vec<_> = (1..=replicas).map(|i| c.pod(0, i)).collect();
        let redis = c.pod(1, 1);
        let mut mesh = Mesh::new(c, |p| {
            !wps.iter().any(|w| w.name == p.name) && p.name != redis.name
        })?;
        for wp in &wps {
            mesh.set_extra(wp, "  native_tunnel: true\n  labels: {role: waypoint}\n")?;
        }
        mesh.set_extra(c.pod(1, 0), "  labels: {app: echo}\n")?;
        mesh.set_sections(&format!(
            "services:\n\
             - {{name: echo, addresses: [{ECHO}], selector: {{app: echo}}, waypoint: wp, ports: [{{port: 80, target_port: {HTTP}}}]}}\n\
             - {{name: wp, addresses: [], ports: [], selector: {{role: waypoint}}}}\n{limits}"
        ))?;
        mesh.start_all()?;
        let procs = vec![l7::http_echo(c.pod(1, 0), HTTP, "v1")?];
        let mut waypoints = Vec::new();
        for wp in &wps {
            waypoints.push(mesh.start_waypoint(wp, wp_args)?);
        }
        Ok(Rl {
            c,
            _mesh: mesh,
            _procs: procs,
            waypoints,
        })
    }

    fn get(&self, args: &[&str]) -> Result<CurlResult> {
        l7::curl(self.c.pod(0, 0), &format!("http://{ECHO}/x"), args)
    }
}

/// A `redis-server` in pod (1,1), on [`REDIS`], without persistence; killed
/// when dropped.
fn redis(c: &Cluster) -> Result<Proc> {
    weft_tests::l7::redis_server(c.pod(1, 1), REDIS)
}

fn privileged(test: impl FnOnce() -> Result<()>) -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    test()
}

/// `n` requests over `conns` HTTP/1.1 connections: (2xx, 4xx, 5xx, seconds).
fn load(s: &Rl, n: u64, conns: u64) -> Result<(u64, u64, u64, f64)> {
    let started = Instant::now();
    let r = l7::h2load(s.c.pod(0, 0), &format!("http://{ECHO}/x"), n, conns, false)?;
    let secs = started.elapsed().as_secs_f64();
    ensure!(r.done == n, "{r:?}");
    Ok((r.status[0], r.status[2], r.status[3], secs))
}

#[test]
fn local_limit_holds_with_its_headers() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("rl-local", 2, 3)?;
        let s = Rl::start(
            &c,
            "rate_limits:\n\
             - name: ten\n  target_refs: [{kind: Service, name: echo}]\n  x_ratelimit_headers: true\n\
             \x20 rules: [{limit: {requests: 10, unit: Second}, burst: 5}]\n",
            1,
            &[],
        )?;
        let (ok, limited, errors, secs) = load(&s, 50, 1)?;
        let expected = 5.0 + 10.0 * secs;
        ensure!(errors == 0 && ok + limited == 50, "{ok} {limited} {errors}");
        ensure!(
            (ok as f64 - expected).abs() <= 3.0,
            "{ok} passed in {secs:.2}s, expected {expected:.1} ± 3"
        );
        // Exhaust the burst, then look at a refusal.
        let mut refusal = None;
        for _ in 0..20 {
            let r = s.get(&[])?;
            if r.status == 429 {
                refusal = Some(r);
                break;
            }
        }
        let r = refusal.context("no 429 after 20 requests at once")?;
        ensure!(r.header("retry-after") == Some("1"), "{r:?}");
        ensure!(
            r.header("ratelimit-policy") == Some("\"ten\";q=10;w=1"),
            "{r:?}"
        );
        ensure!(r.header("ratelimit") == Some("\"ten\";r=0;t=1"), "{r:?}");
        ensure!(r.header("x-ratelimit-limit") == Some("10"), "{r:?}");
        ensure!(r.header("x-ratelimit-remaining") == Some("0"), "{r:?}");
        // After a quiet second the burst is back, and an allowed answer says
        // what is left of it, so a client can pace itself.
        std::thread::sleep(Duration::from_millis(1100));
        let r = s.get(&[])?;
        ensure!(r.status == 200, "{r:?}");
        ensure!(
            r.header("ratelimit-policy") == Some("\"ten\";q=10;w=1"),
            "{r:?}"
        );
        ensure!(r.header("ratelimit") == Some("\"ten\";r=4;t=1"), "{r:?}");
        ensure!(r.header("x-ratelimit-remaining") == Some("4"), "{r:?}");
        Ok(())
    })
}

#[test]
fn keyed_by_a_header_and_shadow_mode_never_refuses() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("rl-keyed", 2, 3)?;
        let s = Rl::start(
            &c,
            "rate_limits:\n\
             - name: per-user\n  target_refs: [{kind: Service, name: echo}]\n  key: [header:x-user]\n\
             \x20 rules: [{client_selectors: [{headers: [{name: x-user, type: RegularExpression, value: 'a.*|b.*'}]}], limit: {requests: 2, unit: Minute}}]\n\
             - name: shadow\n  target_refs: [{kind: Service, name: echo}]\n  shadow: true\n\
             \x20 rules: [{limit: {requests: 1, unit: Hour}}]\n",
            1,
            &[],
        )?;
        let status =
            |user: &str| -> Result<u16> { Ok(s.get(&["-H", &format!("x-user: {user}")])?.status) };
        // Two buckets of two: alice's refusal leaves bob's alone.
        for (user, want) in [
            ("alice", 200),
            ("alice", 200),
            ("alice", 429),
            ("bob", 200),
            ("bob", 200),
            ("bob", 429),
            ("alice", 429),
        ] {
            let got = status(user)?;
            ensure!(got == want, "{user}: {got}, expected {want}");
        }
        // No selector match (carol), no limit; the shadow policy (1 an hour)
        // has been over its limit since the second request, and refused none.
        for _ in 0..5 {
            ensure!(status("carol")? == 200);
        }
        let log = s.waypoints[0].stdout_lines().join("\n");
        ensure!(
            log.contains("shadow mode: let through"),
            "the shadow refusals are logged:\n{log}"
        );
        Ok(())
    })
}

#[test]
fn global_limit_across_two_replicas_and_redis_failures() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("rl-global", 2, 3)?;
        let mut redis_proc = redis(&c)?;
        let addr = format!("{}:{REDIS}", c.pod(1, 1).ip);
        let limits = |mode: &str| {
            format!(
                "rate_limits:\n\
                 - name: shared\n  target_refs: [{{kind: Service, name: echo}}]\n  type: Global\n\
                 \x20 failure_mode: {mode}\n  timeout: 100ms\n  key: [header:x-mode]\n\
                 \x20 rules: [{{limit: {{requests: 20, unit: Minute}}}}]\n"
            )
        };
        // Both modes in one mesh: two policies, told apart by a selector.
        let yaml = format!(
            "{}{}",
            limits("open").replace(
                "rules: [{",
                "rules: [{client_selectors: [{headers: [{name: x-mode, value: open}]}], "
            ),
            limits("closed")
                .replace("rate_limits:\n", "")
                .replace("name: shared", "name: strict")
                .replace(
                    "rules: [{",
                    "rules: [{client_selectors: [{headers: [{name: x-mode, value: closed}]}], "
                )
        );
        let s = Rl::start(&c, &yaml, 2, &["--redis-addr", &addr])?;
        let count = |mode: &str, n: usize| -> Result<[u32; 3]> {
            let mut by = [0; 3];
            for _ in 0..n {
                match s.get(&["-H", &format!("x-mode: {mode}")])?.status {
                    200 => by[0] += 1,
                    429 => by[1] += 1,
                    500 => by[2] += 1,
                    other => anyhow::bail!("status {other}"),
                }
            }
            Ok(by)
        };
        // 40 requests, each a new connection (spread over both replicas):
        // 20 a minute, all at once, in all; one more may refill (one per 3s).
        let first = s.get(&["-H", "x-mode: open"])?;
        ensure!(
            first.status == 200 && first.header("ratelimit") == Some("\"shared\";r=19;t=3"),
            "the first request of 20 a minute leaves 19, full in 3s: {first:?}"
        );
        let [ok, limited, _] = count("open", 39)?;
        let ok = ok + 1;
        ensure!((20..=22).contains(&ok), "{ok} passed, {limited} limited");
        // Redis killed: open lets everything through, closed refuses (500).
        redis_proc.kill()?;
        let [ok, _, _] = count("open", 5)?;
        // Refusals already cached stay refused until their retry-after (≤ 3s).
        std::thread::sleep(Duration::from_secs(3));
        let [ok2, _, _] = count("open", 5)?;
        ensure!(ok + ok2 >= 5, "fail open lets traffic through: {ok} {ok2}");
        let [_, _, failed] = count("closed", 5)?;
        ensure!(failed == 5, "fail closed refuses: {failed} of 5");
        // Redis back (empty): limits hold again.
        let _redis = redis(&c)?;
        std::thread::sleep(Duration::from_millis(300));
        let [ok, limited, failed] = count("closed", 25)?;
        ensure!(
            failed == 0 && (20..=21).contains(&ok) && limited >= 4,
            "after the restart: {ok} {limited} {failed}"
        );
        Ok(())
    })
}

/// A sample of a waypoint's metrics page: the value of series `name`.
fn metric(s: &Rl, replica: usize, name: &str) -> Result<f64> {
    let page =
        s.c.pod(0, replica)
            .exec_ok("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {name} on replica {replica}'s metrics page"))
}

/// A hot bucket with a large burst is leased: Redis grants budget ahead, the
/// replicas admit most requests without a call, and the limit still holds
/// across both: never more than Redis's GCRA allows (shifted by at most a
/// lease's 100 ms), at most a lease per replica (a twentieth of the burst)
/// fewer.
#[test]
fn global_limit_leases_hot_buckets_and_still_holds_across_replicas() -> Result<()> {
    privileged(|| {
        let c = Cluster::new("rl-lease", 2, 3)?;
        let _redis = redis(&c)?;
        let addr = format!("{}:{REDIS}", c.pod(1, 1).ip);
        // 600 a minute: a burst of 600, 10 a second after it; a lease of
        // at most 30.
        let s = Rl::start(
            &c,
            "rate_limits:\n\
             - name: hot\n  target_refs: [{kind: Service, name: echo}]\n  type: Global\n\
             \x20 failure_mode: closed\n  rules: [{limit: {requests: 600, unit: Minute}}]\n",
            2,
            &["--redis-addr", &addr],
        )?;
        let (ok, limited, failed, secs) = load(&s, 2000, 8)?;
        ensure!(failed == 0, "{failed} failed");
        let allowed = 600.0 + 10.0 * secs;
        let (ok_f, lease) = (ok as f64, 30.0);
        ensure!(
            ok_f <= allowed + 10.0 * 0.1 + 3.0,
            "{ok} passed in {secs:.2}s: more than the limit allows ({allowed:.0})"
        );
        ensure!(
            ok_f >= allowed - 2.0 * lease - 3.0,
            "{ok} passed in {secs:.2}s, {limited} limited: more than two leases short of {allowed:.0}"
        );
        let mut leased = 0.0;
        let mut calls = 0.0;
        for replica in [1, 2] {
            leased += metric(&s, replica, "weft_ratelimit_leased_total")?;
            calls += metric(&s, replica, "weft_ratelimit_redis_call_seconds_count")?;
        }
        println!(
            "{ok} admitted, {limited} limited in {secs:.2}s (the limit allows {allowed:.0}); {leased} from leases, {calls} Redis calls"
        );
        ensure!(
            leased >= ok_f / 2.0 && calls <= ok_f / 2.0,
            "{ok} admitted, {leased} of them from leases, with {calls} Redis calls"
        );
        Ok(())
    })
}
