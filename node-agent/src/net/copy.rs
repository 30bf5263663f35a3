//! Bidirectional byte copy between two TCP sockets (node-local and plaintext
//! connections), with correct half-close.
//!
//! Each direction reads into a buffer and writes it out; at end-of-stream it
//! shuts down the write side of the other socket (a FIN), while the opposite
//! direction keeps flowing until its own end. An error in either direction ends
//! both, and both sockets are reset so neither peer mistakes an abort for a clean
//! end. Byte counts survive errors, for the access log.
//!
//! A direction holds a buffer only while bytes move ([`super::buffer`]), so an
//! idle connection costs its task and its sockets, not 32 KiB of buffers.
//! Moving the bytes in the kernel instead (`splice` through a pipe from a pool,
//! as HAProxy does) was measured and not kept: on loopback and veth sockets it
//! cost more CPU per byte than these reads and writes, and one more system call
//! per message, since a short `splice` does not prove the socket empty
//! (BENCHMARKS.md, "What was changed, and what was tried").

use std::{
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

use super::buffer::{START_BUF, give_buf, next_size, read_some, take_buf};

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

async fn one_way(
    reader: &mut ReadHalf<'_>,
    writer: &mut WriteHalf<'_>,
    count: &AtomicU64,
    read_side: Side,
    write_side: Side,
) -> Result<(), (Side, io::Error)> {
    let socket: &TcpStream = reader.as_ref();
    let mut want = START_BUF;
    // Capacity 0: no buffer held.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.capacity() == 0 {
            buf = if want == START_BUF {
                take_buf()
            } else {
                Vec::with_capacity(want)
            };
        }
        let n = match read_some(socket, &mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Empty for now: unless bulk is moving, wait without a buffer.
                if want == START_BUF {
                    give_buf(std::mem::take(&mut buf));
                }
                poll_fn(|cx| socket.poll_read_ready(cx))
                    .await
                    .map_err(|e| (read_side, e))?;
                continue;
            }
            Err(e) => return Err((read_side, e)),
        };
        if n == 0 {
            give_buf(buf);
            // Half-close: pass the FIN on, keep the other direction open.
            return writer.shutdown().await.map_err(|e| (write_side, e));
        }
        writer.write_all(&buf).await.map_err(|e| (write_side, e))?;
        count.fetch_add(n as u64, Relaxed);
        buf.clear();
        let next = next_size(want, n);
        if next > want {
            give_buf(std::mem::replace(&mut buf, Vec::with_capacity(next)));
        } else if next < want {
            // Bulk has stopped: back to small, and to no buffer while idle.
            buf = Vec::new();
        }
        want = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::buffer::testing::{buffers_out, buffers_pooled, pair, write_bulk_quiet_bulk};
    use std::time::Duration;
    use tokio::{io::AsyncReadExt, time::timeout};

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

    /// Bulk, then a pause with a few bytes, then bulk again: the buffer grows,
    /// is given up when the bulk stops, and is taken again; no byte is lost or
    /// reordered on the way.
    #[tokio::test]
    async fn bulk_then_quiet_then_bulk_arrives_intact() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&mut down, &mut up).await });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        });
        let sent = write_bulk_quiet_bulk(&mut client).await;
        client.shutdown().await.unwrap();
        let got = reader.await.unwrap();
        assert_eq!(got.len(), sent.len());
        assert!(got == sent, "the bytes came out changed");
        let t = proxy.await.unwrap();
        assert!(t.result.is_ok(), "{:?}", t.result);
        assert_eq!(t.sent, sent.len() as u64);
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

    /// Pattern bytes, so that a lost, doubled or reordered byte shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Connections that have moved bytes both ways and gone quiet hold no
    /// buffer: the buffers are back in the worker's pool, and the next burst
    /// takes them from there instead of allocating.
    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let mut held = Vec::new();
        for i in 0..10u8 {
            let (mut client, mut down) = pair().await;
            let (mut up, mut server) = pair().await;
            let proxy = tokio::spawn(async move { bidirectional(&mut down, &mut up).await });
            let request = pattern(1000 + usize::from(i), i);
            client.write_all(&request).await.unwrap();
            let mut got = vec![0u8; request.len()];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(got, request);
            server.write_all(&request[..10]).await.unwrap();
            let mut back = [0u8; 10];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back[..], request[..10]);
            held.push((client, server, proxy));
        }
        // Let each direction find its socket empty.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(buffers_out(), 0, "idle connections still hold buffers");
        let pooled = buffers_pooled();
        assert!(
            (1..=2).contains(&pooled),
            "{pooled} pipes pooled for one burst at a time"
        );

        // A destination that does not read holds its source back.
        let (mut client, _server, _proxy) = held.pop().unwrap();
        let big = pattern(32 << 20, 3);
        let stalled = timeout(Duration::from_millis(300), client.write_all(&big)).await;
        assert!(
            stalled.is_err(),
            "32 MiB went into a destination that never reads"
        );
    }

    /// Thousands of tiny segments, queued before the proxy reads: they must
    /// all arrive, in order, though no FIN keeps the socket readable.
    #[tokio::test]
    async fn many_tiny_segments_arrive_whole_and_in_order() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        client.set_nodelay(true).unwrap();
        let message = pattern(5_000 * 7, 9);
        for chunk in message.chunks(7) {
            client.write_all(chunk).await.unwrap();
        }
        // No FIN yet: a socket that has seen one stays readable for good,
        // which would hide bytes left behind.
        let proxy = tokio::spawn(async move { bidirectional(&mut down, &mut up).await });
        let mut got = vec![0u8; message.len()];
        timeout(Duration::from_secs(5), server.read_exact(&mut got))
            .await
            .expect("bytes stuck in the proxy")
            .unwrap();
        assert!(got == message, "bytes lost or reordered");
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        drop(server);
        let t = proxy.await.unwrap();
        assert_eq!(t.sent, message.len() as u64);
    }

    /// A destination that stops reading holds the source back (the proxy
    /// takes no more than the sockets and one buffer hold), and nothing is lost
    /// when it reads again.
    #[tokio::test]
    async fn a_slow_destination_holds_the_source_back() {
        let (mut client, mut down) = pair().await;
        let (mut up, mut server) = pair().await;
        let proxy = tokio::spawn(async move { bidirectional(&mut down, &mut up).await });
        let data = pattern(256 << 20, 5);
        let writer = tokio::spawn(async move {
            client.write_all(&data).await.unwrap();
            client.shutdown().await.unwrap();
            (client, data)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !writer.is_finished(),
            "256 MiB taken by a proxy whose destination does not read"
        );
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        let (_client, data) = writer.await.unwrap();
        assert!(got == data, "bytes lost or reordered");
        drop(server);
        let t = proxy.await.unwrap();
        assert!(t.result.is_ok(), "{:?}", t.result);
        assert_eq!(t.sent, data.len() as u64);
    }
}
