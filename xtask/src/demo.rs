//! `cargo xtask demo`: Weft's first five minutes.
//!
//! A two-node virtual cluster, the mesh with one pod left out, a real web
//! server and the traffic kit, sample traffic, and a table of what the agents
//! captured; a service with three replicas across both nodes behind a virtual
//! IP, a policy that denies one client, and per-service traffic from the
//! agents' metrics; then commands to try by hand while new access-log lines and
//! per-service counts stream in, until Ctrl-C. Section 7 adds a waypoint: an
//! HTTPRoute split 90/10 with retries hiding a flaky replica, a header route
//! and a redirect, live through `weft waypoint`; section 8 its policies: a 401
//! for a bad token, a 403 for a denied path however it is spelled, and 429s. Teardown is the harness's: dropping the `Mesh` kills the agents
//! and uninstalls their programs, dropping the `Cluster` removes namespaces and
//! cgroups, on every path out of here (errors and panics included).

use std::fmt::Write as _;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use weft_tests::Host as _;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use weft_tests::{Cluster, Mesh, Pod, Proc, bin_path, eventually};

use crate::cmd::quote;
use crate::lab::{self, Profile};

const WEB_PORT: u16 = 8080;
const TK_PORT: u16 = 9000;
/// Each way, for the weft-tk transfers.
const TRANSFER: &str = "8M";
const TRANSFER_BYTES: u64 = 8 << 20;
/// How long servers may take to start listening.
const SERVER_START: Duration = Duration::from_secs(20);
const LIVE_POLL: Duration = Duration::from_millis(500);
/// The demo service: a virtual IP, its port, and the replicas' port.
const SVC_VIP: &str = "10.96.0.10";
const SVC_PORT: u16 = 80;
const HELLO_PORT: u16 = 7000;
/// The service behind the waypoint, and its replicas' port.
const SHOP_VIP: &str = "10.96.0.30";
const SHOP_PORT: u16 = 9090;

/// Set by SIGINT/SIGTERM; the demo stops at the next check and tears down.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(signal, handler) };
    }
}

