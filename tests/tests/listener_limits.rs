//! Every listener has limits, in the virtual cluster: a pod outside the mesh
//! floods 15008 with connections that never say anything and 15006 with more
//! connections than its share; a compromised workload (a certificate the mesh
//! issued) holds HBONE connections open without streams and asks for more
//! streams than its share. Each flood is refused at its cap, counted in
//! `weft_listener_refusals_total`, timed out where it holds something, and the
//! agent keeps serving everyone else meanwhile.
//!
//! The hostile side runs in-process from inside the attacker pod's network
//! namespace (`weft_tests::probe::run_in_netns`), outside every pod cgroup, so
//! the kernel capture leaves it alone and it reaches the destination's
//! listeners directly, as a peer would.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};
use tokio_rustls::TlsConnector;
use weft_tests::{
    Cluster, Host as _, Mesh, PATIENCE, Pod, eventually,
    mesh::identity,
    probe::{CertKey, HBONE_PORT, client_config, run_in_netns},
    require_privileged, tk,
};

const PORT: u16 = 9000;
const HOUR: Duration = Duration::from_secs(3600);

fn say_ok(from: &Pod, to: SocketAddr, message: &str) -> Result<()> {
    let r = tk::say(from, &to.to_string(), message, &[])?;
    ensure!(r["ok"] == true, "{} → {to}: {r}", from.name);
    Ok(())
}

/// The value of one series (`name{labels}`) of node `node`'s metrics.
fn metric(c: &Cluster, node: usize, series: &str) -> Result<f64> {
    let out = c
        .node(node)
        .exec("curl", ["-sS", "http://127.0.0.1:15020/metrics"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("no series {series} in node {node}'s metrics:\n{text}"))
}

fn refusals(c: &Cluster, node: usize, listener: &str, reason: &str) -> Result<f64> {
    metric(
        c,
        node,
        &format!("weft_listener_refusals_total{{listener=\"{listener}\",reason=\"{reason}\"}}"),
    )
}

/// "HBONE connection refused" lines node 1's agent has logged.
fn refused_lines(mesh: &Mesh) -> usize {
    mesh.logs(1, |v| v["message"] == "HBONE connection refused")
        .len()
}

/// When each of a set of held connections was closed by the other side.
#[derive(Debug)]
struct Held {
    /// Connections made.
    opened: usize,
    /// How long after the last was made each closed one closed.
    closed_after: Vec<Duration>,
}

impl Held {
    fn closed_within(&self, d: Duration) -> usize {
        self.closed_after.iter().filter(|t| **t <= d).count()
    }
}

/// From `from`'s namespace, opens `n` TCP connections to `to` and sends
/// nothing; watches each for `watch` and records when the server closed (or
/// reset) it. Runs on its own thread; join it for the result.
fn hold_silent(
    from: &Pod,
    to: SocketAddr,
    n: usize,
    watch: Duration,
) -> std::thread::JoinHandle<Result<Held>> {
    let netns = from.netns_path.clone();
    std::thread::spawn(move || {
        run_in_netns(&netns, move || async move {
            let mut streams = Vec::with_capacity(n);
            // Reset so fast that `connect` itself reports it: closed at once.
            let mut reset_at_connect = 0;
            for i in 0..n {
                match TcpStream::connect(to).await {
                    Ok(s) => streams.push(s),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        reset_at_connect += 1;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("connection {i} to {to}"));
                    }
                }
            }
            let start = Instant::now();
            let mut set = JoinSet::new();
            for mut s in streams {
                set.spawn(async move {
                    let mut buf = [0u8; 64];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return Some(start.elapsed()),
                            Ok(_) => {}
                        }
                    }
                });
            }
            let mut closed_after = vec![Duration::ZERO; reset_at_connect];
            let deadline = tokio::time::sleep(watch);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = &mut deadline => break,
                    r = set.join_next() => match r {
                        Some(Ok(Some(t))) => closed_after.push(t),
                        Some(_) => {}
                        None => break,
                    },
                }
            }
            Ok(Held {
                opened: n,
                closed_after,
            })
        })
    })
}

