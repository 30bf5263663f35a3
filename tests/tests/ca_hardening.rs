//! The CA's boundary against what can reach it, in the virtual cluster (issue 19
//! item 5).
//!
//! A flood: pods outside the mesh open more connections to port 15012 than the
//! CA holds, some TCP only, some with TLS and the HTTP/2 preface and then
//! silence, and hold them. A node's agent that restarts meanwhile must still get
//! its certificates; the CA must refuse the excess at once, count it, and close
//! what it took at its first-request deadline although the flooders never send
//! another byte. The CA runs with its defaults (1,024 connections, 32 per peer
//! address, 10 s to the first answered request): before these limits, the flood
//! took every connection for a minute and more, and the agent got no certificate.
//!
//! Token files: written for their owner only, and an agent's token file is the
//! token exactly (one final newline aside), never trimmed.
//!
//! The CA's identity: a mesh file that gives an enrolled pod
//! `weft-system/weft-ca` is refused by the CA and the agent, so no node's agent
//! asks for it (and the CA would refuse it anyway: `ca::server` unit tests).

use std::{
    net::SocketAddr,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};
use tokio_rustls::TlsConnector;
use weft::{ca::server::Limits, identity::ca_identity, tls};
use weft_tests::{
    Cluster, Host as _, Mesh, PATIENCE, Pod, mesh::identity, probe, require_privileged,
};

/// More than the CA's default total of 1,024.
const FLOOD_TLS: usize = 1100;
const FLOOD_TCP: usize = 200;
/// The CA's defaults, which the test runs with.
fn per_peer() -> usize {
    Limits::default().max_connections_per_peer
}

fn first_request() -> Duration {
    Limits::default().first_request_timeout
}

/// What a held connection may last past the first-request deadline: the CA's
/// one-second close, and room for a busy machine.
const SLACK: Duration = Duration::from_secs(4);

/// What a flooding pod saw.
#[derive(Debug)]
struct Flood {
    /// Connections that got past the CA's accept (TLS done, or, for TCP only,
    /// not closed within half a second).
    held: usize,
    /// Connections the CA closed at once.
    refused: usize,
    /// The longest any held connection stayed open, and how many were still open
    /// when the flooder gave up waiting.
    longest: Duration,
    still_open: usize,
}

