//! Bytes between a TCP socket and one HTTP/2 stream, both ways, with half-close.
//!
//! TCP → stream: once the socket is readable, reads into a 16 KiB buffer from the
//! worker's pool and lends it to h2 without copying (`Bytes`); it goes back to
//! the pool when h2 has written it out, so a connection waiting for bytes holds
//! no buffer. While reads keep filling it, bulk moves through one buffer of its
//! own that grows to 256 KiB, each read split off it. h2 gets every read in pieces
//! no larger than the flow-control capacity the peer granted. EOF becomes an empty
//! DATA frame with END_STREAM (half-close).
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

use crate::net::{
    buffer::{START_BUF, give_buf, next_size, read_some, take_buf},
    copy::{Side, Transfer},
};

/// A pooled buffer lent to h2: back to this thread's pool once every piece of it
/// has been written out and dropped.
struct Lent(Vec<u8>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        give_buf(std::mem::take(&mut self.0));
    }
}

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
            // START_BUF: pooled buffers, none held while waiting; above it, bulk
            // moves through `bulk`.
            let mut want = START_BUF;
            let mut bulk = BytesMut::new();
            loop {
                let read = if want == START_BUF {
                    let mut lent = Lent(take_buf());
                    read_some(socket, &mut lent.0).map(|n| (n, Some(lent)))
                } else {
                    bulk.reserve(want);
                    read_some(socket, &mut bulk).map(|n| (n, None))
                };
                let (n, lent) = match read {
                    Ok(read) => read,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // A pooled buffer has gone back already (dropped).
                        poll_fn(|cx| socket.poll_read_ready(cx))
                            .await
                            .map_err(|e| (Side::Downstream, e))?;
                        continue;
                    }
                    Err(e) => return Err((Side::Downstream, e)),
                };
                if n == 0 {
                    return send
                        .send_data(Bytes::new(), true)
                        .map_err(|e| (Side::Upstream, h2_io(e)));
                }
                let mut data = match lent {
                    Some(lent) => Bytes::from_owner(lent),
                    None => bulk.split().freeze(),
                };
                let next = next_size(want, n);
                if next < want {
                    // Bulk has stopped: pooled buffers again, none while idle.
                    bulk = BytesMut::new();
                }
                want = next;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        hbone::{client_builder, server_builder},
        net::buffer::testing::{buffers_out, buffers_pooled, pair, write_bulk_quiet_bulk},
    };
    use http::{Method, Request, Response};
    use std::time::Duration;
    use tokio::{
        io::AsyncReadExt,
        task::JoinHandle,
        time::{sleep, timeout},
    };

    /// app <-> [socket | bidirectional | h2 stream over a duplex] <-> client's
    /// stream: the destination agent's side of a tunnel, with the agent's h2
    /// settings. Returns the application's end, the client's halves of the
    /// stream and the copy.
    async fn tunnel() -> (
        TcpStream,
        SendStream<Bytes>,
        RecvStream,
        JoinHandle<Transfer>,
    ) {
        let (client_io, server_io) = tokio::io::duplex(1 << 20);
        let (app, mut agent_side) = pair().await;
        let server = tokio::spawn(async move {
            let mut conn = server_builder()
                .handshake::<_, Bytes>(server_io)
                .await
                .unwrap();
            let (req, mut respond) = conn.accept().await.unwrap().unwrap();
            let send = respond.send_response(Response::new(()), false).unwrap();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            bidirectional(&mut agent_side, send, req.into_body(), false).await
        });
        let (send, connection) = client_builder()
            .handshake::<_, Bytes>(client_io)
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut send = send.ready().await.unwrap();
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .unwrap();
        let (response, stream) = send.send_request(req, false).unwrap();
        let recv = response.await.unwrap().into_body();
        (app, stream, recv, server)
    }

    async fn read_stream(recv: &mut RecvStream, len: usize) -> Vec<u8> {
        let mut got = Vec::new();
        while got.len() < len {
            let chunk = recv.data().await.unwrap().unwrap();
            let _ = recv.flow_control().release_capacity(chunk.len());
            got.extend_from_slice(&chunk);
        }
        got
    }

    /// Small messages lend pooled buffers to h2 and get them back once written:
    /// a quiet tunnel holds none. Bulk, a pause and bulk again arrive intact.
    #[tokio::test]
    async fn a_quiet_tunnel_holds_no_buffer_and_bulk_arrives_intact() {
        let (mut app, mut send, mut recv, copy) = tunnel().await;
        for i in 0..20u8 {
            let message = vec![i; 1000 + usize::from(i)];
            app.write_all(&message).await.unwrap();
            assert_eq!(read_stream(&mut recv, message.len()).await, message);
        }
        sleep(Duration::from_millis(20)).await;
        assert_eq!(buffers_out(), 0, "a quiet tunnel still holds a buffer");
        assert!(
            buffers_pooled() >= 1,
            "the messages did not go through the pool"
        );

        let expected = write_bulk_quiet_bulk(&mut app).await;
        let got = timeout(
            Duration::from_secs(20),
            read_stream(&mut recv, expected.len()),
        )
        .await
        .expect("bytes stuck in the tunnel");
        assert!(got == expected, "the bytes came out changed");

        // The other way, and both ends.
        send.send_data(Bytes::from_static(b"request"), true)
            .unwrap();
        let mut request = Vec::new();
        app.read_to_end(&mut request).await.unwrap();
        assert_eq!(request, b"request");
        app.shutdown().await.unwrap();
        while let Some(chunk) = recv.data().await {
            assert!(chunk.unwrap().is_empty(), "bytes after the end");
        }
        let t = copy.await.unwrap();
        assert!(t.result.is_ok(), "{:?}", t.result);
        assert_eq!(
            (t.sent, t.received),
            (expected.len() as u64 + 20 * 1000 + 190, 7)
        );
        sleep(Duration::from_millis(20)).await;
        assert_eq!(buffers_out(), 0);
    }
}
