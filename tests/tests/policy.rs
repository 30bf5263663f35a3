//! L4 authorization and peer authentication at the destination's agent, in the
//! virtual cluster: Istio AuthorizationPolicy semantics on the identity that
//! mutual TLS proved, `STRICT`/`PERMISSIVE` for plaintext, policy changes that
//! close live connections, and a broken config that changes nothing.

use std::time::Duration;

use anyhow::{Result, ensure};
use serde_json::Value;
use weft_tests::{
    Cluster, Mesh, PATIENCE, Pod, Proc, cluster::Host as _, eventually, require_privileged, tk,
};

const PORT: u16 = 9000;

fn to(pod: &Pod) -> String {
    format!("{}:{PORT}", pod.ip)
}

fn say(from: &Pod, to: &str) -> Result<Value> {
    tk::say(from, to, "hello", &["--timeout-secs", "5"])
}

/// A connection from `from` to `to` held open in the background: `message`
/// echoed `repeat` times, 200 ms apart. Its report is its last stdout line.
fn held(from: &Pod, to: &str, message: &str, repeat: u32) -> Result<Proc> {
    let mut cmd = from.command(weft_tests::bin_path("weft-tk"));
    cmd.args(["say", "--connect", to, "--message", message, "--repeat"])
        .arg(repeat.to_string())
        .args(["--interval-ms", "200"]);
    from.spawn(&mut cmd)
}

/// Connections the server's application saw (every agent-proxied connection
/// comes from 127.0.0.6, so they are told apart by count, not address).
fn seen(server: &Proc) -> usize {
    tk::accepted(server)
        .iter()
        .filter(|v| v["echoed"].as_u64() > Some(0))
        .count()
}

/// Waits until node `node`'s agent has applied a config change (the count of
/// "config changed" lines grew past `before`).
fn applied(mesh: &Mesh, node: usize, before: usize) -> bool {
    eventually(PATIENCE, || {
        mesh.logs(node, |v| v["message"] == "config changed, applying")
            .len()
            > before
    })
}

fn changes(mesh: &Mesh, node: usize) -> usize {
    mesh.logs(node, |v| v["message"] == "config changed, applying")
        .len()
}

/// Three clients on node 0 (`a`, `b` in namespace `default`; `e` in `evil`),
/// the server `s` on node 1.
#[test]
fn deny_by_principal_and_namespace_and_allow_only_policies() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("pol_deny", 2, 3)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let (a, b, e) = (c.pod(0, 0), c.pod(0, 1), c.pod(0, 2));
    let s = c.pod(1, 0);
    mesh.set_namespace(e, "evil")?;
    mesh.set_extra(s, "  labels: {app: server}\n")?;
    mesh.start_all()?;
    let server = tk::echo(s, PORT)?;
    for p in [a, b, e] {
        ensure!(
            say(p, &to(s))?["ok"] == true,
            "{} before any policy",
            p.name
        );
    }

    // DENY by principal (Istio's form: no `spiffe://`) and by namespace.
    let before = changes(&mesh, 1);
    mesh.set_sections(&format!(
        "authorization_policies:\n\
         - name: deny-a\n  selector: {{app: server}}\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/{}]}}}}]}}]\n\
         - name: deny-evil\n  action: DENY\n  rules: [{{from: [{{source: {{namespaces: [evil]}}}}]}}]\n",
        a.name
    ))?;
    ensure!(applied(&mesh, 1, before), "policy not applied");
    let accepted_before = tk::accepted(&server).len();
    for p in [a, e] {
        let r = say(p, &to(s))?;
        assert_eq!(r["ok"], false, "{} was let through: {r}", p.name);
    }
    assert_eq!(say(b, &to(s))?["ok"], true);
    // The application saw only b's connection.
    assert!(eventually(PATIENCE, || tk::accepted(&server).len() > accepted_before));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        tk::accepted(&server).len(),
        accepted_before + 1,
        "a denied connection reached the application"
    );
    // The destination's agent said why, with 401 to the peer and DENY in the
    // metrics.
    let denied = mesh.logs(1, |v| {
        v["target"] == "weft::access" && v["end"] == "denied" && v["direction"] == "inbound"
    });
    assert!(denied.len() >= 2, "{denied:?}");
    assert!(
        denied.iter().any(|v| v["error"]
            .as_str()
            .is_some_and(|m| m.contains("default/deny-a"))),
        "{denied:?}"
    );
    let out = c
        .node(1)
        .exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("response_flags=\"DENY\"")
                && l.contains(&format!("source_principal=\"{}\"", mesh.identity(a)))),
        "{text}"
    );

    // ALLOW-only: b alone is allowed; everyone else is denied.
    let before = changes(&mesh, 1);
    mesh.set_sections(&format!(
        "authorization_policies:\n\
         - name: only-b\n  selector: {{app: server}}\n  rules: [{{from: [{{source: {{principals: [\"*/sa/{}\"]}}}}], to: [{{operation: {{ports: [{PORT}]}}}}]}}]\n",
        b.name
    ))?;
    ensure!(applied(&mesh, 1, before), "policy not applied");
    assert_eq!(say(b, &to(s))?["ok"], true);
    for p in [a, e] {
        assert_eq!(say(p, &to(s))?["ok"], false, "{} was let through", p.name);
    }
    Ok(())
}

