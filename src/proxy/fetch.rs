//! Single-flight blob fetches from upstream, streamed to every waiting client
//! while they are written to the cache.
//!
//! One task per digest downloads into an upload file and publishes its
//! progress on a `watch` channel. Each client follows that progress and reads
//! the bytes back from the upload file, so any number of clients share one
//! upstream download and the first byte reaches them long before the last.
//! The last byte is held back until the digest has been verified: a corrupt
//! download ends every client's response with an error (the connection is
//! cut before the promised length), never as a complete, wrong blob.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::Stream;
use parking_lot::Mutex;
use tokio::sync::watch;

use crate::oci::Digest;
use crate::storage::{BlobRead, BlobStore, ByteStream, Delivery, RangeRequest, StorageError};

/// How much a client reads from the upload file at a time.
const FOLLOW_CHUNK: usize = 256 * 1024;

/// Where a fetch is.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for a fetch slot or for upstream's response headers.
    Connecting,
    /// Bytes are arriving; `written` of them are readable in the upload file.
    Streaming { total: Option<u64>, written: u64 },
    /// All bytes are in the upload file and match the digest; the blob is
    /// being made durable and committed.
    Verified { size: u64 },
    /// Verified and committed to the cache.
    Done { size: u64 },
    /// Failed; `not_found` when upstream does not have the blob.
    Failed { message: Arc<str>, not_found: bool },
}

/// A fetch in progress that clients can follow.
pub struct InFlight {
    pub upload_id: String,
    pub progress: watch::Receiver<Progress>,
}

/// The fetches in progress, by digest. A fetch's task removes its entry
/// when it ends, however it ends, whether or not anyone still follows it.
#[derive(Default)]
pub struct Fetches {
    map: Mutex<HashMap<Digest, Arc<InFlight>>>,
}

impl Fetches {
    /// The fetch of `digest` in progress, if any.
    pub fn get(&self, digest: &Digest) -> Option<Arc<InFlight>> {
        self.map.lock().get(digest).cloned()
    }

    /// Registers a new fetch unless one raced in first; returns the fetch to
    /// follow and whether it is the new one (whose task must be started).
    pub fn register(&self, digest: &Digest, candidate: InFlight) -> (Arc<InFlight>, bool) {
        let mut map = self.map.lock();
        if let Some(existing) = map.get(digest) {
            return (existing.clone(), false);
        }
        let fresh = Arc::new(candidate);
        map.insert(digest.clone(), fresh.clone());
        (fresh, true)
    }

    /// Forgets `flight`, if it is still the fetch registered for `digest`
    /// (a later fetch of the same digest is left alone).
    pub fn remove(&self, digest: &Digest, flight: &Arc<InFlight>) {
        let mut map = self.map.lock();
        if map.get(digest).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(digest);
        }
    }
}

/// Waits until upstream's headers are in and returns the blob's total size
/// (if upstream sent one), or how the fetch failed before any byte.
pub async fn wait_for_headers(flight: &InFlight) -> Result<Option<u64>, Progress> {
    let mut rx = flight.progress.clone();
    loop {
        let p = rx.borrow_and_update().clone();
        match p {
            Progress::Connecting => {}
            Progress::Streaming { total, .. } => return Ok(total),
            Progress::Verified { size } | Progress::Done { size } => return Ok(Some(size)),
            failed @ Progress::Failed { .. } => return Err(failed),
        }
        if rx.changed().await.is_err() {
            return Err(Progress::Failed {
                message: "the upstream fetch stopped unexpectedly".into(),
                not_found: false,
            });
        }
    }
}

/// Waits until a fetch has committed the blob (`Ok`) or failed.
pub async fn wait_until_settled(flight: &InFlight) -> Result<(), Progress> {
    let mut rx = flight.progress.clone();
    loop {
        let p = rx.borrow_and_update().clone();
        match p {
            Progress::Done { .. } => return Ok(()),
            failed @ Progress::Failed { .. } => return Err(failed),
            _ => {}
        }
        if rx.changed().await.is_err() {
            return match &*rx.borrow() {
                Progress::Done { .. } => Ok(()),
                other => Err(other.clone()),
            };
        }
    }
}

/// What a follower does next.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// Read up to this many bytes of the upload file at the position.
    Read(usize),
    /// Wait for the fetch to make progress.
    Wait,
    /// The blob is committed: stream the rest from the cache.
    Drain,
    /// Everything was sent.
    End,
    /// The fetch failed: end the client's response with this error.
    Fail(String),
}

