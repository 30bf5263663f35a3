//! The L7 path of `cargo xtask bench`: HTTP/1.1 and HTTP/2 through the
//! waypoint, against direct and against nginx as a reverse proxy in the
//! waypoint's place, in the same run.
//!
//! A 3-node × 2-pod virtual cluster of its own, so each hop crosses nodes: the
//! client is `n0p0`, the waypoint `n1p0`, the nginx yardstick `n1p1` (the
//! waypoint's node, a pod of its own), the server `n2p0` (nginx, one worker, a
//! 1 KiB body; HTTP/1.1 on 8080, h2c on 8081). Three modes, alternating round
//! by round as the L4 modes do:
//!
//! - **direct**: nothing enrolled; the client connects to the server pod.
//! - **nginx** (the yardstick): nothing enrolled; the client connects to nginx
//!   in `n1p1`, one worker, plaintext, which proxies to the server over
//!   HTTP/1.1 keep-alive (nginx 1.22 cannot proxy HTTP/2 to an upstream:
//!   `proxy_http_version` stops at 1.1), for both of its listeners.
//! - **waypoint**: client and server enrolled, service `web` bound to
//!   waypoint service `wp`, whose endpoint is the `weft waypoint` in `n1p0`.
//!   The client connects to the service address; its agent carries the
//!   connection over HBONE to the waypoint, which sends each request over
//!   HBONE with its own identity to the server's agent (HTTP/1.1 upstream for
//!   the `http` port, h2c for the `h2c` port).
//! - **waypoint+policies** (issue 21), right after the waypoint in each round:
//!   the same waypoint and path, with the waypoint's policy phases on every
//!   request: a `RequestAuthentication` (ES256, its key inline; the client
//!   sends a bearer token the bench minted, so after the first request each
//!   check is a hit of the waypoint's cache of verified tokens, as for a
//!   client that keeps its token), an ALLOW `AuthorizationPolicy` of 100
//!   rules of which only the last matches the request's path (as
//!   `benches/policy.rs`), a Local rate limit keyed by the token's `sub` and a
//!   Global one (Redis, `failure_mode: closed`), both too high to refuse. The
//!   Redis is a `redis-server` in `n2p1` (outside the mesh; the waypoint gets
//!   `--redis-addr`). Its rows sit in the waypoint column under their own
//!   names; the waypoint's metrics must show a verified token and two allowed
//!   limit decisions per request sent (one for the requests the Global limit
//!   does not select), else the run fails. To judge "the
//!   Redis limit adds no more than one Redis round trip at p50", the pass
//!   then makes a paired run: 1,000 req/s on one connection where every other
//!   request carries the header the Global limit's rule selects and the rest
//!   a value it does not (`weft-tk http-rr --alternate`), so the two halves
//!   differ by the Redis limit alone and share the VM's drift; and right
//!   after, from the waypoint's pod and paced at the same rate (`weft-tk
//!   redis-rr`), the limit's own call (its script: the one round trip the
//!   target allows) and a PING. `redis-benchmark`'s back-to-back PING is
//!   shown beside them. The `global` bucket is hot and its burst large, so
//!   the waypoint leases it (most of its requests make no call: the proof
//!   counts them); a second paired run alternates with an `exact` rule whose
//!   burst is too small to lease, so that every one of its requests calls
//!   Redis, and shows what a call on the path costs.
//! - **waypoint+policies without Redis**, next to it: the same policies but
//!   the Global limit, which is what the CPU target names ("JWT + authz +
//!   local limit add ≤ 20 µs CPU per request"); the pass with Redis then
//!   says what the Redis limit adds on top.
//!
//! Per protocol: requests/s at saturation (`h2load`: 64 connections, 10
//! streams each for HTTP/2, one for HTTP/1.1), latency at a fixed 1,000/s on
//! one connection (`weft-tk http-rr`, each request timed), the proxy's CPU
//! (the waypoint's or nginx's; the two agents' too) per 1,000 req/s at that
//! rate and per request at saturation. Then memory: the proxy's RSS idle
//! (freshly started) and with 1,000 idle HTTP/1.1 keep-alive connections held
//! through it.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use weft_tests::Host as _;
use weft_tests::jwt::{EsKey, jwks};
use weft_tests::l7::{self, Nginx};
use weft_tests::{Cluster, Mesh, Pod, Proc, bin_path, eventually};

use super::{Cpu, Mode, Plan, Profiler, Results, Row, Target, json_line, num, pct, spread};

/// The bench service's address, bound to the waypoint.
const VIP: &str = "10.96.0.30";
/// HTTP/1.1 on the server and the yardstick (and the service port).
const H1_PORT: u16 = 8080;
/// h2c (prior knowledge) on the server and the yardstick.
const H2_PORT: u16 = 8081;
/// `redis-server` in the Redis pod, for the global limit.
const REDIS_PORT: u16 = 6379;
/// The issuer of the bench's tokens.
const ISS: &str = "https://issuer.bench";
/// The path of the policies pass: only the last of the 100 rules matches it.
const POLICY_PATH: &str = "/api/v2/items99";
/// The Global limit applies to the requests that carry this header with
/// value `global`; the policies passes send it on every request, and the
/// paired run on every other one (`local` on the rest: the same bytes).
const LIMIT_HEADER: &str = "x-bench-limit";
/// The fixed request rate of the latency and CPU measures.
pub(super) const RATE: u32 = 1000;
/// Bytes of the server's response body.
const BODY: usize = 1024;
/// h2load's connections at saturation, and HTTP/2 streams per connection.
const SAT_CONNECTIONS: u32 = 64;
const SAT_STREAMS_H2: u32 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    const ALL: [Proto; 2] = [Proto::H1, Proto::H2];

    fn key(self) -> &'static str {
        match self {
            Proto::H1 => "http1",
            Proto::H2 => "h2c",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }

    fn port(self) -> u16 {
        match self {
            Proto::H1 => H1_PORT,
            Proto::H2 => H2_PORT,
        }
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Direct => "direct",
        Mode::Relay => "nginx",
        Mode::Weft => "waypoint",
    }
}

/// What the L7 part measured: its rows (direct, nginx in the relay column,
/// the waypoint in Weft's), its targets and the access-log proof.
pub(super) struct L7 {
    pub results: Results,
    pub targets: Vec<Target>,
    pub proof: Vec<Value>,
}

pub(super) fn run(plan: &Plan) -> Result<L7> {
    super::cmd::step(&format!(
        "L7: a 3-node x 2-pod cluster: client n0p0, waypoint n1p0, nginx yardstick n1p1, \
         server n2p0; {} round(s) of direct/nginx/waypoint, HTTP/1.1 and HTTP/2",
        plan.rounds
    ));
    let cluster = Cluster::new("bench-l7", 3, 2).context("building the L7 virtual cluster")?;
    let id = cluster.id().to_owned();
    let cgroup = cluster.cgroup().to_path_buf();
    let result = bench(&cluster, plan);
    drop(cluster);
    super::lab::check_clean(&id, &cgroup)?;
    let (results, proof) = result?;
    let targets = targets(&results);
    Ok(L7 {
        results,
        targets,
        proof,
    })
}