#[test]
fn an_outside_pod_cannot_hold_more_than_its_share_of_handshakes_or_connections() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("limits_outside", 2, 2)?;
    let (a, b, outsider) = (c.pod(0, 0), c.pod(1, 0), c.pod(1, 1));
    let mut mesh = Mesh::new(&c, |p| p.name != outsider.name)?;
    mesh.agent_args = [
        "--hbone-max-handshakes-per-peer",
        "16",
        "--hbone-handshake-timeout",
        "3s",
        "--max-connections-per-peer",
        "32",
    ]
    .map(String::from)
    .to_vec();
    mesh.start_all()?;
    let _echo = tk::echo(b, PORT)?;
    let app = SocketAddr::new(b.ip.into(), PORT);
    say_ok(a, app, "before")?;

    // 15008: 200 connections that never send a byte. Sixteen may wait for
    // their handshake, until its deadline; the rest are reset at once.
    let hbone = hold_silent(
        outsider,
        SocketAddr::new(b.ip.into(), HBONE_PORT),
        200,
        Duration::from_secs(12),
    );
    std::thread::sleep(Duration::from_secs(1));
    // Meanwhile a mesh peer (another address) is served as ever.
    say_ok(a, app, "during the handshake flood")?;
    let held = hbone.join().expect("the flood thread")?;
    let early = held.closed_within(Duration::from_secs(1));
    ensure!(
        early >= held.opened - 16,
        "only {early} of {} silent connections were refused at once: {held:?}",
        held.opened
    );
    ensure!(
        held.closed_after.len() == held.opened,
        "{} of {} silent connections were still open 12 s later (handshake deadline 3 s)",
        held.opened - held.closed_after.len(),
        held.opened
    );
    ensure!(
        held.closed_within(Duration::from_secs(8)) == held.opened,
        "the held handshakes outlived their 3 s deadline: {held:?}"
    );
    // Refused at accept: past the per-peer connection cap (32), or holding
    // one of its 16 handshake slots.
    let at_once =
        refusals(&c, 1, "hbone", "peer_limit")? + refusals(&c, 1, "hbone", "handshake_limit")?;
    ensure!(
        at_once >= (held.opened - 16) as f64,
        "{at_once} refusals counted"
    );
    ensure!(refusals(&c, 1, "hbone", "handshake_limit")? >= 16.0);
    ensure!(refusals(&c, 1, "hbone", "handshake_timeout")? >= 1.0);

    // 15006 (plaintext to the application): 100 connections from one
    // address; 32 are served (the echo server holds them), the rest reset.
    let plain = hold_silent(outsider, app, 100, Duration::from_secs(3));
    std::thread::sleep(Duration::from_secs(1));
    say_ok(a, app, "during the plaintext flood")?;
    let held = plain.join().expect("the flood thread")?;
    ensure!(
        held.closed_after.len() == held.opened - 32,
        "{} of {} plaintext connections from one peer were refused, not {}: {held:?}",
        held.closed_after.len(),
        held.opened,
        held.opened - 32
    );
    ensure!(refusals(&c, 1, "inbound", "peer_limit")? >= (held.opened - 32) as f64);
    // 300 connections that send garbage instead of a TLS ClientHello: each is
    // refused and counted, but the log gets at most 20 lines a second.
    const GARBAGE: usize = 300;
    let failed_before = refusals(&c, 1, "hbone", "handshake_failed")?;
    let logged_before = refused_lines(&mesh);
    let hbone_addr = SocketAddr::new(b.ip.into(), HBONE_PORT);
    let sent = run_in_netns(&outsider.netns_path, move || async move {
        let started = Instant::now();
        for _ in 0..GARBAGE {
            let mut s = TcpStream::connect(hbone_addr).await?;
            s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await?;
            let mut buf = [0u8; 256];
            while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
        }
        Ok(started.elapsed())
    })?;
    ensure!(
        eventually(PATIENCE, || refusals(&c, 1, "hbone", "handshake_failed")
            .is_ok_and(|n| n - failed_before >= GARBAGE as f64)),
        "not every garbage connection was counted"
    );
    let logged = refused_lines(&mesh) - logged_before;
    let allowed = 20 * (sent.as_secs() as usize + 2);
    ensure!(
        logged <= allowed,
        "{logged} log lines for {GARBAGE} refusals in {sent:?}: more than 20 a second"
    );

    // The slots come back with the connections: the outsider is served again.
    ensure!(
        eventually(PATIENCE, || say_ok(outsider, app, "after the floods")
            .is_ok()),
        "the outsider's slots never came back"
    );
    say_ok(a, app, "after the floods")?;
    Ok(())
}

