//! `weft agent`: the node agent, wired together.
//!
//! Order matters: an embedded CA binds first (it writes the bundle this agent
//! reads); the mesh file is read and must be good (there is no last good one to
//! fall back on); the workers start; the kernel capture is installed; the pods
//! are enrolled; the first certificates settle; then the agent reports ready and
//! follows its files by event until a signal.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use anyhow::Context as _;
use tracing::{error, info, warn};

use crate::{
    admin::Admin,
    ca::{
        client::CaClient,
        server::{CaOptions, CaServer},
    },
    certs::CertManager,
    cli::{AgentArgs, Discovery},
    discovery::{self, file, watch::Watch},
    ebpf::{self, Capture},
    hbone::{PoolSettings, client::Pool},
    model::WorkloadKey,
    node::{self, Shared, cni::Cni, pods::Pods, registry::Registry, scan::Scanner},
    tls::TrustBundle,
};

/// eBPF map sizes for the metrics are counted this often (a walk of each map).
const MAP_COUNT_EVERY: Duration = Duration::from_secs(5);
/// Pending enrollments are retried, and orphaned pods looked at, this often.
const REVISIT_EVERY: Duration = Duration::from_secs(1);

pub fn run(args: AgentArgs) -> anyhow::Result<()> {
    if args.uninstall {
        let removed = ebpf::uninstall(&args.bpf_pin_dir)?;
        info!(pin_dir = %args.bpf_pin_dir.display(), removed, "uninstalled");
        return Ok(());
    }
    ebpf::object()?;
    // The mesh file, or none when the mesh comes from Kubernetes.
    let config_path = match args.source.discovery {
        Discovery::File => Some(
            args.config
                .clone()
                .context("--config is required (the mesh config file)")?,
        ),
        Discovery::Kubernetes => None,
    };
    let node = match &args.node {
        Some(n) => n.clone(),
        None => hostname().context("--node not given and the hostname is unreadable")?,
    };
    let cgroup = match &args.cgroup {
        Some(c) => c.clone(),
        None => cgroup2_root().context("--cgroup not given and no cgroup2 mount found")?,
    };
    raise_fd_limit();
    crate::net::route::set_proc_dir(args.proc_dir.clone());

    // The data path runs on the workers; this runtime has the control plane.
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
        // The node's endpoints first, taken from an agent already serving the
        // node (an upgrade's predecessor): from here on the node's readiness
        // is this agent's.
        let endpoints = super::succession::NodeEndpoints::start(
            &args.bpf_pin_dir,
            [args.metrics_addr, args.readiness_addr, args.admin_addr],
        )
        .await?;
        // An embedded CA binds first: it writes the bundle this agent then reads.
        let embedded = match &args.embedded_ca_dir {
            Some(dir) => {
                let config = config_path.as_deref().context(
                    "--embedded-ca-dir signs from the mesh file: give --config, or run `weft ca` beside a Kubernetes agent",
                )?;
                Some(embedded_ca(&args, dir, config).await?)
            }
            None => None,
        };
        let ca_addr = match &embedded {
            Some(ca) => ca.local_addr().map(connectable)?.into(),
            None => args.ca_addr.clone(),
        };
        let bundle_path = match (&args.trust_bundle, &args.embedded_ca_dir) {
            (Some(path), _) => path.clone(),
            (None, Some(dir)) => dir.join("bundle.pem"),
            (None, None) => anyhow::bail!(
                "--trust-bundle is required (the CA writes it as bundle.pem)"
            ),
        };
        // Watch before reading: a change in between is then seen. The bundle is
        // the last path watched.
        let mut watched: Vec<&Path> = config_path.iter().map(PathBuf::as_path).collect();
        watched.push(&bundle_path);
        let mut watch = Watch::new(&watched);
        // The first config must be good: there is no last good one to fall back on.
        let (loaded, kube) = match &config_path {
            Some(path) => (file::load(path, args.config_max_bytes)?, None),
            None => {
                let (loaded, source) = first_from_kubernetes(&args).await?;
                (loaded, Some(source))
            }
        };
        wait_for_bundle(&bundle_path).await;
        let bundle = load_bundle(&bundle_path)?;
        let token = match (&args.ca_token_file, &args.embedded_ca_node_tokens) {
            (Some(path), _) => {
                if let Some(problem) = crate::ca::tokens::loose_permissions(path) {
                    warn!(%problem, "a node-token file others may read");
                }
                crate::ca::tokens::read_token_file(path)?
            }
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
        let mut ca = CaClient::new(ca_addr, token, bundle.clone(), &loaded.mesh.trust_domain)?;
        if let Some(path) = &args.ca_token_file {
            ca = ca.with_token_file(path.clone());
        }
        let bundle = Arc::new(RwLock::new(bundle));
        // One bundle for everything: a root added or removed counts for the CA
        // client as for every listener and the pool.
        let ca = ca.following(bundle.clone());
        let certs = CertManager::new(Arc::new(ca), args.cert_ttl);
        let settings = node::Settings {
            connect_timeout: Duration::from_millis(args.connect_timeout_ms),
            same_node: args.same_node,
            inbound_source: args.inbound_source,
            caps: node::Caps {
                per_listener: args.max_connections_per_listener.max(1),
                per_peer: args.max_connections_per_peer.max(1),
                streams_per_peer: args.hbone_max_streams_per_peer.max(1),
                handshakes: args.hbone_max_handshakes.max(1),
                handshakes_per_peer: args.hbone_max_handshakes_per_peer.max(1),
                handshake_timeout: args.hbone_handshake_timeout,
                hbone_idle: args.hbone_server_idle,
            },
        };
        anyhow::ensure!(
            !args.hbone_ping_timeout.is_zero(),
            "--hbone-ping-timeout must be more than 0 (to stop PINGs, set --hbone-ping-interval 0s)"
        );
        let defaults = PoolSettings::default();
        let pool = Pool::new(
            certs.clone(),
            bundle.clone(),
            PoolSettings {
                max_streams_per_connection: args.hbone_max_streams.max(1),
                spread: args.hbone_spread.unwrap_or(defaults.spread).max(1),
                idle_timeout: args.hbone_idle,
                connect_timeout: settings.connect_timeout,
                ping_interval: args.hbone_ping_interval,
                ping_timeout: args.hbone_ping_timeout,
            },
        );
        let budget = args.max_connections.unwrap_or_else(connection_budget).max(1);
        info!(connections = budget, "the node's connection budget");
        let shared = Arc::new(Shared::new(
            settings,
            &node,
            certs,
            bundle.clone(),
            pool,
            budget,
        ));
        let certs_view = shared.certs.clone();
        let pool_view = shared.pool.clone();
        let invalid_view = kube.as_ref().map(|k| k.invalid.clone());
        let render: crate::metrics::Render = Arc::new(move || {
            let mut page = crate::stats::STATS.render();
            page.push_str(&certs_view.render_metrics());
            page.push_str(&pool_view.render_metrics());
            if let Some(invalid) = &invalid_view {
                page.push_str(&invalid.render());
            }
            page
        });
        let admin = Arc::new(Admin::new(
            shared.clone(),
            node.clone(),
            config_path
                .clone()
                .unwrap_or_else(|| PathBuf::from("kubernetes")),
            render.clone(),
        ));
        tokio::spawn(return_memory_after_floods(shared.clone()));
        tokio::spawn(prune_departed_series(shared.clone()));
        endpoints.serve(
            crate::metrics::handler(render),
            admin.readiness(),
            admin.handler(),
        );

        let mut pods = Pods::new(
            node.clone(),
            Capture::install(&args.bpf_pin_dir, &cgroup)?,
            shared.clone(),
        );
        let mut registry = Registry::default();
        registry.replace(node_netns(&loaded, &node));
        let allowed_shrink = loaded.allow_shrink;
        let view = shared.set_view(loaded.mesh);
        // Pods that run already and that no source names: found in /proc.
        let mut scanner = Scanner::new(&cgroup, &args.proc_dir);
        scanner.scan_if_needed(&view, &mut registry, true);
        pods.apply(&view, &registry);
        admin.config_loaded(allowed_shrink);
        admin.set_enrolled(pods.enrolled_pods());
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
            enrolled = pods.enrolled().count(),
            workers,
            "agent ready"
        );
        // The CNI plugin's requests are answered from here on: the agent has
        // its model and serves its pods.
        let mut cni = match &args.cni_socket {
            Some(path) => {
                let (server, cni) = node::cni::CniServer::bind(path, &node)
                    .with_context(|| format!("binding the CNI socket {}", path.display()))?;
                tokio::spawn(server.run());
                cni
            }
            None => Cni::off(&node),
        };
        cni.set_ready();
        admin.set_ready();
        let follow = Follow {
            config: config_path.as_deref(),
            bundle: &bundle_path,
            node: &node,
            max_bytes: args.config_max_bytes,
        };
        let uninstalling = kube.as_ref().map(|k| k.uninstalling.clone());
        let mut kube = kube.map(|k| KubeFollow {
            updates: k.updates,
            held: None,
            refused_since: None,
        });
        follow
            .run(
                &mut watch,
                &mut kube,
                &mut pods,
                &mut registry,
                &mut cni,
                &mut scanner,
                &shared,
                &admin,
                &bundle,
            )
            .await?;
        // Weft's namespace is being deleted: this agent is not coming back.
        // Looked at again after the drain, in case the deletion reached this
        // agent after its stop did.
        let going = || uninstalling.as_ref().is_some_and(|u| *u.borrow());
        let mut cni_left = false;
        if going() {
            leave_cni(&args);
            cni_left = true;
        }
        pods.shutdown();
        let left = node::access::drain(Duration::from_millis(args.drain_ms)).await;
        let leaving = going();
        if leaving && !cni_left {
            leave_cni(&args);
        }
        let _ = ca_stop.send(());
        if let Some(task) = ca_task {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "the embedded CA failed"),
                Err(e) => error!(error = %e, "the embedded CA task failed"),
            }
        }
        if leaving {
            match ebpf::uninstall(&args.bpf_pin_dir) {
                Ok(removed) => info!(
                    connections_cut = left,
                    removed,
                    "agent stopped and uninstalled from the node (Weft's namespace is being deleted): capture removed"
                ),
                Err(e) => error!(error = %e, "agent stopped; removing the capture failed: run `weft agent --uninstall` on the node"),
            }
        } else {
            info!(
                connections_cut = left,
                "agent stopped; capture stays pinned (use --uninstall to remove it)"
            );
        }
        anyhow::Ok(())
    })
}

