//! Wires a role together from the command line.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use tracing::{error, info, warn};

use std::sync::{Arc, RwLock};

use crate::{
    admin::Admin,
    agent::Agent,
    ca::client::CaClient,
    ca::server::{CaOptions, CaServer},
    certs::CertManager,
    cli::{AgentArgs, CaArgs, Cli, Command, ConfigCommand},
    config::MeshConfig,
    ebpf::{self, Capture},
    hbone::{PoolSettings, client::Pool},
    proxy,
    tls::TrustBundle,
};

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => agent(*args),
        Command::Ca(args) => ca(args),
        Command::Status(args) => {
            let (code, body) =
                crate::metrics::get(args.admin_addr, "/status").with_context(|| {
                    format!(
                        "asking the agent's admin endpoint {} (is the agent running on this node?)",
                        args.admin_addr
                    )
                })?;
            anyhow::ensure!(code == 200, "the agent answered {code}: {body}");
            if args.json {
                print!("{body}");
            } else {
                let status: crate::admin::Status =
                    serde_json::from_str(&body).context("reading the agent's status")?;
                print!("{}", crate::admin::print_status(&status));
            }
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Validate { file },
        } => {
            let config = MeshConfig::load(&file)?;
            println!(
                "{}: ok ({} workloads, {} services, {} authorization policies, {} peer authentications)",
                file.display(),
                config.workloads.len(),
                config.services.len(),
                config.authorization_policies.len(),
                config.peer_authentications.len(),
            );
            Ok(())
        }
    }
}