/// A TLS connection to `to`'s 15008 presenting `cert` (from the namespace the
/// calling thread is in).
async fn hbone_tls(
    cert: &CertKey,
    to: IpAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(SocketAddr::new(to, HBONE_PORT)).await?;
    let connector = TlsConnector::from(client_config(Some(cert))?);
    let name = rustls::pki_types::ServerName::try_from("hbone.probe.invalid")?;
    Ok(connector.connect(name, tcp).await?)
}

/// An HBONE client connection from `from`'s namespace to `to`'s 15008 with
/// `cert`, and the task driving it (which ends when the server closes it).
async fn hbone_connection(
    cert: &CertKey,
    to: IpAddr,
) -> Result<(
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Instant>,
)> {
    let (send, conn) = h2::client::handshake(hbone_tls(cert, to).await?).await?;
    let driver = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    // TLS 1.3: the server judges the client certificate after the client's
    // handshake is done; a round trip proves the connection was accepted.
    let send = send.ready().await?;
    Ok((send, driver))
}

#[test]
fn a_compromised_workload_cannot_hold_idle_connections_or_more_than_its_share_of_streams()
-> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("limits_compromised", 2, 2)?;
    let (a, b, attacker) = (c.pod(0, 0), c.pod(1, 0), c.pod(1, 1));
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.agent_args = [
        "--hbone-server-idle",
        "2s",
        "--max-connections-per-peer",
        "8",
        "--hbone-max-streams-per-peer",
        "8",
    ]
    .map(String::from)
    .to_vec();
    mesh.start_all()?;
    let _echo = tk::echo(b, PORT)?;
    let app = SocketAddr::new(b.ip.into(), PORT);
    say_ok(a, app, "before")?;
    // The attacker holds a certificate the mesh issued (its own identity).
    let cert = CertKey::issue(&mesh.authority()?, &identity(attacker), HOUR)?;
    let dst: IpAddr = b.ip.into();

    // Twelve HBONE connections without a stream: eight are taken, four reset;
    // the eight are closed once idle for 2 s.
    let idle = {
        let cert = cert.clone();
        run_in_netns(&attacker.netns_path, move || async move {
            let (mut held, mut refused) = (Vec::new(), 0);
            for _ in 0..12 {
                match hbone_connection(&cert, dst).await {
                    Ok(c) => held.push(c),
                    Err(_) => refused += 1,
                }
            }
            let opened = Instant::now();
            let mut closed_after = Vec::new();
            for (_send, driver) in held {
                if let Ok(Ok(at)) = tokio::time::timeout(Duration::from_secs(15), driver).await {
                    closed_after.push(at.saturating_duration_since(opened));
                }
            }
            Ok((refused, closed_after))
        })?
    };
    let (refused, closed_after) = idle;
    ensure!(
        refused == 4,
        "{refused} of 12 HBONE connections from one peer were refused, not 4"
    );
    ensure!(
        closed_after.len() == 8 && closed_after.iter().all(|t| *t < Duration::from_secs(10)),
        "idle HBONE connections were not closed within 10 s (idle timeout 2 s): {closed_after:?}"
    );
    ensure!(refusals(&c, 1, "hbone", "peer_limit")? >= 4.0);
    ensure!(metric(&c, 1, "weft_hbone_idle_closed_total")? >= 8.0);

    // Twenty streams at once on one connection: eight are served, twelve
    // refused (REFUSED_STREAM) without reaching the application.
    let authority = app.to_string();
    let statuses = run_in_netns(&attacker.netns_path, move || async move {
        let (send, _driver) = hbone_connection(&cert, dst).await?;
        let mut pending = Vec::new();
        for _ in 0..20 {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority.as_str())
                .body(())?;
            let mut send = send.clone().ready().await?;
            let (resp, body) = send.send_request(req, false)?;
            pending.push((resp, body));
        }
        let mut ok = 0;
        let mut refused = 0;
        // Keep the accepted tunnels open until every answer is in.
        let mut tunnels = Vec::new();
        for (resp, body) in pending {
            match tokio::time::timeout(Duration::from_secs(10), resp).await {
                Ok(Ok(r)) if r.status() == StatusCode::OK => {
                    ok += 1;
                    tunnels.push((r, body));
                }
                Ok(Err(e)) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
                other => anyhow::bail!("a stream got {other:?}"),
            }
        }
        Ok((ok, refused))
    })?;
    ensure!(
        statuses == (8, 12),
        "(served, refused) streams from one peer: {statuses:?}, not (8, 12)"
    );
    ensure!(refusals(&c, 1, "hbone", "stream_limit")? >= 12.0);
    // Everyone else is served meanwhile and after.
    say_ok(a, app, "after the floods")?;
    Ok(())
}

