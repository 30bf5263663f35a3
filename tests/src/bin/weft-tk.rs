//! weft-tk: the Weft test kit, a TCP client/server pair for data-integrity
//! tests through the mesh.
//!
//! ```text
//! weft-tk serve --listen <addr:port>
//! weft-tk client --connect <addr:port> [--upload N] [--download N]
//!                [--respond-after-eof] [--timeout-secs S]
//! weft-tk connect-time --connect <addr:port> --count N [--timeout-secs S]
//! weft-tk echo --listen <addr:port>
//! weft-tk say --connect <addr:port> --message TEXT [--hold-secs S] [--repeat N --interval-ms M] [--timeout-secs S]
//! weft-tk name --listen <addr:port> --name NAME
//! weft-tk who --connect <addr:port> --count N [--concurrency C] [--hold-ms M] [--timeout-secs S]
//! weft-tk rr --connect <addr:port> --count N [--size B] [--warmup N] [--rate R]
//! weft-tk conn-rate --connect <addr:port> --count N [--size B] [--for-secs S]
//! weft-tk hold --connect <addr:port> --count N [--hold-secs S]
//! weft-tk http-rr --connect <addr:port> --count N [--h2] [--path P] [--header 'name: value']... [--alternate 'name: a|b'] [--warmup N] [--rate R]
//! weft-tk redis-rr --connect <addr:port> --count N [--gcra] [--warmup N] [--rate R]
//! weft-tk http-hold --connect <addr:port> --count N [--hold-secs S]
//! weft-tk relay --listen <addr:port> --connect <addr:port> [--workers N]
//! weft-tk http-echo --port P --name NAME [--h2c-only] [--fail-every K]
//! ```
//!
//! The last three are benchmark clients for an `echo` server (`cargo xtask
//! bench`): `rr` times `--size`-byte request/response round trips over one
//! connection, back to back or paced at `--rate` per second; `conn-rate` makes
//! `--count` connections one after another (or as many as `--for-secs` allows),
//! each with one exchange, and times the connects and the whole exchanges,
//! stopping at the first that fails; `hold` opens `--count` connections,
//! checks each with a one-byte echo, prints `{"holding": N}` and keeps them
//! open. `http-rr` and `http-hold` are the same two for an HTTP server
//! (the L7 bench): `http-rr` times GET requests one at a time on one HTTP/1.1
//! or HTTP/2 (`--h2`, prior knowledge) connection, each latency recorded, and
//! `http-hold` opens `--count` HTTP/1.1 keep-alive connections, makes one
//! request on each, and holds them idle. `redis-rr` times `PING`s to a Redis
//! as `rr` times echoes, or with `--gcra` the waypoint's rate-limit script
//! (the L7 bench's yardsticks of a Redis round trip).
//! `echo --workers N` serves connections on N threads instead of one
//! thread per connection, and `--quiet` drops the per-connection JSON lines.
//!
//! `name` answers every connection with its name and a newline, then closes;
//! `who` makes `--count` connections (`--concurrency` at a time, each held until
//! all of its batch have their answer), and prints how many each name answered
//! and how many failed: for load-balancing tests.
//!
//! `echo` sends back whatever it reads until EOF; `say` sends one message, reads
//! the echo and prints it (`--hold-secs` keeps the connection open that long
//! after the echo, for tests that count live connections).
//!
//! Protocol, per connection: the client sends a 24-byte header of three
//! little-endian u64s — `upload` (bytes the client sends after the header),
//! `download` (bytes the server sends), `flags` (bit 0: respond after EOF) —
//! then `upload` bytes of pattern stream 1 and a FIN. The server verifies the
//! upload and the EOF after it, and sends `download` bytes of pattern stream
//! 2, concurrently with reading unless asked to wait for the client's EOF.
//! Both sides print one JSON line per connection on stdout. A server that
//! detects corruption resets the connection (RST) so the client notices too.
//!
//! `relay` is the bench's yardstick for a proxy on each node: a minimal plaintext
//! TCP relay (no TLS, no HTTP/2, no policy), `--workers` threads (default 8)
//! each accepting a connection, connecting on, and copying both ways with
//! `poll`, blocking `read` and `write` of up to 64 KiB, and passing a half-close
//! on, until both directions have ended.
//!
//! `http-echo` is the HTTP/1.1 and h2c upstream of the L7 tests: it answers every
//! request with a JSON description of it and prints the same as a line; see
//! [`weft_tests::http_echo`] for the controls (status, delay, body size, flaky
//! replies, WebSocket echo).
//!
//! Sizes accept binary suffixes: `1K` = 1024, `64M`, `1G`.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const HEADER_LEN: usize = 24;
const FLAG_RESPOND_AFTER_EOF: u64 = 1;
const UPLOAD_SEED: u64 = 1;
const DOWNLOAD_SEED: u64 = 2;
const CHUNK: usize = 64 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Server-side I/O timeout, so a vanished client does not pin a thread forever.
const SERVER_IO_TIMEOUT: Duration = Duration::from_secs(120);

const USAGE: &str = "usage:
  weft-tk serve --listen <addr:port>
  weft-tk client --connect <addr:port> [--upload N] [--download N] [--respond-after-eof] [--timeout-secs S]
  weft-tk connect-time --connect <addr:port> --count N [--timeout-secs S]
  weft-tk echo --listen <addr:port>
  weft-tk say --connect <addr:port> --message TEXT [--hold-secs S] [--repeat N --interval-ms M] [--timeout-secs S]
  weft-tk name --listen <addr:port> --name NAME
  weft-tk who --connect <addr:port> --count N [--concurrency C] [--hold-ms M] [--timeout-secs S]
  weft-tk rr --connect <addr:port> --count N [--size B] [--warmup N] [--rate R] [--timeout-secs S]
  weft-tk conn-rate --connect <addr:port> --count N [--size B] [--for-secs S] [--timeout-secs S]
  weft-tk hold --connect <addr:port> --count N [--hold-secs S] [--timeout-secs S]
  weft-tk http-rr --connect <addr:port> --count N [--h2] [--path P] [--header 'name: value']... [--alternate 'name: a|b'] [--warmup N] [--rate R] [--timeout-secs S]
  weft-tk redis-rr --connect <addr:port> --count N [--gcra] [--warmup N] [--rate R] [--timeout-secs S]
  weft-tk http-hold --connect <addr:port> --count N [--hold-secs S] [--timeout-secs S]
  weft-tk echo --listen <addr:port> [--workers N] [--quiet]
  weft-tk relay --listen <addr:port> --connect <addr:port> [--workers N]
  weft-tk http-echo --port P --name NAME [--h2c-only] [--fail-every K]
  weft-tk ext-authz-grpc --port P
