//! Proves the L7 test tools themselves, with no Weft component involved: the
//! servers and clients of `weft_tests::l7` talk pod to pod in a one-node cluster
//! with nothing enrolled, so a waypoint test that fails later fails because of
//! the waypoint, not because of its tools.

use std::collections::BTreeSet;

use anyhow::Result;
use weft_tests::l7::{self, CurlResult};
use weft_tests::{Cluster, Pod, require_privileged};

const HTTP_PORT: u16 = 8080;
const PROXY_PORT: u16 = 8081;
const GRPC_PORT: u16 = 50051;

fn url(pod: &Pod, path: &str) -> String {
    format!("http://{}:{HTTP_PORT}{path}", pod.ip)
}

/// The string values of the echo's `headers[name]`.
fn echoed_header<'a>(r: &'a CurlResult, name: &str) -> Vec<&'a str> {
    r.body["headers"][name]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .collect()
}

#[test]
fn http_echo_reflects_requests_over_http1_and_h2c() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("l7_echo", 1, 2)?;
    let (client, server) = (c.pod(0, 0), c.pod(0, 1));
    let echo = l7::http_echo(server, HTTP_PORT, "echo-a")?;

    let h1 = l7::curl(
        client,
        &url(server, "/some/path?a=1&b=two"),
        &["-H", "X-Custom: one", "-H", "x-custom: two"],
    )?;
    assert_eq!((h1.status, h1.http_version.as_str()), (200, "1.1"));
    assert_eq!(h1.header("content-type"), Some("application/json"));
    assert_eq!(h1.header("x-echo-pod"), Some("echo-a"));
    assert_eq!(h1.body["pod"], "echo-a");
    assert_eq!(h1.body["method"], "GET");
    assert_eq!(h1.body["path"], "/some/path");
    assert_eq!(h1.body["query"], "a=1&b=two");
    assert_eq!(h1.body["protocol"], "HTTP/1.1");
    assert_eq!(h1.body["host"], format!("{}:{HTTP_PORT}", server.ip));
    assert_eq!(echoed_header(&h1, "x-custom"), ["one", "two"]);

    let h2 = l7::curl(
        client,
        &url(server, "/upload"),
        &[
            "--http2-prior-knowledge",
            "-H",
            "x-echo-set-x-reply: yes",
            "--data-binary",
            "twelve bytes",
        ],
    )?;
    assert_eq!((h2.status, h2.http_version.as_str()), (200, "2"));
    assert_eq!(h2.body["protocol"], "HTTP/2");
    assert_eq!(h2.body["method"], "POST");
    assert_eq!(h2.body["body_bytes"], 12);
    assert_eq!(h2.body["host"], format!("{}:{HTTP_PORT}", server.ip));
    assert_eq!(h2.header("x-reply"), Some("yes"));

    // IPv6, and an h2c-only replica that refuses HTTP/1.1.
    let v6 = format!("http://[{}]:{HTTP_PORT}/six", server.ip6);
    assert_eq!(l7::curl(client, &v6, &[])?.body["path"], "/six");
    let _h2c = l7::http_echo_with(server, HTTP_PORT + 1, "echo-h2c", &["--h2c-only"])?;
    let h2c_url = format!("http://{}:{}/", server.ip, HTTP_PORT + 1);
    let only_h2 = l7::curl(client, &h2c_url, &["--http2-prior-knowledge"])?;
    assert_eq!(
        (only_h2.status, &only_h2.body["pod"]),
        (200, &"echo-h2c".into())
    );
    assert!(l7::curl(client, &h2c_url, &["--http1.1"]).is_err());

    let served = l7::wait_served(&echo, 3);
    let paths: Vec<_> = served.iter().map(|v| v["path"].clone()).collect();
    assert_eq!(paths, ["/some/path", "/upload", "/six"]);
    assert!(
        served
            .iter()
            .all(|v| v["pod"] == "echo-a" && v["status"] == 200)
    );
    Ok(())
}