/// The resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix("VmRSS:")?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .context("no VmRSS")
}

#[test]
fn memory_a_flood_of_hbone_connections_took_goes_back_after_it() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    const FLOOD: usize = 1000;
    let c = Cluster::new("limits_memory", 2, 2)?;
    let (a, b, attacker) = (c.pod(0, 0), c.pod(1, 0), c.pod(1, 1));
    let mesh = Mesh::start(&c, |_| true)?;
    let _echo = tk::echo(b, PORT)?;
    let app = SocketAddr::new(b.ip.into(), PORT);
    say_ok(a, app, "before")?;
    let cert = CertKey::issue(&mesh.authority()?, &identity(attacker), HOUR)?;
    let dst: IpAddr = b.ip.into();
    let pid = mesh.agent(1).pid();
    let before = rss_kib(pid)?;

    // A thousand HBONE connections with a stream each (every stream a
    // connection to the application), held together, then all closed.
    let (tx, rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let authority = app.to_string();
    let netns = attacker.netns_path.clone();
    let flood = std::thread::spawn(move || {
        run_in_netns(&netns, move || async move {
            let mut held = Vec::new();
            for _ in 0..FLOOD {
                let (send, driver) = hbone_connection(&cert, dst).await?;
                let req = Request::builder()
                    .method(Method::CONNECT)
                    .uri(authority.as_str())
                    .body(())?;
                let (resp, body) = send.clone().ready().await?.send_request(req, false)?;
                let resp = resp.await?;
                ensure!(resp.status() == StatusCode::OK, "{}", resp.status());
                held.push((send, driver, resp, body));
            }
            let _ = tx.send(());
            let _ = release_rx.await;
            drop(held);
            Ok(())
        })
    });
    rx.recv_timeout(Duration::from_secs(120))
        .context("the flood never got all its connections")?;
    let peak = rss_kib(pid)?;
    let _ = release_tx.send(());
    flood.join().expect("the flood thread")?;
    let took = peak.saturating_sub(before);
    ensure!(
        took >= 8 * 1024,
        "{FLOOD} held connections took only {took} KiB (from {before} KiB): too little to tell"
    );
    // Back within a quarter of what the flood took, once it is over.
    let mut after = peak;
    let back = eventually(Duration::from_secs(15), || {
        after = rss_kib(pid).unwrap_or(u64::MAX);
        after <= before + took / 4
    });
    eprintln!(
        "agent RSS: {before} KiB before, {peak} KiB with {FLOOD} connections, {after} KiB after"
    );
    ensure!(
        back,
        "the agent kept the flood's memory: {before} KiB before, {peak} KiB during, {after} KiB after"
    );
    say_ok(a, app, "after the flood")?;
    Ok(())
}

#[test]
fn a_stdout_that_stops_draining_never_stalls_traffic() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    const CONNECTIONS: usize = 2000;
    let c = Cluster::new("limits_stuck_stdout", 2, 1)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let mesh = Mesh::start(&c, |_| true)?;
    let _echo = tk::echo(b, PORT)?;
    let app = SocketAddr::new(b.ip.into(), PORT);
    say_ok(a, app, "before")?;
    // The destination's agent writes an access-log line per connection (about
    // 1 KiB of JSON): 2000 of them fill its stdout pipe (64 KiB) many times
    // over while nobody reads it.
    let agent = mesh.agent(1);
    let cursor = mesh.logs_end(1);
    agent.pause_stdout(true);
    let out = a.exec(
        weft_tests::bin_path("weft-tk"),
        [
            "conn-rate",
            "--connect",
            &app.to_string(),
            "--count",
            &CONNECTIONS.to_string(),
            "--timeout-secs",
            "10",
        ],
    )?;
    agent.pause_stdout(false);
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "traffic stalled while the agent's stdout was not read: {report} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Once read again, the lines that waited come out.
    let mut inbound = 0;
    eventually(PATIENCE, || {
        let mut at = cursor;
        inbound = mesh
            .access_logs_after(1, &mut at)
            .iter()
            .filter(|v| v["direction"] == "inbound")
            .count();
        inbound >= CONNECTIONS
    });
    ensure!(
        inbound >= CONNECTIONS,
        "only {inbound} of {CONNECTIONS} access-log lines came out after stdout drained again"
    );
    Ok(())
}

