//! `weft waypoint`: the L7 proxy of the services bound to it. It is a workload
//! of the mesh with its own identity (`native_tunnel`), gets its certificate
//! from the CA as agents do, serves HBONE on 15008, and sends each request on
//! to an endpoint over HBONE with its own identity.

use std::{
    path::Path,
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use rustls::{server::ResolvesServerCert, sign::CertifiedKey};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, error, info, warn};

use crate::{
    ca::client::CaClient,
    certs::CertManager,
    cli::{Discovery, WaypointArgs},
    discovery::{file, kube::Update, watch::Watch},
    hbone::{
        PoolSettings,
        client::Pool,
        server::{Limits, Server},
    },
    http::{
        engine::{Config, Engine},
        jwt::{self, Jwks},
        upstream::Upstreams,
    },
    identity::SpiffeId,
    model::{LbPolicy, Mesh, WorkloadKey},
    net::{Netns, limit::Limit},
    tls,
    view::{Balancers, View},
    waypoint::Front,
};

pub fn run(args: WaypointArgs) -> anyhow::Result<()> {
    super::raise_fd_limit();
    let (namespace, name) = args
        .workload
        .split_once('/')
        .context("--workload must be <namespace>/<name>")?;
    let me = WorkloadKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    };
    // The data path runs on the workers, as the agent's does: a downstream
    // connection, its requests' tasks, the upstream connections they use and
    // the Redis connection of their limits all live on one thread, so a
    // request's steps wake no other thread. This runtime has the control
    // plane (config, certificates, metrics).
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    crate::workers::start(workers).context("starting the worker threads")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("weft-waypoint")
        .build()?;
    runtime.block_on(serve(args, me))
}

/// Where the waypoint's mesh comes from.
enum Source {
    /// The file, index 0 of the watch (the bundle is index 1).
    File(std::path::PathBuf),
    /// Ordered: a change of pods alone comes as the workloads that changed.
    Kubernetes(crate::discovery::kube::OrderedSource),
}

impl Source {
    async fn start(args: &WaypointArgs) -> anyhow::Result<(Source, Mesh)> {
        match (args.source.discovery, &args.config) {
            (Discovery::File, Some(path)) => {
                let mesh = file::load(path, args.config_max_bytes)?.mesh;
                Ok((Source::File(path.clone()), mesh))
            }
            (Discovery::File, None) => anyhow::bail!("--config is required with --discovery file"),
            (Discovery::Kubernetes, Some(_)) => anyhow::bail!("--config is for --discovery file"),
            (Discovery::Kubernetes, None) => {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (in cluster, or KUBECONFIG)")?;
                let mut source =
                    crate::discovery::kube::start_ordered(client, args.source.kube_options());
                let mesh = source
                    .first()
                    .await
                    .context("Kubernetes discovery stopped before its first list")?;
                Ok((Source::Kubernetes(source), Arc::unwrap_or_clone(mesh)))
            }
        }
    }

    /// The next update from Kubernetes (never, for a file: the watch says).
    async fn next(&mut self) -> Option<Update> {
        match self {
            Source::File(_) => std::future::pending().await,
            Source::Kubernetes(s) => s.updates.recv().await,
        }
    }
}