/// Reads until the CA closes `io`, for at most `limit`; how long it stayed open
/// (`None`: still open).
async fn open_for<S: AsyncRead + Unpin>(
    mut io: S,
    opened: Instant,
    limit: Duration,
) -> Option<Duration> {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((opened + limit).into(), io.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(opened.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Sums up the held connections' fates.
async fn wait_all(mut held: JoinSet<Option<Duration>>, mut flood: Flood) -> Result<Flood> {
    while let Some(done) = held.join_next().await {
        match done? {
            Some(d) => flood.longest = flood.longest.max(d),
            None => flood.still_open += 1,
        }
    }
    Ok(flood)
}

/// From `pod`: `n` connections with TLS (checked as an agent checks the CA) and
/// the HTTP/2 preface, then nothing. Says on `opened` when all are made.
fn flood_tls(
    pod: &Pod,
    ca: SocketAddr,
    bundle: String,
    n: usize,
    opened: mpsc::Sender<()>,
) -> thread::JoinHandle<Result<Flood>> {
    let netns = pod.netns_path.clone();
    thread::spawn(move || {
        probe::run_in_netns(&netns, move || async move {
            let bundle = tls::TrustBundle::from_pem(&bundle)?;
            let config = tls::anonymous_client_config(&bundle, ca_identity("cluster.local")?)?;
            let connector = TlsConnector::from(config);
            let mut held = JoinSet::new();
            let mut flood = Flood {
                held: 0,
                refused: 0,
                longest: Duration::ZERO,
                still_open: 0,
            };
            for _ in 0..n {
                let tcp = TcpStream::connect(ca)
                    .await
                    .context("connecting to the CA")?;
                let start = Instant::now();
                let name = ServerName::IpAddress(ca.ip().into());
                let tls =
                    tokio::time::timeout(Duration::from_secs(5), connector.connect(name, tcp));
                match tls.await {
                    Ok(Ok(mut tls)) => {
                        tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
                            .await?;
                        flood.held += 1;
                        held.spawn(open_for(tls, start, first_request() + SLACK));
                    }
                    _ => flood.refused += 1,
                }
            }
            let _ = opened.send(());
            wait_all(held, flood).await
        })
    })
}

/// From `pod`: `n` TCP connections that send nothing.
fn flood_tcp(
    pod: &Pod,
    ca: SocketAddr,
    n: usize,
    opened: mpsc::Sender<()>,
) -> thread::JoinHandle<Result<Flood>> {
    let netns = pod.netns_path.clone();
    thread::spawn(move || {
        probe::run_in_netns(&netns, move || async move {
            let mut conns = Vec::new();
            for _ in 0..n {
                let tcp = TcpStream::connect(ca)
                    .await
                    .context("connecting to the CA")?;
                conns.push((tcp, Instant::now()));
            }
            let _ = opened.send(());
            let mut held = JoinSet::new();
            let mut flood = Flood {
                held: 0,
                refused: 0,
                longest: Duration::ZERO,
                still_open: 0,
            };
            for (mut tcp, start) in conns {
                let mut byte = [0u8; 1];
                let at_once = (start + Duration::from_millis(500)).into();
                match tokio::time::timeout_at(at_once, tcp.read(&mut byte)).await {
                    Ok(Ok(0) | Err(_)) => flood.refused += 1,
                    _ => {
                        flood.held += 1;
                        held.spawn(open_for(tcp, start, first_request() + SLACK));
                    }
                }
            }
            wait_all(held, flood).await
        })
    })
}

fn ca_metric(c: &Cluster, name: &str) -> Result<f64> {
    let out = c
        .node(0)
        .exec("curl", ["-sS", "http://127.0.0.1:15014/metrics"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .with_context(|| format!("no {name} in:\n{text}"))
}

#[test]
fn a_flood_from_pods_outside_the_mesh_keeps_no_node_from_its_certificates() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    // More than the CA holds in all, from one pod.
    assert!(FLOOD_TLS > Limits::default().max_connections);
    let c = Cluster::new("ca_flood", 2, 2)?;
    // pod 0 of each node is in the mesh; pod 1 of each is outside and floods.
    let mut mesh = Mesh::new(&c, |p| p.name.ends_with("p0"))?;
    mesh.start_all()?;
    let ca: SocketAddr = mesh.ca_addr().parse()?;
    let bundle = std::fs::read_to_string(mesh.bundle_path())?;
    let victim = c.pod(1, 0);
    mesh.stop_agent(1, false)?;

    // One pod takes more than every connection the CA has with TLS; the other
    // adds silent TCP connections.
    let (opened, all_open) = mpsc::channel();
    let tls_flood = flood_tls(c.pod(1, 1), ca, bundle, FLOOD_TLS, opened.clone());
    all_open
        .recv_timeout(Duration::from_secs(60))
        .context("the TLS flood never finished opening")?;
    let tcp_flood = flood_tcp(c.pod(0, 1), ca, FLOOD_TCP, opened);
    all_open
        .recv_timeout(Duration::from_secs(30))
        .context("the TCP flood never finished opening")?;

    // While they are held, node 1's agent starts again and gets its certificate.
    let restarted = Instant::now();
    mesh.start_agent(1)?;
    let issued = mesh.logs(1, |v| {
        v["message"] == "certificate issued" && v["identity"] == identity(victim)
    });
    ensure!(
        !issued.is_empty(),
        "node 1's agent got no certificate while the CA was flooded (restarted {:?} ago)",
        restarted.elapsed()
    );
    ensure!(
        mesh.logs(1, |v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("no certificate yet")))
            .is_empty(),
        "node 1's agent started without its certificate"
    );

    let tls = tls_flood.join().expect("the TLS flooder panicked")?;
    let tcp = tcp_flood.join().expect("the TCP flooder panicked")?;
    eprintln!("TLS flood: {tls:?}\nTCP flood: {tcp:?}");
    // Each pod got its per-peer share, the rest was closed at once...
    ensure!(
        tls.held <= per_peer() && tcp.held <= per_peer(),
        "{tls:?} {tcp:?}"
    );
    ensure!(
        tls.refused >= FLOOD_TLS - per_peer() && tcp.refused >= FLOOD_TCP - per_peer(),
        "{tls:?} {tcp:?}"
    );
    // ...and what the CA took it closed at its deadline, with the flooders silent.
    for f in [&tls, &tcp] {
        ensure!(f.still_open == 0, "held past the deadline: {f:?}");
        ensure!(f.longest <= first_request() + SLACK, "{f:?}");
    }
    let refused = ca_metric(
        &c,
        "weft_ca_connections_refused_total{reason=\"peer_limit\"}",
    )?;
    ensure!(
        refused >= (tls.refused + tcp.refused) as f64,
        "the CA counted {refused} refusals; the flooders saw {}",
        tls.refused + tcp.refused
    );
    ensure!(
        ca_metric(
            &c,
            "weft_ca_connections_timed_out_total{phase=\"first_request\"}"
        )? >= (tls.held + tcp.held) as f64
    );
    // The CA holds nothing of the flood now (node agents hold none between calls).
    ensure!(
        weft_tests::eventually(PATIENCE, || ca_metric(&c, "weft_ca_connections_open")
            .is_ok_and(|n| n == 0.0)),
        "the CA still holds connections"
    );
    Ok(())
}

#[test]
fn token_files_are_private_and_an_agent_sends_its_token_exactly() -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("ca_tokens", 1, 1)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    for path in [mesh.token_path(0), mesh.node_tokens_path()] {
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "{} is mode {mode:o}", path.display());
    }
    mesh.start_ca()?;
    let token = std::fs::read_to_string(mesh.token_path(0))?;

    // The right token and a space: the agent stops at start, naming the file.
    std::fs::write(mesh.token_path(0), format!("{token} \n"))?;
    let out = weft_tests::Proc::spawn(&mut mesh.agent_command(0), "agent, spaced token")?
        .wait_with_output(PATIENCE)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "the agent started with a token and a space"
    );
    ensure!(
        stderr.contains(&mesh.token_path(0).display().to_string())
            && stderr.contains("nothing is trimmed"),
        "{stderr}"
    );

    // The token and the newline `echo` writes: the file's line ending.
    std::fs::write(mesh.token_path(0), format!("{token}\n"))?;
    mesh.start_agent(0)?;
    ensure!(
        !mesh
            .logs(0, |v| v["message"] == "certificate issued"
                && v["identity"] == identity(c.pod(0, 0)))
            .is_empty(),
        "no certificate with the echoed token"
    );
    Ok(())
}

