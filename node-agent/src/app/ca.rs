//! `weft ca`: the certificate authority as its own process.

use crate::{
    ca::server::{CaOptions, CaServer, Limits},
    cli::CaArgs,
};

pub fn run(args: CaArgs) -> anyhow::Result<()> {
    let opts = CaOptions {
        dir: args.dir,
        config: args.config,
        node_tokens: args.node_tokens,
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
