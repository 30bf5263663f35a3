//! Bidirectional byte copy between two TCP sockets (node-local and plaintext
//! connections), with correct half-close.
//!
//! Each direction reads into a buffer and writes it out; at end-of-stream it
//! shuts down the write side of the other socket (a FIN), while the opposite
//! direction keeps flowing until its own end. An error in either direction ends
//! both, and both sockets are reset so neither peer mistakes an abort for a clean
//! end. Byte counts survive errors, for the access log.
//!
//! A direction holds a buffer only while bytes move (see [`START_BUF`]), so an
//! idle connection costs its task and its sockets, not 32 KiB of buffers.
//! Moving the bytes in the kernel instead (`splice` through a pipe from a pool,
//! as HAProxy does) was measured and not kept: on loopback and veth sockets it
//! cost more CPU per byte than these reads and writes, and one more system call
//! per message, since a short `splice` does not prove the socket empty
//! (BENCHMARKS.md, "What was changed, and what was tried").

use std::{
    cell::RefCell,
    future::poll_fn,
    io,
    sync::atomic::{AtomicU64, Ordering::Relaxed},
};

use bytes::BufMut;
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::{
        TcpStream,
        tcp::{ReadHalf, WriteHalf},
    },
};

/// Per-direction buffer: starts small, so quiet and request/response connections
/// stay cheap, and doubles each time a read fills it, so a bulk transfer soon
/// moves up to `MAX_BUF` per `read`/`write` pair (fewer syscalls per byte).
/// A direction that is not moving bulk holds no buffer while it waits for bytes:
/// it takes one from its worker's pool when the socket is readable and gives it
/// back when a read finds the socket empty, so an idle connection costs no buffer.
pub(crate) const START_BUF: usize = 16 * 1024;
pub(crate) const MAX_BUF: usize = 256 * 1024;

/// At most this many `START_BUF` buffers wait in a worker thread's pool (256 KiB).
/// Only directions in the middle of a read and its write hold one, so a worker
/// rarely needs more; beyond it buffers go back to the allocator.
const POOL_MAX: usize = 16;

thread_local! {
    /// Empty `START_BUF` buffers of this thread's connections. A pool, not the
    /// allocator, because freeing 16 KiB at a time into the top of a thread's heap
    /// makes glibc give the pages back (`madvise`) and fault them in again on the
    /// next message.
    static POOL: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    /// Tests: pool buffers taken and not given back.
    #[cfg(test)]
    static OUT: std::cell::Cell<isize> = const { std::cell::Cell::new(0) };
}

/// An empty buffer of `START_BUF` capacity, from this thread's pool if it has one.
pub(crate) fn take_buf() -> Vec<u8> {
    #[cfg(test)]
    OUT.set(OUT.get() + 1);
    POOL.with_borrow_mut(Vec::pop)
        .unwrap_or_else(|| Vec::with_capacity(START_BUF))
}

