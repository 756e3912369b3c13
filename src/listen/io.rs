//! The socket of one connection, wrapped to record when bytes move, to
//! give up on writes to a client that stopped reading, and (plain
//! connections) to send blob windows from their files.
//!
//! It sits under TLS, so it sees the bytes on the wire (handshake included)
//! and the same code serves plain and TLS connections.
//!
//! On a plain connection, a slice hyper asks it to write may be a mapped
//! window of a blob file registered in the connection's [`FileRegions`]
//! (`storage/download.rs`): that slice goes out with `sendfile` from the
//! file, so the kernel sends page-cache pages and no user-space copy is
//! read or made. Everything before it in the same `writev` (the response
//! head) is written first; hyper calls again for the rest.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::activity::Activity;
use super::stall::StallTimer;
use crate::storage::download::{record_sent_from_file, FileRegions, FileSpan};

pub(super) struct WatchedIo<T> {
    inner: T,
    activity: Arc<Activity>,
    /// Windows to send from their files; `None` under TLS.
    regions: Option<Arc<FileRegions>>,
    /// Runs while writes are pending: the kernel's send buffer stays full
    /// when the client does not read, and a write that makes no progress for
    /// the idle timeout fails, ending the connection.
    write_stall: StallTimer,
}

impl<T> WatchedIo<T> {
    /// The file bytes `buf` mirrors, when it starts in a registered window.
    fn file_span(&self, buf: &[u8]) -> Option<FileSpan> {
        if buf.is_empty() {
            return None;
        }
        self.regions.as_ref()?.find(buf.as_ptr(), buf.len())
    }

    pub(super) fn new(
        inner: T,
        activity: Arc<Activity>,
        write_timeout: Duration,
        regions: Option<Arc<FileRegions>>,
    ) -> Self {
        WatchedIo {
            inner,
            activity,
            regions,
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

impl<T: AsyncWrite + SendFile + Unpin> AsyncWrite for WatchedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = match this.file_span(buf) {
            Some(span) => this.inner.poll_send_file(cx, &span),
            None => Pin::new(&mut this.inner).poll_write(cx, buf),
        };
        this.after_write(cx, poll, |&n| n > 0)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        // The slices before the first file window go as they are; the
        // window itself goes from its file.
        let first_window = bufs
            .iter()
            .enumerate()
            .find_map(|(i, b)| this.file_span(b).map(|span| (i, span)));
        let poll = match first_window {
            Some((0, span)) => this.inner.poll_send_file(cx, &span),
            Some((i, _)) => Pin::new(&mut this.inner).poll_write_vectored(cx, &bufs[..i]),
            None => Pin::new(&mut this.inner).poll_write_vectored(cx, bufs),
        };
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

/// Sending bytes of a file on the socket without passing them through
/// memory.
pub(super) trait SendFile {
    fn poll_send_file(&self, cx: &mut Context<'_>, span: &FileSpan) -> Poll<io::Result<usize>>;
}

impl SendFile for TcpStream {
    #[cfg(target_os = "linux")]
    fn poll_send_file(&self, cx: &mut Context<'_>, span: &FileSpan) -> Poll<io::Result<usize>> {
        use std::os::fd::AsRawFd;
        loop {
            ready!(self.poll_write_ready(cx))?;
            let sent = self.try_io(Interest::WRITABLE, || {
                let mut offset = libc::off_t::try_from(span.offset)
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                // SAFETY: both descriptors are open for the call (the socket
                // is borrowed, the file held by `span`); `offset` is a valid
                // pointer for the kernel to update.
                let n = unsafe {
                    libc::sendfile(
                        self.as_raw_fd(),
                        span.file.as_raw_fd(),
                        &mut offset,
                        span.len,
                    )
                };
                usize::try_from(n).map_err(|_| io::Error::last_os_error())
            });
            match sent {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(n) => {
                    record_sent_from_file(n);
                    return Poll::Ready(Ok(n));
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Not called elsewhere: connections have no windows there.
    #[cfg(not(target_os = "linux"))]
    fn poll_send_file(&self, cx: &mut Context<'_>, span: &FileSpan) -> Poll<io::Result<usize>> {
        let _ = (cx, span);
        Poll::Ready(Err(io::Error::from(io::ErrorKind::Unsupported)))
    }
}
