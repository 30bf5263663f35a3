//! `weft ca`: the certificate authority as its own process.

use anyhow::Context as _;

use crate::{
    ca::{
        cluster,
        satoken::{Check, SaOptions},
        server::{AgentAuth, CaOptions, CaServer, Limits, MeshSource, Updates},
    },
    cli::{AgentAuthMode, CaArgs, Discovery},
};

pub fn run(args: CaArgs) -> anyhow::Result<()> {
    let auth = agent_auth(&args)?;
    let root_secret = args.root_secret.as_deref().map(namespaced).transpose()?;
    let bundle_configmap = args
        .bundle_configmap
        .as_deref()
        .map(namespaced)
        .transpose()?;
    let kubernetes = args.discovery == Discovery::Kubernetes;
    match (kubernetes, &args.config) {
        (true, Some(_)) => anyhow::bail!("--config is for --discovery file"),
        (false, None) => anyhow::bail!("--config is required with --discovery file"),
        _ => {}
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("weft-ca")
        .build()?;
    runtime.block_on(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let needs_client = kubernetes || root_secret.is_some() || bundle_configmap.is_some();
        let client = match needs_client {
            false => None,
            true => Some(kube::Client::try_default().await.context(
                "--discovery kubernetes, --root-secret and --bundle-configmap need a Kubernetes \
                 client (in cluster, or KUBECONFIG)",
            )?),
        };
        let (mesh, trust_domain) = match (&client, args.config) {
            (Some(client), None) => {
                // Pods and namespaces: which identities run on which node.
                let source = crate::discovery::kube::start_ordered(
                    client.clone(),
                    crate::discovery::kube::KubeOptions {
                        kinds: crate::discovery::kube::Kinds::WorkloadsOnly,
                        trust_domain: args.trust_domain.clone(),
                        ..Default::default()
                    },
                );
                let updates = MeshSource::Updates {
                    trust_domain: args.trust_domain.clone(),
                    updates: Updates::new(source.updates),
                };
                (updates, args.trust_domain)
            }
            (_, Some(path)) => {
                let trust_domain = crate::discovery::file::load(&path, args.config_max_bytes)?
                    .mesh
                    .trust_domain;
                (MeshSource::File(path), trust_domain)
            }
            (None, None) => unreachable!("checked above"),
        };
        if let (Some(client), Some((ns, name))) = (&client, &root_secret) {
            cluster::root_from_secret(client, ns, name, &args.dir, &trust_domain).await?;
        }
        let server = CaServer::bind(CaOptions {
            dir: args.dir,
            mesh,
            auth,
            listen: args.listen,
            metrics_addr: Some(args.metrics_addr),
            max_ttl: args.cert_ttl,
            config_max_bytes: args.config_max_bytes,
            limits: Limits {
                max_connections: args.max_connections,
                max_connections_per_peer: args.max_connections_per_peer,
                first_request_timeout: args.first_request_timeout,
                idle_timeout: args.idle_timeout,
            },
        })
        .await?;
        if let (Some(client), Some((ns, name))) = (&client, &bundle_configmap) {
            cluster::publish_bundle(client, ns, name, &server.bundle_pem()).await?;
            // Into waypoints' namespaces too, and again now and then.
            tokio::spawn(cluster::follow_waypoints(
                client.clone(),
                name.clone(),
                server.bundle_pem(),
                server.waypoint_namespaces(),
                [ns.clone()].into(),
                cluster::REFRESH_EVERY,
            ));
        }
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

/// `namespace/name`, split.
fn namespaced(s: &str) -> anyhow::Result<(String, String)> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_owned(), name.to_owned()))
        }
        _ => anyhow::bail!("{s:?} is not namespace/name"),
    }
}

/// How agents prove their node, from the flags.
fn agent_auth(args: &CaArgs) -> anyhow::Result<AgentAuth> {
    if args.agent_auth == AgentAuthMode::NodeTokens {
        let path = args
            .node_tokens
            .clone()
            .context("--node-tokens is required with --agent-auth node-tokens")?;
        return Ok(AgentAuth::NodeTokens(path));
    }
    if args.node_tokens.is_some() {
        anyhow::bail!("--node-tokens is for --agent-auth node-tokens only");
    }
    let (ns, sa) = namespaced(&args.agent_service_account).context("--agent-service-account")?;
    let check = match (args.agent_auth, &args.sa_jwks_file) {
        (AgentAuthMode::TokenReview, None) => Check::TokenReview,
        (AgentAuthMode::TokenReview, Some(_)) => {
            anyhow::bail!("--sa-jwks-file is for --agent-auth service-account")
        }
        (_, Some(path)) => Check::JwksFile(path.clone()),
        (_, None) => Check::ApiServerJwks,
    };
    Ok(AgentAuth::ServiceAccounts(SaOptions {
        check,
        issuer: args.sa_issuer.clone(),
        audience: args.token_audience.clone(),
        agent_namespace: ns,
        agent_service_account: sa,
    }))
}
