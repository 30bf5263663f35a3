//! Wires a role together from the command line: one file per role (`agent`,
//! `ca`; `waypoint` and `gateway` will sit beside them), and the small commands
//! here.

mod agent;
mod ca;
mod succession;
mod waypoint;

use anyhow::Context as _;

use crate::cli::{Cli, CniArgs, CniCommand, Command, ConfigCommand};

pub use agent::raise_fd_limit;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => agent::run(*args),
        Command::Ca(args) => ca::run(*args),
        Command::Waypoint(args) => waypoint::run(*args),
        Command::Cni(args) => cni(args),
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
            let loaded =
                crate::discovery::file::load(&file, crate::discovery::file::DEFAULT_MAX_BYTES)?;
            let mesh = &loaded.mesh;
            println!(
                "{}: ok ({} workloads, {} enrolled, {} services ({} bound to a waypoint), {} authorization policies, {} peer authentications, {} HTTP routes, {} gRPC routes)",
                file.display(),
                mesh.workloads.len(),
                mesh.enrolled_count(),
                mesh.services.len(),
                mesh.services
                    .iter()
                    .filter(|s| mesh.waypoint_of(s).is_some())
                    .count(),
                mesh.authorization_policies.len(),
                mesh.peer_authentications.len(),
                mesh.http_routes.len(),
                mesh.grpc_routes.len(),
            );
            Ok(())
        }
    }
}

/// `weft cni install` / `uninstall` (the plugin itself never gets here: see
/// `main.rs`).
fn cni(args: CniArgs) -> anyhow::Result<()> {
    use crate::cni::install;
    match args.command {
        None => anyhow::bail!("`weft cni` runs as a plugin only from main"),
        Some(CniCommand::Install {
            bin_dir,
            conf_dir,
            agent_socket,
            exclude_namespaces,
        }) => {
            let exe = std::env::current_exe().context("finding this executable")?;
            let entry = install::Entry {
                agent_socket,
                exclude_namespaces,
            };
            let (list, changed) = install::install(&exe, &bin_dir, &conf_dir, &entry)?;
            tracing::info!(
                binary = %bin_dir.join(install::PLUGIN_TYPE).display(),
                conflist = %list.display(),
                changed,
                "weft-cni installed"
            );
            Ok(())
        }
        Some(CniCommand::Uninstall { bin_dir, conf_dir }) => {
            let changed = install::uninstall(bin_dir.as_deref(), &conf_dir)?;
            let changed: Vec<String> = changed.iter().map(|p| p.display().to_string()).collect();
            tracing::info!(?changed, "weft-cni uninstalled");
            Ok(())
        }
    }
}