fn agent(args: AgentArgs) -> anyhow::Result<()> {
    if args.uninstall {
        let removed = ebpf::uninstall(&args.bpf_pin_dir)?;
        info!(pin_dir = %args.bpf_pin_dir.display(), removed, "uninstalled");
        return Ok(());
    }
    ebpf::object()?;
    let config_path = args
        .config
        .clone()
        .context("--config is required (the mesh config file)")?;
    let node = match &args.node {
        Some(n) => n.clone(),
        None => hostname().context("--node not given and the hostname is unreadable")?,
    };
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => cgroup2_root().context("--cgroup not given and no cgroup2 mount found")?,
    };
    raise_fd_limit();
    // The first config must be good: there is no last good one to fall back on.
    let config = MeshConfig::load(&config_path)?;

    // The data path runs on the workers; this runtime has the control plane and
    // the accept loops.
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let workers = crate::workers::start(workers).context("starting the worker threads")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("weft-main")
        .build()?;
    runtime.block_on(async move {
        // An embedded CA binds first: it writes the bundle this agent then reads.
        let embedded = match &args.embedded_ca_dir {
            Some(dir) => Some(embedded_ca(&args, dir, &config_path).await?),
            None => None,
        };
        let ca_addr = match &embedded {
            Some(ca) => ca.local_addr().map(connectable)?,
            None => args.ca_addr,
        };
        let bundle_path = match (&args.trust_bundle, &args.embedded_ca_dir) {
            (Some(path), _) => path.clone(),
            (None, Some(dir)) => dir.join("bundle.pem"),
            (None, None) => anyhow::bail!(
                "--trust-bundle is required (the CA writes it as bundle.pem)"
            ),
        };
        let bundle = load_bundle(&bundle_path)?;
        let token = match (&args.ca_token_file, &args.embedded_ca_node_tokens) {
            (Some(path), _) => std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?
                .trim()
                .to_owned(),
            (None, Some(tokens)) => crate::ca::tokens::token_of(tokens, &node)?,
            (None, None) => anyhow::bail!(
                "--ca-token-file is required (this node's token for the CA)"
            ),
        };
        let (ca_stop, ca_stopping) = tokio::sync::oneshot::channel::<()>();
        let ca_task = embedded.map(|ca| {
            tokio::spawn(ca.run(async move {
                let _ = ca_stopping.await;
            }))
        });
        let ca = CaClient::new(ca_addr, token, bundle.clone(), &config.trust_domain)?;
        let certs = CertManager::new(Arc::new(ca), args.cert_ttl);
        let bundle = Arc::new(RwLock::new(bundle));
        let settings = proxy::Settings {
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            same_node: args.same_node,
        };
        let defaults = PoolSettings::default();
        let pool = Pool::new(
            certs.clone(),
            bundle.clone(),
            PoolSettings {
                max_streams_per_connection: args.hbone_max_streams.max(1),
                spread: args.hbone_spread.unwrap_or(defaults.spread).max(1),
                idle_timeout: args.hbone_idle,
                connect_timeout: settings.connect_timeout,
            },
        );
        let shared = Arc::new(proxy::Shared::new(
            settings,
            &node,
            certs,
            bundle.clone(),
            pool,
        ));
        let shared_for_agent = shared.clone();
        let bind = async |addr: std::net::SocketAddr, what: &str| {
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the {what} endpoint {addr}"))
        };
        let metrics = bind(args.metrics_addr, "metrics").await?;
        let readiness = bind(args.readiness_addr, "readiness").await?;
        let admin_listener = bind(args.admin_addr, "admin").await?;
        let certs_view = shared.certs.clone();
        let render: crate::metrics::Render = Arc::new(move || {
            let mut page = crate::stats::STATS.render();
            page.push_str(&certs_view.render_metrics());
            page
        });
        let admin = Arc::new(Admin::new(
            shared.clone(),
            node.clone(),
            config_path.clone(),
            render.clone(),
        ));
        tokio::spawn(crate::metrics::serve(metrics, render));
        tokio::spawn(crate::metrics::serve_http(readiness, admin.readiness()));
        tokio::spawn(crate::metrics::serve_http(admin_listener, admin.handler()));
        tokio::spawn(watch_bundle(
            bundle_path,
            bundle,
            Duration::from_millis(args.config_poll_ms),
        ));
        let mut agent = Agent::new(node.clone(), capture_install(&args, &cgroup)?, shared_for_agent);
        agent.apply(&config);
        admin.set_enrolled(agent.enrolled_pods());
        // Ready means able to serve: the enrolled pods' certificates are here (or
        // the CA has answered, and the log says why not).
        let missing = shared.certs.settle(Duration::from_secs(15)).await;
        if !missing.is_empty() {
            let ids: Vec<String> = missing.iter().map(ToString::to_string).collect();
            warn!(identities = ?ids, "no certificate yet for some workloads; their mTLS connections fail until the CA answers");
        }
        info!(
            node = %node,
            cgroup = %cgroup.display(),
            pin_dir = %args.bpf_pin_dir.display(),
            enrolled = agent.enrolled().count(),
            workers,
            "agent ready"
        );
        admin.set_ready();
        watch_config(
            &mut agent,
            &admin,
            config,
            Duration::from_millis(args.config_poll_ms),
        )
        .await?;
        agent.shutdown();
        let left = proxy::drain(Duration::from_millis(args.drain_ms)).await;
        let _ = ca_stop.send(());
        if let Some(task) = ca_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "the embedded CA failed"),
                Err(e) => error!(error = %e, "the embedded CA task failed"),
            }
        }
        info!(
            connections_cut = left,
            "agent stopped; capture stays pinned (use --uninstall to remove it)"
        );
        anyhow::Ok(())
    })
}

/// Binds the CA that runs inside this agent (`--embedded-ca-dir`).
async fn embedded_ca(args: &AgentArgs, dir: &Path, config: &Path) -> anyhow::Result<CaServer> {
    let node_tokens = args
        .embedded_ca_node_tokens
        .clone()
        .context("--embedded-ca-node-tokens is required with --embedded-ca-dir")?;
    let opts = CaOptions {
        dir: dir.to_owned(),
        config: config.to_owned(),
        node_tokens,
        listen: args.ca_addr,
        metrics_addr: Some(args.embedded_ca_metrics_addr),
        max_ttl: args.embedded_ca_cert_ttl,
        config_poll: Duration::from_millis(args.config_poll_ms),
    };
    CaServer::bind(opts)
        .await
        .context("starting the embedded CA")
}

