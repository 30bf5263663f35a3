//! `cargo xtask fuzz`: builds the fuzz targets of `fuzz/` with libFuzzer's
//! coverage instrumentation and runs each for a bounded time, as CI's smoke
//! run of every parser of outside input.
//!
//! Not `cargo fuzz`: it is one more tool to compile on a fresh machine (a
//! minute of CI), for two things done here in a few lines: the nightly's
//! sanitizer-coverage flags (the same as cargo-fuzz passes) and running the
//! binaries. No AddressSanitizer: the targets are safe Rust, where what the
//! fuzzer finds is a panic, an abort, a hang or runaway memory, which
//! libFuzzer reports on its own. The fuzz crate is not a workspace member,
//! so it starts from the workspace's lock file: the same versions as the
//! code it fuzzes.

use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::{cmd, setup};

/// libFuzzer's coverage instrumentation, as cargo-fuzz sets it (its
/// defaults, without a sanitizer), and the checks a release build drops.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// The host target, named so that `RUSTFLAGS` reach the fuzzed code only,
/// not the build scripts and proc macros.
const TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn run(secs: u32, only: Option<String>) -> Result<()> {
    setup::toolchain()?;
    let root = cmd::repo_root();
    let fuzz = root.join("fuzz");
    let lock = fuzz.join("Cargo.lock");
    if !lock.exists() {
        std::fs::copy(root.join("Cargo.lock"), &lock)
            .with_context(|| format!("copying the workspace's Cargo.lock to {}", lock.display()))?;
    }
    let targets = targets(&fuzz, only.as_deref())?;
    cmd::step(&format!(
        "building {} fuzz target(s) (nightly, libFuzzer coverage)",
        targets.len()
    ));
    let target_dir = root.join("target").join("fuzz");
    let mut build = cmd::cargo(Some("nightly"));
    build
        .current_dir(&fuzz)
        .args(["build", "--release", "--target", TARGET, "--target-dir"])
        .arg(&target_dir)
        .env("RUSTFLAGS", RUSTFLAGS);
    for t in &targets {
        build.args(["--bin", t]);
    }
    cmd::run(&mut build)?;
    let mut failed = Vec::new();
    for t in &targets {
        cmd::step(&format!("fuzzing {t} for {secs}s"));
        let corpus = fuzz.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let artifacts = fuzz.join("artifacts").join(t);
        std::fs::create_dir_all(&artifacts)?;
        let mut run = std::process::Command::new(target_dir.join(TARGET).join("release").join(t));
        run.arg(format!("-max_total_time={secs}"))
            .arg("-rss_limit_mb=2048")
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg(&corpus);
        // libFuzzer prints its progress on stderr: its summary line when
        // all went well, the end of its report when not.
        let out = run
            .output()
            .with_context(|| format!("running the fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            let runs = log.lines().rfind(|l| l.starts_with("Done ")).unwrap_or("");
            cmd::done(&format!("{t}: no crash in {secs}s ({runs})"));
        } else {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for line in tail.iter().rev() {
                println!("    {line}");
            }
            failed.push(format!(
                "{t} ({}; the input is in {})",
                out.status,
                artifacts.display()
            ));
        }
    }
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The fuzz targets: `fuzz_targets/*.rs`, or the one named.
fn targets(fuzz: &Path, only: Option<&str>) -> Result<Vec<String>> {
    let mut all: Vec<String> = std::fs::read_dir(fuzz.join("fuzz_targets"))?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            Some(name.strip_suffix(".rs")?.to_owned())
        })
        .collect();
    all.sort();
    match only {
        None => Ok(all),
        Some(t) if all.iter().any(|a| a == t) => Ok(vec![t.to_owned()]),
        Some(t) => bail!("no fuzz target {t}: there are {}", all.join(", ")),
    }
}
