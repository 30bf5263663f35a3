//! Services in the virtual cluster: a virtual IP captured and sent to one of its
//! endpoints over the mesh, by round robin, least request or consistent hash;
//! outlier detection around a killed backend; a config reload that touches one
//! service and not another; and the Istio TCP metrics matching what was sent.

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use weft_tests::{
    Cluster, Mesh, PATIENCE, Pod, cluster::Host as _, eventually, require_privileged, tk,
};

const PORT: u16 = 8080;
const VIP: &str = "10.96.0.10";

/// A service `web` on `VIP:80` → `PORT`, endpoints: pods labelled `app: web`.
fn web_service(policy: &str, extra: &str) -> String {
    format!(
        "services:\n- name: web\n  addresses: [{VIP}]\n  ports: [{{port: 80, target_port: {PORT}}}]\n  selector: {{app: web}}\n  load_balancing: {{policy: {policy}}}\n{extra}"
    )
}

/// Client pod (0,0); three backends (0,1), (1,0), (1,1), each answering its name.
struct Setup<'c> {
    mesh: Mesh<'c>,
    backends: Vec<(&'c Pod, weft_tests::Proc)>,
}

fn setup<'c>(c: &'c Cluster, sections: &str, agent_args: &[&str]) -> Result<Setup<'c>> {
    let mut mesh = Mesh::new(c, |_| true)?;
    mesh.agent_args = agent_args.iter().map(|s| s.to_string()).collect();
    let backends = [c.pod(0, 1), c.pod(1, 0), c.pod(1, 1)];
    for b in backends {
        mesh.set_extra(b, "  labels: {app: web}\n")?;
    }
    mesh.set_sections(sections)?;
    mesh.start_all()?;
    let mut procs = Vec::new();
    for b in backends {
        procs.push((b, tk::name(b, PORT)?));
    }
    Ok(Setup {
        mesh,
        backends: procs,
    })
}

fn counts(report: &Value) -> Vec<(String, u64)> {
    report["counts"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn count_of(report: &Value, pod: &Pod) -> u64 {
    report["counts"][&pod.name].as_u64().unwrap_or(0)
}

/// Every backend got `n / 3` connections within `tolerance` (a fraction).
fn assert_even(report: &Value, s: &Setup, n: u64, tolerance: f64) {
    assert_eq!(report["failures"], 0, "{report}");
    let want = n as f64 / 3.0;
    for (pod, _) in &s.backends {
        let got = count_of(report, pod) as f64;
        assert!(
            (got - want).abs() <= want * tolerance,
            "{} got {got} of {n}, want {want:.0} ± {:.0}%: {:?}",
            pod.name,
            tolerance * 100.0,
            counts(report)
        );
    }
}

#[test]
fn round_robin_spreads_3000_connections_evenly_over_three_endpoints() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_rr", 2, 2)?;
    let s = setup(&c, &web_service("round_robin", ""), &[])?;
    let report = tk::who(c.pod(0, 0), &format!("{VIP}:80"), 3000, 1)?;
    // One client, one agent, strict rotation: exactly a third each (±1%).
    assert_even(&report, &s, 3000, 0.01);
    // Each went over mutual TLS to the pod's target port, named by its service;
    // to the backend on the client's node, in-process.
    // (An access-log line is written up to 50 ms after its connection closed.)
    let mut logs = Vec::new();
    eventually(PATIENCE, || {
        logs = s.mesh.access_logs(0);
        logs.iter()
            .filter(|v| v["service"] == "default/web")
            .count()
            >= 3000
    });
    let to_web: Vec<&Value> = logs
        .iter()
        .filter(|v| v["service"] == "default/web")
        .collect();
    assert!(to_web.len() >= 3000, "{} access-log lines", to_web.len());
    let same_node = c.pod(0, 1).ip.to_string();
    assert!(to_web.iter().all(|v| {
        let local = v["dst.addr"]
            .as_str()
            .is_some_and(|a| a.starts_with(&format!("{same_node}:")));
        v["security"] == if local { "node_local" } else { "mutual_tls" }
            && v["dst.addr"]
                .as_str()
                .is_some_and(|a| a.ends_with(&format!(":{PORT}")))
    }));
    Ok(())
}

#[test]
fn least_request_spreads_concurrent_connections_evenly() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_lr", 2, 2)?;
    let s = setup(&c, &web_service("least_request", ""), &[])?;
    // 30 held at a time: the less busy of two random picks takes each new one.
    let report = tk::who(c.pod(0, 0), &format!("{VIP}:80"), 3000, 30)?;
    assert_even(&report, &s, 3000, 0.10);
    Ok(())
}

