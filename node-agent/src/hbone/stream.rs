//! Bytes between a TCP socket and one HTTP/2 stream, both ways, with half-close.
//!
//! TCP → stream: once the socket is readable, reads into a buffer (16 KiB from
//! the worker's pool, growing to 256 KiB while reads fill it). A read of up to
//! 4 KiB is copied out and the buffer goes back to the pool; a larger one goes to
//! h2 without a copy (`Bytes`). Either way h2 gets it in pieces no larger than the
//! flow-control capacity the peer granted. A connection waiting for bytes holds
//! no buffer. EOF becomes an empty DATA frame with END_STREAM (half-close).
//!
//! Stream → TCP: writes each DATA frame out and only then returns its bytes to the
//! flow-control window, so a slow reader behind this socket holds at most one
//! stream window of the connection's window, never the whole connection.
//! END_STREAM becomes a FIN.
//!
//! An error on either side ends both: the stream is reset (CANCEL) and the socket
//! closed with a reset, so neither peer mistakes an abort for a clean end.

use std::{future::poll_fn, io};

use bytes::{Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::proxy::copy::{MAX_BUF, START_BUF, Side, Transfer, give_buf, read_some, take_buf};

/// Reads up to this size are copied out of the pooled buffer for h2; larger
/// ones are handed over whole.
const COPY_MAX: usize = 4 * 1024;

/// Copies between `tcp` (the downstream side, for the byte counts) and the
/// stream (`send`, `recv`) until both directions are done or one fails.
/// `sent_all`: the socket's side already ended and END_STREAM went out (the
/// client closed while the stream was being opened), so only the other
/// direction is left.
pub async fn bidirectional(
    tcp: &mut TcpStream,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    sent_all: bool,
) -> Transfer {
    let mut sent = 0u64;
    let mut received = 0u64;
    let result = {
        let (rd, mut wr) = tcp.split();
        let up = async {
            if sent_all {
                return Ok(());
            }
            let socket: &TcpStream = rd.as_ref();
            let mut want = START_BUF;
            // While bulk moves (`want` above START_BUF), each read is split off
            // one buffer, which gets its space back once h2 has written it out.
            let mut bulk = BytesMut::new();
            loop {
                let small_mode = want == START_BUF;
                let mut small = Vec::new();
                let read = if small_mode {
                    small = take_buf();
                    read_some(socket, &mut small)
                } else {
                    bulk.reserve(want);
                    read_some(socket, &mut bulk)
                };
                let n = match read {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // No buffer while waiting, unless bulk is moving.
                        give_buf(small);
                        poll_fn(|cx| socket.poll_read_ready(cx))
                            .await
                            .map_err(|e| (Side::Downstream, e))?;
                        continue;
                    }
                    Err(e) => return Err((Side::Downstream, e)),
                };
                if n == 0 {
                    give_buf(small);
                    return send
                        .send_data(Bytes::new(), true)
                        .map_err(|e| (Side::Upstream, h2_io(e)));
                }
                let mut data = if !small_mode {
                    bulk.split().freeze()
                } else if n <= COPY_MAX {
                    // Copied out, so the pooled buffer serves the next read.
                    let data = Bytes::copy_from_slice(&small);
                    give_buf(small);
                    data
                } else {
                    Bytes::from(small)
                };
                if n >= want && want < MAX_BUF {
                    want *= 2;
                } else if n < START_BUF && !small_mode {
                    // Bulk has stopped: pooled buffers again, none while idle.
                    want = START_BUF;
                    bulk = BytesMut::new();
                }
                while !data.is_empty() {
                    send.reserve_capacity(data.len());
                    let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Err((Side::Upstream, h2_io(e))),
                        None => {
                            return Err((
                                Side::Upstream,
                                io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"),
                            ));
                        }
                    };
                    if granted == 0 {
                        continue;
                    }
                    let chunk = data.split_to(granted.min(data.len()));
                    sent += chunk.len() as u64;
                    send.send_data(chunk, false)
                        .map_err(|e| (Side::Upstream, h2_io(e)))?;
                }
            }
        };
        let down = async {
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.map_err(|e| (Side::Upstream, h2_io(e)))?;
                wr.write_all(&chunk)
                    .await
                    .map_err(|e| (Side::Downstream, e))?;
                received += chunk.len() as u64;
                let _ = recv.flow_control().release_capacity(chunk.len());
            }
            wr.shutdown().await.map_err(|e| (Side::Downstream, e))
        };
        tokio::try_join!(up, down).map(|_| ())
    };
    if result.is_err() {
        // Neither peer may mistake this for a clean end.
        send.send_reset(Reason::CANCEL);
        let _ = tcp.set_zero_linger();
    }
    Transfer {
        sent,
        received,
        result,
    }
}

/// An h2 error as an I/O error, keeping its reason readable.
pub(crate) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = match e.reason() {
        Some(Reason::CANCEL) | Some(Reason::STREAM_CLOSED) => io::ErrorKind::ConnectionReset,
        Some(Reason::REFUSED_STREAM) => io::ErrorKind::ConnectionRefused,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}