fn interrupted() -> Result<()> {
    if STOP.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Whether a pod is in the mesh: all but n1p1, which shows the difference, and
/// the waypoint, which speaks HBONE itself.
fn enrolled(p: &Pod) -> bool {
    !(is_waypoint(p) || p.node == 1 && p.index == 1)
}

/// The waypoint's pod: n0p3.
fn is_waypoint(p: &Pod) -> bool {
    p.node == 0 && p.index == 3
}

/// The `shop` replicas behind the waypoint: (pod, version, flaky).
fn shop_replicas(c: &Cluster) -> [(&Pod, &'static str, bool); 3] {
    [
        (c.pod(0, 1), "v1", false),
        (c.pod(1, 0), "v1", true),
        (c.pod(1, 3), "v2", false),
    ]
}

/// The replicas of the demo service `hello`: across both nodes.
fn hello_replicas(c: &Cluster) -> [&Pod; 3] {
    [c.pod(0, 1), c.pod(1, 0), c.pod(1, 2)]
}

/// The client the demo's policy denies.
fn denied_client(c: &Cluster) -> &Pod {
    c.pod(0, 2)
}

/// The services, the waypoint and its routes, and a policy that denies one
/// client (by its SPIFFE principal).
fn demo_sections(c: &Cluster) -> String {
    let denied = &denied_client(c).name;
    format!(
        "services:
- name: hello
  addresses: [{SVC_VIP}]
  ports: [{{port: {SVC_PORT}, target_port: {HELLO_PORT}}}]
  selector: {{app: hello}}
  load_balancing: {{policy: round_robin}}
- name: shop
  addresses: [{SHOP_VIP}]
  ports: [{{port: 80, target_port: {SHOP_PORT}, app_protocol: http}}]
  selector: {{shop: \"yes\"}}
  waypoint: waypoint
- name: shop-v1
  addresses: [10.96.0.31]
  ports: [{{port: 80, target_port: {SHOP_PORT}}}]
  selector: {{shop: \"yes\", version: v1}}
- name: shop-v2
  addresses: [10.96.0.32]
  ports: [{{port: 80, target_port: {SHOP_PORT}}}]
  selector: {{shop: \"yes\", version: v2}}
- name: waypoint
  addresses: []
  ports: []
  selector: {{role: waypoint}}
http_routes:
- name: shop
  spec:
    parentRefs: [{{group: \"\", kind: Service, name: shop, port: 80}}]
    rules:
    - name: canary
      matches: [{{headers: [{{name: x-canary, value: \"true\"}}]}}]
      backendRefs: [{{name: shop-v2, port: 80}}]
    - name: moved
      matches: [{{path: {{type: PathPrefix, value: /old}}}}]
      filters:
      - type: RequestRedirect
        requestRedirect: {{path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}, statusCode: 301}}
    - name: split
      backendRefs: [{{name: shop-v1, port: 80, weight: 90}}, {{name: shop-v2, port: 80, weight: 10}}]
      retry: {{codes: [503], attempts: 2}}
request_authentications:
- name: shop-jwt
  targetRefs: [{{kind: Service, group: \"\", name: shop}}]
  jwtRules:
  - issuer: https://login.demo.weft
    jwks: '{{\"keys\": [{{\"kty\": \"OKP\", \"crv\": \"Ed25519\", \"kid\": \"k1\", \"x\": \"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo\"}}]}}'
rate_limits:
- name: per-user
  target_refs: [{{kind: Service, name: shop}}]
  type: Local
  key: [header:x-user]
  rules:
  - client_selectors: [{{headers: [{{name: x-user, type: Distinct}}]}}]
    limit: {{requests: 5, unit: Second}}
    burst: 5
authorization_policies:
- name: shop-no-admin
  targetRefs: [{{kind: Service, group: \"\", name: shop}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: [\"/admin*\"]}}}}]}}]
- name: deny-{denied}
  selector: {{app: hello}}
  action: DENY
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/{denied}]}}}}]}}]
"
    )
}

pub fn run(once: bool) -> Result<()> {
    lab::require_root("demo")?;
    lab::prepare(Profile::Debug)?;
    install_signal_handlers();

    banner("Weft demo");
    println!(
        "Weft captures the TCP connections of enrolled pods with eBPF and runs them through\n\
         a per-node agent (no sidecars). This demo builds a small cluster out of network\n\
         namespaces and cgroups on this machine, starts one agent per node, sends traffic\n\
         and shows what the agents saw."
    );

    let cluster = Cluster::new("demo", 2, 4).context("building the virtual cluster")?;
    let id = cluster.id().to_owned();
    let cgroup = cluster.cgroup().to_path_buf();
    let outcome = walkthrough(&cluster, once);
    if let Err(e) = &outcome {
        eprintln!("\nxtask demo: {e:#}");
    }
    section("Teardown");
    drop(cluster);
    println!(
        "  agents stopped, `weft agent --uninstall` removed their eBPF programs and pins,\n  \
         network namespaces and cgroups deleted"
    );
    lab::check_clean(&id, &cgroup)?;
    outcome.map_err(|_| anyhow::anyhow!("the demo did not complete (see above)"))
}

/// Everything that needs the cluster; the mesh and all processes are dropped
/// (killed, uninstalled) before this returns.
fn walkthrough(cluster: &Cluster, once: bool) -> Result<()> {
    section("1. The cluster");
    println!(
        "  {} nodes with {} pods each. A node is a network namespace that routes for its pods\n  \
         (nodes meet on a bridge); a pod is a network namespace plus a cgroup v2.\n",
        cluster.nodes().len(),
        cluster.pods_of(0).len()
    );
    for node in cluster.nodes() {
        println!(
            "  {}  {:<15} pods {}/{}",
            node.name,
            node.ip.to_string(),
            node.pod_cidr.0,
            node.pod_cidr.1
        );
        for pod in cluster.pods_of(node.index) {
            println!(
                "    {}  {:<10} {:<13} {}",
                pod.name,
                pod.ip.to_string(),
                pod.ip6.to_string(),
                if enrolled(pod) {
                    "enrolled"
                } else {
                    "NOT enrolled (plain kernel networking, for comparison)"
                }
            );
        }
    }

    section("2. The mesh");
    let mut mesh = Mesh::new(cluster, enrolled)?;
    for pod in cluster.pods() {
        let mut labels = Vec::new();
        if hello_replicas(cluster).iter().any(|p| p.name == pod.name) {
            labels.push("app: hello".to_owned());
        }
        if let Some((_, version, _)) = shop_replicas(cluster)
            .iter()
            .find(|(p, ..)| p.name == pod.name)
        {
            labels.push(format!("shop: \"yes\", version: {version}"));
        }
        let mut extra = String::new();
        if is_waypoint(pod) {
            labels.push("role: waypoint".to_owned());
            extra.push_str("  native_tunnel: true\n");
        }
        if !labels.is_empty() {
            extra.push_str(&format!("  labels: {{{}}}\n", labels.join(", ")));
            mesh.set_extra(pod, &extra)?;
        }
    }
    mesh.set_sections(&demo_sections(cluster))?;
    mesh.start_all().context("starting the agents")?;
    for node in cluster.nodes() {
        println!(
            "  {}: `weft agent` pid {} ready; attached to cgroup {}, pins in {}",
            node.name,
            mesh.agent(node.index).pid(),
            node.cgroup.display(),
            mesh.pin_dir(node.index).display()
        );
    }
    println!("  config: {}", mesh.config_path().display());
    interrupted()?;

    section("3. Applications");
    let site = WebRoot::create(cluster.id())?;
    let web_pod = cluster.pod(1, 0);
    let mut web_cmd = web_pod.command("python3");
    web_cmd
        .args([
            "-u",
            "-m",
            "http.server",
            &WEB_PORT.to_string(),
            "--bind",
            "::",
            "--directory",
        ])
        .arg(&site.0);
    let web = spawn(web_pod, web_cmd)?;
    web.wait_for_line(SERVER_START, |l| l.contains("Serving HTTP"))
        .context("the web server did not start")?;
    println!(
        "  {}: python3 -m http.server on port {WEB_PORT}",
        web_pod.name
    );
    let tk = bin_path("weft-tk");
    let tk_servers: Vec<(&Pod, Proc)> = [cluster.pod(0, 1), cluster.pod(1, 1)]
        .into_iter()
        .map(|pod| -> Result<(&Pod, Proc)> {
            let mut c = pod.command(&tk);
            c.args(["serve", "--listen", &format!("[::]:{TK_PORT}")]);
            let p = spawn(pod, c)?;
            p.wait_for_json(SERVER_START, |v| v.get("listening").is_some())?;
            println!(
                "  {}: weft-tk serve on port {TK_PORT} (verifies every byte it gets)",
                pod.name
            );
            Ok((pod, p))
        })
        .collect::<Result<_>>()?;
    interrupted()?;

    section("4. Traffic");
    let mut failures = Vec::new();
    let mut note = |result: Result<()>| {
        if let Err(e) = result {
            println!("      FAILED: {e:#}");
            failures.push(e);
        }
    };
    let (n0p0, n0p1, n1p0, n1p1) = (
        cluster.pod(0, 0),
        cluster.pod(0, 1),
        cluster.pod(1, 0),
        cluster.pod(1, 1),
    );
    println!(
        "  [1] curl  {} -> http://{}:{WEB_PORT}/ in {}   (cross-node, both enrolled)",
        n0p0.name, n1p0.ip, n1p0.name
    );
    note(curl_step(n0p0, n1p0, &web));
    interrupted()?;
    let server = |pod: &Pod| {
        &tk_servers
            .iter()
            .find(|(p, _)| p.name == pod.name)
            .unwrap()
            .1
    };
    let tk_steps = [
        (n0p0, n0p1, n0p1.ip.to_string(), "same node, both enrolled"),
        (
            n1p1,
            n0p1,
            n0p1.ip.to_string(),
            "from a pod NOT enrolled to an enrolled one",
        ),
        (
            n0p0,
            n1p1,
            format!("[{}]", n1p1.ip6),
            "IPv6, cross-node, to the pod NOT enrolled",
        ),
    ];
    for (i, (from, to, host, what)) in tk_steps.iter().enumerate() {
        println!(
            "  [{}] weft-tk  {} -> {}:{TK_PORT} in {}, {TRANSFER} each way   ({what})",
            i + 2,
            from.name,
            host,
            to.name
        );
        note(tk_step(&tk, from, &format!("{host}:{TK_PORT}"), server(to)));
        interrupted()?;
    }

    section("5. What the agents captured (their access logs)");
    // One line per connection and proxy side: curl (n0 out, n1 in), n0p0->n0p1
    // (out and in on n0), n1p1->n0p1 (in on n0), n0p0->n1p1 (out on n0).
    let expected = 6;
    eventually(Duration::from_secs(5), || {
        all_logs(&mesh, cluster).len() >= expected
    });
    let logs = all_logs(&mesh, cluster);
    print_table(&logs);
    if logs.len() < expected {
        println!("  (expected {expected} lines, got {})", logs.len());
    }
    println!(
        "\n  outbound = the agent on the client's node took the connection from an enrolled pod;\n  \
         inbound  = the agent on the server's node delivered it to an enrolled pod.\n  \
         Traffic of the pod that is not enrolled is captured only where it meets an enrolled one.\n  \
         The app's connect was redirected to the agent's listener at 127.0.0.1 / [::1]\n  \
         inside its pod (getpeername still shows the original destination). Between two\n  \
         enrolled pods the agents carried it as one HTTP/2 CONNECT stream over mutual TLS 1.3\n  \
         (HBONE, port 15008): wire = mTLS, and each side proved the SPIFFE identity shown,\n  \
         with certificates `weft ca` signed for this node only. Between two enrolled pods\n  \
         of one node the agent connected them itself after the same policy checks\n  \
         (wire = node: the bytes never left the node, so no TLS). A destination outside\n  \
         the mesh gets plaintext (outside_mesh: passthrough, the default)."
    );

    section("6. A service, load balancing and a policy");
    let hello: Vec<Proc> = hello_replicas(cluster)
        .into_iter()
        .map(|pod| -> Result<Proc> {
            let mut c = pod.command(&tk);
            c.args([
                "name",
                "--listen",
                &format!("[::]:{HELLO_PORT}"),
                "--name",
                &pod.name,
            ]);
            let p = spawn(pod, c)?;
            p.wait_for_json(SERVER_START, |v| v.get("listening").is_some())?;
            Ok(p)
        })
        .collect::<Result<_>>()?;
    let names: Vec<&str> = hello_replicas(cluster)
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    println!(
        "  service default/hello: {SVC_VIP}:{SVC_PORT} -> port {HELLO_PORT} of the pods labelled app=hello"
    );
    println!(
        "  ({}), round robin; each replica answers its name.",
        names.join(", ")
    );
    println!(
        "  policy default/deny-{0}: DENY spiffe://cluster.local/ns/default/sa/{0} at app=hello.",
        denied_client(cluster).name
    );
    note(service_step(n0p0, 30, true));
    note(service_step(denied_client(cluster), 3, false));
    let traffic = service_traffic(cluster);
    println!(
        "
  per-service traffic, from the agents' Istio metrics (istio_tcp_*, :15020):"
    );
    print_traffic(&traffic);

    section("7. A waypoint: L7 routing");
    let wp_pod = cluster.pod(0, 3);
    let waypoint = mesh
        .start_waypoint(wp_pod, &[])
        .context("starting the waypoint")?;
    let _shop: Vec<Proc> = shop_replicas(cluster)
        .into_iter()
        .map(|(pod, version, flaky)| {
            let name = format!("{}-{version}", pod.name);
            let extra: &[&str] = if flaky { &["--fail-every", "3"] } else { &[] };
            weft_tests::l7::http_echo_with(pod, SHOP_PORT, &name, extra)
        })
        .collect::<Result<_>>()?;
    println!(
        "  `weft waypoint` pid {} in {} (its own identity, spiffe://cluster.local/ns/default/sa/{}).\n  \
         service default/shop ({SHOP_VIP}:80) is bound to it: the client's agent sends each\n  \
         connection to the waypoint over HBONE, the waypoint routes each request (an HTTPRoute)\n  \
         and sends it on over HBONE with its own identity. Replicas: {} (v1), {} (v1, fails\n  \
         every 3rd request with 503), {} (v2).",
        waypoint.pid(),
        wp_pod.name,
        wp_pod.name,
        cluster.pod(0, 1).name,
        cluster.pod(1, 0).name,
        cluster.pod(1, 3).name,
    );
    note(waypoint_steps(n0p0, _shop.get(1)));
    note(route_counts(&waypoint));

    section("8. Policies at the waypoint: JWT, L7 authorization, rate limits");
    println!(
        "  On service shop, at its waypoint: a RequestAuthentication (JWT, an Ed25519 key\n  \
         inline), an AuthorizationPolicy denying /admin*, and a local rate limit of 5 requests\n  \
         a second (burst 5) per x-user."
    );
    note(policy_steps(n0p0));

    let failed = failures.len();
    if failed > 0 {
        bail!("{failed} of 8 demo steps failed");
    }
    if once {
        return Ok(());
    }

    section("7. Try it yourself (in another terminal, as root)");
    print_commands(cluster, &mesh, &tk);
    section("Live access logs and per-service traffic (Ctrl-C to stop and tear down)");
    // Where each agent's log was read up to: every poll parses only the lines
    // printed since the last, and frees them once shown (the demo may run for
    // hours under load).
    let mut seen: Vec<usize> = cluster
        .nodes()
        .iter()
        .map(|n| mesh.logs_end(n.index))
        .collect();
    let mut last = traffic;
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(LIVE_POLL);
        let now = service_traffic(cluster);
        if now != last {
            print_traffic(&now);
            last = now;
        }
        for (index, status, tail) in mesh.exited_agents() {
            let name = &cluster.nodes()[index].name;
            println!(
                "\n  !! the agent of {name} died ({status}); its pods' traffic through the mesh fails closed until it is back"
            );
            for line in tail.lines() {
                println!("     {line}");
            }
        }
        for node in cluster.nodes() {
            for line in mesh.access_logs_after(node.index, &mut seen[node.index]) {
                println!("  {}", live_row(&node.name, &line));
            }
            // Shown: nothing needs it again, and memory stays flat however
            // long the demo runs under load.
            mesh.forget_logs_before(node.index, seen[node.index]);
        }
    }
    println!("\n  Ctrl-C received");
    drop(hello);
    drop(tk_servers);
    drop(web);
    drop(mesh);
    Ok(())
}

/// `count` connections from `from` to the service; `allowed` says whether the
/// policy lets `from` in.
/// The waypoint's routes, live: a 90/10 split with retries hiding the flaky
/// replica, a header route to v2, and a redirect.
fn waypoint_steps(client: &Pod, flaky: Option<&Proc>) -> Result<()> {
    let url = format!("http://{SHOP_VIP}/");
    let urls: Vec<&str> = std::iter::repeat_n(url.as_str(), 200).collect();
    let mut args = vec![
        "-sS",
        "--noproxy",
        "*",
        "--max-time",
        "60",
        "-w",
        "\n%{http_code}\n",
    ];
    args.extend(urls.iter().copied());
    let out = client.exec("curl", &args)?;
    let mut by_pod = std::collections::BTreeMap::<String, u32>::new();
    let (mut answers, mut ok) = (0, 0);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('{') {
            let v: Value = serde_json::from_str(line)?;
            *by_pod.entry(text(&v, "pod")).or_default() += 1;
        } else if line.len() == 3 {
            answers += 1;
            ok += u32::from(line == "200");
        }
    }
    let hidden = flaky
        .map(|p| {
            weft_tests::l7::served_by(p)
                .iter()
                .filter(|v| v["status"] == 503)
                .count()
        })
        .unwrap_or(0);
    println!("\n  $ curl {url}  (200 requests on one keep-alive connection)");
    println!(
        "    {ok} of {answers} answered 200 OK; the flaky replica answered 503 {hidden} times,\n    \
         and each was retried on another replica (retry: codes [503])"
    );
    for (pod, n) in &by_pod {
        println!("    {pod:<12} {n:>4}");
    }
    let v2: u32 = by_pod
        .iter()
        .filter(|(p, _)| p.ends_with("-v2"))
        .map(|(_, n)| n)
        .sum();
    println!("    route rule 3: weights 90/10 -> v2 took {v2} of {answers}");
    if ok != 200 {
        bail!("{} of 200 requests through the waypoint failed", 200 - ok);
    }

    let r = weft_tests::l7::curl(client, &url, &["-H", "x-canary: true"])?;
    println!(
        "\n  $ curl -H 'x-canary: true' {url}\n    {} from {}  (route rule 1: a header match sends it to v2)",
        r.status,
        text(&r.body, "pod")
    );
    let r = weft_tests::l7::curl(client, &format!("http://{SHOP_VIP}/old/cart"), &[])?;
    println!(
        "\n  $ curl http://{SHOP_VIP}/old/cart\n    {} location: {}  (route rule 2: a redirect, answered by the waypoint)",
        r.status,
        r.header("location").unwrap_or("-")
    );
    if r.status != 301 {
        bail!("the redirect answered {}", r.status);
    }
    Ok(())
}

/// A bad token (401), a denied path however it is spelled (403), and a client
/// over its limit (429), live through the waypoint.
fn policy_steps(client: &Pod) -> Result<()> {
    let url = format!("http://{SHOP_VIP}/");
    let r = weft_tests::l7::curl(client, &url, &["-H", "authorization: Bearer not.a.jwt"])?;
    println!(
        "\n  $ curl -H 'authorization: Bearer not.a.jwt' {url}\n    {} {:?}  (request authentication: an invalid token is refused; no token passes)",
        r.status,
        r.header("www-authenticate").unwrap_or("-")
    );
    if r.status != 401 {
        bail!("a bad token answered {}", r.status);
    }
    for path in ["/admin", "/%61dmin/users", "//admin", "/x/../admin"] {
        let r = weft_tests::l7::curl(
            client,
            &format!("http://{SHOP_VIP}{path}"),
            &["--path-as-is"],
        )?;
        println!(
            "  $ curl --path-as-is http://{SHOP_VIP}{path}\n    {} {}",
            r.status,
            r.body.as_str().unwrap_or_default()
        );
        if r.status != 403 {
            bail!("{path} answered {}", r.status);
        }
    }
    let mut codes = std::collections::BTreeMap::<u16, u32>::new();
    let mut retry_after = String::new();
    for _ in 0..15 {
        let r = weft_tests::l7::curl(client, &url, &["-H", "x-user: alice"])?;
        if r.status == 429 {
            retry_after = format!(
                "retry-after: {}, ratelimit: {}",
                r.header("retry-after").unwrap_or("-"),
                r.header("ratelimit").unwrap_or("-")
            );
        }
        *codes.entry(r.status).or_default() += 1;
    }
    let bob = weft_tests::l7::curl(client, &url, &["-H", "x-user: bob"])?;
    println!(
        "\n  15 requests as x-user: alice, back to back: {codes:?}\n    the 429s say {retry_after}\n  \
         and bob, meanwhile: {} (his own bucket)",
        bob.status
    );
    if !codes.contains_key(&429) || bob.status != 200 {
        bail!("the rate limit did not hold: {codes:?}, bob {}", bob.status);
    }
    Ok(())
}

/// Requests per route rule and status, from the waypoint's access log (one
/// line per request).
fn route_counts(waypoint: &Proc) -> Result<()> {
    let mut counts = std::collections::BTreeMap::<(String, String), (u32, u64)>::new();
    eventually(Duration::from_secs(5), || {
        counts.clear();
        for v in waypoint.json_lines() {
            if v["message"] == "request" {
                let route = v["route"].as_str().unwrap_or("(no route)").to_owned();
                let c = counts.entry((route, v["status"].to_string())).or_default();
                c.0 += 1;
                c.1 += v["retries"].as_u64().unwrap_or(0);
            }
        }
        counts.values().map(|c| c.0).sum::<u32>() >= 202
    });
    println!("\n  per route rule, from the waypoint's access log (one line per request):");
    for ((route, status), (n, retries)) in &counts {
        println!("    {route:<34} {status:>4}  {n:>4} requests, {retries:>3} retried");
    }
    if counts.is_empty() {
        bail!("the waypoint logged no request");
    }
    Ok(())
}

fn service_step(from: &Pod, count: usize, allowed: bool) -> Result<()> {
    let to = format!("{SVC_VIP}:{SVC_PORT}");
    println!(
        "  weft-tk who  {} -> {to}, {count} connections   ({})",
        from.name,
        if allowed {
            "allowed"
        } else {
            "denied by the policy"
        }
    );
    let report = weft_tests::tk::who(from, &to, count, 1)?;
    let answered: Vec<String> = report["counts"]
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k}: {v}")).collect())
        .unwrap_or_default();
    let failures = report["failures"].as_u64().unwrap_or(0);
    if allowed {
        if failures > 0 || answered.len() != 3 {
            bail!("expected all three replicas to answer: {report}");
        }
        println!("      answered by {}", answered.join(", "));
    } else {
        if !answered.is_empty() {
            bail!("a denied client got through: {report}");
        }
        println!(
            "      all {failures} refused by the destination's policy (a 401 on the HBONE stream,\n      \
             or in-process for a replica on the client's own node); the application never saw them"
        );
    }
    Ok(())
}

/// Per (service, response flags): connections closed and bytes both ways, as
/// the clients' agents report them (`reporter="source"`: the side that knows
/// which service was dialed).
type Traffic = std::collections::BTreeMap<(String, String), (u64, u64)>;

fn service_traffic(cluster: &Cluster) -> Traffic {
    let mut out = Traffic::new();
    for node in cluster.nodes() {
        let Ok(page) = node.exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"]) else {
            continue;
        };
        let text = String::from_utf8_lossy(&page.stdout);
        for line in text.lines().filter(|l| l.starts_with("istio_tcp_")) {
            let Some((name, rest)) = line.split_once('{') else {
                continue;
            };
            let field = |key: &str| -> String {
                rest.split(&format!("{key}=\""))
                    .nth(1)
                    .and_then(|v| v.split('"').next())
                    .unwrap_or("")
                    .to_owned()
            };
            let svc = field("destination_service");
            if field("reporter") != "source" || svc == "unknown" {
                continue;
            }
            let value: u64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let e = out.entry((svc, field("response_flags"))).or_default();
            match name {
                "istio_tcp_connections_closed_total" => e.0 += value,
                "istio_tcp_received_bytes_total" | "istio_tcp_sent_bytes_total" => e.1 += value,
                _ => {}
            }
        }
    }
    out.retain(|_, (conns, _)| *conns > 0);
    out
}

fn print_traffic(t: &Traffic) {
    for ((svc, flags), (conns, bytes_total)) in t {
        let what = match flags.as_str() {
            "-" => "completed",
            "DENY" => "denied by policy",
            "CONNECT" => "failed to connect",
            other => other,
        };
        println!(
            "    {svc:<34} {conns:>5} connections {what:<18} {:>10}",
            bytes(Some(*bytes_total))
        );
    }
}

/// Spawns a pod command in its own process group, so that a Ctrl-C in the
/// terminal reaches only xtask, which then tears everything down in order.
fn spawn(pod: &Pod, mut cmd: Command) -> Result<Proc> {
    cmd.process_group(0);
    pod.spawn(&mut cmd)
}

/// A directory with a small page for the web server; removed on drop.
struct WebRoot(PathBuf);

impl WebRoot {
    fn create(id: &str) -> Result<WebRoot> {
        let dir = std::env::temp_dir().join(format!("weft-demo-{id}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("index.html"),
            "<!doctype html><title>weft demo</title><p>Hello from pod n1p0, through the Weft mesh.</p>\n",
        )?;
        Ok(WebRoot(dir))
    }
}

impl Drop for WebRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn curl_step(from: &Pod, to: &Pod, web: &Proc) -> Result<()> {
    let before = web.stderr().lines().count();
    let url = format!("http://{}:{WEB_PORT}/", to.ip);
    let out = from.exec(
        "curl",
        [
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{size_download} %{remote_ip} %{remote_port}",
            &url,
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    if !out.status.success() {
        bail!(
            "curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let [code, size, ip, port] = fields[..] else {
        bail!("unexpected curl output {stdout:?}");
    };
    println!(
        "      HTTP {code}, {size} bytes; curl's socket is connected to {ip}:{port} (getpeername)"
    );
    // http.server logs each request on stderr, starting with the client address.
    eventually(Duration::from_secs(2), || {
        web.stderr().lines().count() > before
    });
    if let Some(line) = web
        .stderr()
        .lines()
        .skip(before)
        .find(|l| l.contains("\"GET "))
    {
        let client = line.split_whitespace().next().unwrap_or("?");
        println!("      the web server saw the request come from {client}");
        loopback_note(client, true);
    }
    if code != "200" {
        bail!("expected HTTP 200, got {code}");
    }
    Ok(())
}

fn tk_step(tk: &Path, from: &Pod, addr: &str, server: &Proc) -> Result<()> {
    let accepted = |p: &Proc| {
        p.json_lines()
            .into_iter()
            .filter(|v| v.get("accepted").is_some())
            .count()
    };
    let before = accepted(server);
    let out = from.exec(
        tk,
        [
            "client",
            "--connect",
            addr,
            "--upload",
            TRANSFER,
            "--download",
            TRANSFER,
            "--timeout-secs",
            "30",
        ],
    )?;
    let report: Value = String::from_utf8_lossy(&out.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "weft-tk client printed no report; stderr: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    let peer = report["peer"].as_str().unwrap_or("-");
    let ms = report["elapsed_ms"].as_f64().unwrap_or(0.0);
    eventually(Duration::from_secs(2), || accepted(server) > before);
    let seen = server
        .json_lines()
        .into_iter()
        .filter(|v| v.get("accepted").is_some())
        .nth(before);
    if report["ok"] != true {
        bail!(
            "weft-tk client: {}",
            report["error"].as_str().unwrap_or("failed")
        );
    }
    let moved = |k: &str| report[k].as_u64().unwrap_or(0);
    if moved("uploaded") != TRANSFER_BYTES || moved("downloaded") != TRANSFER_BYTES {
        bail!(
            "moved {} up / {} down, expected {TRANSFER_BYTES} each",
            moved("uploaded"),
            moved("downloaded")
        );
    }
    println!("      ok: {TRANSFER} up and {TRANSFER} down, every byte verified, {ms:.0} ms");
    println!("      client's socket is connected to {peer} (getpeername)");
    if let Some(seen) = seen {
        let client = seen["accepted"].as_str().unwrap_or("?");
        println!(
            "      the server accepted it from {client} on {}",
            seen["local"].as_str().unwrap_or("?")
        );
        loopback_note(client, false);
    }
    Ok(())
}

/// Explains a loopback client address seen by a server in an enrolled pod.
/// Says where the address an application saw comes from; `explain_client`:
/// also when it is the client's own (the server's pod is enrolled).
fn loopback_note(client: &str, explain_client: bool) {
    if client.contains("127.0.0.6") || client.starts_with("[::1]") || client == "::1" {
        println!(
            "      (that is the agent on the server's node handing the connection over inside\n       \
             the pod; the inbound access-log line below names the real client)"
        );
    } else if explain_client {
        println!(
            "      (the client's own address: the agent on the server's node hands the connection\n       \
             to the application from it; `--inbound-source loopback` would show 127.0.0.6)"
        );
    }
}

/// Access-log lines of all agents, each with its node's name, in time order.
fn all_logs(mesh: &Mesh, cluster: &Cluster) -> Vec<(String, Value)> {
    let mut all: Vec<(String, Value)> = cluster
        .nodes()
        .iter()
        .flat_map(|n| {
            mesh.access_logs(n.index)
                .into_iter()
                .map(|v| (n.name.clone(), v))
        })
        .collect();
    all.sort_by_key(|a| text(&a.1, "timestamp"));
    all
}

fn text(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The columns of an access-log row.
fn columns(node: &str, v: &Value) -> [String; 9] {
    let mut end = text(v, "end");
    if let Some(e) = v["error"].as_str() {
        let _ = write!(end, " ({e})");
    }
    [
        node.to_owned(),
        text(v, "direction"),
        text(v, "workload"),
        format!("{} -> {}", text(v, "src.addr"), text(v, "dst.addr")),
        match v["security"].as_str() {
            Some("mutual_tls") => "mTLS".into(),
            Some("node_local") => "node".into(),
            _ => "plain".into(),
        },
        format!("{} -> {}", text(v, "src.identity"), text(v, "dst.identity")),
        format!(
            "{} / {}",
            bytes(v["bytes_sent"].as_u64()),
            bytes(v["bytes_received"].as_u64())
        ),
        v["duration_ms"]
            .as_f64()
            .map_or("-".into(), |ms| format!("{ms:.1} ms")),
        end,
    ]
}

const HEADERS: [&str; 9] = [
    "node",
    "direction",
    "workload",
    "src -> dst",
    "wire",
    "SPIFFE identities (src -> dst)",
    "sent / received",
    "duration",
    "end",
];

fn print_table(logs: &[(String, Value)]) {
    if logs.is_empty() {
        println!("  (no access-log lines)");
        return;
    }
    let rows: Vec<[String; 9]> = logs.iter().map(|(n, v)| columns(n, v)).collect();
    let mut widths = HEADERS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::from(" ");
        for (cell, w) in cells.iter().zip(widths) {
            let _ = write!(out, " {cell:<w$} ");
        }
        println!("{}", out.trim_end());
    };
    line(&HEADERS.map(String::from));
    line(&widths.map(|w| "-".repeat(w)));
    for row in &rows {
        line(row);
    }
}

/// One access-log row with fixed column widths, for the live view.
fn live_row(node: &str, v: &Value) -> String {
    let c = columns(node, v);
    format!(
        "{:<6} {:<9} {:<13} {:<44} {:<5} {:<21} {:>10}  {}  [{}]",
        c[0], c[1], c[2], c[3], c[4], c[6], c[7], c[8], c[5]
    )
}

/// `n` bytes, readably.
fn bytes(n: Option<u64>) -> String {
    match n {
        None => "-".into(),
        Some(n) if n < 1024 => format!("{n} B"),
        Some(n) if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        Some(n) => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
    }
}

/// The shell command that runs `program args` inside `pod` (its cgroup first,
/// so that the capture programs see it, then its network namespace).
fn in_pod(pod: &Pod, program: &str) -> String {
    let script = format!(
        "echo $$ > {} && exec ip netns exec {} {program}",
        pod.cgroup.join("cgroup.procs").display(),
        pod.netns
    );
    format!("sh -c {}", quote(&script))
}

fn print_commands(cluster: &Cluster, mesh: &Mesh, tk: &Path) {
    let (n0p0, n0p1, n1p0, n1p1) = (
        cluster.pod(0, 0),
        cluster.pod(0, 1),
        cluster.pod(1, 0),
        cluster.pod(1, 1),
    );
    let web = format!("curl -s http://{}:{WEB_PORT}/", n1p0.ip);
    let tk = tk.display();
    let id = cluster.id();
    println!(
        "  A command is inside a pod when it joins the pod's cgroup (that is what the capture\n  \
         programs key on) and its network namespace:\n"
    );
    println!("  # the web page in n1p0, from enrolled n0p0 (captured on both nodes)");
    println!("  {}\n", in_pod(n0p0, &web));
    println!("  # the same from n1p1, which is not enrolled (captured only inbound, at n1p0)");
    println!("  {}\n", in_pod(n1p1, &web));
    println!(
        "  # only the network namespace, not the cgroup: n0p0's side is not captured\n  \
         # (no outbound line), n1p0's inbound side still is"
    );
    println!("  ip netns exec {} {web}\n", n0p0.netns);
    println!("  # 64 MiB each way through the mesh, every byte verified (n0p0 -> n0p1)");
    println!(
        "  {}\n",
        in_pod(
            n0p0,
            &format!(
                "{tk} client --connect {}:{TK_PORT} --upload 64M --download 64M",
                n0p1.ip
            )
        )
    );
    println!("  # a look under the hood");
    println!("  ip netns list | grep {id}");
    println!("  bpftool cgroup tree {}", cluster.cgroup().display());
    println!(
        "  ls {} {}",
        mesh.pin_dir(0).display(),
        mesh.pin_dir(1).display()
    );
    println!("  cat {}", mesh.config_path().display());
    println!();
}

fn banner(title: &str) {
    println!("\n{title}\n{}", "=".repeat(title.len()));
}

fn section(title: &str) {
    println!("\n--- {title} ---\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes() {
        assert_eq!(bytes(Some(0)), "0 B");
        assert_eq!(bytes(Some(1536)), "1.5 KiB");
        assert_eq!(bytes(Some(8 << 20)), "8.0 MiB");
        assert_eq!(bytes(None), "-");
    }

    #[test]
    fn access_log_columns() {
        let v = serde_json::json!({
            "direction": "outbound", "workload": "default/n0p0",
            "src.addr": "10.1.1.2:40000", "dst.addr": "10.2.1.2:8080",
            "bytes_sent": 80, "bytes_received": 1048576, "duration_ms": 1.25,
            "end": "closed", "error": null,
        });
        let c = columns("node0", &v);
        assert_eq!(c[3], "10.1.1.2:40000 -> 10.2.1.2:8080");
        assert_eq!(c[4], "plain");
        assert_eq!(c[5], "- -> -");
        assert_eq!(c[6], "80 B / 1.0 MiB");
        assert_eq!(c[7], "1.2 ms");
        assert_eq!(c[8], "closed");
    }
}
