//! `cargo xtask image`: the OCI image of `weft` that `deploy/` runs, built with
//! Debian's buildah and smoke-tested under Debian's podman.
//!
//! The image is `FROM scratch`: one statically linked `weft` (glibc with
//! `+crt-static`, since the musl target cannot be installed here) with the eBPF
//! object embedded, the example mesh file of docs/config.md for `weft config
//! validate`, and nothing else: no shell, no libraries, no package manager. It
//! runs as 65532:65532 by default; the agent's DaemonSet sets root and adds its
//! capabilities.
//!
//! Everything lives under `target/image/`: the release build's own target
//! directory (a static build shares nothing with the ordinary one), and the
//! containers storage that buildah and podman use (vfs, so it works on any
//! filesystem, and apart from the machine's own images).
//!
//! The smoke test runs the image under podman with `--network=none
//! --cgroups=disabled --read-only`. Two things of this VM stand in the way, and
//! are worked around for the smoke test only:
//! - cgroups are hybrid (v1 controllers, cgroup2 at /sys/fs/cgroup/unified),
//!   and crun refuses to start any container then ("cgroups in hybrid mode not
//!   supported"), even with cgroups disabled. Podman runs in a private mount
//!   namespace where cgroup2 is mounted at /sys/fs/cgroup, as on a current
//!   node; the container gets no cgroup of its own either way.
//! - root here lacks CAP_SYS_RESOURCE, and crun's setrlimit of the open-file
//!   and process limits podman asks for fails (podman's defaults are above the
//!   hard limits; the current limits themselves were refused too), so the
//!   smoke test asks for lower ones.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, ensure};

use crate::{cmd, setup};

/// Debian packages `cargo xtask image` uses on top of setup's.
pub const IMAGE_PACKAGES: &[&str] = &["buildah", "podman", "crun", "binutils"];

/// The target the static binary is built for.
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// The user the image runs as by default (distroless's `nonroot`).
const USER: &str = "65532:65532";

/// Where the example mesh file sits in the image.
const EXAMPLE: &str = "/usr/share/weft/examples/mesh.yaml";

/// `cargo xtask image`: build the binary, the image, then run it.
pub fn run(tag: Option<String>) -> Result<()> {
    let start = Instant::now();
    let toolchain = setup::toolchain()?;
    setup::packages(setup::Apt::Install, IMAGE_PACKAGES)?;
    crate::build_ebpf_with(&toolchain)?;
    let root = cmd::repo_root();
    let dir = root.join("target/image");
    std::fs::create_dir_all(&dir)?;
    let version = env!("CARGO_PKG_VERSION");
    let reference = tag.unwrap_or_else(|| format!("localhost/weft:{version}"));

    let built = Instant::now();
    let binary = build_static(&root, &dir)?;
    let build_secs = built.elapsed().as_secs_f64();

    cmd::step("writing the example mesh file (docs/config.md's complete example)");
    let example = dir.join("mesh.yaml");
    let docs = std::fs::read_to_string(root.join("docs/config.md"))?;
    std::fs::write(&example, complete_example(&docs)?)?;

    let assembled = Instant::now();
    let storage = Storage::new(&dir);
    assemble(&storage, &binary, &example, &reference, version)?;
    let assemble_secs = assembled.elapsed().as_secs_f64();
    // The image this build replaced (vfs keeps a full copy of each).
    storage.output("podman", &["image", "prune", "--force"])?;

    smoke(&storage, &reference, version, &dir)?;

    let size = storage
        .output(
            "podman",
            &["image", "inspect", "--format", "{{.Size}}", &reference],
        )?
        .trim()
        .parse::<u64>()
        .context("reading the image size")?;
    cmd::done(&format!(
        "{reference}: {:.1} MiB; binary built in {build_secs:.0} s, image assembled in \
         {assemble_secs:.1} s, {:.0} s in all",
        size as f64 / (1024.0 * 1024.0),
        start.elapsed().as_secs_f64()
    ));
    println!(
        "  push it with: podman --root {} --runroot {} --storage-driver vfs push {reference} REGISTRY/weft:{version}",
        storage.root.display(),
        storage.runroot.display()
    );
    Ok(())
}

