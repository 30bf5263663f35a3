//! Real HTTP, gRPC and WebSocket servers and clients in pods, for the L7
//! (waypoint) tests and the bench: `weft-tk http-echo` as the upstream, `curl`
//! and `h2load` as clients, nginx as an upstream or a reverse-proxy yardstick,
//! and Debian's grpcio and websockets for gRPC and WebSocket.
//!
//! The servers print one JSON line per request or call; [`served_by`] reads them
//! back, so a test can count which replica served what.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{PATIENCE, Pod, Proc, bin_path, cluster::Host as _, eventually};

/// The interpreter of the Python scripts: the system one, because Debian's
/// `python3-grpcio` and `python3-websockets` are installed for it only, and a
/// `python3` earlier on `PATH` (pyenv, a venv) would not find them.
pub const PYTHON: &str = "/usr/bin/python3";

/// Bodies larger than this are counted ([`CurlResult::size`]) but not kept.
pub const KEPT_BODY: u64 = 1 << 20;

/// The scripts of this crate (`tests/grpc`, `tests/websocket`).
fn script(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A directory of its own for one helper call, removed on drop. Its name
/// starts with the pod's namespace name, which carries the cluster's id: one
/// left behind (a killed test) says whose it was.
struct Scratch(PathBuf);

impl Scratch {
    fn new(pod: &Pod, what: &str) -> Result<Scratch> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{}-{what}-{n}", pod.netns));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Parses the last non-empty stdout line of a client as JSON.
fn report(from: &Pod, what: &str, out: &std::process::Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty());
    serde_json::from_str(line.unwrap_or_default()).with_context(|| {
        format!(
            "{what} in {} printed no report ({}): {stdout:?}\n--- stderr ---\n{}",
            from.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

// ---------------------------------------------------------------------------
// HTTP

/// Starts `weft-tk http-echo` on port `port` of every address of `pod`,
/// answering as `name`, and waits until it listens.
pub fn http_echo(pod: &Pod, port: u16, name: &str) -> Result<Proc> {
    http_echo_with(pod, port, name, &[])
}

/// [`http_echo`] with more flags: `--h2c-only`, `--fail-every K`.
pub fn http_echo_with(pod: &Pod, port: u16, name: &str, extra: &[&str]) -> Result<Proc> {
    let mut cmd = pod.command(bin_path("weft-tk"));
    cmd.args(["http-echo", "--port", &port.to_string(), "--name", name])
        .args(extra);
    let server = pod.spawn(&mut cmd)?;
    server.wait_for_json(PATIENCE, |v| v.get("listening").is_some())?;
    Ok(server)
}

/// The requests an [`http_echo`] (or a [`grpc_server`]) has reported so far,
/// one JSON object each: `pod`, `method`, `path`, `status`, `headers`, ... for
/// HTTP; `pod`, `method`, `metadata`, `peer` for gRPC.
pub fn served_by(server: &Proc) -> Vec<Value> {
    server
        .json_lines()
        .into_iter()
        .filter(|v| v.get("pod").is_some() && v.get("listening").is_none())
        .collect()
}

/// [`served_by`], once at least `n` requests are reported (a server prints its
/// line before the answer is complete, so usually at once). Waits at most
/// [`PATIENCE`], then returns what there is.
pub fn wait_served(server: &Proc, n: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    eventually(PATIENCE, || {
        seen = served_by(server);
        seen.len() >= n
    });
    seen
}

/// What `curl` got.
#[derive(Debug, Clone)]
pub struct CurlResult {
    /// The response status (of the last response, after `-L`).
    pub status: u16,
    /// `1.1` or `2` (curl's `http_version`).
    pub http_version: String,
    /// Response headers of the last response, lowercased name to values.
    pub headers: BTreeMap<String, Vec<String>>,
    /// The body, parsed if it is JSON, else as a string; `Null` when it was
    /// larger than [`KEPT_BODY`].
    pub body: Value,
    /// Bytes of body received.
    pub size: u64,
    /// Everything `curl -w '%{json}'` reported (timings, addresses,
    /// `num_connects`, ...).
    pub info: Value,
}

impl CurlResult {
    /// The first value of response header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.first().map(String::as_str)
    }
}

/// Runs `curl` in `from` for `url`, with `args` before the URL (e.g.
/// `--http2-prior-knowledge`, `-H`, `-d`, `-X`), and returns the response.
///
/// Fails if curl got no response at all (connection refused or reset, a
/// timeout): curl's exit code and message are in the error. Any status,
/// 5xx included, is a response. Never uses a proxy from the environment; gives
/// up after 30 s unless `args` say otherwise (`--max-time`).
pub fn curl(from: &Pod, url: &str, args: &[&str]) -> Result<CurlResult> {
    let scratch = Scratch::new(from, "curl")?;
    let (body_path, header_path) = (scratch.0.join("body"), scratch.0.join("headers"));
    let mut all: Vec<&str> = vec!["-sS", "--noproxy", "*", "--max-time", "30"];
    all.extend(args);
    let (body_arg, header_arg) = (body_path.to_string_lossy(), header_path.to_string_lossy());
    all.extend(["-o", &body_arg, "-D", &header_arg, "-w", "%{json}", url]);
    let out = from.exec("curl", &all)?;
    let info = report(from, "curl", &out)?;
    if !out.status.success() {
        bail!(
            "curl {url} from {} got no response: exit code {}, {}",
            from.name,
            info["exitcode"],
            info["errormsg"].as_str().unwrap_or_default()
        );
    }
    let size = info["size_download"].as_u64().unwrap_or(0);
    let body = if size > KEPT_BODY {
        Value::Null
    } else {
        let bytes = std::fs::read(&body_path).unwrap_or_default();
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    let headers = std::fs::read_to_string(&header_path).unwrap_or_default();
    Ok(CurlResult {
        status: info["response_code"].as_u64().unwrap_or(0) as u16,
        http_version: info["http_version"].as_str().unwrap_or_default().to_owned(),
        headers: last_header_block(&headers),
        body,
        size,
        info,
    })
}

/// The headers of the last response in a `curl -D` dump (which also holds the
/// interim and redirect responses before it), lowercased name to values.
fn last_header_block(dump: &str) -> BTreeMap<String, Vec<String>> {
    let mut headers = BTreeMap::new();
    for line in dump.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("HTTP/") {
            headers.clear();
        } else if let Some((name, value)) = line.split_once(':') {
            headers
                .entry(name.trim().to_ascii_lowercase())
                .or_insert_with(Vec::new)
                .push(value.trim().to_owned());
        }
    }
    headers
}

/// What `h2load` reported.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct H2loadResult {
    /// Requests done, whatever their status.
    pub done: u64,
    /// Requests that got a complete response (any status).
    pub succeeded: u64,
    pub failed: u64,
    pub errored: u64,
    pub timeout: u64,
    /// Responses by status class: 2xx, 3xx, 4xx, 5xx.
    pub status: [u64; 4],
    pub req_per_s: f64,
    /// Mean time per request, in milliseconds.
    pub mean_ms: f64,
}

/// Runs `h2load` in `from`: `n` requests over `c` connections to `url`, over
/// HTTP/2 with prior knowledge (`h2`) or HTTP/1.1. Fails only if h2load could
/// not run or printed no summary; failed requests are in the result.
pub fn h2load(from: &Pod, url: &str, n: u64, c: u64, h2: bool) -> Result<H2loadResult> {
    let (n, c) = (n.to_string(), c.to_string());
    let mut args = vec!["-n", &n, "-c", &c];
    if !h2 {
        args.push("--h1");
    }
    args.push(url);
    h2load_with(from, &args)
}

/// Runs `h2load` in `from` with `args` as they are (the URL among them), e.g.
/// a timed run: `-D 5 --warm-up-time 1 -c 64 -m 10 URL`.
pub fn h2load_with(from: &Pod, args: &[&str]) -> Result<H2loadResult> {
    let out = from.exec("h2load", args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&stdout).with_context(|| {
        format!(
            "h2load in {} ({}) printed no summary:\n{stdout}\n--- stderr ---\n{}",
            from.name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn parse_h2load(text: &str) -> Result<H2loadResult> {
    let mut r = H2loadResult::default();
    // "1000 done" → 1000: the number before `word` in a comma-separated line.
    let count = |line: &str, word: &str| -> Option<u64> {
        line.split(',').find_map(|part| {
            let mut it = part.split_whitespace();
            let (n, w) = (it.next_back()?, it.next_back()?);
            (n == word).then(|| w.parse().ok()).flatten()
        })
    };
    let mut seen = (false, false);
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("finished in ") {
            let rps = rest
                .split(',')
                .nth(1)
                .and_then(|p| p.split_whitespace().next());
            r.req_per_s = rps.and_then(|p| p.parse().ok()).context("req/s")?;
        } else if let Some(rest) = line.strip_prefix("requests:") {
            r.done = count(rest, "done").context("done")?;
            r.succeeded = count(rest, "succeeded").context("succeeded")?;
            r.failed = count(rest, "failed").unwrap_or(0);
            r.errored = count(rest, "errored").unwrap_or(0);
            r.timeout = count(rest, "timeout").unwrap_or(0);
            seen.0 = true;
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            for (i, class) in ["2xx", "3xx", "4xx", "5xx"].iter().enumerate() {
                r.status[i] = count(rest, class).unwrap_or(0);
            }
            seen.1 = true;
        } else if let Some(rest) = line.strip_prefix("time for request:") {
            // min, max, mean, sd, +/- sd; times carry a unit.
            if let Some(mean) = rest.split_whitespace().nth(2) {
                r.mean_ms = duration_ms(mean).unwrap_or(0.0);
            }
        }
    }
    ensure!(seen.0 && seen.1, "no `requests:` or `status codes:` line");
    Ok(r)
}

/// `12.34ms`, `850us`, `1.2s` in milliseconds.
fn duration_ms(s: &str) -> Option<f64> {
    let (digits, scale) = if let Some(d) = s.strip_suffix("us") {
        (d, 1e-3)
    } else if let Some(d) = s.strip_suffix("ms") {
        (d, 1.0)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1e3)
    } else {
        return None;
    };
    digits.parse::<f64>().ok().map(|v| v * scale)
}

/// nginx running in a pod, with its own directory for the configuration,
/// pid file, error log and temp files; stopped and the directory removed on
/// drop.
pub struct Nginx {
    // Declared first, dropped first: nginx is gone before its directory.
    proc: Proc,
    dir: Scratch,
}

impl Nginx {
    /// The running nginx.
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Its directory: `nginx.conf`, `nginx.pid`, `error.log`.
    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The error log so far.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir().join("error.log")).unwrap_or_default()
    }
}

/// Starts nginx in `pod` with `http` as the body of its `http { }` block
/// (servers, upstreams, keepalive settings) and waits until it listens.
///
/// One process that serves by itself (`master_process off`), running as root,
/// no access log; pid file, error log and temp
/// paths are in the directory of [`Nginx::dir`]. nginx writes its pid file
/// only after it has bound every `listen`, so that file appearing is the
/// readiness signal.
pub fn nginx(pod: &Pod, http: &str) -> Result<Nginx> {
    let dir = Scratch::new(pod, "nginx")?;
    let d = dir.0.display();
    let conf = format!(
        "user root;\n\
         worker_processes 1;\n\
         daemon off;\n\
         master_process off;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         access_log off;\n\
         client_body_temp_path {d}/body;\n\
         proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n\
         default_type text/plain;\n\
         {http}\n\
         }}\n"
    );
    let path = dir.0.join("nginx.conf");
    std::fs::write(&path, conf).with_context(|| format!("writing {}", path.display()))?;
    let mut cmd = pod.command("nginx");
    cmd.arg("-p")
        .arg(&dir.0)
        .arg("-e")
        .arg(dir.0.join("error.log"))
        .arg("-c")
        .arg(&path);
    let mut proc = pod.spawn(&mut cmd)?;
    let pid = dir.0.join("nginx.pid");
    let mut exited = None;
    let ready = eventually(PATIENCE, || {
        exited = proc.try_wait().ok().flatten();
        exited.is_some() || pid.exists()
    });
    let nginx = Nginx { proc, dir };
    if !ready || exited.is_some() {
        bail!(
            "nginx in {} did not start ({}):\n{}{}",
            pod.name,
            exited.map_or("timed out".to_owned(), |s| s.to_string()),
            nginx.error_log(),
            nginx.proc.stderr()
        );
    }
    Ok(nginx)
}

// ---------------------------------------------------------------------------
// gRPC

/// Starts `tests/grpc/echo_server.py` (service `weft.test.Echo`) on port `port`
/// of every address of `pod`, answering as `name`, and waits until it listens.
pub fn grpc_server(pod: &Pod, port: u16, name: &str) -> Result<Proc> {
    let mut cmd = pod.command(PYTHON);
    cmd.arg(script("grpc/echo_server.py"))
        .args(["--port", &port.to_string(), "--name", name]);
    let server = pod.spawn(&mut cmd)?;
    server.wait_for_json(PATIENCE, |v| v.get("listening").is_some())?;
    Ok(server)
}

/// How a gRPC call ended.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcResult {
    /// The numeric status: 0 OK, 5 NOT_FOUND, 14 UNAVAILABLE, ...
    pub code: u32,
    /// Its name, `OK`, `NOT_FOUND`, ...
    pub code_name: String,
    pub details: String,
    /// Initial and trailing metadata, name to values.
    pub initial: BTreeMap<String, Vec<String>>,
    pub trailers: BTreeMap<String, Vec<String>>,
    /// The answers (one for `Say`), as UTF-8.
    pub messages: Vec<String>,
}

/// Calls `weft.test.Echo/<method>` (`Say` or `Stream`) at `target` (`host:port`)
/// from `from` with `payload` and request `metadata`, through
/// `tests/grpc/echo_client.py`. Any status is a result; fails only if the
/// client could not run.
pub fn grpc_call(
    from: &Pod,
    target: &str,
    method: &str,
    payload: &str,
    metadata: &[(&str, &str)],
) -> Result<GrpcResult> {
    let script = script("grpc/echo_client.py");
    let mut args = vec![
        script.to_string_lossy().into_owned(),
        "--target".into(),
        target.into(),
        "--method".into(),
        method.into(),
        "--payload".into(),
        payload.into(),
    ];
    for (k, v) in metadata {
        args.extend(["--metadata".into(), format!("{k}={v}")]);
    }
    let out = from.exec(PYTHON, &args)?;
    let v = report(from, "the gRPC client", &out)?;
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect()
    };
    let map = |v: &Value| -> BTreeMap<String, Vec<String>> {
        v.as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), strings(v)))
            .collect()
    };
    Ok(GrpcResult {
        code: v["code"].as_u64().context("no `code` in the report")? as u32,
        code_name: v["code_name"].as_str().unwrap_or_default().to_owned(),
        details: v["details"].as_str().unwrap_or_default().to_owned(),
        initial: map(&v["initial"]),
        trailers: map(&v["trailers"]),
        messages: strings(&v["messages"]),
    })
}