async fn serve(args: WaypointArgs, me: WorkloadKey) -> anyhow::Result<()> {
    let (mut source, mesh) = Source::start(&args).await?;
    // Index 0: the mesh file (a placeholder in Kubernetes mode: never written);
    // index 1: the trust bundle.
    let config_path = match &source {
        Source::File(p) => p.clone(),
        Source::Kubernetes(_) => args.trust_bundle.clone(),
    };
    let mut watch = Watch::new(&[&config_path, &args.trust_bundle]);
    let workload = mesh
        .workloads
        .iter()
        .find(|w| w.key() == me)
        .with_context(|| format!("workload {me} is not in the mesh"))?;
    anyhow::ensure!(
        workload.native_tunnel,
        "workload {me} must be `native_tunnel: true` to run a waypoint (it speaks HBONE itself)"
    );
    let identity = workload.identity(&mesh.trust_domain)?;
    let node = workload.node.clone();

    super::agent::wait_for_bundle(&args.trust_bundle).await;
    let bundle = super::agent::load_bundle(&args.trust_bundle)?;
    if let Some(problem) = crate::ca::tokens::loose_permissions(&args.ca_token_file) {
        warn!(%problem, "a node-token file others may read");
    }
    let token = crate::ca::tokens::read_token_file(&args.ca_token_file)?;
    let ca = CaClient::new(
        args.ca_addr.clone(),
        token,
        bundle.clone(),
        &mesh.trust_domain,
    )?
    .with_token_file(args.ca_token_file.clone());
    let bundle = Arc::new(RwLock::new(bundle));
    let certs = CertManager::new(Arc::new(ca.following(bundle.clone())), args.cert_ttl);
    let pool = Pool::new(
        certs.clone(),
        bundle.clone(),
        PoolSettings {
            connect_timeout: args.connect_timeout,
            ..PoolSettings::default()
        },
    );
    let exporter = args
        .otlp_endpoint
        .as_deref()
        .map(|e| crate::http::otlp::Exporter::spawn(e, &me.to_string()))
        .transpose()?;
    crate::http::telemetry::configure(crate::http::telemetry::Tracing {
        sample_new: args.trace_sample_new,
        exporter,
    });
    let netns = Netns::open(Path::new("/proc/self/ns/net")).context("opening our own netns")?;
    let balancers = Arc::new(Balancers::default());
    let jwks = Jwks::new(Some(jwks_trust(&args)?), args.jwks_refresh);
    let engine = Arc::new(
        Engine::new(
            Config::new(
                Arc::new(View::new(per_request(mesh), &node, &balancers)),
                &jwks,
            ),
            Upstreams::new(pool, netns, identity.clone(), args.connect_timeout),
            args.request_timeout,
        )
        .with_settings(crate::http::authz::Settings {
            xff_trusted_hops: args.xff_trusted_hops,
            normalization: args.normalize_path,
        })
        .with_redis(args.redis_addr.clone()),
    );
    let serves = {
        let (engine, me) = (engine.clone(), me.clone());
        Arc::new(move |waypoint: &crate::model::ServiceKey| {
            let config = engine.config();
            let view = &config.view;
            view.service(waypoint).is_some_and(|(svc, _)| {
                view.endpoint_workloads(svc)
                    .iter()
                    .any(|(w, _)| w.key() == me)
            })
        })
    };
    let front = Arc::new(Front {
        engine: engine.clone(),
        serves,
    });

    let config = tls::server_config(
        Arc::new(OwnCert {
            certs: certs.clone(),
            id: identity.clone(),
        }),
        &bundle,
    )?;
    let server = Server::new(
        TlsAcceptor::from(config),
        &mesh_trust_domain(&identity),
        &me.to_string(),
        Limits {
            handshakes: Limit::new(256, 32),
            streams: Limit::new(args.max_connections, args.max_connections_per_peer),
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: crate::hbone::SERVER_IDLE_TIMEOUT,
        },
    );
    // Bound here, registered by its accept loop on the worker that runs it.
    let listener = std::net::TcpListener::bind(args.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .with_context(|| format!("binding HBONE on {}", args.listen))?;
    let metrics = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .with_context(|| format!("binding metrics on {}", args.metrics_addr))?;
    let readiness = tokio::net::TcpListener::bind(args.readiness_addr)
        .await
        .with_context(|| format!("binding readiness on {}", args.readiness_addr))?;
    tokio::spawn(crate::metrics::serve(
        metrics,
        Arc::new(|| {
            let mut page = crate::http::telemetry::render();
            page.push_str(&crate::waypoint::BAD.render());
            page.push_str(&crate::http::ratelimit::render());
            page.push_str(&crate::http::jwt::render());
            page
        }),
    ));
    tokio::spawn(prune_departed_series(engine.clone()));
    let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let ready = ready.clone();
        tokio::spawn(crate::metrics::serve_http(
            readiness,
            Arc::new(move |method: &str, path: &str, _: &str| {
                use crate::metrics::Reply;
                match (method, path) {
                    ("GET", "/healthz/ready")
                        if ready.load(std::sync::atomic::Ordering::Relaxed) =>
                    {
                        Reply::text(200, "ready\n")
                    }
                    ("GET", "/healthz/ready") => Reply::text(503, "no certificate yet\n"),
                    _ => Reply::text(404, "not found\n"),
                }
            }),
        ));
    }

    certs
        .get(&identity, Duration::from_secs(30))
        .await
        .context("getting the waypoint's certificate from the CA")?;
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let connections = Arc::new(Limit::new(
        args.max_connections,
        args.max_connections_per_peer,
    ));
    let accept = {
        let connections = connections.clone();
        let server = server.clone();
        let front = front.clone();
        async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return error!(error = %e, "cannot register the HBONE listener"),
            };
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = connections.admit(peer.ip()) else {
                    crate::net::socket::reset(tcp);
                    continue;
                };
                let (server, front, stop) = (server.clone(), front.clone(), stop.clone());
                // On the least loaded worker, for its whole life.
                crate::workers::serve(tcp, move |tcp| async move {
                    server.serve(tcp, peer, front, stop).await;
                    drop(permit);
                });
            }
        }
    };
    let accept = crate::workers::spawn_listener(accept);
    ready.store(true, std::sync::atomic::Ordering::Relaxed);
    info!(
        workload = %me,
        identity = %identity,
        listen = %args.listen,
        "waypoint ready"
    );

    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let changed = tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            changed = watch.changed() => changed,
            Some(update) = source.next() => {
                match update {
                    // Routes, policies and limits name services: only the
                    // view changes (at the cost of the change).
                    Update::Delta(delta) => {
                        let config = engine.config();
                        let view = config.view.with_delta(delta, &balancers);
                        engine.set_config(config.with_view(Arc::new(view)));
                        debug!("workloads updated from Kubernetes");
                    }
                    Update::Mesh(mesh) => {
                        let problems = crate::model::validate::problems(&mesh);
                        if problems.is_empty() {
                            engine.set_config(Config::new(
                                Arc::new(View::new(per_request(Arc::unwrap_or_clone(mesh)), &node, &balancers)),
                                &jwks,
                            ));
                            info!("mesh updated from Kubernetes");
                        } else {
                            error!(problems = %problems.join("; "), "mesh from Kubernetes rejected; the last good one keeps serving");
                        }
                    }
                }
                continue;
            }
        };
        if let Source::File(path) = &source
            && changed.contains(&0)
        {
            match file::load(path, args.config_max_bytes) {
                Ok(loaded) => {
                    engine.set_config(Config::new(
                        Arc::new(View::new(per_request(loaded.mesh), &node, &balancers)),
                        &jwks,
                    ));
                    info!(path = %path.display(), "config reloaded");
                }
                Err(e) => error!(error = %e, "config rejected; the last good config keeps serving"),
            }
        }
        if changed.contains(&1) {
            match super::agent::load_bundle(&args.trust_bundle) {
                Ok(b) => *bundle.write().unwrap_or_else(|e| e.into_inner()) = b,
                Err(e) => {
                    error!(error = %format!("{e:#}"), "trust bundle rejected; keeping the last good one")
                }
            }
        }
    }
    // New connections are refused at once; those held finish the requests in
    // flight (their HTTP/2 peers get a GOAWAY) for up to --drain.
    accept.abort();
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + args.drain;
    while connections.held() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    info!(connections_cut = connections.held(), "waypoint stopped");
    Ok(())
}

