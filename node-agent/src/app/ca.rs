//! `weft ca`: the certificate authority as its own process.

use anyhow::Context as _;

use crate::{
    ca::{
        satoken::{Check, SaOptions},
        server::{AgentAuth, CaOptions, CaServer, Limits},
    },
    cli::{AgentAuthMode, CaArgs},
};

pub fn run(args: CaArgs) -> anyhow::Result<()> {
    let auth = agent_auth(&args)?;
    let opts = CaOptions {
        dir: args.dir,
        config: args.config,
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
    let (ns, sa) = args
        .agent_service_account
        .split_once('/')
        .filter(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'))
        .context("--agent-service-account is namespace/name")?;
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
        agent_namespace: ns.to_owned(),
        agent_service_account: sa.to_owned(),
    }))
}
