//! Copy buffers, held only while bytes move.
//!
//! Both copies of a proxied connection (socket to socket, `net::copy`, and
//! socket to HTTP/2 stream, `hbone::stream`) read into buffers from here. A
//! direction takes a [`START_BUF`] buffer from its worker's pool when its socket
//! is readable and gives it back once the bytes are out, so a connection waiting
//! for bytes holds none; while reads keep filling the buffer, bulk moves through
//! one of its own that grows to [`MAX_BUF`] ([`next_size`]).

use std::{cell::RefCell, io};

use bytes::BufMut;
use tokio::{io::Interest, net::TcpStream};

/// Per-direction buffer: starts small, so quiet and request/response connections
/// stay cheap, and doubles each time a read fills it, so a bulk transfer soon
/// moves up to `MAX_BUF` per read (fewer syscalls per byte).
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

/// The buffer size for the read after one of `n` bytes into a buffer of
/// `size`: doubled (up to [`MAX_BUF`]) when the read filled it, back to
/// [`START_BUF`] (pooled buffers again) when a read comes back smaller than
/// that, else unchanged.
pub(crate) fn next_size(size: usize, n: usize) -> usize {
    if n >= size {
        (size * 2).min(MAX_BUF)
    } else if n < START_BUF {
        START_BUF
    } else {
        size
    }
}

/// Helpers for the copies' tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use tokio::{io::AsyncWriteExt, net::TcpListener};

    /// Pool buffers this thread has taken and not given back.
    pub(crate) fn buffers_out() -> isize {
        OUT.get()
    }

    /// Empty buffers in this thread's pool.
    pub(crate) fn buffers_pooled() -> usize {
        POOL.with_borrow(Vec::len)
    }

    /// Two ends of a loopback TCP connection.
    pub(crate) async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (a, b) = tokio::join!(TcpStream::connect(addr), l.accept());
        (a.unwrap(), b.unwrap().0)
    }

    /// Writes 3 MiB, a pause with a few bytes, and 3 MiB again into
    /// `socket` (bulk growing the buffer, stopping, and starting over); returns
    /// every byte written, to compare with what comes out.
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
}

#[cfg(test)]
mod tests {
    use super::{testing::pair, *};
    use std::future::poll_fn;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_size_doubles_while_reads_fill_it_and_drops_back_when_bulk_stops() {
        assert_eq!(next_size(START_BUF, START_BUF), 2 * START_BUF);
        assert_eq!(next_size(START_BUF, 100), START_BUF);
        assert_eq!(next_size(4 * START_BUF, 4 * START_BUF), 8 * START_BUF);
        assert_eq!(next_size(MAX_BUF, MAX_BUF), MAX_BUF);
        assert_eq!(next_size(4 * START_BUF, 2 * START_BUF), 4 * START_BUF);
        assert_eq!(next_size(4 * START_BUF, START_BUF - 1), START_BUF);
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
}
