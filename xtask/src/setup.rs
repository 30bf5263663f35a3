//! `cargo xtask setup`: what a fresh machine lacks, installed idempotently.
//!
//! Checks are cheap (a few `rustup`/`rustc`/`ldd`/`dpkg-query` calls), so every
//! command that builds or runs something starts with them.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Debian packages the tests, the demo and the measurements run. The L7 tests
/// add `h2load` (nghttp2-client), nginx as an upstream and a reverse-proxy
/// yardstick, and Python's grpcio and websockets for real gRPC and WebSocket
/// peers (`tests/src/l7.rs`).
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "curl",
    "iperf3",
    "bpftool",
    "tcpdump",
    "python3",
    "nghttp2-client",
    "nginx-light",
    "python3-grpcio",
    "python3-websockets",
    // Global rate limits at the waypoint (tests start their own server).
    "redis-server",
    // The CNI reference plugins (bridge, host-local in /usr/lib/cni): the
    // chain `weft cni` is tested behind (tests/src/cni.rs).
    "containernetworking-plugins",
];

/// What `cargo xtask bench` runs on top of [`PACKAGES`]: an HTTP load
/// generator (the HTTP server, nginx, is in [`PACKAGES`] already).
pub const BENCH_PACKAGES: &[&str] = &["wrk"];

/// What to do about missing Debian packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apt {
    /// Install them (needs root).
    Install,
    /// Only warn (a user who is not root and whose privileged tests skip anyway).
    WarnOnly,
}

/// The nightly toolchain as the eBPF build needs it.
#[derive(Debug)]
pub struct Toolchain {
    /// The bpf-linker that links against that LLVM.
    pub bpf_linker: PathBuf,
}

impl Toolchain {
    /// `PATH` with the bpf-linker's directory in front, so the nightly's rustc
    /// finds it even when `~/.cargo/bin` is not on the user's `PATH`.
    pub fn path_with_linker(&self) -> std::ffi::OsString {
        let dir = self.bpf_linker.parent().map(Path::to_path_buf);
        let rest = std::env::var_os("PATH").unwrap_or_default();
        std::env::join_paths(dir.into_iter().chain(std::env::split_paths(&rest))).unwrap_or(rest)
    }
}

