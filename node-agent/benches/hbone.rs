//! The cost of HBONE's headers: building the `CONNECT` request on the client
//! (`connect_request`: authority, fresh `traceparent`, `forwarded`), reading
//! `forwarded` on the server (`forwarded_for`), and one CONNECT round trip through
//! h2 (HPACK encode and decode of the request and of the 200, framing, and the
//! wakeups of both connection tasks) between a client and a server configured like
//! the agent's, over an in-memory pipe on a single-threaded runtime: no TLS, no
//! sockets.
//!
//! `cargo bench -p weft --bench hbone` (add `-- --quick` for a short run).

use std::{
    hint::black_box,
    net::{IpAddr, SocketAddr},
};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use h2::client::SendRequest;
use http::{Request, Response, StatusCode};
use tokio::runtime::Runtime;
use weft::hbone::{
    client_builder,
    headers::{baggage, connect_request, forwarded_for},
    server_builder,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn headers(c: &mut Criterion) {
    let mut group = c.benchmark_group("hbone_connect_request");
    for (name, authority, source) in [
        ("v4", addr("10.2.1.2:8080"), Some(ip("10.1.1.2"))),
        ("v6", addr("[fd00::2]:8080"), Some(ip("fd00::1"))),
        ("v4_no_source", addr("10.2.1.2:8080"), None),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| {
                connect_request(
                    black_box(authority),
                    black_box(source),
                    baggage("shop", "web-0", "web", "v1"),
                )
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("hbone_forwarded_for");
    let with = |value: &str| {
        Request::builder()
            .header("forwarded", value)
            .body(())
            .unwrap()
    };
    let claimed = |req: &Request<()>| req.headers().get("forwarded").and_then(forwarded_for);
    for (name, req) in [
        ("v4", with("for=10.1.1.2")),
        ("v6", with("for=\"[fd00::1]\"")),
        ("v4_quoted_with_port", with("for=\"10.1.1.2:4567\"")),
        (
            "v4_after_other_pairs",
            with("by=10.2.1.2;proto=http;for=10.1.1.2"),
        ),
        ("absent", Request::new(())),
    ] {
        assert_eq!(
            claimed(&req).is_some(),
            name != "absent",
            "{name}: {:?}",
            req.headers()
        );
        group.bench_function(name, |b| b.iter(|| claimed(black_box(&req))));
    }
    group.finish();
}

/// An h2 client and server with the agent's settings, over `tokio::io::duplex`; the
/// server answers each CONNECT with 200 and ends the stream, as does the client's
/// request, so no stream stays open.
fn pair(rt: &Runtime) -> SendRequest<Bytes> {
    rt.block_on(async {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut conn = server_builder()
                .handshake::<_, Bytes>(server_io)
                .await
                .expect("server handshake");
            while let Some(Ok((req, mut respond))) = conn.accept().await {
                let status = if req
                    .headers()
                    .get("forwarded")
                    .and_then(forwarded_for)
                    .is_some()
                {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                };
                let resp = Response::builder().status(status).body(()).unwrap();
                let _ = respond.send_response(resp, true);
            }
        });
        let (send, connection) = client_builder()
            .handshake::<_, Bytes>(client_io)
            .await
            .expect("client handshake");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        send
    })
}

fn round_trip(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let send = pair(&rt);
    let authority = addr("10.2.1.2:8080");
    let source = Some(ip("10.1.1.2"));
    let once = || {
        rt.block_on(async {
            let mut send = send.clone().ready().await.expect("ready");
            let (response, _stream) = send
                .send_request(connect_request(authority, source, None), true)
                .expect("send_request");
            let response = response.await.expect("response");
            assert_eq!(response.status(), StatusCode::OK);
        })
    };
    c.bench_function("hbone_h2_connect_round_trip", |b| b.iter(once));
}

criterion_group!(benches, headers, round_trip);
criterion_main!(benches);