/// The pods of the L7 cluster.
struct Pods<'c> {
    client: &'c Pod,
    waypoint: &'c Pod,
    yardstick: &'c Pod,
    server: &'c Pod,
    /// `redis-server`, outside the mesh, for the global limit.
    redis: &'c Pod,
}

fn services() -> String {
    format!(
        "services:\n\
         - name: web\n  addresses: [{VIP}]\n  ports: [{{port: {H1_PORT}, target_port: {H1_PORT}, app_protocol: http}}, \
         {{port: {H2_PORT}, target_port: {H2_PORT}, app_protocol: h2c}}]\n  selector: {{app: web}}\n  waypoint: wp\n\
         - name: wp\n  addresses: []\n  ports: []\n  selector: {{role: waypoint}}\n"
    )
}

/// The sections without the policies. `allow_shrink`: turning the policies
/// off removes every authorization policy, which the agents' guard holds back
/// unless the file says it is meant (they would keep the policies' config,
/// and every later change, enrollment included, with it).
fn plain_sections() -> String {
    format!("{}allow_shrink: true\n", services())
}

/// The policies passes: their mesh sections (with the Global limit, and
/// without) and the header their client sends.
struct Policies {
    sections: String,
    local_sections: String,
    authorization: String,
}

/// One of the two policies passes.
#[derive(Clone, Copy)]
struct Pass<'a> {
    policies: &'a Policies,
    /// With the Global (Redis) limit.
    redis: bool,
}

impl Pass<'_> {
    fn sections(&self) -> &str {
        if self.redis {
            &self.policies.sections
        } else {
            &self.policies.local_sections
        }
    }

    /// Its rows' key, after the protocol's.
    fn key(&self) -> &'static str {
        if self.redis {
            "policies"
        } else {
            "policies_local"
        }
    }

    fn label(&self) -> &'static str {
        if self.redis {
            "+policies:"
        } else {
            "+policies without Redis:"
        }
    }

    fn name(&self) -> &'static str {
        if self.redis { "wp+pol" } else { "wp+loc" }
    }
}

/// Request authentication with an ES256 key inline and a token for it, an
/// ALLOW policy of 100 rules (each: `requestPrincipals`, two methods, two
/// paths; [`POLICY_PATH`] matches the last only), a Local limit per `sub` and
/// a Global one, neither of which ever refuses. The Global one has two rules:
/// `global`, the bench's, whose large burst the waypoint leases (most of its
/// requests make no Redis call), and `exact`, whose burst is too small to
/// lease (each of its requests calls Redis). Shapes as in docs/config.md and
/// `benches/policy.rs`.
fn policies() -> Result<Policies> {
    let key = EsKey::new("bench")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let token = key.sign(
        &json!({"iss": ISS, "sub": "alice", "aud": ["web"], "iat": now,
        "exp": now + 24 * 3600}),
    )?;
    let mut rules = String::new();
    for i in 0..100 {
        let _ = write!(
            rules,
            "  - from: [{{source: {{requestPrincipals: [\"{ISS}/*\"]}}}}]\n    \
             to: [{{operation: {{methods: [GET, HEAD], paths: [\"/api/v1/items{i}/*\", \"/api/v2/items{i}\"]}}}}]\n"
        );
    }
    let local_sections = format!(
        "{}request_authentications:\n\
         - name: web-jwt\n  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n  jwtRules:\n  \
         - issuer: {ISS}\n    audiences: [web]\n    jwks: '{}'\n\
         authorization_policies:\n\
         - name: web-api\n  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n  action: ALLOW\n  rules:\n\
         {rules}\
         rate_limits:\n\
         - name: bench-local\n  target_refs: [{{kind: Service, name: web}}]\n  type: Local\n  key: [\"claim:sub\"]\n  \
         rules: [{{limit: {{requests: 1000000000, unit: Second}}}}]\n",
        services(),
        jwks(&[&key]),
    );
    let sections = format!(
        "{local_sections}\
         - name: bench-global\n  target_refs: [{{kind: Service, name: web}}]\n  type: Global\n  failure_mode: closed\n  \
         timeout: 1s\n  key: [\"claim:sub\"]\n  rules:\n  \
         - client_selectors: [{{headers: [{{name: {LIMIT_HEADER}, type: Exact, value: global}}]}}]\n    \
         limit: {{requests: 1000000000, unit: Second}}\n  \
         - client_selectors: [{{headers: [{{name: {LIMIT_HEADER}, type: Exact, value: exact}}]}}]\n    \
         limit: {{requests: 1000000, unit: Second}}\n    burst: 39\n"
    );
    Ok(Policies {
        sections,
        local_sections,
        authorization: format!("authorization: Bearer {token}"),
    })
}

/// nginx in the server pod: a 1 KiB body on both ports.
fn start_server(pod: &Pod) -> Result<Nginx> {
    let body = "w".repeat(BODY);
    l7::nginx(
        pod,
        &format!(
            "keepalive_requests 10000000;\n\
             keepalive_timeout 300s;\n\
             http2_max_concurrent_streams 1024;\n\
             server {{\n\
             \x20   listen {H1_PORT} reuseport;\n\
             \x20   listen {H2_PORT} http2 reuseport;\n\
             \x20   location / {{ return 200 \"{body}\"; }}\n\
             }}"
        ),
    )
}

/// The yardstick: nginx as a reverse proxy, one worker, plaintext, HTTP/1.1
/// keep-alive to the server for both of its listeners.
fn start_yardstick(pod: &Pod, server: &Pod) -> Result<Nginx> {
    l7::nginx(
        pod,
        &format!(
            "keepalive_requests 10000000;\n\
             keepalive_timeout 300s;\n\
             http2_max_concurrent_streams 1024;\n\
             upstream server {{\n\
             \x20   server {}:{H1_PORT};\n\
             \x20   keepalive 64;\n\
             \x20   keepalive_requests 10000000;\n\
             }}\n\
             server {{\n\
             \x20   listen {H1_PORT} reuseport;\n\
             \x20   listen {H2_PORT} http2 reuseport;\n\
             \x20   location / {{\n\
             \x20       proxy_pass http://server;\n\
             \x20       proxy_http_version 1.1;\n\
             \x20       proxy_set_header Connection \"\";\n\
             \x20   }}\n\
             }}",
            server.ip
        ),
    )
}

