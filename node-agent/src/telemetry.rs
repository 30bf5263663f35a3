//! Logging. `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` writes one JSON
//! object per line with the event's fields at the top level, for machines.
//!
//! Access logs are events with target `weft::access`, one per connection. They
//! are written in batches, at most [`FLUSH_AFTER`] after the connection closed
//! (as Envoy's file access log does, every second): a line per connection cost
//! each agent a `write` and woke the process reading its output, on the data
//! path. Every other line goes out at once, after the access-log lines before
//! it, and so does everything still waiting when the process exits or panics.
//!
//! No thread that logs ever writes to stdout: lines go into a bounded buffer
//! that one flusher thread writes out. If stdout stops draining (a stuck log
//! collector, a full pipe), the flusher blocks, the buffer fills to 8 MiB, and
//! further lines are dropped and counted (`weft_log_lines_dropped_total`):
//! traffic never waits for a log line.

use std::{
    io::{self, Write as _},
    sync::{
        Condvar, Mutex, MutexGuard, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
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
/// The most that waits for stdout: past it lines are dropped (and counted), so
/// a stdout that stops draining costs bounded memory and never blocks a thread
/// that logs.
const MAX_WAITING: usize = 8 << 20;

/// Lines on their way to stdout. Only the flusher thread writes (and, at exit
/// or on a panic, the thread that flushes): a thread that logs only appends to
/// a buffer under a short lock, whatever stdout does.
struct Out {
    waiting: Mutex<Waiting>,
    /// Held while writing to stdout, and taken before `waiting` is let go: lines
    /// leave in the order they were logged, and two writes never interleave.
    io: Mutex<()>,
    /// Told when lines are waiting that should go now.
    pending: Condvar,
    /// Where lines go: stdout (tests use their own).
    sink: fn(&[u8]) -> io::Result<()>,
    /// Lines dropped because `MAX_WAITING` was waiting.
    dropped: AtomicU64,
}

struct Waiting {
    lines: Vec<u8>,
    /// A line that is not an access log waits: write without delay.
    urgent: bool,
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

/// Log lines dropped since the start because stdout did not keep up
/// (`weft_log_lines_dropped_total`).
pub fn dropped_lines() -> u64 {
    OUT.dropped.load(Ordering::Relaxed)
}

impl Out {
    const fn new(sink: fn(&[u8]) -> io::Result<()>) -> Self {
        Out {
            waiting: Mutex::new(Waiting {
                lines: Vec::new(),
                urgent: false,
            }),
            io: Mutex::new(()),
            pending: Condvar::new(),
            sink,
            dropped: AtomicU64::new(0),
        }
    }

    /// Adds a line for the flusher: at once if `now`, else within
    /// [`FLUSH_AFTER`] or when [`FLUSH_BYTES`] wait. Never writes itself (unless
    /// there is no flusher thread), so it never waits for stdout.
    fn push(&self, line: &[u8], now: bool) -> io::Result<()> {
        let mut waiting = lock(&self.waiting);
        if waiting.lines.len() + line.len() > MAX_WAITING {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let was = (
            waiting.lines.is_empty(),
            waiting.urgent,
            waiting.lines.len() >= FLUSH_BYTES,
        );
        waiting.lines.extend_from_slice(line);
        waiting.urgent |= now;
        if NO_FLUSHER.load(Ordering::Relaxed) {
            return self.write_out(waiting);
        }
        // Wake the flusher only when what it waits for changes.
        let full = waiting.lines.len() >= FLUSH_BYTES;
        if was.0 || (now && !was.1) || (full && !was.2) {
            self.pending.notify_one();
        }
        Ok(())
    }

    fn write_out(&self, mut waiting: MutexGuard<'_, Waiting>) -> io::Result<()> {
        if waiting.lines.is_empty() {
            return Ok(());
        }
        let lines = std::mem::take(&mut waiting.lines);
        waiting.urgent = false;
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
        let lines = std::mem::take(&mut waiting.lines);
        drop(waiting);
        let _ = (self.sink)(&lines);
    }

    /// The flusher thread: waits for a line; writes at once what is urgent or
    /// a full batch, and access-log lines after letting more gather for
    /// [`FLUSH_AFTER`]. A stdout that blocks blocks only this thread.
    fn run(&self) {
        loop {
            let mut waiting = lock(&self.waiting);
            while waiting.lines.is_empty() {
                waiting = self
                    .pending
                    .wait(waiting)
                    .unwrap_or_else(|e| e.into_inner());
            }
            if !waiting.urgent && waiting.lines.len() < FLUSH_BYTES {
                waiting = self
                    .pending
                    .wait_timeout_while(waiting, FLUSH_AFTER, |w| {
                        !w.urgent && w.lines.len() < FLUSH_BYTES
                    })
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            let _ = self.write_out(waiting);
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
            NO_FLUSHER.store(true, Ordering::Relaxed);
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

static NO_FLUSHER: AtomicBool = AtomicBool::new(false);

/// Writes the log lines still waiting (call before the process exits).
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
        OUT.push(buf, !self.batched)?;
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
    use std::sync::mpsc;

    use super::*;

    fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    static WRITES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    fn record(lines: &[u8]) -> io::Result<()> {
        lock(&WRITES).push(lines.to_vec());
        Ok(())
    }

    static ORDERED: Out = Out::new(record);

    #[test]
    fn access_lines_wait_and_leave_in_order_with_the_next_other_line() {
        std::thread::spawn(|| ORDERED.run());
        ORDERED.push(b"access 1\n", false).unwrap();
        ORDERED.push(b"access 2\n", false).unwrap();
        ORDERED.push(b"other\n", true).unwrap();
        assert!(wait_until(|| !lock(&WRITES).is_empty()));
        assert_eq!(
            *lock(&WRITES),
            vec![b"access 1\naccess 2\nother\n".to_vec()],
            "one write, in the order logged"
        );
        // Access lines alone go out within FLUSH_AFTER, in one write.
        ORDERED.push(b"access 3\n", false).unwrap();
        ORDERED.push(b"access 4\n", false).unwrap();
        assert!(wait_until(|| lock(&WRITES).len() == 2));
        assert_eq!(lock(&WRITES)[1], b"access 3\naccess 4\n");
        // What is waiting at exit goes out on `write_out`, and nothing twice.
        let _io = lock(&ORDERED.io);
        ORDERED.push(b"last\n", false).unwrap();
        drop(_io);
        ORDERED.write_out(lock(&ORDERED.waiting)).unwrap();
        ORDERED.write_out(lock(&ORDERED.waiting)).unwrap();
        let writes = lock(&WRITES).concat();
        assert_eq!(
            writes,
            b"access 1\naccess 2\nother\naccess 3\naccess 4\nlast\n"
        );
    }

    /// Held by the test: stdout "stops draining" while it is.
    static GATE: Mutex<()> = Mutex::new(());
    static STUCK_WRITES: Mutex<Vec<u8>> = Mutex::new(Vec::new());

    fn stuck(lines: &[u8]) -> io::Result<()> {
        let _open = lock(&GATE);
        lock(&STUCK_WRITES).extend_from_slice(lines);
        Ok(())
    }

    static STUCK: Out = Out::new(stuck);

    #[test]
    fn a_stdout_that_stops_draining_never_blocks_a_thread_that_logs() {
        let gate = lock(&GATE);
        std::thread::spawn(|| STUCK.run());
        let line = [b'x'; 1023]
            .iter()
            .chain(b"\n")
            .copied()
            .collect::<Vec<u8>>();
        let lines = 3 * MAX_WAITING / line.len();
        let (done, pushed) = mpsc::channel();
        let logger = {
            let line = line.clone();
            std::thread::spawn(move || {
                for i in 0..lines {
                    STUCK.push(&line, i % 2 == 0).unwrap();
                }
                let _ = done.send(());
            })
        };
        pushed
            .recv_timeout(Duration::from_secs(10))
            .expect("a thread that logs waited for a stdout that does not drain");
        logger.join().unwrap();
        // At most MAX_WAITING waited, and at most as much was in the write
        // that got stuck: the rest was dropped and counted.
        let dropped = STUCK.dropped.load(Ordering::Relaxed);
        assert!(
            dropped as usize >= lines / 3,
            "{dropped} of {lines} lines dropped"
        );
        // Once stdout drains again, what waited goes out, whole lines only.
        drop(gate);
        assert!(wait_until(|| {
            let written = lock(&STUCK_WRITES).len();
            written > 0 && written + dropped as usize * line.len() == lines * line.len()
        }));
        assert!(lock(&STUCK_WRITES).chunks(line.len()).all(|l| l == line));
    }
}