sizes accept K/M/G suffixes (binary)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => serve(&args[1..]),
        Some("client") => client(&args[1..]),
        Some("connect-time") => connect_time(&args[1..]),
        Some("echo") => echo(&args[1..]),
        Some("say") => say(&args[1..]),
        Some("name") => name(&args[1..]),
        Some("who") => who(&args[1..]),
        Some("rr") => rr(&args[1..]),
        Some("conn-rate") => conn_rate(&args[1..]),
        Some("hold") => hold(&args[1..]),
        Some("http-rr") => http_rr(&args[1..]),
        Some("redis-rr") => redis_rr(&args[1..]),
        Some("http-hold") => http_hold(&args[1..]),
        Some("relay") => relay(&args[1..]),
        Some("http-echo") => http_echo(&args[1..]),
        Some("ext-authz-grpc") => ext_authz_grpc(&args[1..]),
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => Err(format!("unknown or missing subcommand\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft-tk: {e}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------
// Pattern streams

/// Deterministic pseudo-random byte streams, addressable by position, so
/// both ends can fill or check any chunk independently of how the transport
/// split the stream.
///
/// A stream is a sequence of 64 KiB blocks; block `k` is a window into a
/// 128 KiB random table (one per seed) that starts at a pseudo-random offset
/// derived from `k`. Filling and checking are then plain memcpy/memcmp, fast
/// even in unoptimised test builds, while corrupted, shifted, duplicated or
/// reordered data still fails verification.
mod pattern {
    const BLOCK: usize = 64 * 1024;

    /// splitmix64 of (stream, index).
    fn mix(seed: u64, index: u64) -> u64 {
        let mut z = ((seed << 56) ^ index).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub struct Pattern {
        seed: u64,
        table: Vec<u8>,
    }

    impl Pattern {
        pub fn new(seed: u64) -> Pattern {
            let table = (0..(2 * BLOCK / 8) as u64)
                .flat_map(|i| mix(seed, i).to_le_bytes())
                .collect();
            Pattern { seed, table }
        }

        pub fn seed(&self) -> u64 {
            self.seed
        }

        /// The stream bytes from `offset` on, as slices of the table.
        fn pieces(&self, mut offset: u64, mut len: usize) -> impl Iterator<Item = &[u8]> {
            std::iter::from_fn(move || {
                if len == 0 {
                    return None;
                }
                let block = offset / BLOCK as u64;
                let within = (offset % BLOCK as u64) as usize;
                let n = (BLOCK - within).min(len);
                // A different stream of mix() (top bit set) picks the window.
                let start = (mix(self.seed | 0x80, block) % BLOCK as u64) as usize + within;
                offset += n as u64;
                len -= n;
                Some(&self.table[start..start + n])
            })
        }

        /// Fills `buf` with the stream from byte `offset` on.
        pub fn fill(&self, offset: u64, buf: &mut [u8]) {
            let mut rest = buf;
            for piece in self.pieces(offset, rest.len()) {
                let (head, tail) = rest.split_at_mut(piece.len());
                head.copy_from_slice(piece);
                rest = tail;
            }
        }

        /// Where `data`, claimed to be the stream from `offset` on, first
        /// differs from it (index into `data`), if anywhere.
        pub fn mismatch(&self, offset: u64, data: &[u8]) -> Option<usize> {
            let mut done = 0;
            for piece in self.pieces(offset, data.len()) {
                let got = &data[done..done + piece.len()];
                if got != piece {
                    return got
                        .iter()
                        .zip(piece)
                        .position(|(a, b)| a != b)
                        .map(|i| done + i);
                }
                done += piece.len();
            }
            None
        }
    }

    /// Checks incoming bytes against a stream.
    pub struct Verifier {
        pattern: Pattern,
        position: u64,
    }

    impl Verifier {
        pub fn new(seed: u64) -> Verifier {
            Verifier {
                pattern: Pattern::new(seed),
                position: 0,
            }
        }

        /// Bytes verified so far.
        pub fn position(&self) -> u64 {
            self.position
        }

        /// Checks the next `data` bytes of the stream.
        pub fn check(&mut self, data: &[u8]) -> Result<(), String> {
            if let Some(i) = self.pattern.mismatch(self.position, data) {
                let mut expected = [0u8];
                self.pattern.fill(self.position + i as u64, &mut expected);
                return Err(format!(
                    "data corrupted at byte {} of stream {}: got {:#04x}, expected {:#04x}",
                    self.position + i as u64,
                    self.pattern.seed(),
                    data[i],
                    expected[0]
                ));
            }
            self.position += data.len() as u64;
            Ok(())
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn fill_is_position_addressable() {
            let p = Pattern::new(7);
            let mut whole = vec![0u8; 3 * BLOCK + 100];
            p.fill(0, &mut whole);
            let ranges = [
                (0, 1),
                (3, 17),
                (5, 6),
                (BLOCK - 3, BLOCK + 5),
                (13, 2 * BLOCK + 7),
                (3 * BLOCK, 3 * BLOCK + 100),
            ];
            for (start, end) in ranges {
                let mut part = vec![0u8; end - start];
                p.fill(start as u64, &mut part);
                assert_eq!(part, whole[start..end], "range {start}..{end}");
                assert_eq!(p.mismatch(start as u64, &part), None);
            }
        }

        #[test]
        fn streams_and_blocks_differ() {
            let (a, b) = (Pattern::new(1), Pattern::new(2));
            let mut x = vec![0u8; 2 * BLOCK];
            let mut y = vec![0u8; 2 * BLOCK];
            a.fill(0, &mut x);
            b.fill(0, &mut y);
            assert_ne!(x, y);
            // Blocks of one stream are not interchangeable.
            assert!(a.mismatch(BLOCK as u64, &x[..BLOCK]).is_some());
            // Nor is data shifted by a byte.
            assert!(a.mismatch(1, &x[..100]).is_some());
        }

        #[test]
        fn verifier_catches_corruption() {
            let mut data = vec![0u8; BLOCK + 64];
            Pattern::new(1).fill(0, &mut data);
            let mut v = Verifier::new(1);
            v.check(&data[..10]).unwrap();
            v.check(&data[10..]).unwrap();
            assert_eq!(v.position(), data.len() as u64);

            let mut v = Verifier::new(1);
            data[BLOCK + 33] ^= 1;
            let err = v.check(&data).unwrap_err();
            assert!(err.contains(&format!("byte {}", BLOCK + 33)), "{err}");
        }
    }
}

/// Sends `len` bytes of stream `seed`, stopping early (with an error) once
/// `abort` is set.
fn send_pattern(
    mut out: &TcpStream,
    seed: u64,
    len: u64,
    abort: Option<&AtomicBool>,
) -> io::Result<u64> {
    let pattern = pattern::Pattern::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let mut sent = 0u64;
    while sent < len {
        if abort.is_some_and(|a| a.load(Ordering::Relaxed)) {
            return Err(io::Error::other("aborted"));
        }
        let n = (len - sent).min(CHUNK as u64) as usize;
        pattern.fill(sent, &mut buf[..n]);
        out.write_all(&buf[..n])?;
        sent += n as u64;
    }
    Ok(sent)
}

/// Outcome of one direction of a transfer: the bytes moved, and what went
/// wrong if anything did.
struct Transfer {
    bytes: u64,
    error: Option<String>,
}

/// Reads and verifies exactly `len` bytes of stream `seed`, then (if
/// `expect_eof`) checks that the peer closed its side right after them.
fn receive_pattern(mut input: &TcpStream, seed: u64, len: u64, expect_eof: bool) -> Transfer {
    let mut verifier = pattern::Verifier::new(seed);
    let mut buf = vec![0u8; CHUNK];
    let fail = |verifier: &pattern::Verifier, error: String| Transfer {
        bytes: verifier.position(),
        error: Some(error),
    };
    while verifier.position() < len {
        let want = (len - verifier.position()).min(CHUNK as u64) as usize;
        match input.read(&mut buf[..want]) {
            Ok(0) => {
                let got = verifier.position();
                return fail(&verifier, format!("early EOF after {got} of {len} bytes"));
            }
            Ok(n) => {
                if let Err(e) = verifier.check(&buf[..n]) {
                    return fail(&verifier, e);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                let got = verifier.position();
                return fail(
                    &verifier,
                    format!("read failed after {got} of {len} bytes: {e}"),
                );
            }
        }
    }
    if expect_eof {
        loop {
            match input.read(&mut buf[..1]) {
                Ok(0) => break,
                Ok(_) => return fail(&verifier, format!("more than the announced {len} bytes")),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return fail(&verifier, format!("waiting for EOF after {len} bytes: {e}"));
                }
            }
        }
    }
    Transfer {
        bytes: verifier.position(),
        error: None,
    }
}

// ---------------------------------------------------------------------------
// serve

fn serve(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(args, &["--listen"], &[])?;
    let addr = resolve(opts.required("--listen")?)?;
    let listener = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    emit(&json!({ "listening": local.to_string() }));
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                thread::spawn(move || handle_connection(stream, peer));
            }
            Err(e) => {
                // E.g. EMFILE: keep serving the connections we have.
                eprintln!("weft-tk serve: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// An echo server: each connection gets back what it sent, line by line as it
/// arrives, until EOF. One JSON line per connection when it ends.
fn echo(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(args, &["--listen", "--workers"], &["--quiet"])?;
    let addr = resolve(opts.required("--listen")?)?;
    let workers: usize = opts
        .get("--workers")
        .unwrap_or("0")
        .parse()
        .map_err(|e| format!("--workers: {e}"))?;
    let quiet = opts.has("--quiet");
    weft::app::raise_fd_limit();
    let listener = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    emit(&json!({ "listening": local.to_string() }));
    let accept = |listener: &TcpListener| accept_retrying(listener, "echo");
    if workers == 0 {
        loop {
            let (stream, peer) = accept(&listener);
            thread::spawn(move || echo_connection(stream, peer, quiet));
        }
    }
    let listener = Arc::new(listener);
    let pool: Vec<_> = (0..workers)
        .map(|_| {
            let listener = Arc::clone(&listener);
            thread::spawn(move || {
                loop {
                    let (stream, peer) = accept(&listener);
                    echo_connection(stream, peer, quiet);
                }
            })
        })
        .collect();
    for worker in pool {
        let _ = worker.join();
    }
    Ok(ExitCode::FAILURE)
}

/// The next connection on `listener`; a failed `accept` (out of file
/// descriptors, say) is reported and retried after a pause.
fn accept_retrying(listener: &TcpListener, who: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept() {
            Ok(conn) => return conn,
            Err(e) => {
                eprintln!("weft-tk {who}: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Echoes one connection until EOF, then half-closes it.
fn echo_connection(mut stream: TcpStream, peer: SocketAddr, quiet: bool) {
    let _ = stream.set_read_timeout(Some(SERVER_IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; 16 * 1024];
    let mut total = 0u64;
    let result = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                total += n as u64;
                if let Err(e) = stream.write_all(&buf[..n]) {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    let _ = stream.shutdown(Shutdown::Write);
    if !quiet {
        emit(&json!({
            "accepted": peer.to_string(),
            "echoed": total,
            "error": result.err().map(|e| e.to_string()),
        }));
    }
}

/// A minimal plaintext relay: the floor the bench compares a proxy hop with.
fn relay(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(args, &["--listen", "--connect", "--workers"], &[])?;
    let addr = resolve(opts.required("--listen")?)?;
    let to = resolve(opts.required("--connect")?)?;
    let workers: usize = opts
        .get("--workers")
        .unwrap_or("8")
        .parse()
        .map_err(|e| format!("--workers: {e}"))?;
    if workers == 0 {
        return Err("--workers: at least 1".into());
    }
    let listener = Arc::new(listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?);
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    emit(&json!({ "listening": local.to_string(), "relaying_to": to.to_string() }));
    let pool: Vec<_> = (0..workers)
        .map(|_| {
            let listener = Arc::clone(&listener);
            thread::spawn(move || {
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let (from, _) = accept_retrying(&listener, "relay");
                    if let Err(e) = relay_connection(from, to, &mut buf) {
                        eprintln!("weft-tk relay: {e}");
                    }
                }
            })
        })
        .collect();
    for worker in pool {
        let _ = worker.join();
    }
    Ok(ExitCode::FAILURE)
}

/// The HTTP echo server of the L7 tests, on every address of the pod.
fn http_echo(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(args, &["--port", "--name", "--fail-every"], &["--h2c-only"])?;
    let port: u16 = opts
        .required("--port")?
        .parse()
        .map_err(|e| format!("--port: {e}"))?;
    let fail_every = match opts.get("--fail-every") {
        None => None,
        Some(k) => Some(
            k.parse::<u64>()
                .ok()
                .filter(|&k| k > 0)
                .ok_or_else(|| format!("--fail-every {k:?}: expected a count of at least 1"))?,
        ),
    };
    let config = weft_tests::http_echo::Config {
        name: opts.required("--name")?.to_owned(),
        h2c_only: opts.has("--h2c-only"),
        fail_every,
    };
    weft::app::raise_fd_limit();
    let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let listener = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        emit(&json!({ "listening": local.to_string(), "name": config.name }));
        weft_tests::http_echo::serve(listener, config)
            .await
            .map_err(|e| e.to_string())
    })?;
    Ok(ExitCode::FAILURE)
}

/// A gRPC ext_authz server (see [`weft_tests::ext_authz`]).
fn ext_authz_grpc(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(args, &["--port"], &[])?;
    let port: u16 = opts
        .required("--port")?
        .parse()
        .map_err(|e| format!("--port: {e}"))?;
    let addr = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let listener = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
        emit(&json!({ "listening": port }));
        weft_tests::ext_authz::serve(listener)
            .await
            .map_err(|e| e.to_string())
    })?;
    Ok(ExitCode::FAILURE)
}

/// Connects to `to` and copies between it and `from` until both directions
/// have ended, passing each EOF on as a half-close.
fn relay_connection(from: TcpStream, to: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
    let onward = TcpStream::connect(to)?;
    from.set_nodelay(true)?;
    onward.set_nodelay(true)?;
    let socks = [&from, &onward];
    let mut open = [true, true];
    while open[0] || open[1] {
        let mut fds: Vec<libc::pollfd> = (0..2)
            .filter(|&i| open[i])
            .map(|i| libc::pollfd {
                fd: socks[i].as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of `fds.len()` pollfds for the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for p in fds.iter().filter(|p| p.revents != 0) {
            let i = usize::from(p.fd != from.as_raw_fd());
            let (mut src, mut dst) = (socks[i], socks[1 - i]);
            match src.read(buf)? {
                0 => {
                    open[i] = false;
                    let _ = dst.shutdown(Shutdown::Write);
                }
                n => dst.write_all(&buf[..n])?,
            }
        }
    }
    Ok(())
}

/// Answers every connection with `--name` and a newline, then closes it.
fn name(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(args, &["--listen", "--name"], &[])?;
    let addr = resolve(opts.required("--listen")?)?;
    let line = format!("{}\n", opts.required("--name")?);
    let listener = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    emit(&json!({ "listening": local.to_string() }));
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let line = line.clone();
                thread::spawn(move || {
                    let _ = stream.set_write_timeout(Some(SERVER_IO_TIMEOUT));
                    let _ = stream.write_all(line.as_bytes());
                    let _ = stream.shutdown(Shutdown::Write);
                    // Wait for the client's close, so its read sees the FIN first.
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                    let _ = stream.read(&mut [0u8; 64]);
                });
            }
            Err(e) => {
                eprintln!("weft-tk name: accept failed: {e}");
                thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Makes `--count` connections and tallies the names that answer.
fn who(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &[
            "--connect",
            "--count",
            "--concurrency",
            "--timeout-secs",
            "--hold-ms",
        ],
        &[],
    )?;
    let hold = Duration::from_millis(
        opts.get("--hold-ms")
            .unwrap_or("0")
            .parse()
            .map_err(|e| format!("--hold-ms: {e}"))?,
    );
    weft::app::raise_fd_limit();
    let addr = resolve(opts.required("--connect")?)?;
    let count: usize = opts
        .required("--count")?
        .parse()
        .map_err(|e| format!("--count: {e}"))?;
    let concurrency: usize = opts
        .get("--concurrency")
        .unwrap_or("1")
        .parse()
        .map_err(|e| format!("--concurrency: {e}"))?;
    if count == 0 || concurrency == 0 {
        return Err("--count and --concurrency must be at least 1".into());
    }
    let timeout = opts.timeout()?;
    let ask = |held: &mut Vec<TcpStream>| -> Result<String, String> {
        let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match s.read(&mut byte) {
                Ok(0) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&buf))),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) => buf.push(byte[0]),
                Err(e) => return Err(e.to_string()),
            }
        }
        held.push(s);
        String::from_utf8(buf).map_err(|e| e.to_string())
    };
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    let mut failures = 0u64;
    let mut first_error = None;
    let mut done = 0;
    while done < count {
        let batch = concurrency.min(count - done);
        // Hold every connection of the batch open until all have answered, so
        // `concurrency` of them are live at once.
        let mut held = Vec::with_capacity(batch);
        for _ in 0..batch {
            match ask(&mut held) {
                Ok(name) => *counts.entry(name).or_default() += 1,
                Err(e) => {
                    failures += 1;
                    first_error.get_or_insert(e);
                }
            }
        }
        if !hold.is_zero() {
            emit(&json!({ "holding": held.len() }));
            thread::sleep(hold);
        }
        drop(held);
        done += batch;
    }
    emit(&json!({
        "ok": failures == 0,
        "counts": counts,
        "failures": failures,
        "error": first_error,
    }));
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Sends `--message`, reads its echo back, prints `{"ok", "reply"}`.
fn say(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &[
            "--connect",
            "--message",
            "--hold-secs",
            "--repeat",
            "--interval-ms",
            "--timeout-secs",
        ],
        &[],
    )?;
    let addr = resolve(opts.required("--connect")?)?;
    let message = opts.required("--message")?.as_bytes().to_vec();
    let hold = match opts.get("--hold-secs") {
        Some(s) => {
            Duration::from_secs_f64(s.parse().map_err(|_| format!("bad --hold-secs {s:?}"))?)
        }
        None => Duration::ZERO,
    };
    let repeat: usize = opts
        .get("--repeat")
        .unwrap_or("1")
        .parse()
        .map_err(|e| format!("--repeat: {e}"))?;
    let interval = Duration::from_millis(
        opts.get("--interval-ms")
            .unwrap_or("0")
            .parse()
            .map_err(|e| format!("--interval-ms: {e}"))?,
    );
    let timeout = opts.timeout()?;
    let start = Instant::now();
    let run = || -> Result<Vec<u8>, String> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut reply = vec![0u8; message.len()];
        // `--repeat` exchanges on the one connection, `--interval-ms` apart; each
        // echo must come back intact.
        for i in 0..repeat.max(1) {
            if i > 0 {
                thread::sleep(interval);
            }
            stream
                .write_all(&message)
                .map_err(|e| format!("send {} of {repeat}: {e}", i + 1))?;
            stream
                .read_exact(&mut reply)
                .map_err(|e| format!("reading echo {} of {repeat}: {e}", i + 1))?;
            if reply != message {
                return Err(format!("echo {} of {repeat} differs", i + 1));
            }
        }
        thread::sleep(hold);
        stream
            .shutdown(Shutdown::Write)
            .map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        stream
            .read_to_end(&mut rest)
            .map_err(|e| format!("reading to EOF: {e}"))?;
        reply.extend(rest);
        Ok(reply)
    };
    let result = run();
    let ok = result.as_ref().is_ok_and(|r| *r == message);
    emit(&json!({
        "ok": ok,
        "reply": result.as_ref().ok().map(|r| String::from_utf8_lossy(r).into_owned()),
        "error": result.err(),
        "elapsed_ms": start.elapsed().as_secs_f64() * 1000.0,
    }));
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A listening socket; for `[::]` also accepting IPv4 (IPV6_V6ONLY off), so
/// one server covers both families regardless of the system default.
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a freshly created socket that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let fd = socket.as_raw_fd();
    let on: libc::c_int = 1;
    set_option(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &on)?;
    if let SocketAddr::V6(v6) = addr
        && v6.ip().is_unspecified()
    {
        let off: libc::c_int = 0;
        set_option(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, &off)?;
    }
    let (storage, len) = to_sockaddr(addr);
    // SAFETY: storage holds a valid sockaddr of `len` bytes for this family.
    if unsafe { libc::bind(fd, (&raw const storage).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain listen(2) on our socket.
    if unsafe { libc::listen(fd, 1024) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(TcpListener::from(socket))
}

fn to_sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: v6.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn set_option<T>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live T and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes the final close send RST instead of FIN.
fn set_linger_zero(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_option(
        stream.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_LINGER,
        &linger,
    )
}

/// What the server learned about one connection.
struct Served {
    received: u64,
    sent: u64,
    /// No header at all: a bare connect/close, e.g. from `connect-time`.
    probe: bool,
    error: Option<String>,
}

fn handle_connection(stream: TcpStream, peer: SocketAddr) {
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let served = serve_connection(&stream);
    if let Some(error) = &served.error {
        if !served.probe {
            eprintln!("weft-tk serve: connection from {peer}: {error}; resetting it");
        }
        // Dropping the last handle to the socket now sends RST. A concurrent
        // sender holds a clone until it sees the abort flag.
        let _ = set_linger_zero(&stream);
    }
    emit(&json!({
        "accepted": peer.to_string(),
        "local": local,
        "upload_ok": served.error.is_none() && !served.probe,
        "bytes": served.received,
        "sent": served.sent,
        "probe": served.probe,
        "error": served.error,
    }));
}

fn serve_connection(stream: &TcpStream) -> Served {
    let mut served = Served {
        received: 0,
        sent: 0,
        probe: false,
        error: None,
    };
    let _ = stream.set_read_timeout(Some(SERVER_IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(SERVER_IO_TIMEOUT));

    let header = match read_header(stream) {
        Ok(Some(h)) => h,
        Ok(None) => {
            served.probe = true;
            served.error = Some("closed before sending a header".into());
            return served;
        }
        Err(e) => {
            served.error = Some(format!("reading header: {e}"));
            return served;
        }
    };
    let [upload, download, flags] = header;

    if flags & FLAG_RESPOND_AFTER_EOF != 0 {
        let got = receive_pattern(stream, UPLOAD_SEED, upload, true);
        served.received = got.bytes;
        if got.error.is_some() {
            served.error = got.error;
            return served;
        }
        match send_pattern(stream, DOWNLOAD_SEED, download, None) {
            Ok(n) => served.sent = n,
            Err(e) => served.error = Some(format!("sending: {e}")),
        }
        return served;
    }

    let writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            served.error = Some(format!("cloning socket: {e}"));
            return served;
        }
    };
    let abort = Arc::new(AtomicBool::new(false));
    let sender = {
        let abort = abort.clone();
        thread::spawn(move || send_pattern(&writer, DOWNLOAD_SEED, download, Some(&abort)))
    };
    let got = receive_pattern(stream, UPLOAD_SEED, upload, true);
    served.received = got.bytes;
    if got.error.is_some() {
        // Don't wait for the sender: it may be blocked on a peer that stopped
        // reading. It drops its handle (→ RST, see handle_connection) when it
        // notices the flag or its write fails.
        abort.store(true, Ordering::Relaxed);
        served.error = got.error;
        return served;
    }
    match sender.join() {
        Ok(Ok(n)) => served.sent = n,
        Ok(Err(e)) => served.error = Some(format!("sending: {e}")),
        Err(_) => served.error = Some("sender thread panicked".into()),
    }
    served
}

/// Reads the header; `Ok(None)` if the peer closed (or reset) before
/// sending a single byte.
fn read_header(mut stream: &TcpStream) -> io::Result<Option<[u64; 3]>> {
    let mut buf = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match stream.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::new(ErrorKind::UnexpectedEof, "truncated header")),
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if filled == 0 && e.kind() == ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let word = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    Ok(Some([word(0), word(1), word(2)]))
}

// ---------------------------------------------------------------------------
// client

fn client(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &["--connect", "--upload", "--download", "--timeout-secs"],
        &["--respond-after-eof"],
    )?;
    let addr = resolve(opts.required("--connect")?)?;
    let upload = opts.get("--upload").map_or(Ok(0), parse_size)?;
    let download = opts.get("--download").map_or(Ok(0), parse_size)?;
    let timeout = opts.timeout()?;
    let flags = if opts.has("--respond-after-eof") {
        FLAG_RESPOND_AFTER_EOF
    } else {
        0
    };

    let start = Instant::now();
    let mut report = json!({
        "ok": false, "uploaded": 0, "downloaded": 0,
        "peer": null, "local": null, "error": null,
    });
    let result = run_client(addr, upload, download, flags, timeout, &mut report);
    let ok = result.is_ok();
    report["ok"] = ok.into();
    report["error"] = result.err().map_or(Value::Null, Value::from);
    report["elapsed_ms"] = (start.elapsed().as_secs_f64() * 1000.0).into();
    emit(&report);
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn run_client(
    addr: SocketAddr,
    upload: u64,
    download: u64,
    flags: u64,
    timeout: Duration,
    report: &mut Value,
) -> Result<(), String> {
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    // Peer and local address as the kernel sees them (getpeername and
    // getsockname), which is what a transparent proxy must preserve.
    report["peer"] = stream.peer_addr().map(|a| a.to_string()).ok().into();
    report["local"] = stream.local_addr().map(|a| a.to_string()).ok().into();
    let setup = |e: io::Error| format!("socket setup: {e}");
    stream.set_read_timeout(Some(timeout)).map_err(setup)?;
    stream.set_write_timeout(Some(timeout)).map_err(setup)?;
    stream.set_nodelay(true).map_err(setup)?;

    let writer = stream.try_clone().map_err(setup)?;
    let sender = thread::spawn(move || -> Result<u64, String> {
        let mut header = [0u8; HEADER_LEN];
        for (i, v) in [upload, download, flags].into_iter().enumerate() {
            header[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        (&writer)
            .write_all(&header)
            .map_err(|e| format!("sending header: {e}"))?;
        let sent = send_pattern(&writer, UPLOAD_SEED, upload, None)
            .map_err(|e| format!("upload failed: {e}"))?;
        writer
            .shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown after upload: {e}"))?;
        Ok(sent)
    });

    let received = receive_pattern(&stream, DOWNLOAD_SEED, download, true);
    report["downloaded"] = received.bytes.into();
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err("upload thread panicked".into()));
    if let Ok(n) = &sent {
        report["uploaded"] = (*n).into();
    }
    match (sent, received.error) {
        (Ok(_), None) => Ok(()),
        (Err(up), None) => Err(up),
        (Ok(_), Some(down)) => Err(format!("download: {down}")),
        (Err(up), Some(down)) => Err(format!("{up}; download: {down}")),
    }
}

// ---------------------------------------------------------------------------
// connect-time

fn connect_time(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(args, &["--connect", "--count", "--timeout-secs"], &[])?;
    let addr = resolve(opts.required("--connect")?)?;
    let count = count_opt(&opts)?;
    let timeout = opts.timeout()?;

    let mut micros = Vec::with_capacity(count);
    for i in 0..count {
        let start = Instant::now();
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(stream) => {
                micros.push(start.elapsed().as_secs_f64() * 1e6);
                drop(stream);
            }
            Err(e) => {
                return Ok(connection_failed(i, count, addr, &e));
            }
        }
    }
    micros.sort_by(f64::total_cmp);
    emit(&json!({
        "ok": true,
        "count": count,
        "mean_us": micros.iter().sum::<f64>() / count as f64,
        "p50_us": quantile(&micros, 0.50),
        "p99_us": quantile(&micros, 0.99),
        "min_us": micros[0],
        "max_us": micros[micros.len() - 1],
    }));
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// benchmark clients: rr, conn-rate, hold (against `echo`)

/// Reports connection `i` (0-based) of `count` to `addr` as failed.
fn connection_failed(i: usize, count: usize, addr: SocketAddr, e: &io::Error) -> ExitCode {
    emit(&json!({
        "ok": false,
        "error": format!("connection {} of {count} to {addr}: {e}", i + 1),
    }));
    ExitCode::FAILURE
}

/// A message of `size` bytes that is not all one value, so a misplaced byte shows.
fn bench_message(size: usize) -> Vec<u8> {
    (0..size).map(|i| (i % 251) as u8).collect()
}

/// The `p` quantile of sorted samples (nearest rank).
fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn count_opt(opts: &Opts) -> Result<usize, String> {
    let count: usize = opts
        .required("--count")?
        .parse()
        .map_err(|e| format!("--count: {e}"))?;
    if count == 0 {
        return Err("--count must be at least 1".into());
    }
    Ok(count)
}

/// One exchange: `msg` out, the same number of bytes back, which must equal it.
fn exchange(stream: &mut TcpStream, msg: &[u8], reply: &mut [u8]) -> io::Result<()> {
    stream.write_all(msg)?;
    stream.read_exact(reply)?;
    if reply != msg {
        return Err(io::Error::new(ErrorKind::InvalidData, "the echo differs"));
    }
    Ok(())
}

/// Request/response latency over one connection.
fn rr(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &[
            "--connect",
            "--count",
            "--size",
            "--warmup",
            "--rate",
            "--timeout-secs",
        ],
        &[],
    )?;
    let addr = resolve(opts.required("--connect")?)?;
    let count = count_opt(&opts)?;
    let size = parse_size(opts.get("--size").unwrap_or("1K"))? as usize;
    let (warmup, rate) = opts.pacing(count)?;
    let timeout = opts.timeout()?;
    let fail = |e: String| {
        emit(&json!({ "ok": false, "error": e }));
        Ok(ExitCode::FAILURE)
    };
    let mut stream = match timed_client(addr, timeout) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let msg = bench_message(size);
    let mut reply = vec![0u8; size];
    let timed = timed_loop(count, warmup, rate, |i| {
        exchange(&mut stream, &msg, &mut reply)
            .map_err(|e| format!("exchange {} of {}: {e}", i + 1, warmup + count))
    });
    let (mut micros, elapsed) = match timed {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let mut out = latencies(&mut micros, elapsed);
    out.insert("ok".into(), true.into());
    out.insert("size".into(), size.into());
    emit(&Value::Object(out));
    Ok(ExitCode::SUCCESS)
}

/// A connection for timed exchanges: no Nagle delay, reads bounded by
/// `timeout`.
fn timed_client(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, String> {
    let stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(timeout));
    Ok(stream)
}

/// Runs `once` `warmup + count` times, back to back or paced at `rate` per
/// second, and times each: the timed ones' microseconds in order, and the
/// seconds they took in all. Paced runs keep a fixed schedule, where a late
/// one delays the next send rather than being followed by a burst; the pause
/// is a blocking sleep (a runtime's timer ticks in milliseconds, as long as
/// the interval itself).
fn timed_loop(
    count: usize,
    warmup: usize,
    rate: f64,
    mut once: impl FnMut(usize) -> Result<(), String>,
) -> Result<(Vec<f64>, f64), String> {
    let interval = (rate > 0.0).then(|| Duration::from_secs_f64(1.0 / rate));
    let mut micros = Vec::with_capacity(count);
    let mut next = Instant::now();
    let mut timed_from = Instant::now();
    for i in 0..warmup + count {
        if i == warmup {
            timed_from = Instant::now();
            next = timed_from;
        }
        if let Some(interval) = interval {
            let now = Instant::now();
            if next > now {
                thread::sleep(next - now);
            }
            next = next.max(now) + interval;
        }
        let start = Instant::now();
        once(i)?;
        if i >= warmup {
            micros.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((micros, timed_from.elapsed().as_secs_f64()))
}

/// The JSON fields of a latency run: count, rate, mean, percentiles, max.
/// Sorts `micros` (at least one).
fn latencies(micros: &mut [f64], elapsed: f64) -> serde_json::Map<String, Value> {
    micros.sort_by(f64::total_cmp);
    let count = micros.len();
    let v = json!({
        "count": count,
        "rate_per_s": count as f64 / elapsed,
        "mean_us": micros.iter().sum::<f64>() / count as f64,
        "p50_us": quantile(micros, 0.50),
        "p90_us": quantile(micros, 0.90),
        "p99_us": quantile(micros, 0.99),
        "p999_us": quantile(micros, 0.999),
        "max_us": micros[count - 1],
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!("a JSON object literal"),
    }
}

/// Redis round trips over one connection: `PING`s one at a time, back to
/// back or paced at `--rate` per second, each timed from its write to its
/// answer read whole. With `--gcra`, the waypoint's rate-limit call instead:
/// its script (loaded first) on one key of a limit that never refuses. The
/// yardsticks of "one Redis round trip" for the L7 bench, paced as the
/// waypoint's calls are.
fn redis_rr(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &[
            "--connect",
            "--count",
            "--warmup",
            "--rate",
            "--timeout-secs",
        ],
        &["--gcra"],
    )?;
    let addr = resolve(opts.required("--connect")?)?;
    let count = count_opt(&opts)?;
    let (warmup, rate) = opts.pacing(count)?;
    let timeout = opts.timeout()?;
    let fail = |e: String| {
        emit(&json!({ "ok": false, "error": e }));
        Ok(ExitCode::FAILURE)
    };
    let mut stream = match timed_client(addr, timeout) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut reader = match stream.try_clone() {
        Ok(s) => io::BufReader::new(s),
        Err(e) => return fail(format!("cannot clone the socket: {e}")),
    };
    let resp = |args: &[&str]| {
        let mut out = format!("*{}\r\n", args.len());
        for a in args {
            out += &format!("${}\r\n{a}\r\n", a.len());
        }
        out
    };
    // One answer: a line, and as many more as an array's length says (the
    // script answers integers).
    let mut line = String::new();
    let mut answer = |reader: &mut io::BufReader<TcpStream>| -> io::Result<String> {
        line.clear();
        io::BufRead::read_line(reader, &mut line)?;
        let mut whole = line.clone();
        if let Some(n) = line.strip_prefix('*') {
            for _ in 0..n.trim().parse::<usize>().unwrap_or(0) {
                io::BufRead::read_line(reader, &mut whole)?;
            }
        } else if line.starts_with('$') && line.trim() != "$-1" {
            io::BufRead::read_line(reader, &mut whole)?;
        }
        Ok(whole)
    };
    let gcra = opts.has("--gcra");
    let (command, expected) = if gcra {
        let load = resp(&["SCRIPT", "LOAD", weft::http::ratelimit::SCRIPT]);
        let loaded = stream
            .write_all(load.as_bytes())
            .and_then(|()| answer(&mut reader));
        let sha = match loaded {
            Ok(a) => a.lines().nth(1).unwrap_or_default().to_owned(),
            Err(e) => return fail(format!("SCRIPT LOAD: {e}")),
        };
        // A limit of 10⁹ a second: T = 1 µs, a burst of 10⁹ µs.
        let call = resp(&[
            "EVALSHA",
            &sha,
            "1",
            "weft:bench:rr",
            "1",
            "1000000000",
            "1",
        ]);
        (call, "*3\r\n:1\r\n")
    } else {
        (resp(&["PING"]), "+PONG\r\n")
    };
    let timed = timed_loop(count, warmup, rate, |i| {
        let failed = |e: String| format!("call {} of {}: {e}", i + 1, warmup + count);
        let got = stream
            .write_all(command.as_bytes())
            .and_then(|()| answer(&mut reader))
            .map_err(|e| failed(e.to_string()))?;
        if !got.starts_with(expected) {
            return Err(failed(format!("answered {got:?}")));
        }
        Ok(())
    });
    let (mut micros, elapsed) = match timed {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let mut out = latencies(&mut micros, elapsed);
    out.insert("ok".into(), true.into());
    emit(&Value::Object(out));
    Ok(ExitCode::SUCCESS)
}

/// New connections, one after another, each with one exchange.
fn conn_rate(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &[
            "--connect",
            "--count",
            "--size",
            "--timeout-secs",
            "--for-secs",
        ],
        &[],
    )?;
    let addr = resolve(opts.required("--connect")?)?;
    let mut count = count_opt(&opts)?;
    let for_secs = match opts.get("--for-secs") {
        Some(s) => Some(Duration::from_secs_f64(
            s.parse().map_err(|_| format!("bad --for-secs {s:?}"))?,
        )),
        None => None,
    };
    let size = parse_size(opts.get("--size").unwrap_or("1K"))? as usize;
    let timeout = opts.timeout()?;
    let msg = bench_message(size);
    let mut reply = vec![0u8; size];
    let mut connect = Vec::with_capacity(count.min(1 << 16));
    let mut whole = Vec::with_capacity(count.min(1 << 16));
    let began = Instant::now();
    for i in 0..count {
        if for_secs.is_some_and(|d| began.elapsed() >= d) {
            count = i;
            break;
        }
        let start = Instant::now();
        let result = TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
            connect.push(start.elapsed().as_secs_f64() * 1e6);
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(timeout))?;
            exchange(&mut s, &msg, &mut reply)
        });
        if let Err(e) = result {
            return Ok(connection_failed(i, count, addr, &e));
        }
        whole.push(start.elapsed().as_secs_f64() * 1e6);
    }
    let elapsed = began.elapsed().as_secs_f64();
    connect.sort_by(f64::total_cmp);
    whole.sort_by(f64::total_cmp);
    emit(&json!({
        "ok": true,
        "count": count,
        "size": size,
        "conns_per_s": count as f64 / elapsed,
        "connect_p50_us": quantile(&connect, 0.50),
        "connect_p99_us": quantile(&connect, 0.99),
        "exchange_p50_us": quantile(&whole, 0.50),
        "exchange_p99_us": quantile(&whole, 0.99),
    }));
    Ok(ExitCode::SUCCESS)
}

/// Opens `--count` connections, checks each with a one-byte echo, holds them.
fn hold(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &["--connect", "--count", "--hold-secs", "--timeout-secs"],
        &[],
    )?;
    let addr = resolve(opts.required("--connect")?)?;
    let count = count_opt(&opts)?;
    let hold: f64 = opts
        .get("--hold-secs")
        .unwrap_or("60")
        .parse()
        .map_err(|e| format!("--hold-secs: {e}"))?;
    let timeout = opts.timeout()?;
    weft::app::raise_fd_limit();
    let mut held = Vec::with_capacity(count);
    let mut byte = [0u8; 1];
    for i in 0..count {
        let result = TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
            s.set_read_timeout(Some(timeout))?;
            exchange(&mut s, b"h", &mut byte)?;
            Ok(s)
        });
        match result {
            Ok(s) => held.push(s),
            Err(e) => {
                return Ok(connection_failed(i, count, addr, &e));
            }
        }
    }
    emit(&json!({ "holding": held.len() }));
    thread::sleep(Duration::from_secs_f64(hold.max(0.0)));
    emit(&json!({ "ok": true, "held": held.len() }));
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------
// benchmark clients for an HTTP server: http-rr, http-hold

/// One HTTP connection's request sender, either protocol.
enum HttpSender {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>),
}

impl HttpSender {
    async fn connect(addr: SocketAddr, h2: bool) -> Result<HttpSender, String> {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(tcp);
        let handshake = |e: hyper::Error| format!("HTTP handshake with {addr}: {e}");
        Ok(if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .map_err(handshake)?;
            tokio::spawn(conn);
            HttpSender::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(handshake)?;
            tokio::spawn(conn);
            HttpSender::H1(sender)
        })
    }

    /// One GET of `path` with `headers` (name, value), its whole body read;
    /// the status.
    async fn get(
        &mut self,
        addr: SocketAddr,
        path: &str,
        headers: &[(String, String)],
    ) -> Result<u16, String> {
        use http_body_util::BodyExt as _;
        let failed = |e: hyper::Error| e.to_string();
        let response = match self {
            HttpSender::H1(s) => {
                s.ready().await.map_err(failed)?;
                let mut req = http::Request::get(path).header(http::header::HOST, addr.to_string());
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                let req = req
                    .body(http_body_util::Empty::new())
                    .map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(failed)?
            }
            HttpSender::H2(s) => {
                s.ready().await.map_err(failed)?;
                let mut req = http::Request::get(format!("http://{addr}{path}"))
                    .version(http::Version::HTTP_2);
                for (name, value) in headers {
                    req = req.header(name, value);
                }
                let req = req
                    .body(http_body_util::Empty::new())
                    .map_err(|e| e.to_string())?;
                s.send_request(req).await.map_err(failed)?
            }
        };
        let status = response.status().as_u16();
        response.into_body().collect().await.map_err(failed)?;
        Ok(status)
    }
}

