//! What one connection is doing, so that an idle or stalled one can be told
//! apart from one that is slow for a good reason.
//!
//! A connection may be closed, while Trow is not working on any of its
//! requests, once
//! - no request has been open for the idle timeout (a client that connected
//!   and sends nothing, an HTTP/1.1 connection kept alive and unused, an
//!   HTTP/2 connection that only pings), or
//! - a request is open but no byte has moved for the idle timeout (a client
//!   that stopped sending or reading), or
//! - an HTTP/1.1 request head has been arriving for the header-read timeout
//!   (counted from its first byte, as Go's `ReadHeaderTimeout`).
//!
//! "Working" means a handler is running (a proxy fetch may wait half a
//! minute for its upstream) or a response body is waiting for data from our
//! side; it does not include waiting for the client to take the next frame.
//!
//! hyper's own header-read timeout is not used: its clock starts when an
//! HTTP/1 connection begins waiting for a head, which is the end of the
//! previous response on a kept-alive connection (so it also closes idle
//! connections, at the shorter timeout) and the first byte on a new one
//! (hyper-util reads that byte to tell HTTP/1 from HTTP/2).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::time::Instant;

/// Shared by a connection's socket wrapper (bytes moved), its requests
/// (open, working) and its watchdog.
///
/// Times are milliseconds after `epoch` in atomics: updated on every read
/// and write, read by the watchdog now and then; races between them only
/// move a close by a moment.
pub(super) struct Activity {
    epoch: Instant,
    header_read_timeout: Duration,
    /// When a byte last moved or Trow last finished a piece of work.
    last_progress: AtomicU64,
    /// When the last open request ended (0: none yet, so a connection that
    /// never sends a request is idle from the start).
    last_request_end: AtomicU64,
    /// When the first byte of a request head arrived while no request was
    /// open, plus one (0: none is arriving).
    head_started: AtomicU64,
    /// HTTP/2: bytes between requests are control frames (pings, window
    /// updates), not a request head.
    multiplexed: AtomicBool,
    /// Requests received and not yet answered in full.
    open: AtomicUsize,
    /// Of those, the ones Trow is working on.
    working: AtomicUsize,
}