/// `cargo xtask setup`: the toolchain, then the Debian packages.
pub fn run(apt: Apt) -> Result<Toolchain> {
    let start = Instant::now();
    let toolchain = toolchain()?;
    packages(apt, PACKAGES)?;
    kubectl(apt)?;
    cmd::done(&format!(
        "setup complete in {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    Ok(toolchain)
}

/// `kubectl` for the `deploy/` tests (`kubectl kustomize`): Debian's own
/// (`kubernetes-client`, 1.20) is too old for the manifests' kustomize, so a
/// newer one must be there (the `kubectl` package of Kubernetes' or Google's
/// apt repository, as on the machines Weft is tested on). Tried with apt-get
/// when missing; the tests say what is missing if it still is.
fn kubectl(apt: Apt) -> Result<()> {
    let works = || {
        std::process::Command::new("kubectl")
            .args(["version", "--client"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works() {
        return Ok(());
    }
    if apt == Apt::Install {
        let _ = cmd::run(cmd::tool("apt-get").args(["install", "-y", "-q", "kubectl"]));
    }
    if !works() {
        eprintln!(
            "warning: no kubectl ≥ 1.27 on PATH: the deploy/ tests need `kubectl kustomize` \
             (install the `kubectl` package from the Kubernetes apt repository)"
        );
    }
    Ok(())
}

/// The toolchain checks: nightly present, its rust-src, a matching bpf-linker.
/// Installs rust-src and builds bpf-linker when needed.
pub fn toolchain() -> Result<Toolchain> {
    cmd::step("checking the toolchain (nightly, rust-src, bpf-linker)");
    let list = cmd::output(cmd::tool("rustup").args(["toolchain", "list"]))
        .context("rustup is required (https://rustup.rs); is it installed and on PATH?")?;
    if !has_nightly(&list) {
        bail!(
            "the `nightly` toolchain is not installed (`rustup toolchain list` shows:\n{}\n). \
             The eBPF programs need it, and it cannot be downloaded from this machine: \
             install it where the network allows (`rustup toolchain install nightly \
             --component rust-src`) and make it available here.",
            list.trim()
        );
    }
    let version = cmd::output(cmd::tool("rustc").args(["+nightly", "-vV"]))?;
    let llvm = field(&version, "LLVM version")
        .context("`rustc +nightly -vV` printed no `LLVM version` line")?;
    let llvm_major = llvm_major(llvm)?;
    let release = field(&version, "release").unwrap_or("?");
    cmd::done(&format!("nightly toolchain: rustc {release}, LLVM {llvm}"));

    let sysroot = PathBuf::from(
        cmd::output(cmd::tool("rustc").args(["+nightly", "--print", "sysroot"]))?.trim(),
    );
    let library = sysroot.join("lib/rustlib/src/rust/library");
    if library.is_dir() {
        cmd::done("rust-src component of nightly");
    } else {
        println!("  ..  rust-src missing for nightly: installing it");
        cmd::run(cmd::tool("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
        if !library.is_dir() {
            bail!(
                "`rustup component add rust-src` succeeded but {} is still missing",
                library.display()
            );
        }
        cmd::done("rust-src installed");
    }

    let lib_dir = sysroot.join("lib");
    let bpf_linker = match check_bpf_linker(find_bpf_linker(), &lib_dir) {
        Ok((path, llvm_lib)) => {
            cmd::done(&format!(
                "bpf-linker: {} (uses the nightly's {llvm_lib})",
                path.display()
            ));
            path
        }
        Err(why) => {
            println!("  ..  bpf-linker needs building: {why}");
            build_bpf_linker(&lib_dir, llvm_major)?;
            // Check the one just installed: another, wrong one may come first
            // on PATH. The eBPF build puts this one's directory first.
            let installed = install_bin_dir().map(|d| d.join("bpf-linker"));
            match check_bpf_linker(installed, &lib_dir) {
                Ok((path, llvm_lib)) => {
                    cmd::done(&format!(
                        "bpf-linker built: {} (uses {llvm_lib})",
                        path.display()
                    ));
                    path
                }
                Err(why) => bail!("bpf-linker was built but is still not usable: {why}"),
            }
        }
    };
    Ok(Toolchain { bpf_linker })
}

/// Whether `rustup toolchain list` shows the floating `nightly` (not only a
/// dated `nightly-2025-…`).
fn has_nightly(list: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name == "nightly"
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        })
}

/// The value of a `key: value` line of `rustc -vV`.
fn field<'a>(version: &'a str, key: &str) -> Option<&'a str> {
    version
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(str::trim)
}

fn llvm_major(version: &str) -> Result<u32> {
    version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM major version from {version:?}"))
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin`, else
/// `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn install_bin_dir() -> Option<PathBuf> {
    let root = std::env::var_os("CARGO_INSTALL_ROOT")
        .or_else(|| std::env::var_os("CARGO_HOME"))
        .map(PathBuf::from)
        .or_else(|| cmd::home().map(|h| h.join(".cargo")))?;
    Some(root.join("bin"))
}

/// Where bpf-linker is: on `PATH`, else where `cargo install` puts it.
fn find_bpf_linker() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(install_bin_dir())
        .map(|dir| dir.join("bpf-linker"))
        .find(|p| p.is_file())
}

/// `Ok((path, libLLVM name))` when the bpf-linker at `path` exists and `ldd`
/// shows it loading a `libLLVM` from the nightly's `lib_dir`; `Err(why not)`
/// otherwise.
fn check_bpf_linker(path: Option<PathBuf>, lib_dir: &Path) -> Result<(PathBuf, String), String> {
    let Some(path) = path else {
        return Err("not found on PATH or in cargo's install directory".into());
    };
    let ldd = match cmd::output(cmd::tool("ldd").arg(&path)) {
        Ok(out) => out,
        Err(e) => return Err(format!("`ldd {}` failed: {e:#}", path.display())),
    };
    match nightly_llvm_in_ldd(&ldd, lib_dir) {
        Some(lib) => Ok((path, lib)),
        None => Err(format!(
            "{} does not load a libLLVM from the current nightly ({})",
            path.display(),
            lib_dir.display()
        )),
    }
}

/// The file name of the `libLLVM*` that `ldd` output resolves inside `lib_dir`.
///
/// The nightly ships `libLLVM-NN-rust-….so` as a linker script pointing at
/// `libLLVM.so.NN.M-rust-…`, so the loaded file (what `ldd` shows) is the latter.
fn nightly_llvm_in_ldd(ldd: &str, lib_dir: &Path) -> Option<String> {
    ldd.lines().find_map(|line| {
        let (name, rest) = line.trim().split_once("=>")?;
        let name = name.trim();
        if !name.starts_with("libLLVM") {
            return None;
        }
        let resolved = Path::new(rest.split_whitespace().next()?);
        (resolved.parent()? == lib_dir).then(|| name.to_owned())
    })
}

/// Builds bpf-linker against the nightly's own `libLLVM` (about 75-100 s).
fn build_bpf_linker(lib_dir: &Path, llvm_major: u32) -> Result<()> {
    let script = std::fs::read_dir(lib_dir)
        .with_context(|| format!("listing {}", lib_dir.display()))?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .min()
        .with_context(|| format!("no libLLVM-*.so in {}", lib_dir.display()))?;
    let lib = script
        .strip_prefix("lib")
        .and_then(|n| n.strip_suffix(".so"))
        .expect("filtered above");
    let nl = lib_dir.display();
    println!("      building it against {script} (takes about 75-100 s)");
    cmd::run(
        cmd::cargo(None)
            .env(
                "RUSTFLAGS",
                format!("-L {nl} -l dylib={lib} -C link-arg=-Wl,-rpath,{nl}"),
            )
            .env_remove("CARGO_BUILD_RUSTFLAGS")
            .args([
                "install",
                "bpf-linker",
                "--no-default-features",
                "--features",
            ])
            .arg(format!("llvm-{llvm_major},no-llvm-linking"))
            .arg("--force"),
    )
}

/// Checks the Debian packages `wanted` and installs missing ones with apt-get.
pub fn packages(apt: Apt, wanted: &[&'static str]) -> Result<()> {
    cmd::step("checking Debian packages");
    let out = cmd::tool("dpkg-query")
        .args(["-W", "-f=${Package} ${Status}\\n"])
        .args(wanted)
        .output()
        .context("cannot run dpkg-query: is this a Debian-based system?")?;
    // dpkg-query exits 1 when some package is unknown; the output still lists the rest.
    let missing = missing_packages(wanted, &String::from_utf8_lossy(&out.stdout));
    if missing.is_empty() {
        cmd::done(&format!("installed: {}", wanted.join(" ")));
        return Ok(());
    }
    let list = missing.join(" ");
    if !cmd::is_root() {
        let hint = format!("missing Debian packages: {list} (as root: apt-get install {list})");
        if apt == Apt::WarnOnly {
            cmd::warn(&hint);
            return Ok(());
        }
        bail!("{hint}");
    }
    println!("  ..  missing: {list}; installing");
    cmd::run(cmd::tool("apt-get").arg("update"))?;
    cmd::run(
        cmd::tool("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y"])
            .args(&missing),
    )?;
    cmd::done(&format!("installed {list}"));
    Ok(())
}

/// The packages of `wanted` that `dpkg-query` output does not show installed.
fn missing_packages(wanted: &[&'static str], dpkg: &str) -> Vec<&'static str> {
    wanted
        .iter()
        .copied()
        .filter(|pkg| {
            !dpkg.lines().any(|l| {
                // `name[:arch] install ok installed`
                l.split_once(' ').is_some_and(|(name, status)| {
                    name.split(':').next() == Some(*pkg) && status.trim() == "install ok installed"
                })
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nightly_detection() {
        let list = "stable-x86_64-unknown-linux-gnu (active, default)\n\
                    nightly-x86_64-unknown-linux-gnu\n1.95.0-x86_64-unknown-linux-gnu\n";
        assert!(has_nightly(list));
        assert!(!has_nightly(
            "stable-x86_64-unknown-linux-gnu (default)\nnightly-2025-01-01-x86_64-unknown-linux-gnu\n"
        ));
        assert!(has_nightly("nightly (default)\n"));
    }

    #[test]
    fn rustc_version_fields() {
        let v = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                 release: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(field(v, "LLVM version"), Some("22.1.4"));
        assert_eq!(field(v, "release"), Some("1.97.0-nightly"));
        assert_eq!(llvm_major("22.1.4").unwrap(), 22);
        assert!(llvm_major("x").is_err());
    }

    #[test]
    fn ldd_must_resolve_llvm_inside_the_nightly() {
        let nl = Path::new("/root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib");
        let good = "\tlinux-vdso.so.1 (0x00007f45603d5000)\n\
            \tlibLLVM.so.22.1-rust-1.97.0-nightly => /root/.rustup/toolchains/nightly-x86_64-unknown-linux-gnu/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f4555800000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f455561e000)\n";
        assert_eq!(
            nightly_llvm_in_ldd(good, nl).as_deref(),
            Some("libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        let system = "\tlibLLVM-19.so.1 => /lib/x86_64-linux-gnu/libLLVM-19.so.1 (0x1)\n";
        assert_eq!(nightly_llvm_in_ldd(system, nl), None);
        let not_found = "\tlibLLVM.so.21.1-rust-1.96.0-nightly => not found\n";
        assert_eq!(nightly_llvm_in_ldd(not_found, nl), None);
    }

    #[test]
    fn dpkg_status_parsing() {
        let out = "iproute2 install ok installed\ncurl install ok installed\n\
                   iperf3 deinstall ok config-files\nbpftool install ok installed\n\
                   python3:amd64 install ok installed\n";
        let wanted = [
            "iproute2", "curl", "iperf3", "bpftool", "tcpdump", "python3",
        ];
        assert_eq!(missing_packages(&wanted, out), vec!["iperf3", "tcpdump"]);
    }
}