/// The static release build into `target/image/`, with the eBPF object that
/// `build-ebpf` made; debug info is stripped from the copy that goes in the
/// image (the release profile keeps it for profiling).
fn build_static(root: &Path, dir: &Path) -> Result<PathBuf> {
    cmd::step("building a static weft (release, +crt-static)");
    let object = root.join("target/ebpf/bpfel-unknown-none/release/weft-ebpf");
    ensure!(object.is_file(), "no eBPF object at {}", object.display());
    cmd::run(
        cmd::cargo(None)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env("WEFT_EBPF_OBJECT", &object)
            .args(["build", "--release", "-p", "weft", "--target", TARGET])
            .arg("--target-dir")
            .arg(dir),
    )?;
    let built = dir.join(TARGET).join("release/weft");
    // A static binary has no interpreter; `file`-like check without `file`.
    let ldd = Command::new("ldd").arg(&built).output()?;
    let said =
        String::from_utf8_lossy(&ldd.stdout).to_string() + &String::from_utf8_lossy(&ldd.stderr);
    ensure!(
        said.contains("not a dynamic executable") || said.contains("statically linked"),
        "{} is not static: {said}",
        built.display()
    );
    let stripped = dir.join("weft");
    cmd::run(
        cmd::tool("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&stripped)
            .arg(&built),
    )?;
    cmd::done(&format!(
        "{} ({:.1} MiB, {:.1} MiB with debug info)",
        stripped.display(),
        mib(&stripped)?,
        mib(&built)?
    ));
    Ok(stripped)
}

/// buildah: scratch, the two files, the image config, commit.
fn assemble(
    storage: &Storage,
    binary: &Path,
    example: &Path,
    reference: &str,
    version: &str,
) -> Result<()> {
    cmd::step(&format!(
        "assembling {reference} with buildah (FROM scratch)"
    ));
    let container = storage.output("buildah", &["from", "scratch"])?;
    let container = container.trim();
    let result = (|| -> Result<()> {
        storage.run(
            "buildah",
            &["copy", "--chmod", "0755", container, &path(binary), "/weft"],
        )?;
        storage.run(
            "buildah",
            &[
                "copy",
                "--chmod",
                "0644",
                container,
                &path(example),
                EXAMPLE,
            ],
        )?;
        let revision = cmd::output(
            cmd::tool("git")
                .current_dir(cmd::repo_root())
                .args(["rev-parse", "HEAD"]),
        )
        .unwrap_or_default();
        let labels = [
            ("org.opencontainers.image.title", "weft".to_owned()),
            (
                "org.opencontainers.image.description",
                "Weft: a sidecarless service mesh (agent, ca, waypoint, cni)".to_owned(),
            ),
            ("org.opencontainers.image.version", version.to_owned()),
            (
                "org.opencontainers.image.revision",
                revision.trim().to_owned(),
            ),
            ("org.opencontainers.image.licenses", "Apache-2.0".to_owned()),
        ];
        let mut config: Vec<String> = vec![
            "config".into(),
            "--entrypoint".into(),
            r#"["/weft"]"#.into(),
            "--cmd".into(),
            "--help".into(),
            "--user".into(),
            USER.into(),
            "--workingdir".into(),
            "/".into(),
            "--os".into(),
            "linux".into(),
            "--arch".into(),
            "amd64".into(),
        ];
        for (key, value) in labels {
            config.push("--label".into());
            config.push(format!("{key}={value}"));
        }
        config.push(container.to_owned());
        let config: Vec<&str> = config.iter().map(String::as_str).collect();
        storage.run("buildah", &config)?;
        storage.run(
            "buildah",
            &["commit", "--format", "oci", "--rm", container, reference],
        )
    })();
    if result.is_err() {
        let _ = storage.output("buildah", &["rm", container]);
    }
    result
}

/// Runs the image: its version, the example file validated, a broken file
/// refused (so validation really ran), the default user, and no shell.
fn smoke(storage: &Storage, reference: &str, version: &str, dir: &Path) -> Result<()> {
    cmd::step(&format!("smoke-testing {reference} under podman"));
    let run = |extra: &[&str], args: &[&str]| -> Result<std::process::Output> {
        let mut all = vec![
            "run",
            "--rm",
            "--network=none",
            "--cgroups=disabled",
            "--read-only",
            "--ulimit=nofile=1024:1024",
            "--ulimit=nproc=1024:1024",
        ];
        all.extend_from_slice(extra);
        all.push(reference);
        all.extend_from_slice(args);
        let podman = storage.command("podman", &all);
        let mut c = if cgroup2_at_sys_fs_cgroup() {
            podman
        } else {
            in_cgroup2_mount_namespace(&podman)
        };
        println!("  $ {}", cmd::display(&c));
        c.output().context("running podman")
    };
    let out = run(&[], &["--version"])?;
    let printed = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && printed.trim() == format!("weft {version}"),
        "`weft --version` in the image: {} {printed}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    cmd::done(&format!("weft --version: {}", printed.trim()));

    let out = run(&[], &["config", "validate", EXAMPLE])?;
    ensure!(
        out.status.success(),
        "`weft config validate {EXAMPLE}` in the image: {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    cmd::done(&format!("weft config validate {EXAMPLE}"));

    let bad = dir.join("bad-mesh.yaml");
    std::fs::write(&bad, "workloads:\n- name: a\n  nmae: b\n")?;
    let mount = format!("{}:/tmp/bad.yaml:ro,Z", path(&bad));
    let out = run(&["-v", &mount], &["config", "validate", "/tmp/bad.yaml"])?;
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("nmae"),
        "a misspelled field should fail `weft config validate`: {} {said}",
        out.status
    );
    cmd::done("a broken mesh file is refused, naming the bad field");

    let out = run(&["--entrypoint", "/bin/sh"], &["-c", "true"])?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("/bin/sh"),
        "the image has a shell, or podman failed otherwise: {} {said}",
        out.status
    );
    cmd::done("no shell in the image");

    let files = image_files(storage, reference)?;
    ensure!(
        files == ["usr/share/weft/examples/mesh.yaml", "weft"],
        "the image holds more than weft and its example: {files:?}"
    );
    cmd::done("the image holds /weft and the example, nothing else");

    let user = storage.output(
        "podman",
        &[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}",
            reference,
        ],
    )?;
    ensure!(user.trim() == USER, "default user {user:?}, not {USER}");
    let out = run(&[], &["agent", "--help"])?;
    ensure!(
        out.status.success(),
        "`weft agent --help` failed in the image"
    );
    cmd::done(&format!("runs as {USER} by default"));
    Ok(())
}