/// The network namespaces of this node's workloads, from the file.
fn node_netns(loaded: &file::Loaded, node: &str) -> BTreeMap<WorkloadKey, PathBuf> {
    loaded
        .netns
        .iter()
        .filter(|(key, _)| {
            loaded
                .mesh
                .workloads
                .iter()
                .any(|w| w.node == node && &w.key() == *key)
        })
        .map(|(k, p)| (k.clone(), p.clone()))
        .collect()
}

/// Starts Kubernetes discovery and waits for its first complete mesh: until
/// every kind has been listed the agent serves nothing (it is not ready, so the
/// CNI plugin holds new pods back). Network namespaces are not the API's to
/// know: they reach the registry from the CNI plugin and the `/proc` scan.
async fn first_from_kubernetes(
    args: &AgentArgs,
) -> anyhow::Result<(file::Loaded, discovery::kube::OrderedSource)> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in cluster, or KUBECONFIG)")?;
    let mut opts = args.source.kube_options();
    opts.own_namespace = args.namespace.clone();
    let mut source = discovery::kube::start_ordered(client, opts);
    let mesh = source
        .first()
        .await
        .context("Kubernetes discovery stopped before its first list")?;
    let problems = crate::model::validate::problems(&mesh);
    anyhow::ensure!(
        problems.is_empty(),
        "the mesh from Kubernetes is invalid: {}",
        problems.join("; ")
    );
    info!(
        workloads = mesh.workloads.len(),
        services = mesh.services.len(),
        "mesh listed from Kubernetes"
    );
    let loaded = file::Loaded {
        mesh: Arc::unwrap_or_clone(mesh),
        netns: BTreeMap::new(),
        allow_shrink: false,
    };
    Ok((loaded, source))
}

