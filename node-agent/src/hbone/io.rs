//! One HTTP/2 stream as a byte stream (`AsyncRead` + `AsyncWrite`), for what
//! speaks a protocol inside an HBONE tunnel: the waypoint's HTTP server on a
//! stream it accepted, its HTTP client on a stream it opened.
//!
//! Reads hand out each DATA frame's bytes and return them to the flow-control
//! window once taken, so a slow reader holds at most one frame beyond its
//! window. Writes wait for flow-control capacity and send at most what was
//! granted; each write is copied once into a `Bytes` h2 can own (the callers,
//! hyper's encoders, reuse their buffers). Shutdown sends END_STREAM; dropping
//! the stream before that resets it (h2 sends RST_STREAM(CANCEL)), so a peer
//! never mistakes an abort for a clean end.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::stream::h2_io;

pub struct StreamIo {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// What is left of the last DATA frame.
    pending: Bytes,
    /// END_STREAM was sent.
    shut: bool,
}

impl StreamIo {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        StreamIo {
            send,
            recv,
            pending: Bytes::new(),
            shut: false,
        }
    }
}

impl AsyncRead for StreamIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Taken off the window at once: the frame is ours now, and
                    // held only until the reader has copied it.
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    this.pending = data;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for StreamIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        this.send.reserve_capacity(buf.len());
        let granted = match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        };
        let n = granted.min(buf.len());
        if n == 0 {
            // Capacity was taken back (a SETTINGS change): ask again.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes frames out as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.shut {
            this.shut = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A byte stream with bytes already read from it put back in front (what a
/// protocol detection peeked at).
pub struct Rewind<T> {
    head: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(head: Bytes, inner: T) -> Self {
        Rewind { head, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            buf.put_slice(&self.head[..n]);
            self.head.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