/// An address to connect to for one that is listened on: a wildcard listener is
/// reached on loopback.
fn connectable(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// What identifies a version of the config file cheaply.
fn stamp(path: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

const MAP_COUNT_EVERY: Duration = Duration::from_secs(5);

/// Polls the config file until a shutdown signal. A bad file is reported and the
/// last good config keeps serving.
async fn watch_config(
    agent: &mut Agent,
    admin: &Admin,
    mut good: MeshConfig,
    every: Duration,
) -> anyhow::Result<()> {
    let path = admin.config_path.as_path();
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut last_stamp = stamp(path);
    let mut tick = tokio::time::interval(every);
    // eBPF map sizes for the metrics, every few seconds (a walk of each map).
    let mut last_count = std::time::Instant::now() - MAP_COUNT_EVERY;
    loop {
        if last_count.elapsed() >= MAP_COUNT_EVERY {
            agent.count_map_entries();
            last_count = std::time::Instant::now();
        }
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tick.tick() => {}
        }
        let now = stamp(path);
        if now != last_stamp {
            last_stamp = now;
            match MeshConfig::load(path) {
                Ok(config) => {
                    if config != good {
                        info!(path = %path.display(), "config changed, applying");
                        agent.apply(&config);
                        good = config;
                    }
                    admin.config_applied();
                }
                Err(e) => {
                    error!(error = %e, "config rejected; the last good config keeps serving");
                    admin.config_rejected(e.to_string());
                }
            }
            admin.set_enrolled(agent.enrolled_pods());
        } else if agent.has_pending() {
            agent.apply(&good);
            admin.set_enrolled(agent.enrolled_pods());
        }
    }
}

fn capture_install(args: &AgentArgs, cgroup: &Path) -> anyhow::Result<Capture> {
    Ok(Capture::install(&args.bpf_pin_dir, cgroup)?)
}

fn load_bundle(path: &Path) -> anyhow::Result<TrustBundle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the trust bundle {}", path.display()))?;
    TrustBundle::from_pem(&text).with_context(|| format!("trust bundle {}", path.display()))
}

/// Re-reads the trust bundle when the file changes (a root rotation adds a root
/// there); a bad file is reported and the last good bundle kept. New connections
/// use the new bundle.
async fn watch_bundle(path: PathBuf, bundle: Arc<RwLock<TrustBundle>>, every: Duration) {
    let mut last = stamp(&path);
    loop {
        tokio::time::sleep(every).await;
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        match load_bundle(&path) {
            Ok(b) => {
                info!(path = %path.display(), roots = b.len(), "trust bundle reloaded");
                *bundle.write().unwrap_or_else(|e| e.into_inner()) = b;
            }
            Err(e) => {
                error!(error = %format!("{e:#}"), "trust bundle rejected; keeping the last good one")
            }
        }
    }
}

fn ca(args: CaArgs) -> anyhow::Result<()> {
    let opts = CaOptions {
        dir: args.dir,
        config: args.config,
        node_tokens: args.node_tokens,
        listen: args.listen,
        metrics_addr: Some(args.metrics_addr),
        max_ttl: args.cert_ttl,
        config_poll: Duration::from_millis(args.config_poll_ms),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weft-ca")
        .build()?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let server = CaServer::bind(opts).await?;
        server
            .run(async move {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            })
            .await?;
        anyhow::Ok(())
    })
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    Some(name.trim().to_owned()).filter(|n| !n.is_empty())
}

/// The mount point of the cgroup v2 hierarchy, from /proc/self/mountinfo.
fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split(' ').next()? != "cgroup2" {
                return None;
            }
            left.split(' ').nth(4).map(PathBuf::from)
        })
        .or_else(|| {
            warn!("no cgroup2 mount in mountinfo");
            None
        })
}

/// Every proxied connection holds two sockets: lift the soft open-file limit to the
/// hard one, as a busy proxy needs. (`weft-tk` uses it too, for many held
/// connections.)
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!("cannot raise the open-file limit");
            }
        }
    }
}