fn bench(cluster: &Cluster, plan: &Plan) -> Result<(Results, Vec<Value>)> {
    let pods = Pods {
        client: cluster.pod(0, 0),
        waypoint: cluster.pod(1, 0),
        yardstick: cluster.pod(1, 1),
        server: cluster.pod(2, 0),
        redis: cluster.pod(2, 1),
    };
    let mut mesh = Mesh::new(cluster, |_| false)?;
    mesh.set_extra(
        pods.waypoint,
        "  native_tunnel: true\n  labels: {role: waypoint}\n",
    )?;
    mesh.set_extra(pods.server, "  labels: {app: web}\n")?;
    mesh.set_sections(&plain_sections())?;
    mesh.start_all().context("starting the CA and agents")?;
    let _server = start_server(pods.server)?;
    let _redis = l7::redis_server(pods.redis, REDIS_PORT)?;
    let mut yardstick = start_yardstick(pods.yardstick, pods.server)?;
    let mut waypoint = start_waypoint(&mesh, &pods, plan)?;
    let policies = policies()?;

    let mut results = Results::default();
    let mut proof = Vec::new();
    for round in 1..=plan.rounds {
        // (mode, the policies pass if any): the policies passes next to
        // the plain waypoint.
        let with = |redis| {
            Some(Pass {
                policies: &policies,
                redis,
            })
        };
        let mut order = vec![
            (Mode::Direct, None),
            (Mode::Relay, None),
            (Mode::Weft, None),
            (Mode::Weft, with(false)),
            (Mode::Weft, with(true)),
        ];
        if round % 2 == 0 {
            order.reverse();
        }
        for (mode, pass) in order {
            enroll(&mut mesh, &pods, &waypoint, mode == Mode::Weft)?;
            set_policies(&mut mesh, &waypoint, pass)?;
            let before = log_counts(&mesh);
            let metrics_before = pass.map(|_| PolicyCounts::scrape(&pods)).transpose()?;
            let mut sent = Sent::default();
            let name = pass.map_or(mode_name(mode), |p| p.name());
            for proto in Proto::ALL {
                let (line, n) = scenarios(
                    &mesh,
                    plan,
                    (mode, proto),
                    &pods,
                    (&waypoint, &yardstick),
                    pass,
                    &mut results,
                )
                .with_context(|| format!("round {round}, {name} {}", proto.label()))?;
                sent.all += n.all;
                sent.exempt += n.exempt;
                println!("  round {round} {name:<8} {:<8} {line}", proto.label());
                // Its access log (a line per request) is not needed: keep the
                // bench's memory flat.
                waypoint.forget_stdout_before(waypoint.stdout_end());
            }
            proof.push(check_labels(&mesh, round, mode, before)?);
            if let (Some(before), Some(pass)) = (metrics_before, pass) {
                let p = PolicyCounts::scrape(&pods)?.check_since(&before, sent, pass)?;
                println!("  round {round} {name:<8} checked: {p}");
                proof.push(p);
                // And the authorization policy is one: a path no rule names
                // is refused, with the same token.
                let url = format!("http://{VIP}:{H1_PORT}/api/v3/none");
                let r = l7::curl(pods.client, &url, &["-H", &policies.authorization])?;
                ensure!(r.status == 403, "{url} with a valid token: {r:?}, not 403");
                if !pass.redis {
                    continue;
                }
                let rtt = redis_rtt(&pods)?;
                println!(
                    "  round {round} Redis round trip from the waypoint's pod, p50 {rtt:.1} µs"
                );
                results.add(
                    "l7.redis.rtt_p50",
                    "+policies: the Redis round trip from the waypoint's pod (PING, one connection), p50",
                    "µs",
                    Mode::Weft,
                    rtt,
                );
            }
        }
    }
    set_policies(&mut mesh, &waypoint, None)?;
    memory(
        &mut mesh,
        &pods,
        (&mut waypoint, &mut yardstick),
        plan,
        &mut results,
    )?;
    Ok((results, proof))
}

/// `weft waypoint` in its pod, with the Redis of the global limit and the
/// plan's extra arguments.
fn start_waypoint(mesh: &Mesh, pods: &Pods, plan: &Plan) -> Result<Proc> {
    let redis = format!("{}:{REDIS_PORT}", pods.redis.ip);
    let mut args = vec!["--redis-addr", &redis];
    args.extend(plan.waypoint_args.iter().map(String::as_str));
    mesh.start_waypoint(pods.waypoint, &args)
}

/// Writes the mesh config with a pass's policies or none, and waits for the
/// waypoint to load it (as [`enroll`]).
fn set_policies(mesh: &mut Mesh, waypoint: &Proc, pass: Option<Pass>) -> Result<()> {
    let on = pass.is_some();
    let sections = pass.map_or_else(plain_sections, |p| p.sections().to_owned());
    if mesh.sections() == sections {
        return Ok(());
    }
    let from = waypoint.stdout_end();
    mesh.set_sections(&sections)?;
    ensure!(
        eventually(Duration::from_secs(10), || {
            waypoint
                .json_lines_after(from)
                .0
                .iter()
                .any(|v| v["message"] == "config reloaded")
        }),
        "the waypoint did not reload the config that turns the policies {}",
        if on { "on" } else { "off" }
    );
    Ok(())
}

/// The waypoint's counters that prove the policies ran.
struct PolicyCounts {
    verified: u64,
    local: u64,
    global: u64,
    /// Global decisions taken from a lease, without a Redis call.
    leased: u64,
    refused: u64,
    redis_errors: u64,
}