/// Every file (not directory) of the image's filesystem, sorted, relative.
fn image_files(storage: &Storage, reference: &str) -> Result<Vec<String>> {
    let container = storage.output("buildah", &["from", reference])?;
    let container = container.trim();
    let listed = storage
        .output("buildah", &["mount", container])
        .and_then(|root| {
            let root = PathBuf::from(root.trim());
            let mut files = Vec::new();
            walk(&root, &root, &mut files)?;
            files.sort();
            Ok(files)
        });
    storage.output("buildah", &["rm", container])?;
    listed
}

fn walk(root: &Path, dir: &Path, files: &mut Vec<String>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            walk(root, &entry.path(), files)?;
        } else {
            files.push(path(entry.path().strip_prefix(root)?));
        }
    }
    Ok(())
}

/// Whether cgroup2 is what is mounted at /sys/fs/cgroup (a unified host),
/// from /proc/self/mountinfo.
fn cgroup2_at_sys_fs_cgroup() -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounted_at(&info, "/sys/fs/cgroup") == Some("cgroup2")
}

/// The filesystem type of the last mount at `point` in a mountinfo text.
fn mounted_at<'a>(mountinfo: &'a str, point: &str) -> Option<&'a str> {
    mountinfo.lines().rev().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        (left.split(' ').nth(4)? == point).then(|| right.split(' ').next())?
    })
}