/// The follower's decision, given where the fetch is and how many bytes
/// (`pos`) the client has had. The last byte is held back until the digest
/// is verified, so a corrupt download never reaches a client whole.
fn next_step(progress: &Progress, pos: u64) -> Step {
    let readable = match *progress {
        Progress::Connecting => return Step::Wait,
        Progress::Streaming {
            total: Some(total),
            written,
        } => written.min(total.saturating_sub(1)),
        Progress::Streaming {
            total: None,
            written,
        } => written.saturating_sub(1),
        Progress::Verified { size } if pos >= size => return Step::End,
        Progress::Verified { size } => size,
        Progress::Done { size } if pos >= size => return Step::End,
        Progress::Done { .. } => return Step::Drain,
        Progress::Failed { ref message, .. } => {
            return Step::Fail(format!("upstream fetch failed: {message}"))
        }
    };
    if readable > pos {
        let len = usize::try_from(readable - pos).unwrap_or(usize::MAX);
        Step::Read(len.min(FOLLOW_CHUNK))
    } else {
        Step::Wait
    }
}

/// Where a follower is.
enum FollowState {
    /// About to decide from the latest progress.
    Deciding(watch::Receiver<Progress>),
    /// Waiting for progress; yields the receiver back, and whether the
    /// fetch task is still there to send more.
    Waiting(BoxFuture<'static, (watch::Receiver<Progress>, bool)>),
    /// Reading the upload file.
    Reading(
        watch::Receiver<Progress>,
        BoxFuture<'static, Result<Bytes, StorageError>>,
    ),
    /// Opening the committed blob at the position.
    Opening(BoxFuture<'static, Result<Option<BlobRead>, StorageError>>),
    /// Streaming the rest from the committed blob.
    Draining(ByteStream),
    Finished,
}

/// One client's stream of a blob being fetched: reads the upload file as
/// far as the fetch has written (less the last byte until verified), then
/// the committed blob.
pub struct Follower {
    store: Arc<dyn BlobStore>,
    flight: Arc<InFlight>,
    digest: Digest,
    /// Bytes sent so far.
    pos: u64,
    state: FollowState,
}

impl Follower {
    pub fn new(store: Arc<dyn BlobStore>, flight: Arc<InFlight>, digest: Digest) -> Follower {
        let rx = flight.progress.clone();
        Follower {
            store,
            flight,
            digest,
            pos: 0,
            state: FollowState::Deciding(rx),
        }
    }

    fn wait(mut rx: watch::Receiver<Progress>) -> FollowState {
        FollowState::Waiting(Box::pin(async move {
            let alive = rx.changed().await.is_ok();
            (rx, alive)
        }))
    }

    /// The next state from the latest progress, or an item to yield.
    fn decide(&mut self, mut rx: watch::Receiver<Progress>) -> Option<Option<io::Result<Bytes>>> {
        let progress = rx.borrow_and_update().clone();
        match next_step(&progress, self.pos) {
            Step::Read(len) => {
                let store = self.store.clone();
                let flight = self.flight.clone();
                let pos = self.pos;
                self.state = FollowState::Reading(
                    rx,
                    Box::pin(async move { store.read_upload(&flight.upload_id, pos, len).await }),
                );
                None
            }
            Step::Wait => {
                self.state = Self::wait(rx);
                None
            }
            Step::Drain => {
                let store = self.store.clone();
                let digest = self.digest.clone();
                let range = RangeRequest::FromTo {
                    start: self.pos,
                    end: None,
                };
                self.state = FollowState::Opening(Box::pin(async move {
                    store.read(&digest, Some(range), Delivery::Buffered).await
                }));
                None
            }
            Step::End => Some(None),
            Step::Fail(message) => Some(Some(Err(io::Error::other(message)))),
        }
    }
}

impl Stream for Follower {
    type Item = io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            // Every arm sets the next state; `Finished` unless it says otherwise.
            match std::mem::replace(&mut this.state, FollowState::Finished) {
                FollowState::Finished => return Poll::Ready(None),
                FollowState::Deciding(rx) => {
                    if let Some(item) = this.decide(rx) {
                        return Poll::Ready(item);
                    }
                }
                FollowState::Waiting(mut wait) => match wait.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.state = FollowState::Waiting(wait);
                        return Poll::Pending;
                    }
                    Poll::Ready((rx, true)) => this.state = FollowState::Deciding(rx),
                    Poll::Ready((rx, false)) => {
                        // The fetch task is gone; whatever it committed is final.
                        if matches!(*rx.borrow(), Progress::Done { .. }) {
                            this.state = FollowState::Deciding(rx);
                        } else {
                            return Poll::Ready(Some(Err(io::Error::other(
                                "the upstream fetch stopped unexpectedly",
                            ))));
                        }
                    }
                },
                FollowState::Reading(rx, mut read) => match read.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.state = FollowState::Reading(rx, read);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(bytes)) if !bytes.is_empty() => {
                        this.pos += bytes.len() as u64;
                        this.state = FollowState::Deciding(rx);
                        return Poll::Ready(Some(Ok(bytes)));
                    }
                    // Committed (moved) or failed meanwhile: the next
                    // progress update says which.
                    Poll::Ready(Ok(_)) | Poll::Ready(Err(StorageError::UploadNotFound)) => {
                        this.state = Self::wait(rx);
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Some(Err(io::Error::other(e.to_string()))))
                    }
                },
                FollowState::Opening(mut open) => match open.as_mut().poll(cx) {
                    Poll::Pending => {
                        this.state = FollowState::Opening(open);
                        return Poll::Pending;
                    }
                    Poll::Ready(Ok(Some(read))) => this.state = FollowState::Draining(read.body),
                    Poll::Ready(Ok(None)) => {
                        return Poll::Ready(Some(Err(io::Error::other(
                            "cached blob vanished while being served",
                        ))))
                    }
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(Some(Err(io::Error::other(e.to_string()))))
                    }
                },
                FollowState::Draining(mut body) => match body.as_mut().poll_next(cx) {
                    Poll::Pending => {
                        this.state = FollowState::Draining(body);
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(item)) => {
                        this.state = FollowState::Draining(body);
                        return Poll::Ready(Some(item));
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn streaming(total: Option<u64>, written: u64) -> Progress {
        Progress::Streaming { total, written }
    }

    #[test]
    fn the_last_byte_waits_for_verification() {
        assert_eq!(next_step(&Progress::Connecting, 0), Step::Wait);
        assert_eq!(next_step(&streaming(Some(10), 4), 0), Step::Read(4));
        assert_eq!(next_step(&streaming(Some(10), 10), 0), Step::Read(9));
        assert_eq!(next_step(&streaming(Some(10), 10), 9), Step::Wait);
        assert_eq!(next_step(&streaming(None, 10), 0), Step::Read(9));
        assert_eq!(next_step(&streaming(None, 10), 9), Step::Wait);
        assert_eq!(next_step(&streaming(Some(10), 0), 0), Step::Wait);
        assert_eq!(
            next_step(&Progress::Verified { size: 10 }, 9),
            Step::Read(1)
        );
        assert_eq!(next_step(&Progress::Verified { size: 10 }, 10), Step::End);
        assert_eq!(next_step(&Progress::Done { size: 10 }, 3), Step::Drain);
        assert_eq!(next_step(&Progress::Done { size: 10 }, 10), Step::End);
        assert_eq!(
            next_step(&streaming(Some(1 << 40), 1 << 40), 0),
            Step::Read(FOLLOW_CHUNK)
        );
        let failed = Progress::Failed {
            message: "boom".into(),
            not_found: false,
        };
        assert!(matches!(next_step(&failed, 5), Step::Fail(m) if m.contains("boom")));
    }

    /// A follower over a real upload file: it streams what is written,
    /// less the last byte, which comes only after verification.
    #[tokio::test]
    async fn a_follower_streams_and_holds_the_last_byte_back() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn BlobStore> =
            Arc::new(crate::storage::fs::FsBlobStore::open(dir.path(), false).unwrap());
        let bytes = Bytes::from(vec![7u8; 1000]);
        let digest = Digest::sha256_of(&bytes);
        store.create_upload("0a1b").await.unwrap();
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(bytes.clone())]));
        store.append_upload("0a1b", Some(0), body).await.unwrap();
        let (tx, rx) = watch::channel(Progress::Connecting);
        let flight = Arc::new(InFlight {
            upload_id: "0a1b".into(),
            progress: rx,
        });
        let mut f = Follower::new(store.clone(), flight, digest.clone());
        tx.send_replace(streaming(Some(1000), 1000));
        let first = f.next().await.unwrap().unwrap();
        assert_eq!(first.len(), 999);
        let held = tokio::time::timeout(std::time::Duration::from_millis(100), f.next()).await;
        assert!(held.is_err(), "the last byte must wait for verification");
        tx.send_replace(Progress::Verified { size: 1000 });
        let last = f.next().await.unwrap().unwrap();
        assert_eq!(last.as_ref(), &[7u8]);
        assert!(f.next().await.is_none());

        // A failure ends a follower with an error.
        let (tx, rx) = watch::channel(streaming(Some(1000), 10));
        let flight = Arc::new(InFlight {
            upload_id: "0a1b".into(),
            progress: rx,
        });
        let mut f = Follower::new(store, flight, digest);
        assert_eq!(f.next().await.unwrap().unwrap().len(), 10);
        drop(tx);
        assert!(f.next().await.unwrap().is_err());
        assert!(f.next().await.is_none());
    }
}
