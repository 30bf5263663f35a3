//! Bidirectional byte copy with correct half-close.
//!
//! Each direction reads into its own buffer and writes it out; at end-of-stream it
//! shuts down the write side of the other socket (a FIN), while the opposite
//! direction keeps flowing until its own end. An error in either direction ends
//! both, and both sockets are reset so neither peer mistakes an abort for a clean
//! end. Byte counts survive errors, for the access log.

use std::{
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};

/// Per-direction buffer: starts small, so quiet and request/response connections
/// stay cheap, and doubles each time a read fills it, so a bulk transfer soon
/// moves up to `MAX_BUF` per `read`/`write` pair (fewer syscalls per byte).
const START_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

/// Which socket failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Downstream,
    Upstream,
}

#[derive(Debug)]
pub struct Transfer {
    /// Downstream → upstream.
    pub sent: u64,
    /// Upstream → downstream.
    pub received: u64,
    pub result: Result<(), (Side, io::Error)>,
}

pub async fn bidirectional(down: &mut TcpStream, up: &mut TcpStream) -> Transfer {
    let sent = AtomicU64::new(0);
    let received = AtomicU64::new(0);
    let result = {
        let (mut dr, mut dw) = down.split();
        let (mut ur, mut uw) = up.split();
        let forward = one_way(&mut dr, &mut uw, &sent, Side::Downstream, Side::Upstream);
        let backward = one_way(
            &mut ur,
            &mut dw,
            &received,
            Side::Upstream,
            Side::Downstream,
        );
        tokio::try_join!(forward, backward).map(|_| ())
    };
    if result.is_err() {
        let _ = down.set_zero_linger();
        let _ = up.set_zero_linger();
    }
    Transfer {
        sent: sent.into_inner(),
        received: received.into_inner(),
        result,
    }
}

async fn one_way<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &AtomicU64,
    read_side: Side,
    write_side: Side,
) -> Result<(), (Side, io::Error)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; START_BUF];
    loop {
        let n = reader.read(&mut buf).await.map_err(|e| (read_side, e))?;
        if n == 0 {
            // Half-close: pass the FIN on, keep the other direction open.
            return writer.shutdown().await.map_err(|e| (write_side, e));
        }
        writer
            .write_all(&buf[..n])
            .await
            .map_err(|e| (write_side, e))?;
        count.fetch_add(n as u64, Relaxed);
        if n == buf.len() && buf.len() < MAX_BUF {
            buf.resize(buf.len() * 2, 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// client <-> [down | proxy | up] <-> server, over real loopback sockets.
    #[tokio::test]
    async fn half_close_keeps_the_response_flowing() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&mut down, &mut up).await });

        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        // The server sees the whole request and then EOF...
        let mut req = Vec::new();
        server.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        // ...and can still answer, at length, after it.
        let response = vec![7u8; 1 << 20];
        server.write_all(&response).await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, response);

        let t = proxy.await.unwrap();
        assert!(t.result.is_ok(), "{:?}", t.result);
        assert_eq!(t.sent, 7);
        assert_eq!(t.received, 1 << 20);
    }

    #[tokio::test]
    async fn a_reset_upstream_resets_downstream() {
        let (mut client, mut down) = pair().await;
        let (mut up, server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&mut down, &mut up).await });
        client.write_all(b"x").await.unwrap();
        server.set_zero_linger().unwrap();
        drop(server);
        let t = proxy.await.unwrap();
        assert!(
            matches!(t.result, Err((Side::Upstream, _))),
            "{:?}",
            t.result
        );
        let mut buf = [0u8; 1];
        let err = client.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    }
}