impl PolicyCounts {
    /// From the waypoint's metrics page, read inside its pod.
    fn scrape(pods: &Pods) -> Result<PolicyCounts> {
        let out = waypoint_metrics(pods)?;
        let sum = |f: &dyn Fn(&str) -> bool| -> u64 {
            out.lines()
                .filter(|l| !l.starts_with('#') && f(l))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        let allowed = |policy: &str| {
            sum(&|l: &str| {
                l.starts_with("weft_ratelimit_decisions_total{")
                    && l.contains(policy)
                    && l.contains("decision=\"allowed\"")
            })
        };
        Ok(PolicyCounts {
            verified: sum(&|l: &str| l.starts_with("weft_jwt_tokens_total{result=\"verified\"")),
            refused: sum(&|l: &str| l.starts_with("weft_jwt_tokens_total{result=\"refused\"")),
            local: allowed("bench-local"),
            global: allowed("bench-global"),
            leased: sum(&|l: &str| l.starts_with("weft_ratelimit_leased_total ")),
            redis_errors: sum(&|l: &str| l.starts_with("weft_ratelimit_redis_errors_total{")),
        })
    }

    /// Fails unless every one of the `sent` requests had its token verified
    /// and was let through by both limits (h2load may count a request or two
    /// fewer than the waypoint served: those in flight at its end).
    fn check_since(&self, before: &PolicyCounts, sent: Sent, pass: Pass) -> Result<Value> {
        let Sent { all: sent, exempt } = sent;
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (verified, local, global) = (
            d(self.verified, before.verified),
            d(self.local, before.local),
            d(self.global, before.global),
        );
        let (refused, errors) = (
            d(self.refused, before.refused),
            d(self.redis_errors, before.redis_errors),
        );
        let slack = sent / 100 + SAT_CONNECTIONS as u64 * SAT_STREAMS_H2 as u64;
        ensure!(
            pass.redis || global == 0,
            "{global} global limit decisions in the pass without Redis"
        );
        let checked = [
            ("verified tokens", verified, sent),
            ("local limit decisions", local, sent),
            ("global limit decisions", global, sent - exempt),
        ];
        for &(what, n, sent) in &checked[..if pass.redis { 3 } else { 2 }] {
            ensure!(
                n + slack / 10 >= sent && n <= sent + slack,
                "the policies were not applied to every request: {n} {what} for {sent} requests sent"
            );
        }
        ensure!(
            refused == 0 && errors == 0,
            "{refused} tokens refused, {errors} Redis errors during the policies pass"
        );
        Ok(json!({
            "mode": if pass.redis { "waypoint+policies" } else { "waypoint+policies without Redis" },
            "requests_sent": sent,
            "requests_the_global_limit_applies_to": sent - exempt,
            "tokens_verified": verified,
            "local_limit_allowed": local,
            "global_limit_allowed": global,
            "global_limit_allowed_from_leases": d(self.leased, before.leased),
        }))
    }
}

/// The waypoint's metrics page, read inside its pod.
fn waypoint_metrics(pods: &Pods) -> Result<String> {
    pods.waypoint
        .exec_ok("curl", ["-sS", "http://127.0.0.1:15020/metrics"])
}

/// The waypoint's `weft_ratelimit_redis_call_seconds` buckets: (upper bound
/// in µs, cumulative count), `+Inf` last.
fn redis_call_times(pods: &Pods) -> Result<Vec<(f64, u64)>> {
    let out = waypoint_metrics(pods)?;
    let buckets: Vec<(f64, u64)> = out
        .lines()
        .filter_map(|l| l.strip_prefix("weft_ratelimit_redis_call_seconds_bucket{le=\""))
        .filter_map(|l| {
            let (le, rest) = l.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse::<f64>().ok()? * 1e6
            };
            Some((le, rest.trim().parse().ok()?))
        })
        .collect();
    ensure!(
        !buckets.is_empty(),
        "the waypoint exports no weft_ratelimit_redis_call_seconds"
    );
    Ok(buckets)
}