/// Takes the chained CNI plugin out of the node (its entry, its binary), as
/// `weft cni uninstall` does: first of all on an uninstall, so that no new pod
/// waits for an agent that is not coming back. Without `--cni-conf-dir` the
/// entry stays, and new pods on this node cannot start until it is removed.
fn leave_cni(args: &AgentArgs) {
    let Some(conf_dir) = &args.cni_conf_dir else {
        warn!(
            "Weft's namespace is being deleted, but without --cni-conf-dir the CNI plugin's entry stays: new pods on this node wait until `weft cni uninstall` removes it"
        );
        return;
    };
    match crate::cni::install::uninstall(args.cni_bin_dir.as_deref(), conf_dir) {
        Ok(changed) => info!(
            ?changed,
            "Weft's namespace is being deleted: the CNI plugin is taken out of the node"
        ),
        Err(e) => {
            error!(error = %e, conf_dir = %conf_dir.display(), "Weft's namespace is being deleted, but the CNI plugin could not be taken out: new pods on this node wait until `weft cni uninstall` removes it")
        }
    }
}

/// How long the Kubernetes source must keep saying a sharp shrink (see
/// [`discovery::guard`]) before it is applied. The source never publishes a
/// half-listed kind, so a shrink it holds for this long is the cluster's
/// state (a namespace deleted, a deployment scaled down), not a lost list; the
/// wait only keeps a glitch from unenrolling most of a node at once.
const KUBE_SHRINK_SETTLE: Duration = Duration::from_secs(10);

