//! A timer for "nothing has moved for this long", shared by the socket
//! wrapper (writes to a client that stopped reading) and the request body
//! wrapper (a client that stopped sending).

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Runs while an operation keeps answering `Pending` and expires once it has
/// made no progress for `timeout`.
///
/// Armed by the first `Pending` after progress, disarmed by progress. The
/// `Sleep` is allocated on first use and reset afterwards, so a long
/// transfer does not allocate a timer per chunk.
pub(super) struct StallTimer {
    timeout: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl StallTimer {
    pub(super) fn new(timeout: Duration) -> Self {
        StallTimer {
            timeout,
            sleep: None,
            armed: false,
        }
    }

    pub(super) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The operation made progress: the next stall starts from zero.
    pub(super) fn progressed(&mut self) {
        self.armed = false;
    }

    /// The operation is pending: whether it has now been stuck for the whole
    /// timeout. Registers `cx` to be woken when it will have been.
    pub(super) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let deadline = Instant::now() + self.timeout;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            sleep.as_mut().reset(deadline);
            self.armed = true;
        }
        if sleep.as_mut().poll(cx).is_ready() {
            self.armed = false;
            return true;
        }
        false
    }
}
