//! Logging. `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` writes one JSON
//! object per line with the event's fields at the top level, for machines.
//!
//! Access logs are events with target `weft::access`, one per connection. They
//! are written in batches, at most [`FLUSH_AFTER`] after the connection closed
//! (as Envoy's file access log does, every second): a line per connection cost
//! each agent a `write` and woke the process reading its output, on the data
//! path. Every other line goes out at once, after the access-log lines before
//! it, and so does everything still waiting when the process exits or panics.

use std::{
    io::{self, Write as _},
    sync::{Condvar, Mutex, MutexGuard, OnceLock},
    time::Duration,
};

use tracing::Metadata;
use tracing_subscriber::{EnvFilter, fmt::MakeWriter};

/// Target of the per-connection access log events.
pub const ACCESS_LOG: &str = "weft::access";

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Swaps the log filter at run time (the admin endpoint's `/logging`).
static RELOAD: OnceLock<Reload> = OnceLock::new();
/// The filter in force, as text.
static CURRENT: Mutex<String> = Mutex::new(String::new());

pub fn init_logging() {
    let directives = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = filter.to_string();
    let json = std::env::var("LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    start_flusher();
    let builder = tracing_subscriber::fmt().with_writer(MakeOut);
    if json {
        let builder = builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    } else {
        let builder = builder.with_env_filter(filter).with_filter_reloading();
        let handle = builder.reload_handle();
        let _ = RELOAD.set(Box::new(move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }));
        builder.init();
    }
}

/// The log filter in force (`RUST_LOG` syntax).
pub fn log_filter() -> String {
    CURRENT.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Replaces the log filter: `debug`, `info,weft::access=off`, ...
pub fn set_log_filter(directives: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(directives).map_err(|e| format!("{directives:?}: {e}"))?;
    let text = filter.to_string();
    let reload = RELOAD.get().ok_or("logging is not set up")?;
    reload(filter)?;
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = text;
    Ok(())
}

/// Access-log lines wait at most this long before they are written.
pub const FLUSH_AFTER: Duration = Duration::from_millis(50);
/// Or until this much is waiting.
const FLUSH_BYTES: usize = 64 << 10;

/// Lines on their way to stdout.
struct Out {
    waiting: Mutex<Vec<u8>>,
    /// Held while writing to stdout, and taken before `waiting` is let go: lines
    /// leave in the order they were logged, and two writes never interleave.
    io: Mutex<()>,
    /// Told when the first line starts waiting.
    pending: Condvar,
    /// Where lines go: stdout (tests use their own).
    sink: fn(&[u8]) -> io::Result<()>,
}

static OUT: Out = Out::new(stdout);

fn stdout(lines: &[u8]) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(lines)?;
    stdout.flush()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Out {
    const fn new(sink: fn(&[u8]) -> io::Result<()>) -> Self {
        Out {
            waiting: Mutex::new(Vec::new()),
            io: Mutex::new(()),
            pending: Condvar::new(),
            sink,
        }
    }

    /// Adds a line; writes everything waiting when `now` or when enough waits.
    fn push(&self, line: &[u8], now: bool) -> io::Result<()> {
        let mut waiting = lock(&self.waiting);
        let first = waiting.is_empty();
        waiting.extend_from_slice(line);
        if now || waiting.len() >= FLUSH_BYTES {
            return self.write_out(waiting);
        }
        if first {
            self.pending.notify_one();
        }
        Ok(())
    }

    fn write_out(&self, mut waiting: MutexGuard<'_, Vec<u8>>) -> io::Result<()> {
        if waiting.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut *waiting);
        let _io = lock(&self.io);
        drop(waiting);
        (self.sink)(&lines)
    }

    /// From a panic hook: writes what is waiting unless this thread (or
    /// another) is in the middle of it, rather than wait and maybe deadlock.
    fn write_out_if_free(&self) {
        let Ok(mut waiting) = self.waiting.try_lock() else {
            return;
        };
        let Ok(_io) = self.io.try_lock() else {
            return;
        };
        let lines = std::mem::take(&mut *waiting);
        drop(waiting);
        let _ = (self.sink)(&lines);
    }

    /// The flusher thread: waits for a first line, lets more gather for
    /// [`FLUSH_AFTER`], writes them all.
    fn run(&self) {
        loop {
            let mut waiting = lock(&self.waiting);
            while waiting.is_empty() {
                waiting = self
                    .pending
                    .wait(waiting)
                    .unwrap_or_else(|e| e.into_inner());
            }
            drop(waiting);
            std::thread::sleep(FLUSH_AFTER);
            let _ = self.write_out(lock(&self.waiting));
        }
    }
}

fn start_flusher() {
    static STARTED: OnceLock<()> = OnceLock::new();
    STARTED.get_or_init(|| {
        let spawned = std::thread::Builder::new()
            .name("weft-log".into())
            .spawn(|| OUT.run());
        if spawned.is_err() {
            // No thread: write every line at once.
            NO_FLUSHER.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // Lines still waiting when a panic takes the process down go out first
        // (unless the panic came from inside the writer).
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            OUT.write_out_if_free();
            previous(info);
        }));
    });
}

static NO_FLUSHER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Writes the access-log lines still waiting (call before the process exits).
pub fn flush() {
    let _ = OUT.write_out(lock(&OUT.waiting));
}

/// What the fmt layer writes each event with: one `write_all` per line.
struct MakeOut;

struct Line {
    batched: bool,
}

impl io::Write for Line {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let now = !self.batched || NO_FLUSHER.load(std::sync::atomic::Ordering::Relaxed);
        OUT.push(buf, now)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for MakeOut {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line { batched: false }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            batched: meta.target() == ACCESS_LOG,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static WRITES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    fn record(lines: &[u8]) -> io::Result<()> {
        lock(&WRITES).push(lines.to_vec());
        Ok(())
    }

    #[test]
    fn access_lines_wait_and_leave_in_order_with_the_next_other_line() {
        let out = Out::new(record);
        out.push(b"access 1\n", false).unwrap();
        out.push(b"access 2\n", false).unwrap();
        assert!(
            lock(&WRITES).is_empty(),
            "an access line was written at once"
        );
        out.push(b"other\n", true).unwrap();
        assert_eq!(
            *lock(&WRITES),
            vec![b"access 1\naccess 2\nother\n".to_vec()],
            "one write, in the order logged"
        );
        // A full batch goes without waiting for the flusher.
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        for _ in 0..FLUSH_BYTES / line.len() {
            out.push(&line, false).unwrap();
        }
        assert_eq!(lock(&WRITES).len(), 2);
        assert_eq!(lock(&WRITES)[1].len(), FLUSH_BYTES);
        // What is left goes out on `write_out` (exit) and nothing twice.
        out.push(b"last\n", false).unwrap();
        out.write_out(lock(&out.waiting)).unwrap();
        out.write_out(lock(&out.waiting)).unwrap();
        assert_eq!(lock(&WRITES).len(), 3);
        assert_eq!(lock(&WRITES)[2], b"last\n");
    }
}
