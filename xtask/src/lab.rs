//! What `demo` and `bench` share: building the binaries they run on a virtual
//! cluster, and checking that a cluster left nothing behind.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::{cmd, setup};

/// Set on an xtask that another one started with `exec` (see [`prepare`]).
const REEXEC: &str = "WEFT_XTASK_REEXEC";

/// Which cargo profile the cluster binaries come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// Fails with a clear message unless this is root; `task` is the subcommand.
pub fn require_root(task: &str) -> Result<()> {
    if !cmd::is_root() {
        bail!(
            "`cargo xtask {task}` builds network namespaces and cgroups and loads eBPF \
             programs, so it must run as root: from a root shell, or with \
             `sudo -E env \"PATH=$PATH\" cargo xtask {task}`"
        );
    }
    if let Some(problem) = weft_tests::cluster::privilege_problem() {
        bail!("`cargo xtask {task}` cannot build a virtual cluster here: {problem}");
    }
    Ok(())
}

/// Makes sure the eBPF object and the `weft` and `weft-tk` binaries of
/// `profile` are built and current, then makes sure this process runs from
/// that profile's directory, re-executing itself from there if not.
///
/// The harness ([`weft_tests::bin_path`], which `Mesh` uses) finds binaries
/// next to the running executable: an xtask in `target/release/` runs the
/// release agent. Child cargo runs never see `CARGO_TARGET_DIR` (see
/// [`cmd::clean_env`]), so everything lands in `<repo>/target/<profile>/`.
pub fn prepare(profile: Profile) -> Result<()> {
    let dir = cmd::repo_root().join("target").join(profile.dir());
    let reexecuted = std::env::var_os(REEXEC).is_some();
    let here = running_from(&dir);
    if !reexecuted {
        let toolchain = setup::run(setup::Apt::Install)?;
        crate::build_ebpf_with(&toolchain)?;
        cmd::step(&format!("building weft and weft-tk ({})", profile.dir()));
        let mut build = cmd::cargo(None);
        build.args(["build", "--bins", "-p", "weft", "-p", "weft-tests"]);
        if profile == Profile::Release {
            build.arg("--release");
        }
        if !here {
            build.args(["-p", "xtask"]);
        }
        cmd::run(&mut build)?;
    }
    if here {
        return Ok(());
    }
    if reexecuted {
        bail!(
            "re-executed xtask still does not run from {} (current executable: {:?})",
            dir.display(),
            std::env::current_exe().ok()
        );
    }
    let exe = dir.join("xtask");
    println!("  ..  continuing with {}", exe.display());
    // Nothing is set up yet that would need a destructor: replacing the
    // process is safe here.
    let err = cmd::tool(exe.to_str().context("non-UTF-8 target path")?)
        .args(std::env::args_os().skip(1))
        .env(REEXEC, "1")
        .exec();
    Err(err).with_context(|| format!("cannot execute {}", exe.display()))
}

/// Whether the running executable lives in `dir`.
fn running_from(dir: &Path) -> bool {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|e| e.canonicalize().ok())
        .and_then(|e| e.parent().map(Path::to_path_buf));
    exe_dir.is_some_and(|d| dir.canonicalize().is_ok_and(|want| want == d))
}

/// What a cluster with id `id` could leave behind: network namespaces, bpffs
/// pins, the cgroup tree and the mesh's temporary directory.
pub fn leftovers(id: &str, cgroup: &Path) -> Vec<PathBuf> {
    let named = |dir: &str| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().contains(id))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut found = named(weft_tests::cluster::NETNS_DIR);
    found.extend(named(weft_tests::mesh::BPFFS));
    found.extend(named(&std::env::temp_dir().to_string_lossy()));
    if cgroup.exists() {
        found.push(cgroup.to_path_buf());
    }
    found
}

/// Reports on the teardown of cluster `id`; fails if something is left.
pub fn check_clean(id: &str, cgroup: &Path) -> Result<()> {
    let left = leftovers(id, cgroup);
    if left.is_empty() {
        cmd::done(&format!(
            "nothing left of cluster {id}: no network namespaces, cgroups or bpffs pins"
        ));
        return Ok(());
    }
    let list: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
    bail!("teardown of cluster {id} left behind: {}", list.join(", "))
}
