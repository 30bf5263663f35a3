//! HBONE under attack, in the virtual cluster: port 15008 meets clients with
//! certificates the mesh never issued, an agent meets a destination that is not
//! who it should be, and the listener meets input that is not HBONE at all. Each
//! refusal must happen before the application sees anything, be logged, and
//! leave the agent serving.
//!
//! The hostile side is `weft_tests::probe`: an in-process TLS/HTTP/2 client run
//! from inside another pod's network namespace (outside every pod cgroup, so the
//! kernel capture leaves it alone), and a fake HBONE server.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, ensure};
use http::Method;
use serde_json::Value;
use weft::ca::Authority;
use weft_tests::{
    Cluster, Mesh, PATIENCE, Pod, eventually,
    mesh::identity,
    probe::{CertKey, FakeServer, HBONE_PORT, Leaf, Outcome, Probe, Report},
    require_privileged, tk,
};

const PORT: u16 = 9000;
/// Nothing listens here in any pod.
const CLOSED_PORT: u16 = 9999;
const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

fn addr(ip: impl Into<IpAddr>, port: u16) -> String {
    SocketAddr::new(ip.into(), port).to_string()
}

fn say_ok(from: &Pod, to: &str, message: &str) -> Result<Value> {
    let r = tk::say(from, to, message, &[])?;
    ensure!(r["ok"] == true, "{} → {to}: {r}", from.name);
    Ok(r)
}

/// The mesh's root certificate and key (PEM), as `weft ca` saved them.
fn mesh_root(mesh: &Mesh) -> Result<(String, String)> {
    let dir = mesh.ca_dir();
    let read = |f: &str| {
        std::fs::read_to_string(dir.join(f)).with_context(|| format!("reading {f} in {dir:?}"))
    };
    Ok((read("root.pem")?, read("root-key.pem")?))
}

/// The mesh's own signing authority, to issue certificates it would issue.
fn mesh_authority(mesh: &Mesh) -> Result<Authority> {
    mesh.authority()
}

/// Whether node `node`'s agent process is still running (not exited, not a
/// zombie waiting to be reaped).
fn agent_alive(mesh: &Mesh, node: usize) -> bool {
    let pid = mesh.agent(node).pid();
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| !matches!(state, 'Z' | 'X'))
    })
}

/// A log line of node `node`'s agent about the connection from `local`: an
/// "HBONE connection refused" warning, or an inbound access-log line.
fn wait_log_for(
    mesh: &Mesh,
    node: usize,
    local: SocketAddr,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let local = local.to_string();
    let mut found = None;
    eventually(PATIENCE, || {
        found = mesh
            .logs(node, |v| {
                (v["message"] == "HBONE connection refused" && v["peer"] == local.as_str())
                    || (v["target"] == "weft::access"
                        && v["direction"] == "inbound"
                        && v["src.addr"] == local.as_str())
            })
            .into_iter()
            .find(|v| pred(v));
        found.is_some()
    });
    found.with_context(|| {
        format!(
            "node {node}: no log line for {what} (from {local}); the agent logged:\n{}",
            mesh.logs(node, |v| v["level"] != "DEBUG")
                .iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    })
}

fn refusal_reason(v: &Value) -> &str {
    v["reason"].as_str().unwrap_or_default()
}

/// The local address of a probe that got as far as a TCP connection.
fn local_of(report: &Report) -> Result<SocketAddr> {
    report
        .local
        .with_context(|| format!("the probe never connected: {:?}", report.outcome))
}

/// One client certificate to present, and words one of which the agent's
/// refusal reason must contain.
struct Attempt {
    what: &'static str,
    cert: CertKey,
    reason: &'static [&'static str],
}

