//! Connections from an L7 front to endpoints, pooled and reused across requests
//! and across the workers.
//!
//! An endpoint in the mesh is reached over HBONE with the front's own identity:
//! each upstream HTTP connection is one `CONNECT` stream to the endpoint's
//! `ip:port`, carried by the HBONE pool's shared TLS connection to its node.
//! HTTP/2 upstreams multiplex every request on one connection per endpoint
//! (hyper waits for a free stream when the server's limit is reached, so no
//! request waits behind another's body); HTTP/1.1 upstreams keep a stack of idle
//! keep-alive connections per endpoint. An endpoint outside the mesh is reached
//! in plaintext.
//!
//! Why not hyper-util's pooling client: its pool is keyed by URI, and ours needs
//! the endpoint's identity and the HBONE stream beneath each connection; the
//! pool itself is a map of senders, which hyper's connection API makes small.

use std::{collections::HashMap, io, net::SocketAddr, sync::Mutex, time::Duration};

use bytes::Bytes;
use http::{Request, Response};
use hyper::{body::Incoming, client::conn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::debug;

use super::Body;
use crate::{
    hbone::{
        self,
        client::{Early, Pool, Target},
        io::StreamIo,
    },
    identity::SpiffeId,
    net::{Netns, socket::connect_from},
};

/// Idle HTTP/1.1 connections kept per endpoint, beyond which a finished
/// connection is closed.
const MAX_IDLE_H1: usize = 64;

/// What to speak to an endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http1,
    H2c,
}

