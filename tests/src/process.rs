//! Child processes inside the virtual cluster.
//!
//! [`namespaced_command`] builds a [`Command`] whose child joins a network
//! namespace (and optionally a cgroup) between `fork` and `exec`, and
//! [`Proc`] owns a running child: it collects its output in the background and
//! kills it when dropped, so a failing test never leaks servers.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// Default time limit for run-to-completion helpers such as `Pod::exec`.
pub const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// A [`Command`] for `program` that, in the child, first moves itself into
/// the cgroup whose `cgroup.procs` file is given (if any) and then enters the
/// network namespace at `netns`.
///
/// Both files are opened here, before `fork`, because only async-signal-safe
/// calls are allowed between `fork` and `exec` in a multi-threaded process
/// (the test harness always is). If opening fails, the error is reported when
/// the command is spawned.
pub fn namespaced_command(
    program: impl AsRef<OsStr>,
    netns: &Path,
    cgroup_procs: Option<&Path>,
) -> Command {
    let netns = File::open(netns);
    let procs = cgroup_procs.map(|p| OpenOptions::new().write(true).open(p));
    let mut cmd = Command::new(program);
    let child_setup = move || -> io::Result<()> {
        if let Some(procs) = &procs {
            write_own_pid(fd_or_errno(procs)?)?;
        }
        // SAFETY: setns only reads the fd; it is open (owned by this closure)
        // and refers to a network namespace file.
        if unsafe { libc::setns(fd_or_errno(&netns)?, libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child of a multi-threaded parent.
    // It only calls async-signal-safe functions (getpid, write, setns) on file
    // descriptors opened before the fork, formats into a stack buffer, and
    // builds errors with `from_raw_os_error`/`last_os_error`, which do not
    // allocate. The files are opened with O_CLOEXEC, so the program does not
    // inherit them.
    unsafe {
        cmd.pre_exec(child_setup);
    }
    cmd
}

/// The raw fd of an opened file, or the errno of the failed open, without
/// allocating (this runs between fork and exec).
fn fd_or_errno(file: &io::Result<File>) -> io::Result<RawFd> {
    match file {
        Ok(f) => Ok(f.as_raw_fd()),
        Err(e) => Err(io::Error::from_raw_os_error(
            e.raw_os_error().unwrap_or(libc::EINVAL),
        )),
    }
}

/// Writes the calling process's pid, in decimal, to `fd` (a `cgroup.procs`).
/// Formats by hand into a stack buffer: no allocation after fork.
fn write_own_pid(fd: RawFd) -> io::Result<()> {
    // SAFETY: getpid has no preconditions and is async-signal-safe.
    let mut pid = unsafe { libc::getpid() }.unsigned_abs();
    let mut buf = [0u8; 10]; // u32::MAX has 10 digits
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (pid % 10) as u8;
        pid /= 10;
        if pid == 0 {
            break;
        }
    }
    let digits = &buf[start..];
    // SAFETY: the pointer and length describe the live `digits` slice.
    let written = unsafe { libc::write(fd, digits.as_ptr().cast(), digits.len()) };
    if written < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Output of one child stream, accumulated by a background reader thread.
#[derive(Default)]
struct Captured {
    state: Mutex<CapturedState>,
    changed: Condvar,
}

#[derive(Default)]
struct CapturedState {
    bytes: Vec<u8>,
    eof: bool,
    /// Bytes dropped from the front of `bytes` ([`Proc::forget_stdout_before`]);
    /// offsets count them.
    dropped: usize,
    /// The reader stops reading while set ([`Proc::pause_stdout`]): the pipe
    /// fills and the child's writes block, as with a stuck log collector.
    paused: bool,
}

impl Captured {
    fn lock(&self) -> MutexGuard<'_, CapturedState> {
        // A reader thread cannot panic while holding the lock, but don't turn
        // a poisoned lock into a second panic in a test's error path.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pump(self: Arc<Self>, mut from: impl Read + Send + 'static) -> JoinHandle<()> {
        thread::spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                {
                    let mut state = self.lock();
                    while state.paused {
                        state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
                    }
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        self.lock().bytes.extend_from_slice(&buf[..n]);
                        self.changed.notify_all();
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            self.lock().eof = true;
            self.changed.notify_all();
        })
    }
}

impl CapturedState {
    /// Complete lines so far; after EOF also a final unterminated line.
    fn lines(&self) -> Vec<String> {
        self.lines_after(0).0
    }

    /// Complete lines that start at or after byte `from` (after EOF also a
    /// final unterminated line), and the offset just past them.
    fn lines_after(&self, from: usize) -> (Vec<String>, usize) {
        let start = from.saturating_sub(self.dropped).min(self.bytes.len());
        let rest = &self.bytes[start..];
        let end = self.complete(rest);
        let text = String::from_utf8_lossy(&rest[..end]);
        let lines = text.lines().map(str::to_owned).collect();
        (lines, self.dropped + start + end)
    }

    /// The offset just past the complete lines so far: where a reader that
    /// wants only what comes next starts.
    fn end(&self) -> usize {
        self.dropped + self.complete(&self.bytes)
    }

    /// How much of `rest` (the tail of `bytes`) is complete lines; after EOF,
    /// all of it.
    fn complete(&self, rest: &[u8]) -> usize {
        if self.eof {
            rest.len()
        } else {
            rest.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
        }
    }

    /// Drops the bytes before offset `until` from memory.
    fn forget_before(&mut self, until: usize) {
        let n = until.saturating_sub(self.dropped).min(self.bytes.len());
        self.bytes.drain(..n);
        self.dropped += n;
    }
}

/// A running child process. Dropping it kills (SIGKILL) and reaps the child.
///
/// stdin is `/dev/null`; stdout and stderr are captured by background threads
/// and can be inspected at any time, e.g. with [`Proc::wait_for_json`].
pub struct Proc {
    label: String,
    child: Child,
    stdout: Arc<Captured>,
    stderr: Arc<Captured>,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd` (overriding its stdio as described on [`Proc`]). `label`
    /// names the process in error messages.
    pub fn spawn(cmd: &mut Command, label: impl Into<String>) -> Result<Proc> {
        let label = label.into();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {label}: {cmd:?}"))?;
        let stdout = Arc::new(Captured::default());
        let stderr = Arc::new(Captured::default());
        let out: ChildStdout = child.stdout.take().expect("stdout is piped");
        let err: ChildStderr = child.stderr.take().expect("stderr is piped");
        let readers = vec![stdout.clone().pump(out), stderr.clone().pump(err)];
        Ok(Proc {
            label,
            child,
            stdout,
            stderr,
            readers,
        })
    }

    /// The label given at spawn time.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The child's pid (in the test's pid namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Complete stdout lines printed so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout.lock().lines()
    }

    /// stdout lines that parse as JSON, printed after byte `from` of stdout (0,
    /// or what the last call returned), and the offset to pass next time: a
    /// reader that follows a long-running process reads each line once.
    pub fn json_lines_after(&self, from: usize) -> (Vec<serde_json::Value>, usize) {
        let (lines, next) = self.stdout.lock().lines_after(from);
        let values = lines
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (values, next)
    }

    /// The stdout offset just past the complete lines printed so far, to pass
    /// to [`Proc::json_lines_after`] for only what comes next.
    pub fn stdout_end(&self) -> usize {
        self.stdout.lock().end()
    }

    /// Frees the stdout bytes before offset `until` (one that
    /// [`Proc::json_lines_after`] returned): a reader that follows a
    /// long-running process keeps its memory flat. What was printed before
    /// is gone for every later reader.
    pub fn forget_stdout_before(&self, until: usize) {
        self.stdout.lock().forget_before(until);
    }

    /// Stops reading the child's stdout (`true`) or reads it again (`false`):
    /// once the pipe is full, the child's writes to stdout block.
    pub fn pause_stdout(&self, paused: bool) {
        self.stdout.lock().paused = paused;
        self.stdout.changed.notify_all();
    }

    /// Everything printed to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().bytes).into_owned()
    }

    /// stdout lines so far that parse as JSON.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout_lines()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until some stdout line (including ones already printed)
    /// satisfies `pred` and returns the first such line. Fails on timeout or
    /// when stdout closes without a match.
    pub fn wait_for_line(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.stdout.lock();
        loop {
            if let Some(line) = state.lines().into_iter().find(|l| pred(l)) {
                return Ok(line);
            }
            let eof = state.eof;
            let now = Instant::now();
            if eof || now >= deadline {
                drop(state);
                let why = if eof { "stdout closed" } else { "timed out" };
                bail!(
                    "{}: {why} before the expected line appeared (after {timeout:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.label,
                    self.stdout_lines().join("\n"),
                    self.stderr()
                );
            }
            state = self
                .stdout
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Like [`Proc::wait_for_line`], for the first stdout line that is JSON
    /// and satisfies `pred`.
    pub fn wait_for_json(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let line = self.wait_for_line(timeout, |l| {
            serde_json::from_str::<serde_json::Value>(l).is_ok_and(|v| pred(&v))
        })?;
        Ok(serde_json::from_str(&line)?)
    }

    /// Whether the child has exited, without blocking.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("checking on {}", self.label))
    }

    /// Waits up to `timeout` for the child to exit; on timeout the child is
    /// left running and an error is returned.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} did not exit within {timeout:?}\n--- stderr ---\n{}",
                    self.label,
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the child.
    pub fn signal(&self, signal: libc::c_int) -> Result<()> {
        let pid = libc::pid_t::try_from(self.pid()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions. The child is not
        // reaped before `self` is dropped or waited on, so the pid is still ours.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("sending signal {signal} to {}", self.label));
        }
        Ok(())
    }

    /// Kills the child (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // An error here means the child exited in the meantime; wait() tells.
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("reaping {}", self.label))
    }

    /// Waits up to `timeout` for the child to exit and returns everything it
    /// printed. On timeout the child is killed and an error returned.
    pub fn wait_with_output(mut self, timeout: Duration) -> Result<Output> {
        let status = match self.wait_timeout(timeout) {
            Ok(status) => status,
            Err(e) => {
                let _ = self.kill();
                return Err(e);
            }
        };
        // The pipes can outlive the child if it left descendants holding
        // them; only join the readers when the output is complete.
        let done = |c: &Captured| c.lock().eof;
        let finished = crate::eventually(Duration::from_secs(2), || {
            done(&self.stdout) && done(&self.stderr)
        });
        if finished {
            for reader in self.readers.drain(..) {
                let _ = reader.join();
            }
        }
        Ok(Output {
            status,
            stdout: self.stdout.lock().bytes.clone(),
            stderr: self.stderr.lock().bytes.clone(),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Best effort and silent: the child may already be gone.
        let _ = self.kill();
    }
}

/// Runs `cmd` to completion (bounded by [`EXEC_TIMEOUT`]) and returns its
/// output, whatever its exit status.
pub(crate) fn exec(cmd: &mut Command, label: String) -> Result<Output> {
    Proc::spawn(cmd, label)?.wait_with_output(EXEC_TIMEOUT)
}

/// Runs `cmd` to completion and returns its stdout, failing (with stderr in
/// the message) unless it exits successfully.
pub(crate) fn exec_ok(cmd: &mut Command, label: String) -> Result<String> {
    let out = exec(cmd, label.clone())?;
    if !out.status.success() {
        let how = match (out.status.code(), out.status.signal()) {
            (Some(code), _) => format!("exit code {code}"),
            (None, Some(sig)) => format!("signal {sig}"),
            _ => out.status.to_string(),
        };
        return Err(anyhow!(
            "{label} failed ({how})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8(out.stdout).with_context(|| format!("{label} printed non-UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::CapturedState;

    #[test]
    fn lines_after_reads_each_complete_line_once() {
        let mut s = CapturedState {
            bytes: b"one\ntwo\nthr".to_vec(),
            ..CapturedState::default()
        };
        let (lines, at) = s.lines_after(0);
        assert_eq!((lines, at), (vec!["one".into(), "two".into()], 8));
        s.bytes.extend_from_slice(b"ee\nfour");
        let (lines, at) = s.lines_after(at);
        assert_eq!((lines, at), (vec!["three".to_owned()], 14));
        assert_eq!(s.lines_after(at), (vec![], 14), "nothing new yet");
        s.eof = true;
        assert_eq!(s.lines_after(at), (vec!["four".to_owned()], 18));
        assert_eq!(s.lines(), ["one", "two", "three", "four"]);
    }

    #[test]
    fn forgotten_bytes_keep_their_offsets() {
        let mut s = CapturedState {
            bytes: b"one\ntwo\n".to_vec(),
            ..CapturedState::default()
        };
        let (_, at) = s.lines_after(0);
        s.forget_before(at);
        assert!(s.bytes.is_empty());
        s.bytes.extend_from_slice(b"three\n");
        assert_eq!(s.lines_after(at), (vec!["three".to_owned()], 14));
        assert_eq!(s.lines_after(0), (vec!["three".to_owned()], 14), "gone");
        s.forget_before(3); // already forgotten: nothing happens
        assert_eq!(s.lines(), ["three"]);
    }
}
