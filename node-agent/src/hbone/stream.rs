//! Bytes between a TCP socket and one HTTP/2 stream, both ways, with half-close.
//!
//! TCP → stream: reads into a buffer that grows (16 KiB to 256 KiB) while reads
//! fill it, and hands each read to h2 without copying (`Bytes`), in pieces no larger
//! than the flow-control capacity the peer granted. EOF becomes an empty DATA frame
//! with END_STREAM (half-close).
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
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::proxy::copy::{Side, Transfer};

const START_BUF: usize = 16 * 1024;
const MAX_BUF: usize = 256 * 1024;

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
        let (mut rd, mut wr) = tcp.split();
        let up = async {
            if sent_all {
                return Ok(());
            }
            let mut want = START_BUF;
            let mut buf = BytesMut::with_capacity(want);
            loop {
                buf.reserve(want);
                let n = rd
                    .read_buf(&mut buf)
                    .await
                    .map_err(|e| (Side::Downstream, e))?;
                if n == 0 {
                    return send
                        .send_data(Bytes::new(), true)
                        .map_err(|e| (Side::Upstream, h2_io(e)));
                }
                if n >= want && want < MAX_BUF {
                    want *= 2;
                }
                let mut data = buf.split().freeze();
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
