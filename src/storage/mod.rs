//! Blob bytes, addressed by digest.
//!
//! The [`BlobStore`] trait is what the registry layer sees; [`fs::FsBlobStore`]
//! is the embedded local-disk implementation. An object-storage implementation
//! for multi-replica deployments implements the same trait.
//!
//! Invariant: a blob is visible under its digest only once all of its bytes
//! are durably written and verified against that digest.

mod batches;
pub mod download;
pub mod fs;

use std::io;
use std::pin::Pin;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

use crate::oci::{Digest, DigestError};

/// Called with the number of bytes of an upload that can be read back.
pub type ProgressFn = Box<dyn Fn(u64) + Send + 'static>;

/// A stream of bytes, as read from a request body or a stored blob.
pub type ByteStream = Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send + 'static>>;

/// Frees the buffers that streamed uploads keep between requests, unless
/// one was used since the last call; called every few seconds
/// (`crate::memory::spawn_trimmer`).
pub fn release_idle_buffers() {
    batches::SPARE.release_if_idle();
}

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O error: {0}")]
    Io(#[from] io::Error),

    /// The bytes written do not hash to the digest the client named.
    #[error("content does not match digest {expected} (it hashes to {actual})")]
    DigestMismatch { expected: Digest, actual: Digest },

    #[error("upload session not found")]
    UploadNotFound,

    /// A chunk was sent for an offset other than the current end of the upload.
    #[error("upload holds {size} bytes; a chunk starting at {offset} is out of order")]
    UploadOffsetMismatch { size: u64, offset: u64 },

    #[error("requested range not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },

    #[error("the request body ended early: {0}")]
    BodyInterrupted(io::Error),

    #[error(transparent)]
    Digest(#[from] DigestError),
}

/// A blocking storage task that panicked or was cancelled: an I/O failure
/// as far as the request is concerned.
impl From<tokio::task::JoinError> for StorageError {
    fn from(e: tokio::task::JoinError) -> Self {
        StorageError::Io(io::Error::other(e))
    }
}

/// An HTTP `Range` request for a blob, before it is checked against the size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// `bytes=<start>-<end>` (inclusive) or `bytes=<start>-` (end `None`).
    FromTo { start: u64, end: Option<u64> },
    /// `bytes=-<n>`: the last n bytes.
    Suffix(u64),
}

impl RangeRequest {
    /// Resolves the request against a blob of `size` bytes into an inclusive
    /// `(first, last)` pair, or `None` when it cannot be satisfied.
    pub fn resolve(self, size: u64) -> Option<(u64, u64)> {
        match self {
            RangeRequest::FromTo { start, end } => {
                if start >= size {
                    return None;
                }
                let last = end.map_or(size - 1, |e| e.min(size - 1));
                (last >= start).then_some((start, last))
            }
            RangeRequest::Suffix(n) => {
                if n == 0 || size == 0 {
                    return None;
                }
                Some((size.saturating_sub(n), size - 1))
            }
        }
    }
}

/// Where the bytes of a blob read go, which decides how they may be handed
/// over (see [`download`]).
#[derive(Clone)]
pub enum Delivery {
    /// Read by code in this process (TLS, HTTP/2 framing, hashing, caches):
    /// plain buffers.
    Buffered,
    /// Written as they are to a plain TCP socket by HTTP/1.1: the body may
    /// be mapped windows of the file, registered in the connection's
    /// [`download::FileRegions`] so that its writer sends them with
    /// `sendfile` instead of from memory.
    PlainSocket(std::sync::Arc<download::FileRegions>),
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Delivery::Buffered => "Buffered",
            Delivery::PlainSocket(_) => "PlainSocket",
        })
    }
}

/// An open blob, ready to stream.
pub struct BlobRead {
    /// The size of the whole blob.
    pub total_size: u64,
    /// The inclusive byte range being streamed, when a range was asked for.
    pub range: Option<(u64, u64)>,
    pub body: ByteStream,
}