#[test]
fn consistent_hash_keeps_a_client_on_one_endpoint_when_another_is_removed() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_hash", 2, 2)?;
    let mut s = setup(&c, &web_service("consistent_hash", ""), &[])?;
    let client = c.pod(0, 0);
    let report = tk::who(client, &format!("{VIP}:80"), 200, 1)?;
    assert_eq!(report["failures"], 0, "{report}");
    let seen = counts(&report);
    ensure!(
        seen.len() == 1,
        "the client moved between endpoints: {seen:?}"
    );
    let home = seen[0].0.clone();
    // Remove another endpoint (its label), and the client stays home.
    let other = s
        .backends
        .iter()
        .map(|(p, _)| *p)
        .find(|p| p.name != home)
        .context("no other backend")?;
    s.mesh.set_extra(other, "  labels: {app: retired}\n")?;
    let node = client.node;
    ensure!(
        eventually(PATIENCE, || !s
            .mesh
            .logs(node, |v| v["message"] == "config changed, applying")
            .is_empty()),
        "the agent did not apply the change"
    );
    let report = tk::who(client, &format!("{VIP}:80"), 200, 1)?;
    assert_eq!(counts(&report), vec![(home, 200)], "{report}");
    Ok(())
}

/// The agent's `/metrics` page on `node`.
fn metrics(c: &Cluster, node: usize) -> Result<String> {
    let out = c
        .node(node)
        .exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of the first series of `name` whose labels contain all of `want`.
fn series(text: &str, name: &str, want: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| want.iter().all(|w| l.contains(w)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_killed_backend_is_ejected_no_client_fails_and_it_is_readmitted() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_eject", 2, 2)?;
    // Debug logs show each failed attempt (to check the ejected one is skipped).
    let od = "  outlier_detection: {consecutive_failures: 2, base_ejection_time: 3s, max_ejection_time: 3s}\n";
    let mut s = setup(&c, &web_service("round_robin", od), &[])?;
    s.mesh.stop_agent(0, false)?;
    s.mesh.agent_env = vec![("RUST_LOG".into(), "info,weft::node=debug".into())];
    s.mesh.start_agent(0)?;
    let client = c.pod(0, 0);
    let to = format!("{VIP}:80");
    // Kill one backend's server: its pod still answers 15008, the agent there
    // answers 503 (the application refused), and the client's agent retries.
    let (dead, mut proc) = s.backends.remove(1);
    proc.kill()?;
    let report = tk::who(client, &to, 300, 1)?;
    assert_eq!(
        report["failures"], 0,
        "a client connection failed: {report}"
    );
    assert_eq!(count_of(&report, dead), 0, "{report}");
    let ejected = s.mesh.logs(0, |v| {
        v["message"] == "endpoint ejected"
            && v["endpoint"]
                .as_str()
                .is_some_and(|e| e.ends_with(&format!("/{}", dead.name)))
    });
    ensure!(!ejected.is_empty(), "no ejection logged");
    let text = metrics(&c, 0)?;
    let n = series(
        &text,
        "weft_endpoint_ejections_total",
        &[&format!("endpoint=\"default/{}\"", dead.name)],
    )
    .with_context(|| format!("no ejection metric:\n{text}"))?;
    assert!(n >= 1.0);
    // While it is ejected, the dead one is not even tried.
    let tried = |mesh: &Mesh| {
        mesh.logs(0, |v| {
            v["message"] == "connect failed; trying another endpoint"
                && v["endpoint"]
                    .as_str()
                    .is_some_and(|e| e.ends_with(&format!("/{}", dead.name)))
        })
        .len()
    };
    let before = tried(&s.mesh);
    assert!(
        before >= 2,
        "the failed attempts before the ejection were not logged"
    );
    let report = tk::who(client, &to, 30, 1)?;
    assert_eq!(report["failures"], 0, "{report}");
    assert_eq!(tried(&s.mesh), before, "an ejected endpoint was tried");

    // Bring it back: after the ejection time it is picked again.
    let revived = tk::name(dead, PORT)?;
    let back = eventually(std::time::Duration::from_secs(20), || {
        tk::who(client, &to, 30, 1)
            .map(|r| count_of(&r, dead) > 0 && r["failures"] == 0)
            .unwrap_or(false)
    });
    drop(revived);
    ensure!(back, "the revived backend was not re-admitted");
    Ok(())
}

#[test]
fn a_retry_on_another_endpoint_resends_what_the_client_sent_early() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_early", 2, 2)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let backends = [c.pod(0, 1), c.pod(1, 0), c.pod(1, 1)];
    for b in backends {
        mesh.set_extra(b, "  labels: {app: web}\n")?;
    }
    // No outlier detection: every connection picked for the dead backend is
    // retried, and each retry must carry the client's bytes sent so far.
    mesh.set_sections(&web_service(
        "round_robin",
        "  outlier_detection: {consecutive_failures: 1000}\n",
    ))?;
    mesh.agent_env = vec![("RUST_LOG".into(), "info,weft::node=debug".into())];
    mesh.start_all()?;
    let _live = [tk::echo(backends[0], PORT)?, tk::echo(backends[2], PORT)?];
    let client = c.pod(0, 0);
    let to = format!("{VIP}:80");
    // The client speaks first and at once, so its bytes reach its agent while
    // the dead backend's agent is still answering 503.
    for i in 0..30 {
        let message = format!("early {i} {}", "x".repeat(3000));
        let r = tk::say(client, &to, &message, &[])?;
        assert_eq!(r["ok"], true, "exchange {i}: {r}");
    }
    let retries = mesh.logs(0, |v| {
        v["message"] == "connect failed; trying another endpoint"
            && v["endpoint"]
                .as_str()
                .is_some_and(|e| e.ends_with(&format!("/{}", backends[1].name)))
    });
    ensure!(!retries.is_empty(), "the dead backend was never picked");
    ensure!(
        retries.iter().any(|v| v["early_bytes"].as_u64() > Some(0)),
        "no retry carried early bytes: {retries:?}"
    );
    Ok(())
}

#[test]
fn tcp_metrics_count_the_connections_and_bytes_sent() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_metrics", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    mesh.set_extra(b, "  labels: {app: store, version: v2}\n")?;
    mesh.set_sections(&format!(
        "services:\n- name: store\n  addresses: [10.96.0.20]\n  ports: [{{port: 80, target_port: {PORT}}}]\n  selector: {{app: store}}\n"
    ))?;
    mesh.start_all()?;
    let _server = tk::serve(b, PORT)?;
    let (up, down) = (300_001u64, 70_003u64);
    for _ in 0..3 {
        let r = tk::client(a, "10.96.0.20:80", up, down, &[])?;
        ensure!(r["ok"] == true, "{r}");
    }
    let want_source = [
        "reporter=\"source\"",
        "source_workload=\"",
        "destination_workload=\"",
        "destination_service=\"store.default.svc.cluster.local\"",
        "destination_app=\"store\"",
        "destination_version=\"v2\"",
        "connection_security_policy=\"mutual_tls\"",
        "response_flags=\"-\"",
    ];
    let mut text = String::new();
    let done = eventually(PATIENCE, || {
        text = metrics(&c, 0).unwrap_or_default();
        series(&text, "istio_tcp_connections_closed_total", &want_source) == Some(3.0)
    });
    ensure!(done, "source metrics did not reach 3 closed:\n{text}");
    let s = |name: &str| series(&text, name, &want_source);
    assert_eq!(s("istio_tcp_connections_opened_total"), Some(3.0));
    // Istio's names: `received` is what the destination received (the upload).
    assert_eq!(
        s("istio_tcp_received_bytes_total"),
        Some((3 * (up + 24)) as f64)
    );
    assert_eq!(s("istio_tcp_sent_bytes_total"), Some((3 * down) as f64));
    // The destination's agent reports the same connections, with the client's
    // proven identity.
    let want_dest = [
        "reporter=\"destination\"".to_owned(),
        format!("source_principal=\"{}\"", mesh.identity(a)),
        format!("destination_principal=\"{}\"", mesh.identity(b)),
    ];
    let want_dest: Vec<&str> = want_dest.iter().map(String::as_str).collect();
    let mut text1 = String::new();
    let done = eventually(PATIENCE, || {
        text1 = metrics(&c, 1).unwrap_or_default();
        series(&text1, "istio_tcp_connections_closed_total", &want_dest) == Some(3.0)
    });
    ensure!(done, "destination metrics did not reach 3 closed:\n{text1}");
    assert_eq!(
        series(&text1, "istio_tcp_received_bytes_total", &want_dest),
        Some((3 * (up + 24)) as f64)
    );
    assert_eq!(
        series(&text1, "istio_tcp_sent_bytes_total", &want_dest),
        Some((3 * down) as f64)
    );
    // The agent took each connection's original destination as it accepted
    // it: none is left in the map.
    let map = mesh.pin_dir(0).join("maps/WEFT_ORIG_DST");
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&map)
        .output()?;
    ensure!(
        out.status.success(),
        "bpftool map dump {}: {out:?}",
        map.display()
    );
    let left: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(left.as_array().map(Vec::len), Some(0), "{left}");
    // The eBPF maps' sizes: one pod enrolled on node 0.
    let mut text = String::new();
    let counted = eventually(std::time::Duration::from_secs(15), || {
        text = metrics(&c, 0).unwrap_or_default();
        text.contains("weft_ebpf_map_entries{map=\"WEFT_ENROLLED\"} 1")
    });
    assert!(counted, "{text}");
    Ok(())
}

