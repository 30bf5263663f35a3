//! Command-line flags. Every flag can also come from a `WEFT_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "weft", version, about = "Weft: a sidecarless service mesh")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node agent: load and attach the eBPF programs, serve enrolled pods.
    Agent(AgentArgs),
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a mesh config file and print every error with its location.
    Validate { file: PathBuf },
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The mesh config file (local mode). Watched: changes apply without a restart.
    #[arg(long, env = "WEFT_CONFIG")]
    pub config: Option<PathBuf>,

    /// This node's name; the agent serves the workloads the config places on it.
    #[arg(long, env = "WEFT_NODE")]
    pub node: Option<String>,

    /// The cgroup (v2) the capture programs attach to: every pod of this node must
    /// live below it, and the agent itself must not. Default: the cgroup2 root.
    #[arg(long, env = "WEFT_CGROUP")]
    pub cgroup: Option<PathBuf>,

    /// Where programs, links and maps are pinned on bpffs.
    #[arg(long, env = "WEFT_BPF_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pub bpf_pin_dir: PathBuf,

    /// How often the config file is checked for changes, in milliseconds.
    #[arg(long, env = "WEFT_CONFIG_POLL_MS", default_value_t = 500)]
    pub config_poll_ms: u64,

    /// Timeout for connecting to an upstream, in milliseconds.
    #[arg(long, env = "WEFT_CONNECT_TIMEOUT_MS", default_value_t = 10_000)]
    pub connect_timeout_ms: u64,

    /// On shutdown, how long connections in flight may take to finish before they
    /// are cut, in milliseconds. New connections are refused at once.
    #[arg(long, env = "WEFT_DRAIN_MS", default_value_t = 5_000)]
    pub drain_ms: u64,

    /// Remove every program, link, map and pin this agent installed, then exit.
    #[arg(long)]
    pub uninstall: bool,
}
