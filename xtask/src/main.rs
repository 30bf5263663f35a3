//! `cargo xtask`: Weft's developer commands, one place for what a fresh machine,
//! a developer and CI need.
//!
//! - `setup`: installs what is missing (nightly's rust-src, a bpf-linker built
//!   against the nightly's own LLVM, the Debian tools the tests use); quick and
//!   idempotent when everything is there.
//! - `build-ebpf`: builds the kernel programs with the nightly into
//!   `target/ebpf/`, where `node-agent/build.rs` embeds them from.
//! - `test`: the project's one test command (setup, eBPF, binaries, `cargo test`).
//! - `demo`: a two-node virtual cluster with the mesh, sample traffic and live
//!   access logs.
//! - `image`: the OCI image of `weft` (static, FROM scratch) with buildah,
//!   smoke-tested under podman (see `image.rs`).
//! - `bench`: throughput, latency, connection rate, HTTP, CPU and memory through
//!   Weft versus direct TCP (see `bench.rs` and BENCHMARKS.md).
//!
//! The alias in `.cargo/config.toml` runs this crate with `cargo run`, so every
//! child `cargo` gets an environment cleaned of what that outer run set (see
//! [`cmd::cargo`]).

mod bench;
mod cmd;
mod demo;
mod fuzz;
mod image;
mod lab;
mod setup;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Weft developer commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Check and install the toolchain pieces and tools Weft needs (idempotent).
    Setup,
    /// Build the eBPF programs (nightly, bpfel-unknown-none) into target/ebpf.
    BuildEbpf,
    /// Run the whole test suite, privileged virtual-cluster tests included.
    ///
    /// Extra arguments after `--` go to `cargo test`, e.g.
    /// `cargo xtask test -- -p weft-tests -- --nocapture`.
    Test {
        #[arg(last = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Start a two-node virtual cluster with the mesh, send sample traffic and
    /// show what the agents captured (needs root).
    Demo {
        /// Run the walkthrough once and tear down, without waiting for Ctrl-C.
        #[arg(long)]
        once: bool,
    },
    /// Build the OCI image of `weft` (static binary, FROM scratch, non-root by
    /// default) with buildah, and smoke-test it under podman (needs root).
    Image {
        /// The image reference (default: localhost/weft:<version>, as
        /// deploy/image/kustomization.yaml names it).
        #[arg(long)]
        tag: Option<String>,
    },
    /// Build the fuzz targets of fuzz/ (nightly, libFuzzer coverage) and run
    /// each for a while: a smoke run of every parser of outside input. A
    /// crash fails it, with the input kept in fuzz/artifacts/<target>/.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 20)]
        secs: u32,
        /// One target only (a file name in fuzz/fuzz_targets, without `.rs`).
        target: Option<String>,
    },
    /// Benchmark Weft against direct TCP on a virtual cluster (needs root; release
    /// builds): throughput, latency, connection rate, HTTP, CPU and memory. Writes
    /// target/bench/*.json and the latest results into BENCHMARKS.md.
    Bench {
        /// A short run (one round, short durations) for iteration; under two
        /// minutes once built. Does not touch BENCHMARKS.md.
        #[arg(long)]
        quick: bool,
        /// Record both agents with `perf record --call-graph dwarf` during the
        /// cross-node Weft scenarios, into target/bench/perf-<scenario>.data.
        #[arg(long)]
        perf: bool,
        /// Run one part only: `l4` (the data path) or `l7` (the waypoint).
        /// A full run of one part updates only its section of BENCHMARKS.md.
        #[arg(long, value_enum)]
        only: Option<bench::Part>,
        /// An argument for `weft waypoint` in the L7 part (repeatable), for
        /// experiments: `--waypoint-arg=--workers=1`.
        #[arg(long, allow_hyphen_values = true)]
        waypoint_arg: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result: Result<ExitCode> = match cli.command {
        Task::Setup => setup::run(setup::Apt::Install).map(|_| ExitCode::SUCCESS),
        Task::BuildEbpf => build_ebpf().map(|()| ExitCode::SUCCESS),
        Task::Test { args } => test(&args),
        Task::Demo { once } => demo::run(once).map(|()| ExitCode::SUCCESS),
        Task::Image { tag } => image::run(tag).map(|()| ExitCode::SUCCESS),
        Task::Fuzz { secs, target } => fuzz::run(secs, target).map(|()| ExitCode::SUCCESS),
        Task::Bench {
            quick,
            perf,
            only,
            waypoint_arg,
        } => bench::run(quick, perf, only, waypoint_arg).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask build-ebpf`: the toolchain checks of `setup`, then the build.
fn build_ebpf() -> Result<()> {
    build_ebpf_with(&setup::toolchain()?)
}

/// Builds the kernel crate with a checked nightly `toolchain`.
pub fn build_ebpf_with(toolchain: &setup::Toolchain) -> Result<()> {
    cmd::step("building the eBPF programs (nightly, bpfel-unknown-none)");
    let root = cmd::repo_root();
    let target_dir = root.join("target").join("ebpf");
    let mut build = cmd::cargo(Some("nightly"));
    build
        .current_dir(root.join("ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(&target_dir)
        .env("PATH", toolchain.path_with_linker());
    cmd::run(&mut build)?;
    let object = target_dir.join("bpfel-unknown-none/release/weft-ebpf");
    let size = std::fs::metadata(&object)
        .map_err(|e| {
            anyhow::anyhow!(
                "the build succeeded but {} is missing: {e}",
                object.display()
            )
        })?
        .len();
    cmd::done(&format!(
        "eBPF object: {} ({} KiB); the next build of `weft` embeds it",
        object.display(),
        size / 1024
    ));
    Ok(())
}

/// `cargo xtask test`: setup, eBPF object, every binary, then `cargo test`.
fn test(extra: &[String]) -> Result<ExitCode> {
    let root = cmd::is_root();
    if !root {
        if cmd::ci() {
            anyhow::bail!(
                "CI=true but not running as root: the privileged virtual-cluster tests \
                 (network namespaces, cgroups, eBPF) would fail. Run CI as root."
            );
        }
        cmd::warn(
            "not running as root: the privileged virtual-cluster tests will skip \
             (run as root, or set CI=true to make that an error)",
        );
    }
    let toolchain = setup::run(if root {
        setup::Apt::Install
    } else {
        setup::Apt::WarnOnly
    })?;
    build_ebpf_with(&toolchain)?;
    cmd::step("building every binary (the privileged tests run `weft` and `weft-tk`)");
    cmd::run(cmd::cargo(None).args(["build", "--workspace", "--bins"]))?;
    cmd::step("running the test suite");
    let mut test = cmd::cargo(None);
    test.arg("test");
    // `--workspace` would override a `-p` given to pick packages.
    if !picks_packages(extra) {
        test.arg("--workspace");
    }
    let status = cmd::status(test.args(extra))?;
    if status.success() {
        cmd::done("all tests passed");
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("\nxtask: `cargo test` failed ({status})");
    // Propagate cargo's own code (101 for failed tests); a signal becomes 1.
    Ok(ExitCode::from(
        status
            .code()
            .and_then(|c| u8::try_from(c).ok())
            .unwrap_or(1),
    ))
}

/// Whether extra `cargo test` arguments select packages (before a `--` that
/// starts the test binary's own arguments).
fn picks_packages(args: &[String]) -> bool {
    args.iter().take_while(|a| *a != "--").any(|a| {
        a == "-p"
            || a == "--package"
            || a.starts_with("--package=")
            || (a.starts_with("-p") && a.len() > 2)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_selection_is_detected_before_the_separator() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        assert!(picks_packages(&args("-p weft-tests -- --nocapture")));
        assert!(picks_packages(&args("--package=weft")));
        assert!(picks_packages(&args("-pweft")));
        assert!(!picks_packages(&args("-- -p")));
        assert!(!picks_packages(&args("--release capture")));
    }
}