/// Where blob bytes live.
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The size of a stored blob, or `None` when it is not stored.
    async fn stat(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;

    /// Opens a stored blob for streaming, optionally a byte range of it.
    async fn read(
        &self,
        digest: &Digest,
        range: Option<RangeRequest>,
        delivery: Delivery,
    ) -> Result<Option<BlobRead>, StorageError>;

    /// Reads a whole (small) blob into memory: manifests that versions
    /// before the metadata store kept their bytes were stored as files.
    async fn read_all(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError>;

    /// Stores `bytes` under `digest`. The caller has verified that they hash
    /// to it (a manifest push computes or checks the digest anyway, so
    /// hashing again here would be the same work twice).
    async fn put(&self, digest: &Digest, bytes: Bytes) -> Result<(), StorageError>;

    /// Removes a blob's bytes. Removing a missing blob is not an error.
    async fn delete(&self, digest: &Digest) -> Result<(), StorageError>;

    /// Removes several blobs' bytes (one trip to the disk's thread pool
    /// where the store can). Missing blobs are not an error.
    async fn delete_many(&self, digests: &[Digest]) -> Result<(), StorageError> {
        for digest in digests {
            self.delete(digest).await?;
        }
        Ok(())
    }

    /// Starts an empty upload with the given id. An upload also starts with
    /// its first append: until then, it holds nothing (the registry keeps
    /// the sessions; a client's small blob that arrives whole never needs
    /// storage here).
    async fn create_upload(&self, id: &str) -> Result<(), StorageError>;

    /// The number of bytes received so far for an upload (0 for one not
    /// written to yet).
    async fn upload_size(&self, id: &str) -> Result<u64, StorageError>;

    /// Appends a body to an upload. `offset`, when given, must equal the
    /// upload's current size. Returns the new size. Bytes are hashed as they
    /// are written, so finishing the upload does not read them again.
    async fn append_upload(
        &self,
        id: &str,
        offset: Option<u64>,
        body: ByteStream,
    ) -> Result<u64, StorageError> {
        self.append_upload_with_progress(id, offset, body, None)
            .await
    }

    /// Like `append_upload`, calling `progress` now and then with how many
    /// bytes of the upload can already be read back (`read_upload`).
    async fn append_upload_with_progress(
        &self,
        id: &str,
        offset: Option<u64>,
        body: ByteStream,
        progress: Option<ProgressFn>,
    ) -> Result<u64, StorageError>;

    /// Reads up to `len` bytes of an upload in progress from `offset` (the
    /// pull-through cache streams a blob to clients while it is written).
    async fn read_upload(&self, id: &str, offset: u64, len: usize) -> Result<Bytes, StorageError>;

    /// Verifies an upload against `digest` without committing it yet (the
    /// pull-through cache releases a blob to clients once verified, while it
    /// is being made durable). On a mismatch the upload is discarded.
    async fn verify_upload(&self, id: &str, digest: &Digest) -> Result<u64, StorageError>;

    /// Verifies an upload against `digest` and moves it into place as that
    /// blob. Returns the blob's size. On a digest mismatch the upload is
    /// discarded.
    async fn finish_upload(&self, id: &str, digest: &Digest) -> Result<u64, StorageError>;

    /// Discards an upload and its bytes. Unknown ids are not an error.
    /// Waits for a request using the upload to finish with it.
    async fn cancel_upload(&self, id: &str) -> Result<(), StorageError>;

    /// Discards an upload unless a request is using it right now; returns
    /// whether it was discarded (expiry must never wait on a client).
    async fn cancel_idle_upload(&self, id: &str) -> Result<bool, StorageError>;

    /// Ids of uploads present in storage (to clean up abandoned ones).
    async fn list_uploads(&self) -> Result<Vec<String>, StorageError>;

    /// Checks that new bytes can be stored now (for readiness): writes,
    /// syncs and removes a small scratch object.
    async fn probe_writable(&self) -> Result<(), StorageError>;
}

#[cfg(test)]
mod tests {
    use super::RangeRequest::*;

    #[test]
    fn ranges_resolve_against_size() {
        assert_eq!(
            FromTo {
                start: 0,
                end: Some(9)
            }
            .resolve(100),
            Some((0, 9))
        );
        assert_eq!(
            FromTo {
                start: 90,
                end: None
            }
            .resolve(100),
            Some((90, 99))
        );
        assert_eq!(
            FromTo {
                start: 90,
                end: Some(500)
            }
            .resolve(100),
            Some((90, 99))
        );
        assert_eq!(
            FromTo {
                start: 100,
                end: None
            }
            .resolve(100),
            None
        );
        assert_eq!(
            FromTo {
                start: 5,
                end: Some(4)
            }
            .resolve(100),
            None
        );
        assert_eq!(Suffix(10).resolve(100), Some((90, 99)));
        assert_eq!(Suffix(1000).resolve(100), Some((0, 99)));
        assert_eq!(Suffix(0).resolve(100), None);
        assert_eq!(
            FromTo {
                start: 0,
                end: None
            }
            .resolve(0),
            None
        );
    }
}