/// The Kubernetes source as the follow loop sees it.
struct KubeFollow {
    updates: tokio::sync::mpsc::Receiver<discovery::kube::Update>,
    /// A whole mesh the guard refused, with the changes since applied to it:
    /// applied once the source has said it for [`KUBE_SHRINK_SETTLE`].
    held: Option<crate::model::Mesh>,
    /// When the guard first refused the held mesh.
    refused_since: Option<tokio::time::Instant>,
}

/// What the agent follows after start: its files, by event.
struct Follow<'a> {
    config: Option<&'a Path>,
    bundle: &'a Path,
    node: &'a str,
    max_bytes: u64,
}

impl Follow<'_> {
    /// Applies changes of the mesh file and the trust bundle until a shutdown
    /// signal. A bad file, or a change the guard refuses, is reported and the
    /// last good one keeps serving. Nothing is rebuilt while nothing changed.
    #[expect(
        clippy::too_many_arguments,
        reason = "the follow loop's inputs and outputs"
    )]
    async fn run(
        &self,
        watch: &mut Watch,
        kube: &mut Option<KubeFollow>,
        pods: &mut Pods,
        registry: &mut Registry,
        cni: &mut Cni,
        scanner: &mut Scanner,
        shared: &Shared,
        admin: &Admin,
        bundle: &RwLock<TrustBundle>,
    ) -> anyhow::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut count = tokio::time::interval(MAP_COUNT_EVERY);
        count.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut revisit = tokio::time::interval(REVISIT_EVERY);
        revisit.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let bundle_index = usize::from(self.config.is_some());
        loop {
            let shrink_deadline = kube
                .as_ref()
                .and_then(|k| k.refused_since)
                .map(|t| t + KUBE_SHRINK_SETTLE);
            let changed = tokio::select! {
                _ = term.recv() => return Ok(()),
                _ = int.recv() => return Ok(()),
                update = kube_next(kube), if kube.is_some() => {
                    let update = update.context("Kubernetes discovery stopped")?;
                    if let Some(k) = kube.as_mut() {
                        self.apply_kube(k, Some(update), false, pods, registry, shared, admin);
                    }
                    model_applied(shared, pods, registry, cni, scanner);
                    continue;
                }
                _ = tokio::time::sleep_until(shrink_deadline.unwrap_or_else(tokio::time::Instant::now)), if shrink_deadline.is_some() => {
                    if let Some(k) = kube.as_mut() {
                        self.apply_kube(k, None, true, pods, registry, shared, admin);
                    }
                    model_applied(shared, pods, registry, cni, scanner);
                    continue;
                }
                _ = count.tick() => {
                    pods.count_map_entries();
                    pods.clear_stale_handovers();
                    continue;
                }
                _ = revisit.tick(), if pods.needs_revisit() || cni.waiting() => {
                    let view = shared.view();
                    cni.expire(&view, registry);
                    scanner.scan_if_needed(&view, registry, false);
                    pods.revisit(&view, registry);
                    admin.set_enrolled(pods.enrolled_pods());
                    continue;
                }
                call = cni.next() => {
                    cni.handle(call, &shared.view(), pods, registry);
                    admin.set_enrolled(pods.enrolled_pods());
                    continue;
                }
                changed = watch.changed() => changed,
            };
            if let Some(config) = self.config
                && changed.contains(&0)
            {
                self.reload(config, pods, registry, shared, admin);
                model_applied(shared, pods, registry, cni, scanner);
            }
            if changed.contains(&bundle_index) {
                match load_bundle(self.bundle) {
                    Ok(b) => {
                        info!(path = %self.bundle.display(), roots = b.len(), "trust bundle reloaded");
                        *bundle.write().unwrap_or_else(|e| e.into_inner()) = b;
                    }
                    Err(e) => {
                        error!(error = %format!("{e:#}"), "trust bundle rejected; keeping the last good one")
                    }
                }
            }
        }
    }

    /// Applies an update of the Kubernetes source. Changed workloads apply to
    /// the view in force at their cost. A whole mesh goes through the same
    /// guard as the file: a sharp shrink waits [`KUBE_SHRINK_SETTLE`]
    /// (`settled`: the wait is over; `update` is then `None`), and the last good
    /// mesh serves meanwhile.
    #[allow(clippy::too_many_arguments)]
    fn apply_kube(
        &self,
        kube: &mut KubeFollow,
        update: Option<discovery::kube::Update>,
        settled: bool,
        pods: &mut Pods,
        registry: &Registry,
        shared: &Shared,
        admin: &Admin,
    ) {
        match update {
            Some(discovery::kube::Update::Delta(delta)) => match kube.held.as_mut() {
                // Relative to the held mesh, which is the source's latest.
                Some(held) => held.apply_delta(delta),
                None => {
                    tracing::debug!(
                        changed = delta.upserts.len(),
                        removed = delta.removes.len(),
                        "workloads changed in Kubernetes, applying"
                    );
                    let view = shared.apply_delta(delta);
                    pods.apply(&view, registry);
                    admin.config_applied(false);
                    admin.set_enrolled(pods.enrolled_pods());
                    return;
                }
            },
            Some(discovery::kube::Update::Mesh(m)) => kube.held = Some(Arc::unwrap_or_clone(m)),
            None => {}
        }
        let Some(next) = kube.held.as_ref() else {
            return;
        };
        let current = shared.view();
        let policies = current.config().authorization_policies.len();
        if !settled
            && let Err(e) = discovery::guard_workloads(current.workloads(), policies, next, false)
        {
            if kube.refused_since.is_none() {
                kube.refused_since = Some(tokio::time::Instant::now());
            }
            let e = format!(
                "kubernetes: {e}; applied if the API server still says so in {} s",
                KUBE_SHRINK_SETTLE.as_secs()
            );
            warn!(error = %e, "mesh change held back; the last good mesh keeps serving");
            admin.config_rejected(e);
            return;
        }
        kube.refused_since = None;
        let Some(next) = kube.held.take() else {
            return;
        };
        if !current.is_of(&next) {
            info!(
                workloads = next.workloads.len(),
                services = next.services.len(),
                "mesh changed in Kubernetes, applying"
            );
            let view = shared.set_view(next);
            pods.apply(&view, registry);
        }
        admin.config_applied(false);
        admin.set_enrolled(pods.enrolled_pods());
    }

    fn reload(
        &self,
        config: &Path,
        pods: &mut Pods,
        registry: &mut Registry,
        shared: &Shared,
        admin: &Admin,
    ) {
        let current = shared.view();
        let loaded = match file::load(config, self.max_bytes) {
            Ok(loaded) => loaded,
            Err(e) => {
                error!(error = %e, "config rejected; the last good config keeps serving");
                admin.config_rejected(e.to_string());
                return;
            }
        };
        let policies = current.config().authorization_policies.len();
        if let Err(e) = discovery::guard_workloads(
            current.workloads(),
            policies,
            &loaded.mesh,
            loaded.allow_shrink,
        ) {
            let e = format!(
                "{}: {e}; put `allow_shrink: true` in the file if the change is meant",
                config.display()
            );
            error!(error = %e, "config rejected; the last good config keeps serving");
            admin.config_rejected(e);
            return;
        }
        let netns = node_netns(&loaded, self.node);
        let new_registry = {
            let mut r = registry.clone();
            r.replace(netns);
            r
        };
        if !current.is_of(&loaded.mesh) || new_registry != *registry {
            info!(path = %config.display(), "config changed, applying");
            *registry = new_registry;
            let view = shared.set_view(loaded.mesh);
            pods.apply(&view, registry);
        }
        admin.config_applied(loaded.allow_shrink);
        admin.set_enrolled(pods.enrolled_pods());
    }
}