#[test]
fn strict_refuses_plaintext_from_outside_the_mesh_and_permissive_lets_it_in() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("pol_strict", 2, 1)?;
    // The client on node 0 is not enrolled: it speaks plaintext to the server.
    let (outsider, s) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::new(&c, |p| p.name == s.name)?;
    mesh.start_all()?;
    let server = tk::echo(s, PORT)?;
    // PERMISSIVE (the default): plaintext is let through to the application.
    assert_eq!(say(outsider, &to(s))?["ok"], true);
    assert!(eventually(PATIENCE, || seen(&server) == 1));

    let before = changes(&mesh, 1);
    mesh.set_sections(
        "peer_authentications:\n- {name: strict, namespace: default, mode: STRICT}\n",
    )?;
    ensure!(applied(&mesh, 1, before), "peer authentication not applied");
    let r = say(outsider, &to(s))?;
    assert_eq!(r["ok"], false, "STRICT let plaintext through: {r}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(seen(&server), 1, "the application saw it");
    let refused = mesh.logs(1, |v| {
        v["target"] == "weft::access"
            && v["end"] == "denied"
            && v["error"].as_str().is_some_and(|m| m.contains("STRICT"))
    });
    assert!(!refused.is_empty(), "no access log of the refusal");

    // A workload-level PERMISSIVE overrides the namespace's STRICT.
    let before = changes(&mesh, 1);
    mesh.set_extra(s, "  labels: {app: legacy}\n")?;
    mesh.set_sections(
        "peer_authentications:\n- {name: strict, namespace: default, mode: STRICT}\n- {name: legacy, namespace: default, selector: {app: legacy}, mode: PERMISSIVE}\n",
    )?;
    ensure!(applied(&mesh, 1, before), "peer authentication not applied");
    assert_eq!(say(outsider, &to(s))?["ok"], true);
    Ok(())
}

#[test]
fn a_policy_change_closes_a_live_connection_it_now_denies() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("pol_live", 2, 2)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let (a, b, s) = (c.pod(0, 0), c.pod(0, 1), c.pod(1, 0));
    mesh.start_all()?;
    let _server = tk::echo(s, PORT)?;
    // Two long-lived connections: an exchange every 200 ms for 8 s.
    let long = |p: &Pod| held(p, &to(s), "still here", 40);
    let (la, lb) = (long(a)?, long(b)?);
    std::thread::sleep(Duration::from_secs(1));
    let before = changes(&mesh, 1);
    mesh.set_sections(&format!(
        "authorization_policies:\n- name: cut-a\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/{}]}}}}]}}]\n",
        a.name
    ))?;
    ensure!(applied(&mesh, 1, before), "policy not applied");
    let ra = la.wait_for_json(Duration::from_secs(15), |v| v.get("ok").is_some())?;
    assert_eq!(ra["ok"], false, "the denied connection lived on: {ra}");
    let rb = lb.wait_for_json(Duration::from_secs(20), |v| v.get("ok").is_some())?;
    assert_eq!(rb["ok"], true, "the allowed connection was disturbed: {rb}");
    let closed = mesh.logs(1, |v| {
        v["target"] == "weft::access"
            && v["error"]
                .as_str()
                .is_some_and(|m| m.contains("closed by a policy change"))
    });
    assert_eq!(closed.len(), 1, "{closed:?}");
    Ok(())
}

