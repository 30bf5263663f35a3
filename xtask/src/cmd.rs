//! Running child processes, above all `cargo`, and printing progress.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a subdirectory of the workspace")
        .to_path_buf()
}

/// Variables that the outer `cargo run` (or the rustup proxy in front of it)
/// set for this process, and that would pin a child to the stable toolchain,
/// point it at another target directory or confuse it about which package it
/// builds. Prefixes end in `_`.
const CARGO_RUN_VARS: &[&str] = &[
    "RUSTUP_TOOLCHAIN",
    "RUSTUP_TOOLCHAIN_SOURCE",
    "RUST_RECURSION_COUNT",
    "RUSTC",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "RUSTDOC",
    "CARGO",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_TARGET_DIR",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_CRATE_NAME",
    "CARGO_BIN_NAME",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_RUSTC_CURRENT_DIR",
    "CARGO_MAKEFLAGS",
    "OUT_DIR",
    "CARGO_PKG_",
    "CARGO_CFG_",
];

/// Additionally removed for builds with the nightly toolchain (the eBPF crate,
/// and bpf-linker, which sets its own): flags meant for the host build would
/// break a `bpfel-unknown-none` build.
const HOST_FLAG_VARS: &[&str] = &["RUSTFLAGS", "CARGO_BUILD_RUSTFLAGS"];

/// Removes what `cargo run` set from `cmd`'s environment: see
/// [`CARGO_RUN_VARS`]. `LD_LIBRARY_PATH` loses the entries cargo prepended
/// (the stable toolchain's libraries, this target directory).
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let listed = CARGO_RUN_VARS.iter().any(|v| match v.strip_suffix('_') {
            Some(_) => key.starts_with(v),
            None => key == *v,
        });
        if listed {
            cmd.env_remove(key);
        }
    }
    match cleaned_library_path() {
        Some(path) => cmd.env("LD_LIBRARY_PATH", path),
        None => cmd.env_remove("LD_LIBRARY_PATH"),
    }
}

/// `LD_LIBRARY_PATH` without rustup toolchain directories and without this
/// executable's target directory; `None` if nothing else is left.
fn cleaned_library_path() -> Option<OsString> {
    let value = std::env::var_os("LD_LIBRARY_PATH")?;
    let rustup_home = std::env::var_os("RUSTUP_HOME")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".rustup")));
    let toolchains = rustup_home.map(|h| h.join("toolchains"));
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf));
    let kept: Vec<PathBuf> = std::env::split_paths(&value)
        .filter(|p| {
            !toolchains.as_ref().is_some_and(|t| p.starts_with(t))
                && !exe_dir.as_ref().is_some_and(|d| p.starts_with(d))
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    std::env::join_paths(kept).ok()
}

/// `$HOME`.
pub fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

/// A `cargo` command in the workspace root with a clean environment; with
/// `Some(toolchain)` it runs `cargo +<toolchain>` and host flags are dropped too.
pub fn cargo(toolchain: Option<&str>) -> Command {
    let mut cmd = Command::new("cargo");
    clean_env(&mut cmd);
    if let Some(t) = toolchain {
        cmd.arg(format!("+{t}"));
        for v in HOST_FLAG_VARS {
            cmd.env_remove(v);
        }
    }
    cmd.current_dir(repo_root());
    cmd
}

/// A command for a tool (`rustup`, `rustc`, `ldd`, …) with a clean environment.
pub fn tool(program: &str) -> Command {
    let mut cmd = Command::new(program);
    clean_env(&mut cmd);
    cmd
}

/// The command line as a user would type it.
pub fn display(cmd: &Command) -> String {
    let mut out = String::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value
            && ["RUSTFLAGS", "DEBIAN_FRONTEND"].contains(&key.to_string_lossy().as_ref())
        {
            out.push_str(&format!(
                "{}={} ",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    out.push_str(&cmd.get_program().to_string_lossy());
    for arg in cmd.get_args() {
        out.push(' ');
        out.push_str(&quote(&arg.to_string_lossy()));
    }
    if let Some(dir) = cmd.get_current_dir()
        && dir != repo_root()
    {
        out = format!("(cd {} && {out})", dir.display());
    }
    out
}

/// Shell-quotes `s` if it needs it.
pub fn quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:+,@%[]".contains(c));
    if plain {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Runs `cmd` with inherited stdio, echoing it first, and returns its status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    println!("  $ {}", display(cmd));
    cmd.status()
        .with_context(|| format!("cannot run `{}`", cmd.get_program().to_string_lossy()))
}

/// Like [`status`], but fails unless the command succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; fails (with stderr) unless it succeeds.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run `{}`", cmd.get_program().to_string_lossy()))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the `CI` environment variable is `true`.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Announces a step.
pub fn step(what: &str) {
    println!("\n==> {what}");
}

/// A check that passed or an action that finished.
pub fn done(what: &str) {
    println!("  ok  {what}");
}

pub fn warn(what: &str) {
    eprintln!("  warning: {what}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("--features"), "--features");
        assert_eq!(quote("llvm-22,no-llvm-linking"), "llvm-22,no-llvm-linking");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote(""), "''");
    }

    #[test]
    fn child_cargo_loses_the_outer_runs_variables() {
        let cmd = cargo(Some("nightly"));
        let removed: Vec<String> = cmd
            .get_envs()
            .filter(|(_, v)| v.is_none())
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect();
        // This test itself runs under cargo, which sets these.
        for var in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME", "RUSTFLAGS"] {
            assert!(removed.contains(&var.to_owned()), "{var} kept: {removed:?}");
        }
        assert_eq!(cmd.get_args().next().unwrap(), "+nightly");
    }
}