/// Once a minute, drops the request series of workloads no longer in the
/// model that have been quiet for five minutes, as the agent does for its TCP
/// series (see [`crate::http::telemetry::prune`]).
async fn prune_departed_series(engine: Arc<Engine>) {
    const QUIET_SECS: u64 = 300;
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let config = engine.config();
        let present = |namespace: &str, name: &str| {
            config
                .view
                .workload(&WorkloadKey {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
                .is_some()
        };
        let pruned = crate::http::telemetry::prune(&present, QUIET_SECS);
        if pruned > 0 {
            tracing::debug!(pruned, "request series of departed workloads dropped");
        }
    }
}

/// The mesh as the waypoint balances it: per request, round robin (the
/// default) becomes least request with two random choices, which spreads
/// requests of uneven cost where round robin only spreads their number.
fn per_request(mut mesh: Mesh) -> Mesh {
    for svc in &mut mesh.services {
        if svc.load_balancing.policy == LbPolicy::RoundRobin {
            svc.load_balancing.policy = LbPolicy::LeastRequest;
        }
    }
    mesh
}

/// How JWKS servers are checked: the `--jwks-ca-file` roots and the mesh's
/// trust bundle (as it is at start).
fn jwks_trust(args: &WaypointArgs) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut pems = vec![
        std::fs::read_to_string(&args.trust_bundle)
            .with_context(|| format!("reading {}", args.trust_bundle.display()))?,
    ];
    if let Some(ca) = &args.jwks_ca_file {
        pems.push(
            std::fs::read_to_string(ca)
                .with_context(|| format!("reading --jwks-ca-file {}", ca.display()))?,
        );
    }
    let pems: Vec<&str> = pems.iter().map(String::as_str).collect();
    Ok(jwt::client_config(&pems)?)
}

fn mesh_trust_domain(id: &SpiffeId) -> String {
    id.trust_domain().to_string()
}

/// The waypoint's current certificate, at each handshake.
#[derive(Debug)]
struct OwnCert {
    certs: CertManager,
    id: SpiffeId,
}

impl ResolvesServerCert for OwnCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.certs.current(&self.id).map(|s| s.certified_key())
    }
}