impl Activity {
    pub(super) fn new(header_read_timeout: Duration) -> Arc<Activity> {
        Arc::new(Activity {
            epoch: Instant::now(),
            header_read_timeout,
            last_progress: AtomicU64::new(0),
            last_request_end: AtomicU64::new(0),
            head_started: AtomicU64::new(0),
            multiplexed: AtomicBool::new(false),
            open: AtomicUsize::new(0),
            working: AtomicUsize::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn instant(&self, ms: u64) -> Instant {
        self.epoch + Duration::from_millis(ms)
    }

    /// Bytes were written, or work finished.
    pub(super) fn progressed(&self) {
        self.last_progress.store(self.now_ms(), Ordering::Relaxed);
    }

    /// Bytes were read. With no request open, they start a request head
    /// (HTTP/1.1; the HTTP/2 preface counts as the head of the first one).
    pub(super) fn read_progressed(&self) {
        let now = self.now_ms();
        self.last_progress.store(now, Ordering::Relaxed);
        if self.open.load(Ordering::Relaxed) == 0
            && !self.multiplexed.load(Ordering::Relaxed)
            && self.head_started.load(Ordering::Relaxed) == 0
        {
            self.head_started.store(now + 1, Ordering::Relaxed);
        }
    }

    /// A request arrived; Trow is working on it until
    /// [`RequestGuard::set_working`] says otherwise.
    pub(super) fn request_started(self: &Arc<Self>, http2: bool) -> RequestGuard {
        if http2 {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
        self.open.fetch_add(1, Ordering::Relaxed);
        self.working.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(0, Ordering::Relaxed);
        RequestGuard {
            activity: self.clone(),
            working: true,
        }
    }

    /// When the connection may be closed if nothing changes meanwhile, or
    /// `None` while Trow works on one of its requests.
    fn closable_at(&self, idle_timeout: Duration) -> Option<Instant> {
        if self.working.load(Ordering::Relaxed) > 0 {
            return None;
        }
        if self.open.load(Ordering::Relaxed) > 0 {
            return Some(self.instant(self.last_progress.load(Ordering::Relaxed)) + idle_timeout);
        }
        match self.head_started.load(Ordering::Relaxed) {
            0 => Some(self.instant(self.last_request_end.load(Ordering::Relaxed)) + idle_timeout),
            started => Some(self.instant(started - 1) + self.header_read_timeout),
        }
    }

    /// Resolves once the connection may be closed (see the module
    /// documentation), `idle_timeout` being the idle timeout.
    pub(super) async fn closable(&self, idle_timeout: Duration) {
        loop {
            let now = Instant::now();
            let next_look = match self.closable_at(idle_timeout) {
                Some(at) if at <= now => return,
                Some(at) => at,
                // Working: nothing can expire before the work ends, so look
                // again a fraction of the timeout later.
                None => now + idle_timeout / 4,
            };
            tokio::time::sleep_until(next_look).await;
        }
    }
}

/// One request of a connection, from its arrival until its response body
/// is finished or dropped.
pub(super) struct RequestGuard {
    activity: Arc<Activity>,
    working: bool,
}

impl RequestGuard {
    /// Whether Trow (rather than the client) is what the request waits for.
    pub(super) fn set_working(&mut self, working: bool) {
        if working == self.working {
            return;
        }
        self.working = working;
        if working {
            self.activity.working.fetch_add(1, Ordering::Relaxed);
        } else {
            // Work that just ended counts as activity: a handler that took
            // longer than the idle timeout must get to send its answer.
            self.activity.progressed();
            self.activity.working.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.set_working(false);
        let now = self.activity.now_ms();
        self.activity.last_request_end.store(now, Ordering::Relaxed);
        self.activity.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that tells its request's guard whether Trow is producing
/// data (the body is pending) or the client is expected to take it (a frame
/// was handed over), and ends the request when it ends.
pub(super) struct TrackedBody {
    inner: Body,
    guard: Option<RequestGuard>,
}

impl TrackedBody {
    pub(super) fn new(inner: Body, mut guard: RequestGuard) -> Self {
        guard.set_working(false);
        TrackedBody {
            inner,
            guard: Some(guard),
        }
    }
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Pending => {
                if let Some(guard) = &mut self.guard {
                    guard.set_working(true);
                }
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(guard) = &mut self.guard {
                    guard.set_working(false);
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.guard = None,
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn closable(a: &Activity) -> bool {
        a.closable_at(MINUTE).is_some()
    }

    #[tokio::test]
    async fn closable_only_when_nothing_is_being_worked_on() {
        let activity = Activity::new(MINUTE);
        assert!(closable(&activity), "no request yet");
        let mut guard = activity.request_started(false);
        assert!(!closable(&activity), "handler running");
        guard.set_working(false);
        assert!(closable(&activity), "waiting for the client");
        guard.set_working(true);
        assert!(!closable(&activity));
        let body = TrackedBody::new(Body::empty(), guard);
        assert!(closable(&activity));
        drop(body);
        assert_eq!(activity.open.load(Ordering::Relaxed), 0);
        assert_eq!(activity.working.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_request_head_is_timed_from_its_first_byte() {
        let activity = Activity::new(Duration::from_secs(5));
        let idle = activity.closable_at(MINUTE).unwrap();
        activity.read_progressed();
        let head = activity.closable_at(MINUTE).unwrap();
        assert!(head < idle, "the head timer is shorter than the idle one");
        drop(activity.request_started(false));
        assert!(
            activity.closable_at(MINUTE).unwrap() > head,
            "the head arrived"
        );
    }

    #[tokio::test]
    async fn http2_control_frames_are_not_a_request_head() {
        let activity = Activity::new(Duration::from_secs(5));
        drop(activity.request_started(true));
        let idle = activity.closable_at(MINUTE).unwrap();
        activity.read_progressed();
        assert_eq!(activity.closable_at(MINUTE).unwrap(), idle);
    }

    #[tokio::test]
    async fn closable_resolves_after_the_timeout() {
        let activity = Activity::new(MINUTE);
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            activity.closable(Duration::from_millis(50)),
        )
        .await;
        assert!(waited.is_ok());
    }
}
