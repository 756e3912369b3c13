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
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::oci::Digest;
use crate::storage::{BlobStore, ByteStream, RangeRequest, StorageError};

/// How much a client reads from the upload file at a time.
const FOLLOW_CHUNK: usize = 256 * 1024;

/// Where a fetch is.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Waiting for upstream's response headers.
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

/// The fetches in progress, by digest.
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

    pub fn remove(&self, digest: &Digest) {
        self.map.lock().remove(digest);
    }
}

/// What a client following a fetch streams.
enum FollowState {
    Following {
        pos: u64,
    },
    /// The fetch finished; the rest comes from the committed blob.
    Draining(ByteStream),
    Finished,
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

/// Streams a blob to one client by following a fetch.
pub fn follow(store: Arc<dyn BlobStore>, flight: Arc<InFlight>, digest: Digest) -> ByteStream {
    let rx = flight.progress.clone();
    let state = (FollowState::Following { pos: 0 }, rx, store, flight, digest);
    Box::pin(futures_util::stream::unfold(
        state,
        |(mut st, mut rx, store, flight, digest)| async move {
            loop {
                match &mut st {
                    FollowState::Finished => return None,
                    FollowState::Draining(stream) => {
                        use futures_util::StreamExt;
                        return stream
                            .next()
                            .await
                            .map(|item| (item, (st, rx, store, flight, digest)));
                    }
                    FollowState::Following { pos } => {
                        let pos_now = *pos;
                        let p = rx.borrow_and_update().clone();
                        match p {
                            Progress::Connecting => {}
                            Progress::Streaming { .. } | Progress::Verified { .. } => {
                                // Hold the last byte back until the digest is verified.
                                let limit = match p {
                                    Progress::Streaming {
                                        total: Some(t),
                                        written,
                                    } => written.min(t.saturating_sub(1)),
                                    Progress::Streaming {
                                        total: None,
                                        written,
                                    } => written.saturating_sub(1),
                                    Progress::Verified { size } if pos_now >= size => return None,
                                    Progress::Verified { size } => size,
                                    _ => 0,
                                };
                                if limit > pos_now {
                                    let len = ((limit - pos_now) as usize).min(FOLLOW_CHUNK);
                                    match store.read_upload(&flight.upload_id, pos_now, len).await {
                                        Ok(bytes) if !bytes.is_empty() => {
                                            *pos += bytes.len() as u64;
                                            return Some((
                                                Ok(bytes),
                                                (st, rx, store, flight, digest),
                                            ));
                                        }
                                        // Committed (moved) or failed meanwhile: the
                                        // next progress update says which.
                                        Ok(_) | Err(StorageError::UploadNotFound) => {}
                                        Err(e) => {
                                            let err = io::Error::other(e.to_string());
                                            return Some((
                                                Err(err),
                                                (FollowState::Finished, rx, store, flight, digest),
                                            ));
                                        }
                                    }
                                }
                            }
                            Progress::Done { size } => {
                                if pos_now >= size {
                                    return None;
                                }
                                let range = RangeRequest::FromTo {
                                    start: pos_now,
                                    end: None,
                                };
                                match store.read(&digest, Some(range)).await {
                                    Ok(Some(read)) => {
                                        st = FollowState::Draining(read.body);
                                        continue;
                                    }
                                    Ok(None) => {
                                        let err = io::Error::other(
                                            "cached blob vanished while being served",
                                        );
                                        return Some((
                                            Err(err),
                                            (FollowState::Finished, rx, store, flight, digest),
                                        ));
                                    }
                                    Err(e) => {
                                        let err = io::Error::other(e.to_string());
                                        return Some((
                                            Err(err),
                                            (FollowState::Finished, rx, store, flight, digest),
                                        ));
                                    }
                                }
                            }
                            Progress::Failed { message, .. } => {
                                let err =
                                    io::Error::other(format!("upstream fetch failed: {message}"));
                                return Some((
                                    Err(err),
                                    (FollowState::Finished, rx, store, flight, digest),
                                ));
                            }
                        }
                        if rx.changed().await.is_err() {
                            // The fetch task is gone; whatever it committed is final.
                            let done = matches!(*rx.borrow(), Progress::Done { .. });
                            if !done {
                                let err =
                                    io::Error::other("the upstream fetch stopped unexpectedly");
                                return Some((
                                    Err(err),
                                    (FollowState::Finished, rx, store, flight, digest),
                                ));
                            }
                        }
                    }
                }
            }
        },
    ))
}