/// The Kubernetes source's next update (`None`: it stopped); never, without
/// one.
async fn kube_next(kube: &mut Option<KubeFollow>) -> Option<discovery::kube::Update> {
    match kube {
        Some(k) => k.updates.recv().await,
        None => std::future::pending().await,
    }
}

/// After a model is applied: pods it enrolls whose namespace no source has
/// named are looked for in /proc, and the CNI ADDs waiting for the model get
/// their answer if it now has one.
fn model_applied(
    shared: &Shared,
    pods: &mut Pods,
    registry: &mut Registry,
    cni: &mut Cni,
    scanner: &mut Scanner,
) {
    let view = shared.view();
    scanner.scan_if_needed(&view, registry, false);
    pods.revisit(&view, registry);
    cni.model_changed(&view, pods);
}

/// Binds the CA that runs inside this agent (`--embedded-ca-dir`).
async fn embedded_ca(args: &AgentArgs, dir: &Path, config: &Path) -> anyhow::Result<CaServer> {
    let node_tokens = args
        .embedded_ca_node_tokens
        .clone()
        .context("--embedded-ca-node-tokens is required with --embedded-ca-dir")?;
    let opts = CaOptions {
        dir: dir.to_owned(),
        mesh: crate::ca::server::MeshSource::File(config.to_owned()),
        auth: crate::ca::server::AgentAuth::NodeTokens(node_tokens),
        listen: args
            .ca_addr
            .socket_addr()
            .context("--ca-addr is where the embedded CA listens: an address, not a name")?,
        metrics_addr: Some(args.embedded_ca_metrics_addr),
        max_ttl: args.embedded_ca_cert_ttl,
        config_max_bytes: args.config_max_bytes,
        // `weft ca`'s defaults; the separate process is where they can be tuned.
        limits: Default::default(),
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

/// Waits until the trust bundle exists: in a cluster it is a ConfigMap the CA
/// publishes on its first start, which may come after the agents (a missing
/// one would otherwise restart the agent in a loop). A bundle that exists but
/// does not load is an error, as before.
pub(super) async fn wait_for_bundle(path: &Path) {
    let mut waited = 0u32;
    while !path.exists() {
        if waited.is_multiple_of(30) {
            warn!(path = %path.display(), "waiting for the trust bundle (the CA publishes it)");
        }
        waited += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub(super) fn load_bundle(path: &Path) -> anyhow::Result<TrustBundle> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the trust bundle {}", path.display()))?;
    TrustBundle::from_pem(&text).with_context(|| format!("trust bundle {}", path.display()))
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

/// Once a minute, drops the metric series of workloads no longer in the model
/// that have been quiet for five minutes (see [`crate::stats::Stats::prune`]).
async fn prune_departed_series(shared: Arc<Shared>) {
    const QUIET_SECS: u64 = 300;
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let view = shared.view();
        let present = |namespace: &str, name: &str| {
            view.workload(&crate::model::WorkloadKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            })
            .is_some()
        };
        let pruned = crate::stats::STATS.prune(&present, QUIET_SECS);
        if pruned > 0 {
            tracing::debug!(pruned, "metric series of departed workloads dropped");
        }
    }
}

/// After a flood (the connections held fell by at least `FLOOD` since the
/// last look), hands the memory it took back to the system. glibc's malloc keeps
/// freed memory in its per-thread arenas, and trims only the top of each heap:
/// what thousands of short-lived TLS connections spread over the arenas would
/// otherwise stay with the agent for good. `malloc_trim` walks the arenas and
/// returns every free page (`madvise`); it costs a few milliseconds, off the
/// data path, and runs at most once per look.
async fn return_memory_after_floods(shared: Arc<Shared>) {
    const FLOOD: usize = 256;
    const LOOK_EVERY: Duration = Duration::from_secs(2);
    let mut tick = tokio::time::interval(LOOK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let peak = shared.budget.take_peak();
        let held = shared.budget.held();
        if peak >= held + FLOOD {
            trim(peak, held);
        }
    }
}

#[cfg(target_env = "gnu")]
fn trim(peak: usize, held: usize) {
    // SAFETY: malloc_trim only walks and releases the allocator's free memory.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(
        peak,
        held,
        released,
        "connections fell from a peak: memory handed back"
    );
}

#[cfg(not(target_env = "gnu"))]
fn trim(_peak: usize, _held: usize) {}

/// The node's budget of sockets for proxied connections by default: the
/// open-file limit less 1024 descriptors kept for everything else (the pool's
/// outbound connections, listeners, files, the CA, eBPF).
fn connection_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct given.
    let nofile = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    } else {
        4096
    };
    nofile.saturating_sub(1024).max(64)
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