/// An endpoint to send a request to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// The application's `ip:port`.
    pub addr: SocketAddr,
    /// Its identity when it is in the mesh (reached over HBONE); `None`:
    /// plaintext.
    pub identity: Option<SpiffeId>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("HBONE to {addr}: {source}")]
    Hbone {
        addr: SocketAddr,
        source: hbone::client::Error,
    },
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("no connection to {addr} within {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("request to {addr} failed: {source}")]
    Request {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

impl Error {
    /// Whether no byte of the request reached the application: a connect
    /// failure, or a connection the server closed before taking the request
    /// (safe to send again, whatever the method).
    pub fn before_request(&self) -> bool {
        match self {
            Error::Request { source, .. } => source.is_canceled(),
            _ => true,
        }
    }

    /// Whether the endpoint is to blame (for outlier detection): not when this
    /// side has no certificate yet, nor when the endpoint's agent refused on
    /// policy.
    pub fn blames_endpoint(&self) -> bool {
        match self {
            Error::Hbone { source, .. } => !source.is_local() && !source.is_denied(),
            _ => true,
        }
    }
}

/// An endpoint, a protocol, and the worker ([`crate::workers::current`]):
/// each worker keeps its own connections, whose tasks run on it, so a request
/// never hands its upstream work to another thread.
type Key = (Endpoint, Protocol, usize);

/// `ep`'s key for `proto` on this worker.
fn key(ep: &Endpoint, proto: Protocol) -> Key {
    (ep.clone(), proto, crate::workers::current())
}

enum Idle {
    H2(conn::http2::SendRequest<Body>),
    H1(Vec<conn::http1::SendRequest<Body>>),
}

/// Upstream connections of one front.
pub struct Upstreams {
    hbone: Pool,
    netns: Netns,
    /// The front's identity: upstream streams are opened as it.
    me: SpiffeId,
    connect_timeout: Duration,
    conns: Mutex<HashMap<Key, Idle>>,
}

impl Upstreams {
    pub fn new(hbone: Pool, netns: Netns, me: SpiffeId, connect_timeout: Duration) -> Self {
        Upstreams {
            hbone,
            netns,
            me,
            connect_timeout,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `req` to `ep` and returns the response head (its body streams).
    pub async fn send(
        &self,
        ep: &Endpoint,
        proto: Protocol,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Error> {
        let addr = ep.addr;
        let request = |source| Error::Request { addr, source };
        match proto {
            Protocol::H2c => {
                let mut sender = match self.idle_h2(ep) {
                    Some(s) => s,
                    None => {
                        let s = self.connect_h2(ep).await?;
                        self.lock()
                            .insert(key(ep, Protocol::H2c), Idle::H2(s.clone()));
                        s
                    }
                };
                sender.ready().await.map_err(request)?;
                sender.send_request(req).await.map_err(request)
            }
            Protocol::Http1 => {
                let mut sender = match self.idle_h1(ep) {
                    Some(s) => s,
                    None => self.connect_h1(ep).await?,
                };
                let response = sender.send_request(req).await.map_err(request)?;
                // Back on the stack now: it is taken again only once ready,
                // that is once this response's body has been read to its end.
                let mut conns = self.lock();
                if let Idle::H1(stack) = conns
                    .entry(key(ep, Protocol::Http1))
                    .or_insert_with(|| Idle::H1(Vec::new()))
                    && stack.len() < MAX_IDLE_H1
                {
                    stack.push(sender);
                }
                Ok(response)
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Idle>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn idle_h2(&self, ep: &Endpoint) -> Option<conn::http2::SendRequest<Body>> {
        let mut conns = self.lock();
        let key = key(ep, Protocol::H2c);
        match conns.get(&key) {
            Some(Idle::H2(s)) if !s.is_closed() => Some(s.clone()),
            Some(_) => {
                conns.remove(&key);
                None
            }
            None => None,
        }
    }

    fn idle_h1(&self, ep: &Endpoint) -> Option<conn::http1::SendRequest<Body>> {
        let mut conns = self.lock();
        let Some(Idle::H1(stack)) = conns.get_mut(&key(ep, Protocol::Http1)) else {
            return None;
        };
        stack.retain(|s| !s.is_closed());
        let i = stack.iter().rposition(|s| s.is_ready())?;
        Some(stack.swap_remove(i))
    }

    async fn connect_h2(&self, ep: &Endpoint) -> Result<conn::http2::SendRequest<Body>, Error> {
        let io = self.open(ep).await?;
        let (sender, connection) = conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(hbone::STREAM_WINDOW)
            .initial_connection_window_size(hbone::CONNECTION_WINDOW)
            .handshake(io)
            .await
            .map_err(|source| Error::Handshake {
                addr: ep.addr,
                source,
            })?;
        let addr = ep.addr;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(%addr, error = %e, "upstream HTTP/2 connection ended");
            }
        });
        Ok(sender)
    }

    async fn connect_h1(&self, ep: &Endpoint) -> Result<conn::http1::SendRequest<Body>, Error> {
        let io = self.open(ep).await?;
        let (sender, connection) =
            conn::http1::handshake(io)
                .await
                .map_err(|source| Error::Handshake {
                    addr: ep.addr,
                    source,
                })?;
        let addr = ep.addr;
        tokio::spawn(async move {
            // Upgrades (WebSocket) take the connection over once answered 101.
            if let Err(e) = connection.with_upgrades().await {
                debug!(%addr, error = %e, "upstream HTTP/1.1 connection ended");
            }
        });
        Ok(sender)
    }

    async fn open(&self, ep: &Endpoint) -> Result<TokioIo<Conn>, Error> {
        self.connect(ep).await.map(TokioIo::new)
    }

    /// A byte stream to `ep`: an HBONE stream as this front, or plaintext.
    pub async fn connect(&self, ep: &Endpoint) -> Result<Conn, Error> {
        let addr = ep.addr;
        let attempt = async {
            match &ep.identity {
                Some(dst) => {
                    let tunnel = self
                        .hbone
                        .open(
                            Target {
                                netns: &self.netns,
                                src: &self.me,
                                dst,
                                hbone: SocketAddr::new(addr.ip(), weft_common::INBOUND_HBONE_PORT),
                                authority: addr,
                                // Upstream connections carry many sources'
                                // requests: each request names its own
                                // (`forwarded`), the stream names none.
                                source_ip: None,
                                baggage: None,
                            },
                            None,
                            &mut Early::default(),
                        )
                        .await
                        .map_err(|source| Error::Hbone { addr, source })?;
                    Ok(Conn::Hbone(StreamIo::new(tunnel.send, tunnel.recv)))
                }
                None => connect_from(&self.netns, addr, None, self.connect_timeout)
                    .await
                    .map(Conn::Plain)
                    .map_err(|source| Error::Connect { addr, source }),
            }
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                addr,
                timeout: self.connect_timeout,
            }),
        }
    }
}

/// A connection's bytes: an HBONE stream or a plaintext socket.
pub enum Conn {
    Hbone(StreamIo),
    Plain(tokio::net::TcpStream),
}

impl tokio::io::AsyncRead for Conn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Hbone(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Conn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Hbone(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Hbone(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Hbone(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A response body of bytes already known.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt as _;
    http_body_util::Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}