#[test]
fn http_echo_answers_chosen_statuses_and_flakes_on_demand() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("l7_status", 1, 2)?;
    let (client, server) = (c.pod(0, 0), c.pod(0, 1));
    let _echo = l7::http_echo(server, HTTP_PORT, "steady")?;
    let flaky = l7::http_echo_with(server, HTTP_PORT + 1, "flaky", &["--fail-every", "2"])?;

    assert_eq!(
        l7::curl(client, &url(server, "/status/503"), &[])?.status,
        503
    );
    assert_eq!(
        l7::curl(client, &url(server, "/status/404"), &[])?.status,
        404
    );
    assert_eq!(
        l7::curl(client, &url(server, "/?fail=502"), &[])?.status,
        502
    );
    let slow = l7::curl(client, &url(server, "/?delay_ms=300"), &[])?;
    assert!(
        slow.info["time_total"].as_f64().unwrap_or(0.0) >= 0.3,
        "{slow:?}"
    );

    let flaky_url = format!("http://{}:{}/", server.ip, HTTP_PORT + 1);
    let statuses: Vec<u16> = (0..6)
        .map(|_| l7::curl(client, &flaky_url, &[]).map(|r| r.status))
        .collect::<Result<_>>()?;
    assert_eq!(statuses, [200, 503, 200, 503, 200, 503]);
    let logged: Vec<_> = l7::wait_served(&flaky, 6)
        .iter()
        .map(|v| v["status"].as_u64())
        .collect();
    assert_eq!(logged.len(), 6);
    assert_eq!(logged.iter().filter(|s| **s == Some(503)).count(), 3);
    Ok(())
}

#[test]
fn http_echo_streams_a_10_mib_response_and_counts_a_3_mib_upload() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("l7_body", 1, 2)?;
    let (client, server) = (c.pod(0, 0), c.pod(0, 1));
    let _echo = l7::http_echo(server, HTTP_PORT, "big")?;
    let ten_mib = 10 << 20;
    for h2 in [false, true] {
        let args: &[&str] = if h2 {
            &["--http2-prior-knowledge"]
        } else {
            &[]
        };
        let r = l7::curl(
            client,
            &url(server, &format!("/?body_bytes={ten_mib}")),
            args,
        )?;
        assert_eq!((r.status, r.size), (200, ten_mib), "h2: {h2}");
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert!(r.body.is_null(), "a body over KEPT_BODY is not kept");
    }
    let upload = std::env::temp_dir().join(format!("{}-upload", client.netns));
    std::fs::write(&upload, vec![b'u'; 3 << 20])?;
    let data = format!("@{}", upload.display());
    let r = l7::curl(client, &url(server, "/up"), &["--data-binary", &data]);
    let _ = std::fs::remove_file(&upload);
    assert_eq!(r?.body["body_bytes"], 3 << 20);
    Ok(())
}

#[test]
fn h2load_gets_1000_answers_over_h2c_and_http1() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("l7_h2load", 1, 2)?;
    let (client, server) = (c.pod(0, 0), c.pod(0, 1));
    let echo = l7::http_echo(server, HTTP_PORT, "load")?;
    for h2 in [true, false] {
        let r = l7::h2load(client, &url(server, "/load"), 1000, 10, h2)?;
        assert_eq!((r.done, r.succeeded), (1000, 1000), "h2: {h2}: {r:?}");
        assert_eq!(r.status, [1000, 0, 0, 0], "h2: {h2}: {r:?}");
        assert!(r.req_per_s > 0.0, "{r:?}");
    }
    assert_eq!(l7::wait_served(&echo, 2000).len(), 2000);
    Ok(())
}