/// Presents each attempt's certificate to the destination's 15008, from the
/// source pod's namespace, with a `CONNECT` to the echo server; each must be
/// refused before any status, with a logged reason. Then the control: a
/// certificate from the mesh's root for the source's identity gets through, and
/// the echo server sees exactly that one connection more, so no refused attempt
/// ever reached it. Returns what went wrong, one line per problem.
fn refuse_each(
    cluster_name: &str,
    attempts: impl Fn(&Mesh, &Pod) -> Result<Vec<Attempt>>,
) -> Result<Vec<String>> {
    let c = Cluster::new(cluster_name, 2, 1)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let (src, dst) = (c.pod(0, 0), c.pod(1, 0));
    let echo = tk::echo(dst, PORT)?;
    // Through the mesh first: the destination's agent has its certificate and
    // serves 15008.
    say_ok(src, &addr(dst.ip, PORT), "warm up")?;
    let before = tk::wait_accepted(&echo, 1).len();
    ensure!(before == 1, "the echo server saw {before} connections");

    let target = addr(dst.ip, PORT);
    let mut failures = Vec::new();
    for Attempt { what, cert, reason } in attempts(&mesh, src)? {
        let report = Probe::connect(dst.ip, HBONE_PORT, &target)
            .cert(cert)
            .run(&src.netns_path)?;
        if !report.outcome.refused_before_status() {
            failures.push(format!("{what}: not refused: {:?}", report.outcome));
            continue;
        }
        let local = local_of(&report)?;
        match wait_log_for(&mesh, 1, local, what, |v| {
            v["message"] == "HBONE connection refused"
        }) {
            Ok(line) => {
                let logged = refusal_reason(&line);
                eprintln!("{what}: {:?}; the agent: {logged:?}", report.outcome);
                if !reason.iter().any(|w| logged.contains(w)) {
                    failures.push(format!(
                        "{what}: refused, but the reason {logged:?} names none of {reason:?}"
                    ));
                }
            }
            Err(e) => failures.push(format!("{what}: {e:#}")),
        }
    }

    let src_id = identity(src);
    let good = CertKey::issue(&mesh_authority(&mesh)?, &src_id, HOUR)?;
    let report = Probe::connect(dst.ip, HBONE_PORT, &target)
        .cert(good)
        .run(&src.netns_path)?;
    ensure!(
        matches!(report.outcome, Outcome::Connected { .. }),
        "the control probe with a valid certificate failed: {:?}",
        report.outcome
    );
    let line = wait_log_for(&mesh, 1, local_of(&report)?, "the control", |v| {
        v["target"] == "weft::access"
    })?;
    ensure!(line["src.identity"] == src_id.as_str(), "{line}");
    ensure!(line["end"] == "closed", "{line}");
    let seen = tk::wait_accepted(&echo, before + 1);
    if seen.len() != before + 1 {
        failures.push(format!(
            "the application saw {} connections besides the warm-up, not just the control's: {seen:#?}",
            seen.len() - before
        ));
    }
    Ok(failures)
}