/// `command`, run in a private mount namespace where cgroup2 is mounted at
/// /sys/fs/cgroup (see the module comment).
fn in_cgroup2_mount_namespace(command: &Command) -> Command {
    let mut c = cmd::tool("unshare");
    c.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(r#"mount -t cgroup2 cgroup2 /sys/fs/cgroup && exec "$@""#)
        .arg("sh")
        .arg(command.get_program())
        .args(command.get_args());
    c
}

/// The YAML block of docs/config.md that starts `# A complete example`: its
/// unit tests keep it valid.
fn complete_example(docs: &str) -> Result<String> {
    let start = docs
        .find("```yaml\n# A complete example")
        .context("docs/config.md has no complete example")?;
    let body = &docs[start + "```yaml\n".len()..];
    let end = body.find("\n```").context("unterminated yaml block")?;
    Ok(body[..=end].to_owned())
}

/// buildah's and podman's storage, kept under target/image.
struct Storage {
    root: PathBuf,
    runroot: PathBuf,
}

impl Storage {
    fn new(dir: &Path) -> Self {
        Storage {
            root: dir.join("storage"),
            runroot: dir.join("run"),
        }
    }

    fn command(&self, tool: &str, args: &[&str]) -> Command {
        let mut c = cmd::tool(tool);
        c.arg("--root")
            .arg(&self.root)
            .arg("--runroot")
            .arg(&self.runroot)
            .args(["--storage-driver", "vfs"])
            .args(args);
        c
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        cmd::run(&mut self.command(tool, args))
    }

    fn output(&self, tool: &str, args: &[&str]) -> Result<String> {
        cmd::output(&mut self.command(tool, args))
    }
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn mib(p: &Path) -> Result<f64> {
    Ok(std::fs::metadata(p)?.len() as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_complete_example_is_found_by_its_first_line() {
        let docs =
            "intro\n```yaml\nnot: this\n```\n```yaml\n# A complete example (x)\na: 1\n```\nafter\n";
        assert_eq!(
            complete_example(docs).unwrap(),
            "# A complete example (x)\na: 1\n"
        );
        assert!(complete_example("```yaml\na: 1\n```\n").is_err());
    }

    #[test]
    fn the_repository_docs_have_it() {
        let docs = std::fs::read_to_string(cmd::repo_root().join("docs/config.md")).unwrap();
        let example = complete_example(&docs).unwrap();
        assert!(example.contains("workloads:"), "{example}");
    }

    #[test]
    fn the_last_mount_at_a_point_wins() {
        let info = "\
25 1 0:23 / /sys/fs/cgroup rw - tmpfs tmpfs rw
26 25 0:24 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
";
        assert_eq!(mounted_at(info, "/sys/fs/cgroup"), Some("tmpfs"));
        assert_eq!(mounted_at(info, "/sys/fs/cgroup/unified"), Some("cgroup2"));
        let over = format!("{info}40 25 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n");
        assert_eq!(mounted_at(&over, "/sys/fs/cgroup"), Some("cgroup2"));
        assert_eq!(mounted_at(info, "/proc"), None);
    }

    #[test]
    fn every_tool_gets_the_private_storage() {
        let storage = Storage::new(Path::new("/t"));
        let c = storage.command("podman", &["images"]);
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--root",
                "/t/storage",
                "--runroot",
                "/t/run",
                "--storage-driver",
                "vfs",
                "images"
            ]
        );
    }
}