/// Reads what `socket` has into the spare capacity of `buf` (`try_read_buf`),
/// and takes a read that comes back short of the space offered as proof that
/// the socket is drained, as tokio's own `poll_read` does: its readiness is
/// cleared, so the next wait goes straight to the poller instead of first making
/// a `read` that can only fail with `WouldBlock`. The readiness cleared is the
/// one seen before the read, so bytes that arrive during it are not missed.
/// `WouldBlock` when the socket has nothing (without a system call if no event
/// said otherwise).
pub(crate) fn read_some(socket: &TcpStream, buf: &mut impl BufMut) -> io::Result<usize> {
    let mut got = 0;
    let read = socket.try_io(Interest::READABLE, || {
        let offered = buf.chunk_mut().len();
        got = socket.try_read_buf(buf)?;
        if got > 0 && got < offered {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(got)
        }
    });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

/// Tests: pool buffers this thread has taken and not given back.
#[cfg(test)]
pub(crate) fn buffers_out() -> isize {
    OUT.get()
}

/// Tests: writes 3 MiB, a pause with a few bytes, and 3 MiB again into
/// `socket` (bulk growing the buffer, stopping, and starting over); returns
/// every byte written, to compare with what comes out.
#[cfg(test)]
pub(crate) async fn write_bulk_quiet_bulk(socket: &mut TcpStream) -> Vec<u8> {
    let bulk = |seed: u8| -> Vec<u8> {
        (0..3u32 << 20)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    };
    let mut written = Vec::new();
    for (i, part) in [bulk(1), b"quiet".to_vec(), bulk(2)]
        .into_iter()
        .enumerate()
    {
        socket.write_all(&part).await.unwrap();
        written.extend_from_slice(&part);
        if i == 1 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    written
}

/// Tests: empty buffers in this thread's pool.
#[cfg(test)]
pub(crate) fn buffers_pooled() -> usize {
    POOL.with_borrow(Vec::len)
}

/// Returns a buffer taken with [`take_buf`] to this thread's pool (or frees it
/// if the pool is full or it is not a `START_BUF` one).
pub(crate) fn give_buf(mut buf: Vec<u8>) {
    if buf.capacity() != START_BUF {
        return;
    }
    #[cfg(test)]
    OUT.set(OUT.get() - 1);
    buf.clear();
    POOL.with_borrow_mut(|pool| {
        if pool.len() < POOL_MAX {
            pool.push(buf);
        }
    });
}

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
        let full = n == buf.capacity();
        buf.clear();
        if full && want < MAX_BUF {
            want = (want * 2).min(MAX_BUF);
            give_buf(std::mem::replace(&mut buf, Vec::with_capacity(want)));
        } else if n < START_BUF && want > START_BUF {
            // Bulk has stopped: back to small, and to no buffer while idle.
            want = START_BUF;
            buf = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::{io::AsyncReadExt, net::TcpListener, time::timeout};

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

    #[test]
    fn the_pool_keeps_only_standard_buffers_and_only_so_many() {
        let first = take_buf();
        assert_eq!((first.len(), first.capacity()), (0, START_BUF));
        let ptr = first.as_ptr();
        give_buf(first);
        // The same buffer comes back, empty.
        let again = take_buf();
        assert_eq!(again.as_ptr(), ptr);
        let mut again = again;
        again.extend_from_slice(b"used");
        give_buf(again);
        assert!(take_buf().is_empty());
        // Other sizes are not kept; the pool holds at most POOL_MAX.
        give_buf(Vec::with_capacity(2 * START_BUF));
        for _ in 0..POOL_MAX + 5 {
            give_buf(Vec::with_capacity(START_BUF));
        }
        assert_eq!(POOL.with_borrow(Vec::len), POOL_MAX);
        assert!(POOL.with_borrow(|p| p.iter().all(|b| b.capacity() == START_BUF)));
    }

    /// A short read clears the socket's readiness (no second `read` to learn
    /// that it is empty), and bytes that come after it still wake the reader.
    #[tokio::test]
    async fn a_short_read_ends_the_readiness_and_later_bytes_still_arrive() {
        let (mut client, proxy_side) = pair().await;
        client.write_all(b"0123456789").await.unwrap();
        poll_fn(|cx| proxy_side.poll_read_ready(cx)).await.unwrap();
        let mut buf = take_buf();
        assert_eq!(read_some(&proxy_side, &mut buf).unwrap(), 10);
        assert_eq!(buf, b"0123456789");
        buf.clear();
        // Taken as drained without asking the kernel: even bytes already in
        // the socket wait for the poller's next event (a `read` would return
        // them; nothing here yields to the poller in between).
        client.write_all(b"abcde").await.unwrap();
        let e = read_some(&proxy_side, &mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            poll_fn(|cx| proxy_side.poll_read_ready(cx)),
        )
        .await
        .expect("the later bytes did not wake the reader")
        .unwrap();
        assert_eq!(read_some(&proxy_side, &mut buf).unwrap(), 5);
        assert_eq!(buf, b"abcde");
        // A read that fills the space offered says nothing about what is left.
        client.write_all(&[1u8; 100]).await.unwrap();
        poll_fn(|cx| proxy_side.poll_read_ready(cx)).await.unwrap();
        let mut small = Vec::with_capacity(40);
        assert_eq!(read_some(&proxy_side, &mut small).unwrap(), 40);
        small.clear();
        assert_eq!(read_some(&proxy_side, &mut small).unwrap(), 40);
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
        assert_eq!(OUT.get(), 0, "idle connections still hold buffers");
        let pooled = POOL.with_borrow(Vec::len);
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
