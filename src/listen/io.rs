//! The socket of one connection, wrapped to record when bytes move and to
//! give up on writes to a client that stopped reading.
//!
//! It sits under TLS, so it sees the bytes on the wire (handshake included)
//! and the same code serves plain and TLS connections.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::activity::Activity;
use super::stall::StallTimer;

pub(super) struct WatchedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Runs while writes are pending: the kernel's send buffer stays full
    /// when the client does not read, and a write that makes no progress for
    /// the idle timeout fails, ending the connection.
    write_stall: StallTimer,
}

impl<T> WatchedIo<T> {
    pub(super) fn new(inner: T, activity: Arc<Activity>, write_timeout: Duration) -> Self {
        WatchedIo {
            inner,
            activity,
            write_stall: StallTimer::new(write_timeout),
        }
    }

    /// Bookkeeping after a write-side call: progress resets the stall timer,
    /// `Pending` for the whole timeout becomes an error.
    fn after_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<R>>,
        moved: impl FnOnce(&R) -> bool,
    ) -> Poll<io::Result<R>> {
        match poll {
            Poll::Ready(result) => {
                self.write_stall.progressed();
                if result.as_ref().is_ok_and(moved) {
                    self.activity.progressed();
                }
                Poll::Ready(result)
            }
            Poll::Pending if self.write_stall.poll_expired(cx) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client read nothing for {}",
                    humantime::format_duration(self.write_stall.timeout())
                ),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WatchedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if buf.filled().len() > before {
            this.activity.read_progressed();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.after_write(cx, poll, |&n| n > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.after_write(cx, poll, |&n| n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_flush(cx);
        this.after_write(cx, poll, |_| false)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.after_write(cx, poll, |_| false)
    }
}
