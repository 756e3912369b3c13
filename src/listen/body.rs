//! Request bodies that fail when the client stops sending.
//!
//! Applied to every request at the connection, so blob chunks, monolithic
//! pushes and manifests are all covered without each handler remembering
//! to. A stalled upload thereby releases its upload's lock after the body
//! idle timeout; the storage layer reports the error as an interrupted body
//! (`BLOB_UPLOAD_INVALID`), from which clients resume.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::BoxError;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::stall::StallTimer;

/// The error a stalled body ends with.
#[derive(Debug)]
pub(super) struct BodyStalled(Duration);

impl fmt::Display for BodyStalled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the client sent no data for {}",
            humantime::format_duration(self.0)
        )
    }
}

impl std::error::Error for BodyStalled {}

/// `inner`, failing with [`BodyStalled`] once it has been asked for data and
/// delivered none for the timeout. Time in which nobody asks (a handler
/// waiting for an upload's lock, or for the disk) does not count.
pub(super) struct IdleTimeoutBody<B> {
    inner: B,
    stall: StallTimer,
}

impl<B> IdleTimeoutBody<B> {
    pub(super) fn new(inner: B, timeout: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            stall: StallTimer::new(timeout),
        }
    }
}

impl<B> Body for IdleTimeoutBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.stall.progressed();
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.stall.poll_expired(cx) => {
                Poll::Ready(Some(Err(BodyStalled(this.stall.timeout()).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
