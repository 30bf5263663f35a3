//! Wires a role together from the command line: one file per role (`agent`,
//! `ca`; `waypoint` and `gateway` will sit beside them), and the small commands
//! here.

mod agent;
mod ca;
mod waypoint;

use anyhow::Context as _;

use crate::cli::{Cli, Command, ConfigCommand};

pub use agent::raise_fd_limit;

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Agent(args) => agent::run(*args),
        Command::Ca(args) => ca::run(*args),
        Command::Waypoint(args) => waypoint::run(*args),
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
