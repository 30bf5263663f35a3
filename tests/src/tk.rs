//! Driving `weft-tk` from tests: start a server in a pod, run a client, read what
//! both reported.

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{PATIENCE, Pod, Proc, bin_path, cluster::Host as _};

/// Starts `weft-tk serve` on every address (IPv4 and IPv6) of `pod`, port `port`,
/// and waits until it listens.
pub fn serve(pod: &Pod, port: u16) -> Result<Proc> {
    let mut cmd = pod.command(bin_path("weft-tk"));
    cmd.args(["serve", "--listen", &format!("[::]:{port}")]);
    let server = pod.spawn(&mut cmd)?;
    server.wait_for_json(PATIENCE, |v| v.get("listening").is_some())?;
    Ok(server)
}

/// Runs `weft-tk client` in `from` against `to`, moving `upload` bytes up and
/// `download` down, and returns its JSON report, whether it succeeded or not
/// (`report["ok"]`). `extra` are more client flags.
pub fn client(from: &Pod, to: &str, upload: u64, download: u64, extra: &[&str]) -> Result<Value> {
    let (up, down) = (upload.to_string(), download.to_string());
    let mut args = vec![
        "client",
        "--connect",
        to,
        "--upload",
        &up,
        "--download",
        &down,
    ];
    args.extend(extra);
    let out = from.exec(bin_path("weft-tk"), &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
        format!(
            "client in {} printed no report: {stdout:?} {}",
            from.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The connections a server finished, each with the peer address it saw
/// (`accepted`), what it verified (`upload_ok`, `bytes`); probes left out.
pub fn accepted(server: &Proc) -> Vec<Value> {
    server
        .json_lines()
        .into_iter()
        .filter(|v| v.get("accepted").is_some() && v["probe"] != true)
        .collect()
}

/// [`accepted`], once at least `n` connections are reported: the server prints a
/// line after it has closed the connection, which can be just after the client
/// has exited. Waits at most [`PATIENCE`], then returns what there is.
pub fn wait_accepted(server: &Proc, n: usize) -> Vec<Value> {
    let mut seen = Vec::new();
    crate::eventually(PATIENCE, || {
        seen = accepted(server);
        seen.len() >= n
    });
    seen
}

/// Starts `weft-tk echo` on `[::]:port` in `pod` and waits until it listens.
pub fn echo(pod: &Pod, port: u16) -> Result<Proc> {
    let mut cmd = pod.command(bin_path("weft-tk"));
    cmd.args(["echo", "--listen", &format!("[::]:{port}")]);
    let server = pod.spawn(&mut cmd)?;
    server.wait_for_json(PATIENCE, |v| v.get("listening").is_some())?;
    Ok(server)
}

/// Runs `weft-tk say` in `from`: sends `message` to `to`, returns the report
/// (`ok` is true when the echo came back intact).
pub fn say(from: &Pod, to: &str, message: &str, extra: &[&str]) -> Result<Value> {
    let mut args = vec!["say", "--connect", to, "--message", message];
    args.extend(extra);
    let out = from.exec(bin_path("weft-tk"), &args)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
        format!(
            "say in {} printed no report: {stdout:?} {}",
            from.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Starts `weft-tk name` on `[::]:port` in `pod`, answering with the pod's name.
pub fn name(pod: &Pod, port: u16) -> Result<Proc> {
    let mut cmd = pod.command(bin_path("weft-tk"));
    cmd.args([
        "name",
        "--listen",
        &format!("[::]:{port}"),
        "--name",
        &pod.name,
    ]);
    let server = pod.spawn(&mut cmd)?;
    server.wait_for_json(PATIENCE, |v| v.get("listening").is_some())?;
    Ok(server)
}

/// Runs `weft-tk who` in `from`: `count` connections to `to`, `concurrency` at
/// a time; the report has `counts` (per answering pod) and `failures`.
pub fn who(from: &Pod, to: &str, count: usize, concurrency: usize) -> Result<Value> {
    let (count, concurrency) = (count.to_string(), concurrency.to_string());
    let out = from.exec(
        bin_path("weft-tk"),
        [
            "who",
            "--connect",
            to,
            "--count",
            &count,
            "--concurrency",
            &concurrency,
            "--timeout-secs",
            "10",
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default()).with_context(|| {
        format!(
            "who in {} printed no report: {stdout:?} {}",
            from.name,
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