#[test]
fn client_certificates_the_mesh_did_not_issue_are_refused_before_the_application() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let failures = refuse_each("hbone_client_certs", |mesh, src| {
        let (root, root_key) = mesh_root(mesh)?;
        let src_id = identity(src);
        let now = SystemTime::now();
        let foreign_ca = Authority::generate("cluster.local", DAY)?;
        Ok(vec![
            Attempt {
                what: "a certificate from another CA (same trust domain, same root name)",
                cert: CertKey::issue(&foreign_ca, &src_id, HOUR)?,
                reason: &["BadSignature", "UnknownIssuer"],
            },
            Attempt {
                what: "an expired certificate from the mesh's root",
                cert: Leaf::uri(&src_id)
                    .valid(now - 2 * DAY, now - DAY)
                    .sign(&root, &root_key)?,
                reason: &["expired"],
            },
            Attempt {
                what: "a certificate not valid yet, from the mesh's root",
                cert: Leaf::uri(&src_id)
                    .valid(now + DAY, now + 2 * DAY)
                    .sign(&root, &root_key)?,
                reason: &["not valid yet"],
            },
            Attempt {
                what: "a certificate whose URI is not a SPIFFE ID, from the mesh's root",
                cert: Leaf::uri("https://evil.example/workload").sign(&root, &root_key)?,
                reason: &["SPIFFE"],
            },
            Attempt {
                what: "a certificate with two SPIFFE IDs, from the mesh's root",
                cert: Leaf {
                    uris: vec![src_id.clone(), format!("{src_id}-other")],
                    ..Leaf::uri(&src_id)
                }
                .sign(&root, &root_key)?,
                reason: &["several URI SANs"],
            },
            Attempt {
                what: "a certificate with only a DNS name, from the mesh's root",
                cert: Leaf {
                    uris: Vec::new(),
                    dns_names: vec!["evil.example".into()],
                    ..Leaf::uri(&src_id)
                }
                .sign(&root, &root_key)?,
                reason: &["URI SAN", "subjectAltName"],
            },
        ])
    })?;
    assert!(
        failures.is_empty(),
        "refusals that went wrong:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// A certificate for `spiffe://evil.example/...` that chains to the bundle (a
/// root may sign for several trust domains) is not a peer of this mesh: the
/// inbound listener refuses it before any CONNECT.
#[test]
fn a_client_certificate_for_another_trust_domain_is_refused() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let failures = refuse_each("hbone_trust_domain", |mesh, src| {
        let (root, root_key) = mesh_root(mesh)?;
        let id = format!("spiffe://evil.example/ns/default/sa/{}", src.name);
        Ok(vec![Attempt {
            what: "a certificate for another trust domain, from the mesh's root",
            cert: Leaf::uri(&id).sign(&root, &root_key)?,
            reason: &["trust domain", "evil.example"],
        }])
    })?;
    assert!(
        failures.is_empty(),
        "refusals that went wrong:\n{}",
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn an_agent_refuses_a_destination_that_presents_the_wrong_identity() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("hbone_wrong_server", 2, 2)?;
    let mut mesh = Mesh::start(&c, |_| true)?;
    let (src, dst, bystander) = (c.pod(0, 0), c.pod(1, 0), c.pod(0, 1));
    let echo = tk::echo(dst, PORT)?;
    let target = addr(dst.ip, PORT);
    // The control, from another source pod (so no pooled connection to the real
    // agent is reused below): the path works while the real agent serves.
    say_ok(bystander, &target, "the real one")?;
    let before = tk::wait_accepted(&echo, 1).len();

    // The destination's agent goes away (its sk_lookup program stays, and lets
    // 15008 through to the ordinary socket lookup), and an impostor takes its
    // port, with a certificate the mesh's own root issued for someone else.
    mesh.stop_agent(1, true)?;
    let impostor_id = identity(c.pod(1, 1));
    let cert = CertKey::issue(&mesh_authority(&mesh)?, &impostor_id, HOUR)?;
    let fake = FakeServer::start(
        &dst.netns_path,
        SocketAddr::new(dst.ip.into(), HBONE_PORT),
        &cert,
    )?;

    let r = tk::say(src, &target, "for the real one only", &[])?;
    assert_eq!(
        r["ok"], false,
        "the message reached someone through the impostor: {r}"
    );
    let mut line = None;
    eventually(PATIENCE, || {
        line = mesh.access_logs(0).into_iter().find(|v| {
            v["direction"] == "outbound"
                && v["dst.addr"] == target.as_str()
                && v["src.identity"] == identity(src)
        });
        line.is_some()
    });
    let line = line.with_context(|| {
        format!(
            "no outbound access log for {target}: {:#?}",
            mesh.access_logs(0)
        )
    })?;
    eprintln!("the agent: {line}");
    assert_eq!(line["end"], "tls_error", "{line}");
    let error = line["error"].as_str().unwrap_or_default();
    assert!(
        error.contains(&identity(dst)),
        "the error does not name the expected identity: {line}"
    );
    assert!(
        error.contains(&impostor_id),
        "the error does not name the identity presented: {line}"
    );
    let seen = fake.seen();
    assert!(
        seen.connections > 0,
        "the agent never reached the impostor: {seen:?}"
    );
    assert!(
        seen.connects().is_empty(),
        "a CONNECT reached the impostor: {seen:?}"
    );
    assert_eq!(seen.handshakes, 0, "a TLS handshake completed: {seen:?}");
    assert_eq!(tk::accepted(&echo).len(), before);
    Ok(())
}

/// One malformed exchange with 15008.
struct Bad {
    what: &'static str,
    probe: Probe,
    /// What the prober must see.
    outcome: fn(&Outcome) -> bool,
    /// The agent's log line about it.
    log: fn(&Value) -> bool,
}

fn refused_because(v: &Value, words: &str) -> bool {
    v["message"] == "HBONE connection refused" && refusal_reason(v).contains(words)
}

#[test]
fn malformed_hbone_input_is_refused_and_the_agent_keeps_serving() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("hbone_malformed", 2, 2)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let (src, dst, neighbour) = (c.pod(0, 0), c.pod(1, 0), c.pod(1, 1));
    let _echo = tk::echo(dst, PORT)?;
    let neighbour_echo = tk::echo(neighbour, PORT)?;
    let target = addr(dst.ip, PORT);
    say_ok(src, &target, "before")?;

    let cert = CertKey::issue(&mesh_authority(&mesh)?, &identity(src), HOUR)?;
    let connect =
        |authority: &str| Probe::connect(dst.ip, HBONE_PORT, authority).cert(cert.clone());
    let cases = vec![
        Bad {
            what: "plaintext HTTP/1.1 instead of TLS",
            probe: connect(&target).plaintext(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
            outcome: Outcome::refused_before_status,
            log: |v| refused_because(v, "TLS handshake failed"),
        },
        Bad {
            what: "TLS without a client certificate",
            probe: Probe::connect(dst.ip, HBONE_PORT, &target),
            outcome: Outcome::refused_before_status,
            log: |v| refused_because(v, "TLS handshake failed"),
        },
        Bad {
            what: "garbage instead of HTTP/2 after a good TLS handshake",
            probe: connect(&target).garbage(b"this is not the HTTP/2 preface\r\n\r\n"),
            outcome: |o| matches!(o, Outcome::Closed(_)),
            log: |v| refused_because(v, "HTTP/2"),
        },
        Bad {
            what: "GET instead of CONNECT",
            probe: connect(&target).method(Method::GET),
            outcome: |o| *o == Outcome::Status(400),
            log: |v| v["end"] == "bad_request" && v["security"] == "mutual_tls",
        },
        Bad {
            what: "CONNECT to the HBONE port itself",
            probe: connect(&addr(dst.ip, HBONE_PORT)),
            outcome: |o| *o == Outcome::Status(400),
            log: |v| v["end"] == "bad_request" && v["security"] == "mutual_tls",
        },
        Bad {
            what: "CONNECT to the outbound capture port",
            probe: connect(&addr(dst.ip, 15001)),
            outcome: |o| *o == Outcome::Status(400),
            log: |v| v["end"] == "bad_request" && v["security"] == "mutual_tls",
        },
        Bad {
            what: "CONNECT to another pod's address (on the same node)",
            probe: connect(&addr(neighbour.ip, PORT)),
            outcome: |o| *o == Outcome::Status(400),
            log: |v| v["end"] == "bad_request" && v["security"] == "mutual_tls",
        },
        Bad {
            what: "CONNECT to a host name",
            probe: connect(&format!("localhost:{PORT}")),
            outcome: |o| *o == Outcome::Status(400),
            log: |v| v["end"] == "bad_request" && v["security"] == "mutual_tls",
        },
        Bad {
            what: "CONNECT to a port where nothing listens",
            probe: connect(&addr(dst.ip, CLOSED_PORT)),
            outcome: |o| *o == Outcome::Status(503),
            log: |v| v["end"] == "upstream_connect_failed" && v["security"] == "mutual_tls",
        },
    ];

    let mut failures = Vec::new();
    for (i, bad) in cases.into_iter().enumerate() {
        let report = bad.probe.run(&src.netns_path)?;
        eprintln!("{}: {:?}", bad.what, report.outcome);
        if !(bad.outcome)(&report.outcome) {
            failures.push(format!(
                "{}: unexpected outcome {:?}",
                bad.what, report.outcome
            ));
        }
        match report.local {
            Some(local) => match wait_log_for(&mesh, 1, local, bad.what, bad.log) {
                Ok(line) => eprintln!("  the agent: {line}"),
                Err(e) => failures.push(format!("{}: {e:#}", bad.what)),
            },
            None => failures.push(format!("{}: never connected", bad.what)),
        }
        // The agent is still there and still carries traffic.
        assert!(agent_alive(&mesh, 1), "the agent died after: {}", bad.what);
        say_ok(src, &target, &format!("after case {i}"))
            .with_context(|| format!("the mesh stopped working after: {}", bad.what))?;
    }

    // A well-formed CONNECT still gets through, from the prober too.
    let report = connect(&target).run(&src.netns_path)?;
    assert!(
        matches!(report.outcome, Outcome::Connected { .. }),
        "a good CONNECT after the bad ones: {:?}",
        report.outcome
    );
    // The neighbour's application never saw a connection: the CONNECT that named
    // its address was answered 400 without one.
    assert!(
        tk::accepted(&neighbour_echo).is_empty(),
        "{:?}",
        tk::accepted(&neighbour_echo)
    );
    assert!(
        failures.is_empty(),
        "malformed input handled wrongly:\n{}",
        failures.join("\n")
    );
    Ok(())
}

/// Issue 19 item 11: what a peer claims in `forwarded` (here in RFC 7239's quoted
/// form, as ztunnel sends it) is logged as `src.forwarded`, beside the address the
/// connection really came from, never in its place.
#[test]
fn a_forwarded_claim_is_logged_beside_the_real_source_never_instead() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("hbone_forwarded", 2, 1)?;
    let mesh = Mesh::start(&c, |_| true)?;
    let (src, dst) = (c.pod(0, 0), c.pod(1, 0));
    let _echo = tk::echo(dst, PORT)?;
    let target = addr(dst.ip, PORT);
    // A compromised workload: a certificate the mesh issued, and a lie.
    let cert = CertKey::issue(&mesh_authority(&mesh)?, &identity(src), HOUR)?;
    let report = Probe::connect(dst.ip, HBONE_PORT, &target)
        .cert(cert)
        .header("forwarded", "for=\"6.6.6.6:1234\";proto=https")
        .run(&src.netns_path)?;
    assert!(
        matches!(report.outcome, Outcome::Connected { .. }),
        "{:?}",
        report.outcome
    );
    let local = report.local.context("never connected")?;
    // `wait_log_for` matches `src.addr` against the probe's real address.
    let line = wait_log_for(&mesh, 1, local, "a forwarded claim", |v| {
        v["security"] == "mutual_tls"
    })?;
    assert_eq!(line["src.addr"], local.to_string(), "{line}");
    assert_eq!(line["src.forwarded"], "6.6.6.6:1234", "{line}");
    Ok(())
}