/// HTTP request/response latency over one connection: GETs one at a time,
/// back to back or paced at `--rate` per second, each timed from its send to
/// the end of its response body. `--alternate 'name: a|b'` sends that header
/// with `a` on every other request and `b` on the rest, and reports the two
/// halves apart too (`by_alternate`): two variants measured in the same run,
/// so what drifts between runs drifts for both.
fn http_rr(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &[
            "--connect",
            "--count",
            "--path",
            "--header",
            "--alternate",
            "--warmup",
            "--rate",
            "--timeout-secs",
        ],
        &["--h2"],
    )?;
    let header = |h: &str| {
        h.split_once(':')
            .map(|(name, value)| (name.trim().to_owned(), value.trim().to_owned()))
            .ok_or_else(|| format!("{h}: not `name: value`"))
    };
    // Headers for every request, e.g. a bearer token (the L7 bench's
    // policies).
    let headers = opts
        .all("--header")
        .map(header)
        .collect::<Result<Vec<_>, _>>()?;
    let alternate = match opts.get("--alternate") {
        Some(h) => {
            let (name, values) = header(h)?;
            let (a, b) = values
                .split_once('|')
                .ok_or_else(|| format!("--alternate {h}: not `name: a|b`"))?;
            Some([(name.clone(), a.to_owned()), (name, b.to_owned())])
        }
        None => None,
    };
    let addr = resolve(opts.required("--connect")?)?;
    let count = count_opt(&opts)?;
    let path = opts.get("--path").unwrap_or("/").to_owned();
    let (warmup, rate) = opts.pacing(count)?;
    let timeout = opts.timeout()?;
    let h2 = opts.has("--h2");
    let fail = |e: String| {
        emit(&json!({ "ok": false, "error": e }));
        Ok(ExitCode::FAILURE)
    };
    // One thread: the connection's task runs only while a request is
    // awaited, and nothing else is due meanwhile.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let connected = runtime.block_on(async {
        tokio::time::timeout(timeout, HttpSender::connect(addr, h2))
            .await
            .map_err(|_| format!("connect {addr}: timed out"))?
    });
    let mut sender = match connected {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut with = headers.clone();
    let timed = timed_loop(count, warmup, rate, |i| {
        with.truncate(headers.len());
        if let Some(alternate) = &alternate {
            with.push(alternate[i % 2].clone());
        }
        let got = runtime.block_on(async {
            tokio::time::timeout(timeout, sender.get(addr, &path, &with)).await
        });
        let failed = |e: String| format!("request {} of {}: {e}", i + 1, warmup + count);
        match got {
            Err(_) => Err(failed("timed out".to_owned())),
            Ok(Err(e)) => Err(failed(e)),
            Ok(Ok(200)) => Ok(()),
            Ok(Ok(status)) => Err(failed(format!("status {status}"))),
        }
    });
    let (mut micros, elapsed) = match timed {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let halves = alternate.map(|alternate| {
        // The timed requests' alternate is by their index in the whole run.
        let mut halves = [Vec::new(), Vec::new()];
        for (j, us) in micros.iter().enumerate() {
            halves[(warmup + j) % 2].push(*us);
        }
        let by = alternate
            .iter()
            .zip(halves)
            .filter(|(_, half)| !half.is_empty())
            .map(|((_, value), mut half)| {
                (value.clone(), Value::Object(latencies(&mut half, elapsed)))
            });
        Value::Object(by.collect())
    });
    let mut out = latencies(&mut micros, elapsed);
    out.insert("ok".into(), true.into());
    out.insert(
        "protocol".into(),
        if h2 { "h2c" } else { "http/1.1" }.into(),
    );
    if let Some(halves) = halves {
        out.insert("by_alternate".into(), halves);
    }
    emit(&Value::Object(out));
    Ok(ExitCode::SUCCESS)
}

/// Opens `--count` HTTP/1.1 keep-alive connections, makes one GET on each
/// (its response read whole), and holds them idle.
fn http_hold(args: &[String]) -> Result<ExitCode, String> {
    let opts = Opts::parse(
        args,
        &["--connect", "--count", "--hold-secs", "--timeout-secs"],
        &[],
    )?;
    let addr = resolve(opts.required("--connect")?)?;
    let count = count_opt(&opts)?;
    let hold: f64 = opts
        .get("--hold-secs")
        .unwrap_or("60")
        .parse()
        .map_err(|e| format!("--hold-secs: {e}"))?;
    let timeout = opts.timeout()?;
    weft::app::raise_fd_limit();
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        let result = TcpStream::connect_timeout(&addr, timeout).and_then(|mut s| {
            s.set_read_timeout(Some(timeout))?;
            s.write_all(request.as_bytes())?;
            read_http_response(&mut s)?;
            Ok(s)
        });
        match result {
            Ok(s) => held.push(s),
            Err(e) => return Ok(connection_failed(i, count, addr, &e)),
        }
    }
    emit(&json!({ "holding": held.len() }));
    thread::sleep(Duration::from_secs_f64(hold.max(0.0)));
    emit(&json!({ "ok": true, "held": held.len() }));
    Ok(ExitCode::SUCCESS)
}