#[test]
fn rapid_reset_from_a_compromised_workload_ends_its_connection_and_no_one_else_notices()
-> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    const STREAMS: usize = 5000;
    let c = Cluster::new("limits_rapid_reset", 2, 2)?;
    let (a, b, attacker) = (c.pod(0, 0), c.pod(1, 0), c.pod(1, 1));
    let mesh = Mesh::start(&c, |_| true)?;
    let echo = tk::echo(b, PORT)?;
    let app = SocketAddr::new(b.ip.into(), PORT);
    say_ok(a, app, "before")?;
    let cert = CertKey::issue(&mesh.authority()?, &identity(attacker), HOUR)?;
    let dst: IpAddr = b.ip.into();
    let authority = app.to_string();
    // CVE-2023-44487: open a stream and reset it at once, over and over, on
    // one connection, never waiting for an answer.
    let (sent, ended) = run_in_netns(&attacker.netns_path, move || async move {
        let (mut send, conn) = h2::client::Builder::new()
            .max_concurrent_reset_streams(usize::MAX)
            .handshake::<_, Bytes>(hbone_tls(&cert, dst).await?)
            .await?;
        let conn = tokio::spawn(conn);
        let mut sent = 0;
        for _ in 0..STREAMS {
            let req = Request::builder()
                .method(Method::CONNECT)
                .uri(authority.as_str())
                .body(())?;
            send = match send.ready().await {
                Ok(s) => s,
                Err(_) => break,
            };
            match send.send_request(req, false) {
                // Dropping both halves at once sends RST_STREAM(CANCEL).
                Ok((response, body)) => drop((response, body)),
                Err(_) => break,
            }
            sent += 1;
        }
        // The agent must end the connection (GOAWAY ENHANCE_YOUR_CALM, then
        // close): its driver ends in an error, and soon.
        let ended = match tokio::time::timeout(Duration::from_secs(10), conn).await {
            Ok(Ok(Err(e))) => Some(e.to_string()),
            _ => None,
        };
        Ok((sent, ended))
    })?;
    eprintln!("rapid reset: {sent} streams sent; the connection ended: {ended:?}");
    ensure!(
        ended.is_some(),
        "{sent} streams opened and reset, and the agent kept the connection"
    );
    // Everyone else is served, and the application saw a bounded number of the
    // attacker's streams at most.
    say_ok(a, app, "after the rapid reset")?;
    let reached = tk::accepted(&echo).len();
    ensure!(
        reached < 1000,
        "{reached} of the reset streams reached the application"
    );
    Ok(())
}

#[test]
fn the_node_budget_refuses_what_would_take_the_agent_to_its_open_file_limit() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("limits_budget", 2, 1)?;
    let (a, b) = (c.pod(0, 0), c.pod(1, 0));
    let mut mesh = Mesh::new(&c, |_| true)?;
    // Node 1's agent may hold 24 sockets for proxied connections: a few
    // HBONE connections from node 0, and one socket to the application per
    // stream.
    mesh.agent_args = vec!["--max-connections".into(), "24".into()];
    mesh.start_all()?;
    let _echo = tk::echo(b, PORT)?;
    let app = SocketAddr::new(b.ip.into(), PORT);
    say_ok(a, app, "before")?;
    let out = a.exec(
        weft_tests::bin_path("weft-tk"),
        [
            "hold",
            "--connect",
            &app.to_string(),
            "--count",
            "100",
            "--hold-secs",
            "1",
            "--timeout-secs",
            "5",
        ],
    )?;
    let report = String::from_utf8_lossy(&out.stdout);
    ensure!(
        !out.status.success(),
        "100 connections held through an agent whose budget is 24: {report}"
    );
    ensure!(refusals(&c, 1, "hbone", "node_limit")? >= 1.0);
    // What was held is given back: served again.
    ensure!(
        eventually(PATIENCE, || say_ok(a, app, "after").is_ok()),
        "the budget never came back"
    );
    Ok(())
}