// ---------------------------------------------------------------------------
// WebSocket

/// Opens a WebSocket to `url` (`ws://host:port/path`) from `from` with
/// Debian's python3-websockets, sends each of `messages` as a text frame and
/// waits for its echo, then closes; returns the echoes in order.
pub fn ws_echo_roundtrip(from: &Pod, url: &str, messages: &[&str]) -> Result<Vec<String>> {
    let script = script("websocket/echo_client.py");
    let mut args = vec![script.to_string_lossy().into_owned(), url.to_owned()];
    args.extend(messages.iter().map(|m| m.to_string()));
    let out = from.exec(PYTHON, &args)?;
    let v = report(from, "the WebSocket client", &out)?;
    if let Some(e) = v["error"].as_str() {
        bail!("WebSocket to {url} from {}: {e}", from.name);
    }
    v["echoes"]
        .as_array()
        .context("no `echoes` in the report")?
        .iter()
        .map(|e| e.as_str().map(str::to_owned).context("an echo is not text"))
        .collect()
}

/// `redis-server` in `pod` on `port` (all addresses, no persistence), once it
/// answers PING; killed when dropped.
pub fn redis_server(pod: &Pod, port: u16) -> Result<Proc> {
    let port = port.to_string();
    let mut cmd = pod.command("redis-server");
    cmd.args([
        "--port",
        &port,
        "--bind",
        "0.0.0.0",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    let p = pod.spawn(&mut cmd)?;
    ensure!(
        eventually(std::time::Duration::from_secs(10), || {
            pod.exec("redis-cli", ["-p", &port, "PING"])
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
        }),
        "redis-server in {} did not answer",
        pod.name
    );
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_summary_is_parsed() {
        let out = "\
finished in 1.23s, 811.69 req/s, 137.33KB/s
requests: 1000 total, 1000 started, 998 done, 990 succeeded, 10 failed, 2 errored, 0 timeout
status codes: 980 2xx, 0 3xx, 1 4xx, 9 5xx
traffic: 169.02KB (173076) total, 17.58KB (18000) headers (space savings 89.76%), 120.00KB (122880) data
                     min         max         mean         sd        +/- sd
time for request:      150us     12.04ms      1.21ms       900us    80.00%
";
        let r = parse_h2load(out).unwrap();
        assert_eq!(
            (r.done, r.succeeded, r.failed, r.errored, r.timeout),
            (998, 990, 10, 2, 0)
        );
        assert_eq!(r.status, [980, 0, 1, 9]);
        assert!((r.req_per_s - 811.69).abs() < 1e-9);
        assert!((r.mean_ms - 1.21).abs() < 1e-9);
        assert!(parse_h2load("connect failed").is_err());
    }

    #[test]
    fn only_the_last_header_block_counts() {
        let dump = "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nX-A: 1\r\nx-a: 2\r\nSet-Cookie: a=b; c\r\n\r\n";
        let h = last_header_block(dump);
        assert_eq!(h["x-a"], ["1", "2"]);
        assert_eq!(h["set-cookie"], ["a=b; c"]);
        assert_eq!(h.len(), 2);
    }
}