/// Reads one HTTP/1.1 response with a `content-length` body; fails unless
/// its status is 200.
fn read_http_response(s: &mut TcpStream) -> io::Result<()> {
    let bad = |what: &str| io::Error::new(ErrorKind::InvalidData, what.to_owned());
    let mut buf = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 << 10 {
            return Err(bad("response head over 64 KiB"));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(bad("closed before the response head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return Err(bad(head.lines().next().unwrap_or("no status line")));
    }
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| bad("no content-length"))?;
    let mut have = buf.len() - head_end;
    while have < length {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(bad("closed inside the body"));
        }
        have += n;
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// helpers

/// Prints one JSON line on stdout and flushes it, so a test waiting for the
/// line sees it at once even through a pipe.
fn emit(value: &Value) {
    let mut out = io::stdout().lock();
    // Nothing sensible to do if stdout is gone.
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

/// `1234`, `1K`, `64M`, `1G` (binary multiples; `KiB` etc. also accepted).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("bad size {s:?} (expected e.g. 4096, 1K, 64M, 1G)"))
}

/// Command-line options: `--name value`, `--name=value` and switches.
struct Opts {
    /// Each option's values in order (most take one: the last counts).
    values: HashMap<String, Vec<String>>,
    switches: Vec<String>,
}

impl Opts {
    fn parse(args: &[String], with_value: &[&str], switches: &[&str]) -> Result<Opts, String> {
        let mut opts = Opts {
            values: HashMap::new(),
            switches: Vec::new(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (arg.as_str(), None),
            };
            if with_value.contains(&name) {
                let value = match inline {
                    Some(v) => v,
                    None => args
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("{name} needs a value"))?,
                };
                opts.values.entry(name.to_owned()).or_default().push(value);
            } else if switches.contains(&name) && inline.is_none() {
                opts.switches.push(name.to_owned());
            } else {
                return Err(format!("unexpected argument {arg:?}\n{USAGE}"));
            }
        }
        Ok(opts)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.all(name).last()
    }

    /// Every value given for `name`, in order.
    fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.values
            .get(name)
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    fn required(&self, name: &str) -> Result<&str, String> {
        self.get(name)
            .ok_or_else(|| format!("{name} is required\n{USAGE}"))
    }

    fn has(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }

    /// `--warmup` (default: a tenth of `count`) and `--rate` (per second; 0,
    /// the default: back to back), for the timed clients.
    fn pacing(&self, count: usize) -> Result<(usize, f64), String> {
        let warmup = match self.get("--warmup") {
            Some(w) => w.parse().map_err(|e| format!("--warmup: {e}"))?,
            None => count / 10,
        };
        let rate = self
            .get("--rate")
            .unwrap_or("0")
            .parse()
            .map_err(|e| format!("--rate: {e}"))?;
        Ok((warmup, rate))
    }

    fn timeout(&self) -> Result<Duration, String> {
        match self.get("--timeout-secs") {
            None => Ok(DEFAULT_TIMEOUT),
            Some(s) => s
                .parse::<f64>()
                .ok()
                .filter(|t| t.is_finite() && *t > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| format!("bad --timeout-secs {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay carries bytes both ways, more than one buffer of them, and
    /// passes each half-close on without cutting the other direction short.
    #[test]
    fn relay_copies_both_ways_and_passes_half_close() {
        let server = TcpListener::bind("127.0.0.1:0").unwrap();
        let server_addr = server.local_addr().unwrap();
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let front_addr = front.local_addr().unwrap();
        let upload: Vec<u8> = (0..3 * CHUNK + 17).map(|i| (i % 251) as u8).collect();
        let expected = upload.clone();
        // The server reads everything up to the client's EOF, then answers
        // with the bytes reversed: the answer can only come after the
        // half-close went through, on a connection still open the other way.
        let served = thread::spawn(move || {
            let (mut s, _) = server.accept().unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            assert_eq!(got, expected);
            got.reverse();
            s.write_all(&got).unwrap();
        });
        let relayed = thread::spawn(move || {
            let (from, _) = front.accept().unwrap();
            let mut buf = vec![0u8; CHUNK];
            relay_connection(from, server_addr, &mut buf)
        });
        let mut c = TcpStream::connect(front_addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(&upload).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        c.read_to_end(&mut answer).unwrap();
        let mut reversed = upload;
        reversed.reverse();
        assert_eq!(answer, reversed);
        served.join().unwrap();
        relayed.join().unwrap().unwrap();
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1K"), Ok(1024));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert!(parse_size("M").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999999999G").is_err());
    }

    #[test]
    fn options() {
        let args: Vec<String> = [
            "--connect",
            "1.2.3.4:5",
            "--upload=1K",
            "--respond-after-eof",
        ]
        .map(String::from)
        .to_vec();
        let o = Opts::parse(&args, &["--connect", "--upload"], &["--respond-after-eof"]).unwrap();
        assert_eq!(o.get("--connect"), Some("1.2.3.4:5"));
        assert_eq!(o.get("--upload"), Some("1K"));
        assert!(o.has("--respond-after-eof"));
        assert!(Opts::parse(&args[..1], &["--connect"], &[]).is_err());
        assert!(Opts::parse(&["--bogus".to_owned()], &[], &[]).is_err());
    }
}
