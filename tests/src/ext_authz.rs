//! A real gRPC external authorization server (Envoy's
//! `envoy.service.auth.v3.Authorization/Check`), run as `weft-tk
//! ext-authz-grpc` in a pod: HTTP/2 with prior knowledge (hyper), gRPC framing
//! and trailers, the messages of [`weft::http::extauthz`].
//!
//! It allows a request whose check carries header `x-ext-authz: allow`,
//! setting `x-ext-authz-user: <the source principal, or anonymous>` on it
//! upstream; it denies any other with status 7 (PERMISSION_DENIED), HTTP 403
//! and `x-ext-authz-check-result: denied`. A check with `x-ext-authz: error`
//! gets gRPC status 13 (INTERNAL), so the waypoint's failure mode can be seen.
//! Each check is printed as a JSON line.

use std::{
    collections::VecDeque,
    convert::Infallible,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use weft::http::extauthz::{CHECK, CheckRequest, CheckResponse, MAX_MESSAGE};

/// A body of fixed frames: the message, then the trailers.
pub struct Frames(VecDeque<Frame<Bytes>>);

impl http_body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// Serves `listener` until the process ends.
pub async fn serve(listener: TcpListener) -> io::Result<()> {
    loop {
        let (stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(
                    |req| async move { Ok::<_, Infallible>(handle(req).await) },
                );
            let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(e) = served {
                eprintln!("ext-authz-grpc: {e}");
            }
        });
    }
}

fn grpc(message: Option<Vec<u8>>, status: u32) -> Response<Frames> {
    let mut frames = VecDeque::new();
    if let Some(m) = message {
        frames.push_back(Frame::data(Bytes::from(weft::grpc::frame(&m))));
    }
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from(status));
    frames.push_back(Frame::trailers(trailers));
    Response::builder()
        .header("content-type", "application/grpc")
        .body(Frames(frames))
        .expect("a valid response")
}

async fn handle(req: Request<Incoming>) -> Response<Frames> {
    if req.uri().path() != CHECK {
        return grpc(None, 12); // UNIMPLEMENTED
    }
    let body = match Limited::new(req.into_body(), MAX_MESSAGE + 5)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => return grpc(None, 3),
    };
    let check = match weft::grpc::unframe(&body, MAX_MESSAGE) {
        Ok(Some((m, _))) => CheckRequest::decode(m),
        _ => return grpc(None, 3),
    };
    let Ok(check) = check else {
        return grpc(None, 3); // INVALID_ARGUMENT
    };
    let asked = check.header("x-ext-authz").unwrap_or_default().to_owned();
    println!(
        "{}",
        json!({
            "check": check.path, "method": check.method, "host": check.host,
            "principal": check.source_principal,
            "source": check.source.map(|s| s.ip().to_string()),
            "asked": asked,
        })
    );
    let answer = match asked.as_str() {
        "error" => return grpc(None, 13),
        "allow" => CheckResponse {
            code: 0,
            ok_headers: vec![(
                "x-ext-authz-user".into(),
                if check.source_principal.is_empty() {
                    "anonymous".into()
                } else {
                    check.source_principal.clone()
                },
            )],
            ..Default::default()
        },
        _ => CheckResponse {
            code: 7,
            denied_status: 403,
            denied_headers: vec![("x-ext-authz-check-result".into(), "denied".into())],
            denied_body: "denied by ext-authz-grpc".into(),
            ..Default::default()
        },
    };
    grpc(Some(answer.encode()), 0)
}