#[test]
fn the_connect_carries_the_source_workload_in_baggage_and_its_address_in_forwarded() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("hbone_baggage", 2, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    let (src, dst) = (c.pod(0, 0), c.pod(1, 0));
    mesh.set_extra(src, "  labels: {app: shop, version: v2}\n")?;
    mesh.start_all()?;
    // What goes on the wire, seen by a server that holds the destination's
    // own certificate (so the source's agent talks to it as to the real one).
    mesh.stop_agent(1, true)?;
    let cert = CertKey::issue(&mesh_authority(&mesh)?, &identity(dst), HOUR)?;
    let fake = FakeServer::start(
        &dst.netns_path,
        SocketAddr::new(dst.ip.into(), HBONE_PORT),
        &cert,
    )?;
    let target = addr(dst.ip, PORT);
    let r = tk::say(src, &target, "hello", &[])?;
    ensure!(r["ok"] == false, "the fake server answers 503: {r}");
    let seen = fake.seen();
    let i = seen
        .requests
        .iter()
        .position(|r| r == &format!("CONNECT {target}"))
        .with_context(|| format!("no CONNECT {target}: {seen:?}"))?;
    let header = |name: &str| {
        seen.headers[i]
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let baggage = header("baggage").with_context(|| format!("no baggage: {seen:?}"))?;
    for part in [
        "k8s.namespace.name=default",
        &format!("k8s.pod.name={}", src.name),
        "service.name=shop",
        "service.version=v2",
    ] {
        ensure!(
            baggage.split(',').any(|p| p == part),
            "baggage {baggage:?} lacks {part}"
        );
    }
    let forwarded = header("forwarded").with_context(|| format!("no forwarded: {seen:?}"))?;
    ensure!(
        forwarded.contains(&src.ip.to_string()),
        "forwarded {forwarded:?} does not name {}",
        src.ip
    );
    Ok(())
}
