//! Test harness for Weft's privileged integration tests.
//!
//! The centrepiece is [`Cluster`]: a "virtual cluster" built from real network
//! namespaces joined by veth pairs and a bridge, with one cgroup v2 per pod, so
//! that Weft's eBPF programs and node agent can be exercised against real kernel
//! datapaths without VMs or containers. Every cluster gets names unique to the
//! test process and the test, and tears itself down on `Drop` (which also runs
//! when a test panics).
//!
//! The `weft-tk` binary in this crate is the matching traffic kit: a
//! client/server pair that moves deterministic byte patterns and verifies them
//! end to end, for data-integrity checks through the mesh; its `http-echo`
//! ([`http_echo`]) and the helpers of [`l7`] (curl, h2load, nginx, gRPC and
//! WebSocket peers) are the real servers and clients of the L7 tests.
//!
//! Privileged tests should start with
//!
//! ```no_run
//! if !weft_tests::require_privileged() {
//!     return;
//! }
//! ```

pub mod cluster;
pub mod cni;
pub mod ext_authz;
pub mod http_echo;
pub mod jwt;
pub mod kubeapi;
pub mod l7;
pub mod mesh;
pub mod probe;
pub mod process;
pub mod tk;

use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use cluster::{Cluster, Host, Node, Pod};
pub use mesh::Mesh;
pub use process::Proc;

/// How long [`eventually`] and [`assert_eventually!`] wait by default.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// How often [`eventually`] re-evaluates its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Whether privileged tests (root, network namespaces, cgroup v2) can run here.
///
/// Returns `true` when they can. Otherwise it prints why and returns `false`
/// so the test can skip itself — unless the environment variable `CI` is
/// `true`, in which case silently skipping would hide a broken CI setup, so it
/// panics with the reason instead.
pub fn require_privileged() -> bool {
    let Some(problem) = cluster::privilege_problem() else {
        return true;
    };
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true, but privileged Weft tests cannot run: {problem}");
    }
    eprintln!("skipping privileged test: {problem} (set CI=true to turn this into a failure)");
    false
}

/// Polls `cond` every [`POLL_INTERVAL`] until it returns `true` (→ `true`) or
/// `timeout` has passed (→ `false`). The condition is always evaluated at
/// least once, and once more at the deadline.
pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL.min(deadline - now));
    }
}

/// Asserts that a condition becomes true within a bounded time, polling it
/// instead of sleeping a fixed amount.
///
/// ```no_run
/// # use std::time::Duration;
/// # let ready = || true;
/// weft_tests::assert_eventually!(ready());
/// weft_tests::assert_eventually!(ready(), "server never became ready");
/// weft_tests::assert_eventually!(within Duration::from_secs(30), ready(), "slow thing: {}", 42);
/// ```
///
/// The default patience is [`PATIENCE`] (10 s).
#[macro_export]
macro_rules! assert_eventually {
    (within $timeout:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!(within $timeout, $cond, "`{}`", stringify!($cond))
    };
    (within $timeout:expr, $cond:expr, $($arg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        if !$crate::eventually(timeout, || $cond) {
            panic!("condition not met within {:?}: {}", timeout, format_args!($($arg)+));
        }
    }};
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(within $crate::PATIENCE, $cond)
    };
    ($cond:expr, $($arg:tt)+) => {
        $crate::assert_eventually!(within $crate::PATIENCE, $cond, $($arg)+)
    };
}

/// Writes a secret (a node token) readable by its owner only: created `0600`, and
/// set to `0600` if it existed, so a token is never world-readable, not even
/// between the write and a `chmod`.
pub fn write_secret(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_bytes())
}

/// Path of a workspace binary built into the same target directory as the
/// running test executable.
///
/// Test executables live in `target/<profile>/deps/`, binaries in
/// `target/<profile>/`. Integration tests of *this* crate should prefer
/// `env!("CARGO_BIN_EXE_weft-tk")`; this is for binaries of other workspace
/// crates, which cargo does not build for us.
///
/// # Panics
///
/// If the binary does not exist, with a hint on how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("cannot determine the test executable's path");
    let mut dir = exe
        .parent()
        .expect("test executable has no parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "binary `{name}` not found at {}; build it first (e.g. `cargo build --workspace --bins`, \
         with the same profile as the tests)",
        path.display()
    );
    path
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn secrets_are_written_for_their_owner_only() {
        let path = std::env::temp_dir().join(format!("weft-secret-{}", std::process::id()));
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let _ = std::fs::remove_file(&path);
        super::write_secret(&path, "one").unwrap();
        let fresh = mode(&path);
        // A file that was there, world-readable, is made private too.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        super::write_secret(&path, "two").unwrap();
        let (rewritten, text) = (mode(&path), std::fs::read_to_string(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        assert_eq!((fresh, rewritten), (0o600, 0o600));
        assert_eq!(text, "two");
    }
}
