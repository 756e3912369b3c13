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
//! - a response has waited for the client to take its next frame for the
//!   idle timeout (an HTTP/2 stream the client stopped reading, while pings
//!   or other streams keep bytes moving), or
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

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use parking_lot::Mutex;
use tokio::time::Instant;

/// Shared by a connection's socket wrapper (bytes moved), its requests
/// (working, or waiting for the client) and its watchdog.
///
/// Times are milliseconds after `epoch`: updated on every read and write,
/// read by the watchdog now and then; races between them only move a close
/// by a moment.
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
    /// Requests received and not yet answered in full (`requests`' total,
    /// readable without the lock on every read from the socket).
    open: AtomicUsize,
    requests: Mutex<Requests>,
}

/// The open requests of a connection.
#[derive(Default)]
struct Requests {
    next_id: u64,
    /// How many Trow is working on.
    working: usize,
    /// The others, by id: since when each has waited for the client to take
    /// its response's next frame.
    awaiting_client: HashMap<u64, u64>,
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
            requests: Mutex::new(Requests::default()),
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
    /// its response is ready ([`TrackedBody::new`]).
    pub(super) fn request_started(self: &Arc<Self>, http2: bool) -> RequestGuard {
        if http2 {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
        let id = {
            let mut requests = self.requests.lock();
            requests.next_id += 1;
            requests.working += 1;
            self.open.fetch_add(1, Ordering::Relaxed);
            requests.next_id
        };
        self.head_started.store(0, Ordering::Relaxed);
        RequestGuard {
            activity: self.clone(),
            id,
            working: true,
        }
    }

    /// When the connection may be closed if nothing changes meanwhile, or
    /// `None` while Trow works on one of its requests.
    fn closable_at(&self, idle_timeout: Duration) -> Option<Instant> {
        {
            let requests = self.requests.lock();
            if requests.working > 0 {
                return None;
            }
            if let Some(&oldest) = requests.awaiting_client.values().min() {
                let since = oldest.min(self.last_progress.load(Ordering::Relaxed));
                return Some(self.instant(since) + idle_timeout);
            }
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
            // A request head may start arriving while this sleeps, and its
            // deadline is the header-read timeout from its first byte:
            // looking again within that timeout finds it in time. (Sleeping
            // until the idle deadline let a head that began after a look
            // trickle in for the whole idle timeout.)
            let next_look = next_look.min(now + self.header_read_timeout);
            tokio::time::sleep_until(next_look).await;
        }
    }
}

/// One request of a connection, from its arrival until its response body
/// is finished or dropped.
pub(super) struct RequestGuard {
    activity: Arc<Activity>,
    id: u64,
    working: bool,
}

impl RequestGuard {
    /// Trow works on the request (a handler running, a response body
    /// producing its next frame).
    fn working(&mut self) {
        if self.working {
            return;
        }
        self.working = true;
        let mut requests = self.activity.requests.lock();
        requests.awaiting_client.remove(&self.id);
        requests.working += 1;
    }

    /// The request now waits for the client to take the next frame of its
    /// response: from now on, if it was working; afresh, if the client just
    /// took one.
    fn awaiting_client(&mut self) {
        // Work that just ended counts as activity: a handler that took
        // longer than the idle timeout must get to send its answer.
        let now = self.activity.now_ms();
        self.activity.last_progress.store(now, Ordering::Relaxed);
        let mut requests = self.activity.requests.lock();
        if self.working {
            self.working = false;
            requests.working -= 1;
        }
        requests.awaiting_client.insert(self.id, now);
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut requests = self.activity.requests.lock();
        if self.working {
            requests.working -= 1;
        } else {
            requests.awaiting_client.remove(&self.id);
        }
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
    /// The handler answered: the response waits for the client to take it.
    pub(super) fn new(inner: Body, mut guard: RequestGuard) -> Self {
        guard.awaiting_client();
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
                    guard.working();
                }
            }
            Poll::Ready(Some(Ok(_))) => {
                if let Some(guard) = &mut self.guard {
                    guard.awaiting_client();
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
        guard.awaiting_client();
        assert!(closable(&activity), "waiting for the client");
        guard.working();
        assert!(!closable(&activity));
        let body = TrackedBody::new(Body::empty(), guard);
        assert!(closable(&activity));
        drop(body);
        assert_eq!(activity.open.load(Ordering::Relaxed), 0);
        let requests = activity.requests.lock();
        assert_eq!(requests.working, 0);
        assert!(requests.awaiting_client.is_empty());
    }

    #[tokio::test]
    async fn a_response_the_client_does_not_take_is_stalled_whatever_else_moves() {
        let activity = Activity::new(MINUTE);
        let stalled = activity.request_started(true);
        let stalled = TrackedBody::new(Body::empty(), stalled);
        let at = activity.closable_at(MINUTE).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        activity.read_progressed(); // a ping
        let mut other = activity.request_started(true);
        other.awaiting_client(); // another stream moving
        assert_eq!(activity.closable_at(MINUTE), Some(at));
        drop(stalled);
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

    /// The watchdog looked before the first byte of a head arrived (so the
    /// deadline it saw was the idle one); the head is still cut at the
    /// header-read timeout from that byte.
    #[tokio::test]
    async fn a_head_that_starts_after_a_look_is_cut_at_the_header_timeout() {
        let activity = Activity::new(Duration::from_millis(100));
        let started = Instant::now();
        let watchdog = {
            let activity = activity.clone();
            tokio::spawn(async move { activity.closable(MINUTE).await })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        activity.read_progressed();
        // Without the head it would wait the idle minute.
        let cut = tokio::time::timeout(Duration::from_secs(20), watchdog).await;
        assert!(cut.is_ok(), "a head trickling in was not cut");
        assert!(
            started.elapsed() >= Duration::from_millis(130),
            "cut after {:?}, before the header-read timeout from the head's first byte",
            started.elapsed()
        );
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