/// Pods of one node are connected by their agent in-process (no TLS): the
/// destination's policy still decides, on the source's identity, for new and
/// for live connections, and both ends are logged and counted as over HBONE.
#[test]
fn node_local_connections_get_the_destinations_policy_new_and_live() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("pol_local", 1, 3)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let (a, b, s) = (c.pod(0, 0), c.pod(0, 1), c.pod(0, 2));
    mesh.set_extra(s, "  labels: {app: server}\n")?;
    mesh.start_all()?;
    let server = tk::echo(s, PORT)?;
    assert_eq!(say(a, &to(s))?["ok"], true);
    fn lines(mesh: &Mesh, direction: &str, end: &str, src: &Pod) -> Vec<Value> {
        let id = mesh.identity(src);
        mesh.logs(0, move |v| {
            v["target"] == "weft::access"
                && v["direction"] == direction
                && v["end"] == end
                && v["src.identity"] == id.as_str()
        })
    }
    // An access-log line is written up to 50 ms after its connection closed,
    // so each is waited for: the lines once there are `n`.
    fn wait_lines(mesh: &Mesh, direction: &str, end: &str, src: &Pod, n: usize) -> Vec<Value> {
        eventually(PATIENCE, || lines(mesh, direction, end, src).len() >= n);
        lines(mesh, direction, end, src)
    }
    // Both ends logged, as node-local, with both identities and no HBONE
    // connection.
    for direction in ["outbound", "inbound"] {
        let l = &wait_lines(&mesh, direction, "closed", a, 1)[0];
        assert_eq!(l["security"], "node_local", "{l}");
        assert_eq!(l["dst.identity"], mesh.identity(s), "{l}");
        assert_eq!(l["dst.addr"], to(s), "{l}");
        assert_eq!(l["bytes_sent"], l["bytes_received"], "{l}");
        assert!(l["hbone.connection"].is_null(), "{l}");
    }

    // b holds a connection open; then a policy denies b.
    let live = held(b, &to(s), "still here", 40)?;
    std::thread::sleep(Duration::from_secs(1));
    let before = changes(&mesh, 0);
    mesh.set_sections(&format!(
        "authorization_policies:\n- name: deny-b\n  selector: {{app: server}}\n  action: DENY\n  rules: [{{from: [{{source: {{principals: [cluster.local/ns/default/sa/{}]}}}}]}}]\n",
        b.name
    ))?;
    ensure!(applied(&mesh, 0, before), "policy not applied");
    let r = live.wait_for_json(Duration::from_secs(15), |v| v.get("ok").is_some())?;
    assert_eq!(r["ok"], false, "the denied live connection lived on: {r}");
    let killed = wait_lines(&mesh, "inbound", "denied", b, 1);
    assert_eq!(killed.len(), 1, "{killed:?}");
    assert!(
        killed[0]["error"]
            .as_str()
            .is_some_and(|m| m.contains("closed by a policy change")),
        "{killed:?}"
    );
    // A new connection from b is refused before the application sees it; a's
    // still goes through.
    let seen_before = seen(&server);
    assert_eq!(say(b, &to(s))?["ok"], false, "b was let through");
    assert_eq!(say(a, &to(s))?["ok"], true);
    assert!(eventually(PATIENCE, || seen(&server) > seen_before));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(seen(&server), seen_before + 1, "a denied connection got in");
    let refused = &wait_lines(&mesh, "inbound", "denied", b, 2)[1];
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|m| m.contains("default/deny-b")),
        "{refused}"
    );
    let out = wait_lines(&mesh, "outbound", "denied", b, 1);
    assert_eq!(out.len(), 1, "{out:?}");
    let metrics = c
        .node(0)
        .exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("response_flags=\"DENY\"")
                && l.contains(&format!("source_principal=\"{}\"", mesh.identity(b)))),
        "{text}"
    );
    Ok(())
}