/// The median of the observations between two scrapes of one histogram,
/// interpolated linearly inside its bucket (as Prometheus's
/// `histogram_quantile`); `None` without observations.
fn histogram_p50(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<f64> {
    let counts: Vec<(f64, u64)> = after
        .iter()
        .zip(before)
        .map(|((le, a), (_, b))| (*le, a.saturating_sub(*b)))
        .collect();
    let total = counts.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = total as f64 / 2.0;
    let mut lower = (0.0, 0u64);
    for &(le, n) in &counts {
        if n as f64 >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (n - lower.1) as f64;
            let share = if within > 0.0 {
                (rank - lower.1 as f64) / within
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, n);
    }
    None
}

/// The p50 of `count` Redis PINGs (or, with `gcra`, calls of the rate-limit
/// script) from the waypoint's pod on one connection, paced at `rate` per
/// second (`weft-tk redis-rr`); µs.
fn redis_rr(pods: &Pods, count: u32, rate: Option<u32>, gcra: bool) -> Result<f64> {
    let addr = format!("{}:{REDIS_PORT}", pods.redis.ip);
    let count = count.to_string();
    let mut args = vec!["redis-rr", "--connect", &addr, "--count", &count];
    if gcra {
        args.push("--gcra");
    }
    let rate = rate.map(|r| r.to_string());
    if let Some(rate) = &rate {
        args.extend(["--rate", rate]);
    }
    let v = json_line(&pods.waypoint.exec_ok(bin_path("weft-tk"), &args)?)?;
    ensure!(v["ok"] == true, "weft-tk redis-rr to {addr} failed: {v}");
    num(&v, "p50_us")
}

/// The p50 of a Redis round trip from the waypoint's pod: `redis-benchmark`,
/// PING (RESP multi-bulk), one connection, one at a time; µs.
fn redis_rtt(pods: &Pods) -> Result<f64> {
    let port = REDIS_PORT.to_string();
    let host = pods.redis.ip.to_string();
    let out = pods.waypoint.exec_ok(
        "redis-benchmark",
        [
            "-h", &host, "-p", &port, "-c", "1", "-n", "5000", "-t", "ping", "--csv",
        ],
    )?;
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    let line = out
        .lines()
        .find(|l| l.starts_with("\"PING_MBULK\""))
        .with_context(|| format!("redis-benchmark printed no PING_MBULK line:\n{out}"))?;
    let p50: f64 = line
        .split(',')
        .nth(4)
        .map(|v| v.trim_matches('"'))
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no p50 in redis-benchmark's {line}"))?;
    Ok(p50 * 1000.0)
}

/// Enrolls the client and the server (the waypoint mode) or neither, and
/// waits until the waypoint has the config that says so: it reaches an
/// enrolled server over HBONE, an unenrolled one in plaintext.
fn enroll(mesh: &mut Mesh, pods: &Pods, waypoint: &Proc, on: bool) -> Result<()> {
    if mesh.is_enrolled(pods.client) == on && mesh.is_enrolled(pods.server) == on {
        return Ok(());
    }
    // The waypoint logs a line per request: read only what comes after now.
    let from = waypoint.stdout_end();
    let reloaded = || {
        waypoint
            .json_lines_after(from)
            .0
            .iter()
            .any(|v| v["message"] == "config reloaded")
    };
    for pod in [pods.client, pods.server] {
        mesh.set_enrolled(pod, on)?;
    }
    ensure!(
        eventually(Duration::from_secs(10), reloaded),
        "the waypoint did not reload the config that {} the client and the server",
        if on { "enrolls" } else { "unenrolls" }
    );
    // Both pods are written in one burst or two: let a second reload land.
    std::thread::sleep(Duration::from_millis(700));
    Ok(())
}

/// Where the client sends `proto` in `mode`.
fn target(mode: Mode, proto: Proto, pods: &Pods) -> String {
    let host = match mode {
        Mode::Direct => pods.server.ip.to_string(),
        Mode::Relay => pods.yardstick.ip.to_string(),
        Mode::Weft => VIP.to_owned(),
    };
    format!("{host}:{}", proto.port())
}

/// Requests a pass sent, and how many of them the Global limit did not apply
/// to (the paired run's other half).
#[derive(Default, Clone, Copy)]
struct Sent {
    all: u64,
    exempt: u64,
}

/// Runs one mode's scenarios for one protocol, with the policies' token and
/// path if given (their rows are the waypoint's, named apart); a one-line
/// summary and the requests sent.
fn scenarios(
    mesh: &Mesh,
    plan: &Plan,
    (mode, proto): (Mode, Proto),
    pods: &Pods,
    (waypoint, yardstick): (&Proc, &Nginx),
    pass: Option<Pass>,
    results: &mut Results,
) -> Result<(String, Sent)> {
    let policies = pass.map(|p| p.policies);
    let target = target(mode, proto, pods);
    let limit_header = format!("{LIMIT_HEADER}: global");
    let req = Req {
        path: if policies.is_some() { POLICY_PATH } else { "/" },
        headers: policies.map_or(Vec::new(), |p| {
            vec![p.authorization.as_str(), limit_header.as_str()]
        }),
        alternate: None,
    };
    let proxy: Vec<u32> = match mode {
        Mode::Direct => Vec::new(),
        Mode::Relay => vec![yardstick.proc().pid()],
        Mode::Weft => vec![waypoint.pid()],
    };
    // The client's and the server's agents; the waypoint's node's agent
    // carries nothing of this path (the waypoint speaks HBONE itself).
    let agents: Vec<u32> = match mode {
        Mode::Weft => vec![mesh.agent(0).pid(), mesh.agent(2).pid()],
        Mode::Direct | Mode::Relay => Vec::new(),
    };
    let profile = |name: &str| -> Result<Option<Profiler>> {
        if plan.perf && mode == Mode::Weft {
            let mut pids = proxy.clone();
            pids.extend(&agents);
            let pol = pass.map_or(String::new(), |p| format!("-{}", p.key()));
            Profiler::start(&pids, &format!("l7-{}{pol}-{name}", proto.key())).map(Some)
        } else {
            Ok(None)
        }
    };
    let (k, l) = match pass {
        None => (proto.key().to_owned(), proto.label().to_owned()),
        Some(p) => (
            format!("{}.{}", proto.key(), p.key()),
            format!("{} {}", proto.label(), p.label()),
        ),
    };
    let mut add = |key: &str, name: &str, unit: &'static str, value: f64| {
        results.add(
            &format!("l7.{k}.{key}"),
            &format!("{l} {name}"),
            unit,
            mode,
            value,
        );
    };

    // Fill the pools (the waypoint's upstream connections, nginx's keep-alive
    // ones) and check the path answers, before anything is timed.
    http_rr(pods.client, &target, proto, &req, 200, None).context("warming up")?;
    let mut sent = 220;

    // 1. Saturation.
    let cpu0 = Cpu::now(&proxy)?;
    let perf = profile("saturated")?;
    let sat = h2load(pods.client, &target, proto, &req, plan.l7_secs)?;
    sent += sat.succeeded;
    drop(perf);
    let cpu1 = Cpu::now(&proxy)?;
    add(
        "rps",
        &format!(
            "requests/s at saturation (h2load, {SAT_CONNECTIONS} connections{})",
            if proto == Proto::H2 {
                format!(" x {SAT_STREAMS_H2} streams")
            } else {
                String::new()
            }
        ),
        "req/s",
        sat.req_per_s,
    );
    if mode != Mode::Direct {
        add(
            "proxy_cpu_per_request_saturated",
            "proxy CPU per request at saturation",
            "CPU-µs",
            (cpu1.proxies - cpu0.proxies) * 1e6 / sat.succeeded as f64,
        );
    }

    // 2. and 3. Latency at a fixed rate, and the CPU it costs.
    let cpu0 = Cpu::now(&proxy)?;
    let agents0 = Cpu::now(&agents)?;
    let calls0 = pass
        .filter(|p| p.redis)
        .map(|_| redis_call_times(pods))
        .transpose()?;
    let perf = profile("fixed")?;
    let fixed = http_rr(pods.client, &target, proto, &req, plan.l7_fixed, Some(RATE))?;
    sent += u64::from(plan.l7_fixed) * 11 / 10;
    drop(perf);
    if let Some(before) = calls0 {
        // The waypoint's own Redis calls during the paced run: the round
        // trip its requests wait for, as they wait for it.
        let after = redis_call_times(pods)?;
        let p50 = histogram_p50(&before, &after)
            .context("no Redis call during the paced run of the policies pass")?;
        add(
            "fixed_redis_call_p50",
            "at 1,000 req/s, the waypoint's Redis calls, p50 (its histogram, interpolated)",
            "µs",
            p50,
        );
    }
    let cpu1 = Cpu::now(&proxy)?;
    let agents1 = Cpu::now(&agents)?;
    // The warm-up requests (a tenth) are paced too.
    let requests = f64::from(plan.l7_fixed) * 1.1;
    for p in ["p50", "p90", "p99", "p999"] {
        let shown = if p == "p999" { "p99.9" } else { p };
        add(
            &format!("fixed_{p}"),
            &format!("at 1,000 req/s, {shown}"),
            "µs",
            num(&fixed, &format!("{p}_us"))?,
        );
    }
    let per_1k = |cpu: f64| cpu / requests * f64::from(RATE);
    if mode != Mode::Direct {
        add(
            "proxy_cpu_fixed",
            "proxy CPU per 1,000 req/s (at 1,000/s)",
            "vCPU",
            per_1k(cpu1.proxies - cpu0.proxies),
        );
    }
    if mode == Mode::Weft {
        add(
            "agents_cpu_fixed",
            "the two agents' CPU per 1,000 req/s (at 1,000/s)",
            "vCPU",
            per_1k(agents1.proxies - agents0.proxies),
        );
    }
    let mut exempt = 0;
    let mut redis_line = String::new();
    if pass.is_some_and(|p| p.redis) {
        // 4. What the Redis limit adds, measured within one run: every
        // other request is one the Global limit applies to, the rest carry
        // the same header with a value it does not match, so both halves go
        // through the same JWT, authorization and local limit, on one
        // connection, at the same time. Two passes minutes apart differ by
        // more than this on this VM.
        // One paired run, `a` and `b` alternating: the p50s of the halves.
        let paired_run = |a: &str, b: &str| -> Result<(f64, f64)> {
            let alternate = format!("{LIMIT_HEADER}: {a}|{b}");
            let paired_req = Req {
                path: req.path,
                headers: req.headers[..1].to_vec(),
                alternate: Some(&alternate),
            };
            let paired = http_rr(
                pods.client,
                &target,
                proto,
                &paired_req,
                plan.l7_fixed,
                Some(RATE),
            )
            .with_context(|| format!("the paired run {a}|{b}"))?;
            let half = |v: &str| num(&paired["by_alternate"][v], "p50_us");
            Ok((half(a)?, half(b)?))
        };
        let counts = PolicyCounts::scrape(pods)?;
        let (global, local) = paired_run("global", "local")?;
        let n = u64::from(plan.l7_fixed) * 11 / 10;
        sent += n;
        exempt = n / 2;
        // How many of the global half the lease admitted (no call).
        let after = PolicyCounts::scrape(pods)?;
        let global_n = after.global.saturating_sub(counts.global).max(1);
        add(
            "paired_leased_share",
            "at 1,000 req/s, alternating, share of the Redis limit's decisions taken from a lease",
            "%",
            100.0 * after.leased.saturating_sub(counts.leased) as f64 / global_n as f64,
        );
        add(
            "paired_global_p50",
            "at 1,000 req/s, alternating, p50 of the requests the Redis limit applies to",
            "µs",
            global,
        );
        add(
            "paired_local_p50",
            "at 1,000 req/s, alternating, p50 of the others",
            "µs",
            local,
        );
        add(
            "redis_added_p50",
            "p50 added by the Redis limit (the two halves of one alternating run)",
            "µs",
            global - local,
        );
        // 5. The yardsticks, as the waypoint meets them: from its pod, paced
        // at the same rate on one connection, right after: the limit's own
        // call (its script), and a PING.
        let call = redis_rr(pods, plan.l7_fixed, Some(RATE), true)?;
        add(
            "redis_gcra_paced_p50",
            "the rate-limit script called from the waypoint's pod at 1,000/s, one connection, p50",
            "µs",
            call,
        );
        let ping = redis_rr(pods, plan.l7_fixed, Some(RATE), false)?;
        add(
            "redis_ping_paced_p50",
            "a Redis PING from the waypoint's pod at 1,000/s, one connection, p50",
            "µs",
            ping,
        );
        // 6. The same with a bucket too small to lease: every request of
        // the `exact` half calls Redis.
        let (exact, exact_local) = paired_run("exact", "local")?;
        sent += n;
        exempt += n / 2;
        add(
            "redis_exact_added_p50",
            "p50 added by the Redis limit on a bucket too small to lease (a call per request; the halves of one alternating run)",
            "µs",
            exact - exact_local,
        );
        redis_line = format!(
            "  the Redis limit adds {:.1} µs, unleased {:.1} (its call {call:.1}, PING {ping:.1})",
            global - local,
            exact - exact_local
        );
    }
    let mut line = format!(
        "{:>7.0} req/s  at 1,000/s p50 {:>6.1} p99 {:>7.1} µs",
        sat.req_per_s,
        num(&fixed, "p50_us")?,
        num(&fixed, "p99_us")?,
    );
    if mode != Mode::Direct {
        let _ = write!(
            line,
            "  proxy {:.3} vCPU per 1k/s",
            per_1k(cpu1.proxies - cpu0.proxies)
        );
    }
    line.push_str(&redis_line);
    Ok((line, Sent { all: sent, exempt }))
}

