//! `weft cni`: the chained CNI plugin that hands each new pod's network
//! namespace to the node's agent (`plugin`), the protocol both sides speak over
//! the agent's Unix socket (`proto`; the agent's side is `node::cni`), and the
//! install into a node's CNI directories (`install`).
//!
//! The runtime runs a plugin by the name of its `type`, so the binary goes
//! into the CNI bin dir as `weft-cni`, and `weft` run under that name is the
//! plugin (see `main.rs`). As a plugin it writes nothing but the CNI result or
//! error to stdout, and logs nothing: stdout belongs to the runtime.

pub mod install;
pub mod plugin;
pub mod proto;

use std::{io::Write as _, process::ExitCode};

/// Runs the plugin with this process's environment and stdin, prints the
/// result or the error, and exits as the spec asks (0, or 1 with an error).
pub fn plugin_main() -> ExitCode {
    let env = std::env::vars().collect();
    let outcome = plugin::run(&env, std::io::stdin().lock());
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(outcome.stdout.as_bytes());
    let _ = stdout.flush();
    if outcome.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