#[test]
fn a_broken_config_keeps_the_last_good_one_and_a_change_to_one_service_spares_another() -> Result<()>
{
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("pol_reload", 2, 2)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let (client, x, y) = (c.pod(0, 0), c.pod(1, 0), c.pod(1, 1));
    mesh.set_extra(x, "  labels: {app: x}\n")?;
    mesh.set_extra(y, "  labels: {app: y}\n")?;
    let services = |y_port: u16| {
        format!(
            "services:\n\
             - {{name: x, addresses: [10.96.1.1], ports: [{{port: 80, target_port: {PORT}}}], selector: {{app: x}}}}\n\
             - {{name: y, addresses: [10.96.1.2], ports: [{{port: {y_port}, target_port: {PORT}}}], selector: {{app: y}}}}\n"
        )
    };
    mesh.set_sections(&services(80))?;
    mesh.start_all()?;
    let _ex = tk::echo(x, PORT)?;
    let _ey = tk::echo(y, PORT)?;
    assert_eq!(say(client, "10.96.1.1:80")?["ok"], true);

    // A live connection to x, while y changes.
    let live = held(client, "10.96.1.1:80", "x keeps going", 25)?;
    std::thread::sleep(Duration::from_millis(800));
    let before = changes(&mesh, 0);
    mesh.set_sections(&services(81))?;
    ensure!(applied(&mesh, 0, before), "the change to y was not applied");
    assert_eq!(say(client, "10.96.1.2:81")?["ok"], true, "y's new port");

    // A broken file: reported three ways, and the last good config serves.
    mesh.write_raw_config("workloads: [this is not: valid\n")?;
    ensure!(
        eventually(PATIENCE, || !mesh
            .logs(0, |v| v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("config rejected")))
            .is_empty()),
        "no rejection logged"
    );
    let r = live.wait_for_json(Duration::from_secs(20), |v| v.get("ok").is_some())?;
    assert_eq!(r["ok"], true, "the connection to x was disturbed: {r}");
    assert_eq!(
        say(client, "10.96.1.1:80")?["ok"],
        true,
        "x after the bad file"
    );
    assert_eq!(
        say(client, "10.96.1.2:81")?["ok"],
        true,
        "y after the bad file"
    );
    let node = c.node(0);
    let metrics = node.exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("weft_config_last_reload_successful 0")
            && text.contains("weft_config_reloads_total{result=\"rejected\"} 1"),
        "{text}"
    );
    let dump = node.exec("curl", ["-sS", "http://127.0.0.1:15000/config_dump"])?;
    let dump: Value = serde_json::from_slice(&dump.stdout)?;
    assert!(
        dump["status"]["last_error"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("mesh.yaml")),
        "{dump}"
    );
    assert_eq!(dump["config"]["services"][1]["ports"][0]["port"], 81);

    // `weft status` shows the node's view and the rejected change.
    let status = node.exec(weft_tests::bin_path("weft"), ["status"])?;
    let text = String::from_utf8_lossy(&status.stdout);
    for want in [
        "LAST CHANGE REJECTED",
        &format!("default/{}", client.name),
        "default/x",
        "10.96.1.2",
        "enrolled",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    let ready = node.exec(
        "curl",
        [
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "http://127.0.0.1:15021/healthz/ready",
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "200");
    // The log level changes at run time.
    let set = node.exec(
        "curl",
        [
            "-sS",
            "-X",
            "POST",
            "http://127.0.0.1:15000/logging?level=debug",
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "debug");
    assert_eq!(say(client, "10.96.1.1:80")?["ok"], true);
    assert!(
        eventually(PATIENCE, || !mesh
            .logs(0, |v| v["level"] == "DEBUG")
            .is_empty()),
        "no debug line after the change"
    );
    // A bad filter is refused, and the one in force stays.
    let bad = node.exec(
        "curl",
        [
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "-X",
            "POST",
            "http://127.0.0.1:15000/logging?level=weft%3Dnotalevel",
        ],
    )?;
    assert_eq!(String::from_utf8_lossy(&bad.stdout), "400");
    let now = node.exec("curl", ["-sS", "http://127.0.0.1:15000/logging"])?;
    assert_eq!(String::from_utf8_lossy(&now.stdout).trim(), "debug");
    Ok(())
}