/// What each request of a scenario carries.
struct Req<'a> {
    path: &'a str,
    /// `name: value`
    headers: Vec<&'a str>,
    /// `name: a|b`: one header, `a` on every other request, `b` on the rest.
    alternate: Option<&'a str>,
}

/// `weft-tk http-rr` from `client`: `count` GETs on one connection, paced at
/// `rate` per second or back to back.
fn http_rr(
    client: &Pod,
    target: &str,
    proto: Proto,
    req: &Req,
    count: u32,
    rate: Option<u32>,
) -> Result<Value> {
    let mut args = vec![
        "http-rr".to_owned(),
        "--connect".to_owned(),
        target.to_owned(),
        "--count".to_owned(),
        count.to_string(),
        "--path".to_owned(),
        req.path.to_owned(),
    ];
    for h in &req.headers {
        args.extend(["--header".to_owned(), (*h).to_owned()]);
    }
    if let Some(a) = req.alternate {
        args.extend(["--alternate".to_owned(), a.to_owned()]);
    }
    if proto == Proto::H2 {
        args.push("--h2".to_owned());
    }
    if let Some(rate) = rate {
        args.extend(["--rate".to_owned(), rate.to_string()]);
    }
    let v = json_line(&client.exec_ok(bin_path("weft-tk"), &args)?)?;
    ensure!(v["ok"] == true, "weft-tk http-rr to {target} failed: {v}");
    Ok(v)
}

/// h2load at saturation for `secs` seconds; fails
/// on any failed request or any status but 2xx. (Its 2xx count can be one
/// short of `succeeded`: a response that straddles the end of the run.)
fn h2load(
    client: &Pod,
    target: &str,
    proto: Proto,
    req: &Req,
    secs: u32,
) -> Result<l7::H2loadResult> {
    let (c, d) = (SAT_CONNECTIONS.to_string(), secs.to_string());
    let m = match proto {
        Proto::H1 => "1".to_owned(),
        Proto::H2 => SAT_STREAMS_H2.to_string(),
    };
    let url = format!("http://{target}{}", req.path);
    // No `--warm-up-time`: its second would be inside the CPU window but not
    // in the request count. The requests before it have filled the pools.
    let mut args = vec!["-c", &c, "-m", &m, "-D", &d];
    for h in &req.headers {
        args.extend(["-H", h]);
    }
    if proto == Proto::H1 {
        args.push("--h1");
    }
    args.push(&url);
    let r = l7::h2load_with(client, &args)?;
    ensure!(
        r.succeeded > 0 && r.failed == 0 && r.errored == 0 && r.status[1..] == [0, 0, 0],
        "h2load to {url}: {r:?}"
    );
    Ok(r)
}

/// Access-log lines of the three agents so far.
fn log_counts(mesh: &Mesh) -> [usize; 3] {
    [0, 1, 2].map(|n| mesh.access_logs(n).len())
}

/// Proves one mode's label from the agents' access logs: in the waypoint
/// mode the client's agent logged the connections it carried to the
/// waypoint; in the others no agent carried anything. Agents log a
/// connection when it closes, so the counts are read once they settle.
fn check_labels(mesh: &Mesh, round: usize, mode: Mode, before: [usize; 3]) -> Result<Value> {
    let mut after = log_counts(mesh);
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(300));
        let now = log_counts(mesh);
        if now == after {
            break;
        }
        after = now;
    }
    let new: Vec<usize> = (0..3).map(|n| after[n] - before[n]).collect();
    match mode {
        Mode::Weft => ensure!(
            new[0] > 0,
            "round {round}: the waypoint run left no access-log line on the client's node: \
             nothing was captured"
        ),
        Mode::Direct | Mode::Relay => ensure!(
            new.iter().all(|&n| n == 0),
            "round {round}: the {} run went through the agents ({new:?} access-log lines)",
            mode_name(mode)
        ),
    }
    let lines = mesh.access_logs(0).split_off(before[0]);
    let to_waypoint = lines.iter().filter(|v| v.to_string().contains(VIP)).count();
    Ok(json!({
        "round": round,
        "mode": mode_name(mode),
        "new_access_log_lines": new,
        "client_node_lines_naming_the_service": to_waypoint,
    }))
}