#[test]
fn nginx_proxies_to_http_echo_over_keepalive_upstream_connections() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("l7_nginx", 1, 2)?;
    let (front, back) = (c.pod(0, 0), c.pod(0, 1));
    let echo = l7::http_echo(back, HTTP_PORT, "behind-nginx")?;
    let nginx = l7::nginx(
        front,
        &format!(
            "upstream echo {{ server {}:{HTTP_PORT}; keepalive 8; }}\n\
             server {{\n\
               listen {PROXY_PORT};\n\
               location / {{\n\
                 proxy_pass http://echo;\n\
                 proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n\
                 proxy_set_header Host $http_host;\n\
               }}\n\
             }}",
            back.ip
        ),
    )?;
    let via = format!("http://127.0.0.1:{PROXY_PORT}/through?x=1");
    for _ in 0..10 {
        let r = l7::curl(front, &via, &[])?;
        assert_eq!(r.status, 200, "{r:?}\n{}", nginx.error_log());
        assert_eq!(r.body["pod"], "behind-nginx");
        assert_eq!(r.body["path"], "/through");
        assert_eq!(r.body["host"], format!("127.0.0.1:{PROXY_PORT}"));
    }
    // Ten curls, ten downstream connections; upstream, one kept alive.
    let served = l7::wait_served(&echo, 10);
    let peers: BTreeSet<_> = served.iter().map(|v| v["peer"].to_string()).collect();
    assert_eq!(served.len(), 10);
    assert_eq!(peers.len(), 1, "upstream connections: {peers:?}");
    Ok(())
}

#[test]
fn grpc_echo_answers_unary_errors_with_trailers_and_streams() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("l7_grpc", 1, 2)?;
    let (client, server) = (c.pod(0, 0), c.pod(0, 1));
    let grpc = l7::grpc_server(server, GRPC_PORT, "grpc-a")?;
    let target = format!("{}:{GRPC_PORT}", server.ip);

    let ok = l7::grpc_call(client, &target, "Say", "hello", &[])?;
    assert_eq!((ok.code, ok.code_name.as_str()), (0, "OK"));
    assert_eq!(ok.messages, ["hello"]);
    assert_eq!(ok.trailers["x-echo-pod"], ["grpc-a"]);

    let failed = l7::grpc_call(
        client,
        &target,
        "Say",
        "hello",
        &[
            ("x-echo-grpc-status", "9"),
            ("x-echo-grpc-message", "not now"),
            ("x-echo-trailer-x-reason", "testing"),
        ],
    )?;
    assert_eq!(
        (
            failed.code,
            failed.code_name.as_str(),
            failed.details.as_str()
        ),
        (9, "FAILED_PRECONDITION", "not now")
    );
    assert!(failed.messages.is_empty());
    assert_eq!(failed.trailers["x-reason"], ["testing"]);

    let streamed = l7::grpc_call(client, &target, "Stream", "tick", &[("x-echo-count", "5")])?;
    assert_eq!(streamed.code, 0, "{streamed:?}");
    assert_eq!(streamed.messages, ["tick"; 5]);

    let v6 = format!("[{}]:{GRPC_PORT}", server.ip6);
    assert_eq!(
        l7::grpc_call(client, &v6, "Say", "six", &[])?.messages,
        ["six"]
    );
    let nobody = format!("{}:{}", server.ip, GRPC_PORT + 1);
    assert_eq!(
        l7::grpc_call(client, &nobody, "Say", "x", &[])?.code_name,
        "UNAVAILABLE"
    );

    let calls: Vec<_> = l7::wait_served(&grpc, 4)
        .iter()
        .map(|v| v["method"].clone())
        .collect();
    assert_eq!(calls, ["Say", "Say", "Stream", "Say"]);
    Ok(())
}

#[test]
fn websocket_echo_round_trips_through_http_echo() -> Result<()> {
    if !require_privileged() {
        return Ok(());
    }
    let c = Cluster::new("l7_ws", 1, 2)?;
    let (client, server) = (c.pod(0, 0), c.pod(0, 1));
    let echo = l7::http_echo(server, HTTP_PORT, "ws")?;
    let big = "w".repeat(70_000);
    let sent = ["hello", "", big.as_str(), "ünïcödé"];
    let url = format!("ws://{}:{HTTP_PORT}/chat", server.ip);
    assert_eq!(l7::ws_echo_roundtrip(client, &url, &sent)?, sent);
    let upgrade = &l7::wait_served(&echo, 1)[0];
    assert_eq!(
        (&upgrade["status"], &upgrade["path"]),
        (&101.into(), &"/chat".into())
    );
    Ok(())
}