#[test]
fn a_service_without_a_healthy_endpoint_is_refused_cleanly_logged_and_counted() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_none", 1, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.set_sections(
        "services:\n- name: empty\n  addresses: [10.96.0.30]\n  ports: [{port: 80}]\n  selector: {app: nobody}\n",
    )?;
    mesh.start_all()?;
    let report = tk::who(c.pod(0, 0), "10.96.0.30:80", 2, 1)?;
    assert_eq!(report["failures"], 2, "{report}");
    let refused = || {
        mesh.logs(0, |v| {
            v["target"] == "weft::access"
                && v["service"] == "default/empty"
                && v["end"] == "no_healthy_endpoint"
        })
    };
    assert!(
        eventually(PATIENCE, || refused().len() == 2),
        "{:?}",
        refused()
    );
    let text = metrics(&c, 0)?;
    assert_eq!(
        series(
            &text,
            "weft_service_no_healthy_endpoint_total",
            &["service=\"default/empty\""]
        ),
        Some(2.0),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_source_without_a_certificate_never_ejects_the_endpoints_it_cannot_reach() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("svc_blame", 2, 2)?;
    let (client, newcomer) = (c.pod(0, 0), c.pod(0, 1));
    let backends = [c.pod(1, 0), c.pod(1, 1)];
    // Ejected after two failures, for a minute: had the newcomer's failures
    // counted against the endpoints, the client would lose one of them.
    let od = "  outlier_detection: {consecutive_failures: 2, base_ejection_time: 60s, max_ejection_time: 60s}\n";
    let mut mesh = Mesh::new(&c, |p| p.name != newcomer.name)?;
    for b in backends {
        mesh.set_extra(b, "  labels: {app: web}\n")?;
    }
    mesh.set_sections(&web_service("round_robin", od))?;
    mesh.start_all()?;
    let _servers = backends
        .iter()
        .map(|b| tk::name(b, PORT))
        .collect::<Result<Vec<_>>>()?;
    let to = format!("{VIP}:80");
    let both = |mesh: &Mesh| -> Result<()> {
        let report = tk::who(client, &to, 20, 1)?;
        ensure!(report["failures"] == 0, "{report}");
        for b in backends {
            ensure!(
                count_of(&report, b) > 0,
                "{} no longer gets connections: {report}\n{:?}",
                b.name,
                mesh.logs(0, |v| v["message"] == "endpoint ejected")
            );
        }
        Ok(())
    };
    both(&mesh)?;

    // The CA goes away, then the newcomer is enrolled: its agent cannot get it
    // a certificate, so each of its connections fails on its own side.
    mesh.stop_ca()?;
    mesh.set_enrolled(newcomer, true)?;
    let report = tk::who(newcomer, &to, 10, 1)?;
    ensure!(
        report["failures"] == 10,
        "a pod without a certificate got through: {report}"
    );
    // The endpoints were not blamed: none ejected, both still reached.
    let text = metrics(&c, 0)?;
    ensure!(
        series(&text, "weft_endpoint_ejections_total", &["endpoint="]).is_none(),
        "an endpoint was ejected for the source's failures:\n{text}"
    );
    both(&mesh)?;

    // The CA back, the newcomer gets its certificate and its connections work.
    mesh.start_ca()?;
    ensure!(
        eventually(PATIENCE * 4, || {
            tk::who(newcomer, &to, 1, 1).is_ok_and(|r| r["failures"] == 0)
        }),
        "the newcomer never got through once the CA was back"
    );
    Ok(())
}