/// Memory of the two proxies, each freshly started: idle, then with `held`
/// idle HTTP/1.1 keep-alive connections through it (one request made on
/// each). The waypoint's RSS after the load rounds is noted first.
fn memory(
    mesh: &mut Mesh,
    pods: &Pods,
    (waypoint, yardstick): (&mut Proc, &mut Nginx),
    plan: &Plan,
    results: &mut Results,
) -> Result<()> {
    results.add(
        "l7.memory.rss_after_load",
        "proxy RSS after the load rounds, idle",
        "MiB",
        Mode::Weft,
        rss_kib(waypoint.pid())? / 1024.0,
    );
    results.add(
        "l7.memory.rss_after_load",
        "proxy RSS after the load rounds, idle",
        "MiB",
        Mode::Relay,
        rss_kib(yardstick.proc().pid())? / 1024.0,
    );
    let n = plan.l7_held;
    for mode in [Mode::Relay, Mode::Weft] {
        enroll(mesh, pods, waypoint, mode == Mode::Weft)?;
        let pid = match mode {
            Mode::Weft => {
                waypoint.kill()?;
                *waypoint = start_waypoint(mesh, pods, plan)?;
                waypoint.pid()
            }
            _ => {
                *yardstick = start_yardstick(pods.yardstick, pods.server)?;
                yardstick.proc().pid()
            }
        };
        // Let the certificate and the startup work settle.
        std::thread::sleep(Duration::from_secs(2));
        let idle = rss_kib(pid)?;
        let mut c = pods.client.command(bin_path("weft-tk"));
        c.args([
            "http-hold",
            "--connect",
            &target(mode, Proto::H1, pods),
            "--count",
            &n.to_string(),
            "--hold-secs",
            "600",
        ]);
        let mut holder = pods.client.spawn(&mut c)?;
        holder
            .wait_for_json(Duration::from_secs(60), |v| {
                v.get("holding").is_some() || v["ok"] == false
            })
            .with_context(|| format!("holding {n} connections: {}", holder.stderr()))?;
        if let Some(v) = holder.json_lines().iter().find(|v| v["ok"] == false) {
            bail!("holding {n} HTTP connections failed: {v}");
        }
        std::thread::sleep(Duration::from_secs(1));
        let held = rss_kib(pid)?;
        holder.kill()?;
        results.add(
            "l7.memory.rss_idle",
            "proxy RSS idle (freshly started)",
            "MiB",
            mode,
            idle / 1024.0,
        );
        results.add(
            &format!("l7.memory.rss_{n}"),
            &format!("proxy RSS, {n} idle HTTP/1.1 keep-alive connections"),
            "MiB",
            mode,
            held / 1024.0,
        );
        results.add(
            &format!("l7.memory.per_connection_{n}"),
            &format!("proxy memory per idle HTTP/1.1 keep-alive connection, {n} held"),
            "KiB",
            mode,
            (held - idle) / n as f64,
        );
        println!(
            "  memory, {}: idle {:.1} MiB, {n} idle connections {:.1} MiB",
            mode_name(mode),
            idle / 1024.0,
            held / 1024.0
        );
    }
    Ok(())
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// The L7 targets, judged on this run; the relay column is nginx's
/// value on the same measure.
fn targets(results: &Results) -> Vec<Target> {
    let row = |key: &str| results.get(key);
    let shown = |value: Option<f64>, unit: &str| {
        value.filter(|v| v.is_finite()).map_or("-".into(), |v| {
            if unit == "x" {
                format!("{v:.2}x")
            } else if unit == "vCPU" {
                format!("{v:.3} vCPU")
            } else {
                format!("{v:.1} {unit}")
            }
        })
    };
    let t = |what: String,
             goal: &'static str,
             (value, relay): (Option<f64>, Option<f64>),
             unit: &str,
             ok: &dyn Fn(f64) -> bool| Target {
        what,
        goal,
        value,
        shown: shown(value, unit),
        met: value.filter(|v| v.is_finite()).map(ok),
        relay,
        relay_shown: shown(relay, unit),
    };
    let mut out = Vec::new();
    for p in Proto::ALL {
        let k = p.key();
        let l = p.label();
        out.push(t(
            format!("{l}: waypoint req/s at saturation / nginx's"),
            ">= 0.80x",
            (
                row(&format!("l7.{k}.rps")).map(|r| r.weft_median() / r.relay_median()),
                None,
            ),
            "x",
            &|v| v >= 0.8,
        ));
        for (p_key, p_name, goal, limit) in [
            ("p50", "p50", "<= 300 µs", 300.0),
            ("p99", "p99", "<= 1000 µs", 1000.0),
        ] {
            let r = row(&format!("l7.{k}.fixed_{p_key}"));
            out.push(t(
                format!("{l}: latency added at {p_name} over direct (1,000 req/s)"),
                goal,
                (
                    r.map(|r| r.weft_median() - r.direct_median()),
                    r.map(|r| r.relay_median() - r.direct_median()),
                ),
                "µs",
                &move |v| v <= limit,
            ));
        }
        let r = row(&format!("l7.{k}.proxy_cpu_fixed"));
        out.push(t(
            format!("{l}: waypoint CPU per 1,000 req/s"),
            "<= 0.100 vCPU",
            (r.map(Row::weft_median), r.map(Row::relay_median)),
            "vCPU",
            &|v| v <= 0.1,
        ));
    }
    // The policies pass against the plain waypoint of the same rounds.
    let rtt = row("l7.redis.rtt_p50").map(Row::weft_median);
    for p in Proto::ALL {
        let (k, l) = (p.key(), p.label());
        let plain = |key: &str| row(&format!("l7.{k}.{key}")).map(Row::weft_median);
        let with = |key: &str| row(&format!("l7.{k}.policies.{key}")).map(Row::weft_median);
        let local = |key: &str| row(&format!("l7.{k}.policies_local.{key}")).map(Row::weft_median);
        let key = "proxy_cpu_per_request_saturated";
        out.push(t(
            format!(
                "{l}: waypoint CPU per request added by JWT + 100-rule authz + local limit, \
                 at saturation"
            ),
            "<= 20 µs",
            (local(key).zip(plain(key)).map(|(w, p)| w - p), None),
            "µs",
            &|v| v <= 20.0,
        ));
        // The Redis limit's own share, from the halves of one alternating
        // run, against a PING paced as the waypoint's calls are (both ends
        // wake from idle for each; a tight loop never lets them sleep).
        let added = with("redis_added_p50");
        let call = with("redis_gcra_paced_p50");
        let ping = with("redis_ping_paced_p50");
        let mut target = t(
            format!("{l}: p50 added by the Redis limit (1,000 req/s)"),
            "<= 1 Redis round trip",
            (added, None),
            "µs",
            &|_| true,
        );
        // One round trip of the one call the limit makes: its script, which
        // Redis takes longer to run than a PING.
        target.met = added.zip(call).map(|(a, r)| a <= r);
        let mut context = Vec::new();
        if let Some(r) = call {
            context.push(format!("its call at 1,000/s {r:.1} µs"));
        }
        if let Some(r) = ping {
            context.push(format!("a PING at 1,000/s {r:.1} µs"));
        }
        if let Some(r) = rtt {
            context.push(format!("a PING back to back {r:.1} µs"));
        }
        if let Some(c) = with("fixed_redis_call_p50") {
            // What the waypoint's own calls took, as its client sees them.
            context.push(format!("the waypoint's calls {c:.1} µs"));
        }
        if let Some(e) = with("redis_exact_added_p50") {
            // A bucket too small to lease: a call on every request's path.
            context.push(format!("unleased {e:.1} µs"));
        }
        if let Some(apart) = with("fixed_p50").zip(local("fixed_p50")) {
            // The same, from two passes minutes apart: drift included.
            context.push(format!("passes apart {:.1} µs", apart.0 - apart.1));
        }
        if !context.is_empty() {
            target.shown = format!("{} ({})", target.shown, context.join("; "));
        }
        out.push(target);
    }
    let r = row("l7.memory.rss_idle");
    out.push(t(
        "waypoint RSS idle".to_owned(),
        "<= 20 MiB",
        (r.map(Row::weft_median), r.map(Row::relay_median)),
        "MiB",
        &|v| v <= 20.0,
    ));
    let r = results
        .rows
        .iter()
        .find(|r| r.key.starts_with("l7.memory.per_connection_"));
    out.push(t(
        "waypoint memory per idle downstream HTTP/1.1 connection".to_owned(),
        "<= 32 KiB",
        (r.map(Row::weft_median), r.map(Row::relay_median)),
        "KiB",
        &|v| v <= 32.0,
    ));
    out
}

/// The L7 rows: direct, nginx and the waypoint side by side, with spreads.
pub(super) fn table(results: &Results) -> String {
    let mut out = format!(
        "  {:<66} {:>13} {:>13} {:>13} {:>9} {:>9} {:>16}\n",
        "L7 (client n0p0 -> n1 -> server n2p0)",
        "direct",
        "nginx",
        "waypoint",
        "wp/nginx",
        "wp-direct",
        "spread d/n/w"
    );
    for r in &results.rows {
        let [d, n, w, _, _, wn] = super::relay_cells(r, "x");
        let _ = writeln!(
            out,
            "  {:<66} {d:>13} {n:>13} {w:>13} {wn:>9} {:>9} {:>16}",
            r.name,
            added(r),
            spreads(r)
        );
    }
    out
}

/// The waypoint's latency minus direct's, for latency rows.
fn added(r: &Row) -> String {
    let v = r.weft_median() - r.direct_median();
    if r.is_latency() && v.is_finite() {
        format!("{v:+.1}")
    } else {
        "-".into()
    }
}

fn spreads(r: &Row) -> String {
    [&r.direct, &r.relay, &r.weft]
        .map(|s| {
            if s.is_empty() {
                "-".to_owned()
            } else {
                pct(spread(s))
            }
        })
        .join("/")
}

pub(super) fn targets_table(targets: &[Target]) -> String {
    let mut out = String::from("  L7 targets:\n");
    for t in targets {
        let verdict = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let _ = writeln!(
            out,
            "    {:<62} {:>12}  goal {:<14} {verdict:<8} nginx {}",
            t.what, t.shown, t.goal, t.relay_shown
        );
    }
    out
}

/// The L7 section of BENCHMARKS.md.
pub(super) fn markdown(l7: &L7, header: &str) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{header} direct, nginx and the waypoint alternating; medians over rounds, \
         spread = (max − min) / median. Client `n0p0`, waypoint `n1p0`, nginx `n1p1`, \
         server `n2p0` (nginx, 1 KiB body).\n"
    );
    md.push_str(
        "| L7 target | goal | the waypoint | | nginx in its place |\n|---|---|---|---|---|\n",
    );
    for t in &l7.targets {
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
        "\n| scenario | direct | nginx | waypoint | waypoint/nginx | waypoint − direct | \
         spread (direct/nginx/waypoint) |\n|---|---|---|---|---|---|---|\n",
    );
    for r in &l7.results.rows {
        let [d, n, w, _, _, wn] = super::relay_cells(r, "×");
        let _ = writeln!(
            md,
            "| {} | {d} | {n} | {w} | {wn} | {} | {} |",
            r.name,
            if r.is_latency() {
                format!("{} µs", added(r))
            } else {
                "-".into()
            },
            spreads(r)
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_between_two_scrapes_of_a_histogram_is_interpolated() {
        let before = [(50.0, 1), (100.0, 1), (200.0, 3), (f64::INFINITY, 3)];
        let after = [(50.0, 1), (100.0, 5), (200.0, 11), (f64::INFINITY, 13)];
        // Between them: 0 up to 50 µs, 4 up to 100, 8 up to 200, 10 in all:
        // the 5th is a quarter into (100, 200].
        assert_eq!(histogram_p50(&before, &after), Some(125.0));
        assert_eq!(histogram_p50(&before, &before), None);
        // Past the last bound: its bound, as histogram_quantile says.
        let late = [(50.0, 1), (100.0, 1), (200.0, 3), (f64::INFINITY, 13)];
        assert_eq!(histogram_p50(&before, &late), Some(200.0));
    }

    #[test]
    fn l7_targets_compare_the_waypoint_with_nginx_and_direct() {
        let mut r = Results::default();
        for (mode, rps, p50, cpu) in [
            (Mode::Direct, 30_000.0, 100.0, f64::NAN),
            (Mode::Relay, 20_000.0, 250.0, 0.05),
            (Mode::Weft, 15_000.0, 500.0, 0.12),
        ] {
            r.add("l7.http1.rps", "rps", "req/s", mode, rps);
            r.add("l7.http1.fixed_p50", "p50", "µs", mode, p50);
            if cpu.is_finite() {
                r.add("l7.http1.proxy_cpu_fixed", "cpu", "vCPU", mode, cpu);
            }
        }
        let t = targets(&r);
        let rps = &t[0];
        assert_eq!((rps.value, rps.met), (Some(0.75), Some(false)));
        let p50 = t
            .iter()
            .find(|t| t.what.starts_with("HTTP/1.1: latency added at p50"))
            .unwrap();
        assert_eq!((p50.value, p50.relay), (Some(400.0), Some(150.0)));
        assert_eq!(p50.met, Some(false));
        let cpu = t
            .iter()
            .find(|t| t.what.starts_with("HTTP/1.1: waypoint CPU"))
            .unwrap();
        assert_eq!(cpu.shown, "0.120 vCPU");
        assert_eq!(cpu.relay_shown, "0.050 vCPU");
        // What was not measured is not judged.
        assert!(
            t.iter()
                .any(|t| t.what.starts_with("HTTP/2") && t.met.is_none())
        );
        assert!(table(&r).contains("+400.0"), "{}", table(&r));
    }
}