#[test]
fn no_node_gets_the_ca_identity_whatever_the_mesh_file_says() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("ca_reserved", 1, 2)?;
    let mut mesh = Mesh::new(&c, |_| true)?;
    mesh.start_all()?;
    // The mesh file turns enrolled pod n0p1 into the CA's identity.
    let pod = c.pod(0, 1);
    let entry = |ns: &str, sa: &str| {
        format!(
            "- name: {}\n  namespace: {ns}\n  service_account: {sa}\n",
            pod.name
        )
    };
    let text = mesh.config_text();
    let forged = text.replace(
        &entry("default", &pod.name),
        &entry("weft-system", "weft-ca"),
    );
    ensure!(forged != text, "the pod's entry was not found in:\n{text}");
    mesh.write_raw_config(&forged)?;

    // The CA and the agent both refuse the file, saying why.
    let reason = "weft-system/weft-ca is the CA's identity";
    let ca = mesh.ca().wait_for_json(PATIENCE, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("mesh config rejected"))
    })?;
    ensure!(
        ca["error"].as_str().is_some_and(|e| e.contains(reason)),
        "{ca}"
    );
    for l in mesh.agent(0).stdout_lines() {
        if l.contains("config") || l.contains("weft-ca") {
            eprintln!("DBG {l}");
        }
    }
    eprintln!("DBG stderr {}", mesh.agent(0).stderr());
    let agent = mesh.agent(0).wait_for_json(PATIENCE, |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("config rejected"))
    })?;
    ensure!(
        agent["error"].as_str().is_some_and(|e| e.contains(reason)),
        "{agent}"
    );
    // And no certificate for it was issued.
    let ca_id = ca_identity("cluster.local")?.to_string();
    ensure!(
        mesh.logs(0, |v| v["identity"] == ca_id.as_str()).is_empty(),
        "node 0's agent asked for the CA's identity"
    );
    Ok(())
}
