//! Blob uploads (monolithic, chunked, streamed), cross-repository mounts,
//! the pull-through cache's downloads, and the expiry of abandoned ones.
//!
//! Committing a blob follows the reference-safety rule (docs/ARCHITECTURE.md):
//! the digest is locked shared while its file is moved into place and its
//! link recorded, so a removal of the same digest can never slip between
//! "the file exists" and "the link is recorded".

use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;

use super::error::{RegistryError, Result};
use super::quota::{self, LimitExceeded, PushLimits};
use super::{Registry, INLINE_BLOB_MAX};
use crate::meta::{CommitBlob, LinkOrigin, LockMode, MetaError, ReclaimRule, UploadKind};
use crate::oci::{Digest, DigestHasher, RepoName};
use crate::storage::{ByteStream, ProgressFn, StorageError};

/// Upload sessions examined per expiry query.
const EXPIRY_BATCH: u32 = 1000;

/// A request body for an upload, with what its headers say about it.
pub struct Chunk {
    /// Where it starts (`Content-Range`); it must be the upload's size.
    pub offset: Option<u64>,
    /// How long it is (`Content-Length`, or the span of `Content-Range`),
    /// when the client says; limits are checked against it before a byte
    /// is read.
    pub len: Option<u64>,
    pub body: ByteStream,
}

impl Chunk {
    /// A body of unknown length, appended wherever the upload ends.
    pub fn streamed(body: ByteStream) -> Chunk {
        Chunk {
            offset: None,
            len: None,
            body,
        }
    }
}

/// The result of a mount request.
pub enum MountOutcome {
    /// The blob is now in the repository.
    Mounted { size: u64 },
    /// It could not be mounted; a normal upload was started instead.
    UploadStarted { id: String },
}

impl Registry {
    /// Starts an upload session and returns its id. The metadata record is
    /// written first, so a crash never leaves upload bytes nobody can expire.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<String> {
        Self::ensure_writable(repo)?;
        let id = uuid::Uuid::new_v4().to_string();
        self.new_upload(repo, &id, UploadKind::Client).await?;
        Ok(id)
    }

    /// A client's upload gets its storage with its first bytes: most small
    /// blobs arrive whole in the request that finishes the upload and are
    /// kept in the metadata store, so they never need a file. The cache's
    /// downloads are read back while they are written, so theirs is made now.
    async fn new_upload(&self, repo: &RepoName, id: &str, kind: UploadKind) -> Result<()> {
        self.meta.create_upload(id, repo.as_str(), kind).await?;
        if kind != UploadKind::Client {
            self.blobs.create_upload(id).await?;
        }
        Ok(())
    }

    /// Checks that upload `id` exists and belongs to `repo`.
    async fn check_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        match self.meta.get_upload(id).await? {
            Some(u) if u.repo == repo.as_str() => Ok(()),
            _ => Err(RegistryError::BlobUploadUnknown),
        }
    }

    /// The number of bytes an upload holds.
    pub async fn upload_size(&self, repo: &RepoName, id: &str) -> Result<u64> {
        self.check_upload(repo, id).await?;
        Ok(self.blobs.upload_size(id).await?)
    }

    /// Appends a chunk; its `offset` (from `Content-Range`) must be the
    /// current size. The session counts as active from the moment a chunk
    /// starts. A chunk that would take the upload over a blob size limit or
    /// a quota is refused and the upload discarded.
    pub async fn append_upload(&self, repo: &RepoName, id: &str, chunk: Chunk) -> Result<u64> {
        // Checked and marked active in one write: a chunked push makes this
        // trip once per chunk.
        if !self.meta.touch_upload(id, repo.as_str()).await? {
            return Err(RegistryError::BlobUploadUnknown);
        }
        let limits = self.push_limits(repo, None).await?;
        self.append_within(id, None, chunk, limits.as_ref()).await
    }

    /// Completes an upload with an optional last chunk, verifying `digest`.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        last_chunk: Option<Chunk>,
    ) -> Result<u64> {
        self.check_upload(repo, id).await?;
        let limits = self.push_limits(repo, Some(digest)).await?;
        self.finish_within(repo, id, None, digest, last_chunk, limits.as_ref())
            .await
    }

    /// `finish_upload` with the push's limits already read (and, when
    /// known, the size of the upload). The whole blob is checked against
    /// them before it is moved into place, so a push that streamed without
    /// a length is refused here, and nothing of it is kept.
    async fn finish_within(
        &self,
        repo: &RepoName,
        id: &str,
        held: Option<u64>,
        digest: &Digest,
        last_chunk: Option<Chunk>,
        limits: Option<&PushLimits>,
    ) -> Result<u64> {
        let mut held = held;
        if is_small(last_chunk.as_ref()) {
            let holds = match held {
                Some(size) => size,
                None => self.blobs.upload_size(id).await?,
            };
            if holds == 0 {
                return self
                    .commit_inline(repo, Some(id), digest, last_chunk, limits)
                    .await;
            }
            held = Some(holds);
        }
        if let Some(chunk) = last_chunk {
            held = Some(self.append_within(id, held, chunk, limits).await?);
        }
        if let Some(limits) = limits {
            let size = match held {
                Some(size) => size,
                None => self.blobs.upload_size(id).await?,
            };
            if let Err(e) = limits.check(size, false) {
                return Err(self.discard_upload(id, e).await);
            }
        }
        self.commit_upload(repo, id, digest, LinkOrigin::Client)
            .await
    }

    /// Appends a client's chunk within `limits`. A chunk whose stated
    /// length would take the upload over them is refused before a byte of
    /// it is read; a body without one is cut off before the chunk that
    /// would cross them. Either way the upload is discarded: a blob over a
    /// limit can never be committed, so there is nothing to resume.
    async fn append_within(
        &self,
        id: &str,
        held: Option<u64>,
        chunk: Chunk,
        limits: Option<&PushLimits>,
    ) -> Result<u64> {
        let Chunk { offset, len, body } = chunk;
        let Some(limits) = limits else {
            return Ok(self.blobs.append_upload(id, offset, body).await?);
        };
        let held = match held {
            Some(size) => size,
            None => self.blobs.upload_size(id).await?,
        };
        if offset.is_some_and(|o| o != held) {
            // Out of order: the store refuses it and says where the upload is.
            return Ok(self.blobs.append_upload(id, offset, body).await?);
        }
        if let Some(len) = len {
            if let Err(e) = limits.check(held.saturating_add(len), false) {
                return Err(self.discard_upload(id, e).await);
            }
        }
        let Some(allowance) = limits.allowance() else {
            return Ok(self.blobs.append_upload(id, offset, body).await?);
        };
        let (body, reached) = quota::bounded(body, held, allowance);
        match self.blobs.append_upload(id, offset, body).await {
            Ok(size) => Ok(size),
            Err(e) => {
                let reached = reached.load(Ordering::Acquire);
                if reached == 0 {
                    return Err(e.into());
                }
                match limits.check(reached, true) {
                    Err(limit) => Err(self.discard_upload(id, limit).await),
                    // Cannot be: the allowance is the smallest limit.
                    Ok(()) => Err(e.into()),
                }
            }
        }
    }

    /// Drops an upload refused by a limit, bytes and session.
    async fn discard_upload(&self, id: &str, limit: LimitExceeded) -> RegistryError {
        if let Err(e) = self.blobs.cancel_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "could not remove an upload refused by a limit");
        }
        if let Err(e) = self.meta.delete_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "could not forget an upload refused by a limit");
        }
        RegistryError::LimitExceeded(limit)
    }

    /// Verifies an upload, moves it into place as `digest` and links it
    /// into `repo`; the session ends. On a digest mismatch the bytes and the
    /// session are gone. A link refused by a quota (another push took the
    /// space since the limits were read) takes the bytes back out.
    async fn commit_upload(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        origin: LinkOrigin,
    ) -> Result<u64> {
        // The lock covers the rename and the record. The hash is already
        // known (it was computed while the bytes arrived) unless a restart
        // lost it; then the file is hashed again under the lock, which only
        // makes a removal of this very digest wait.
        let lock = self.meta.lock_blob(digest, LockMode::Shared).await?;
        let size = match self.blobs.finish_upload(id, digest).await {
            Ok(size) => size,
            Err(e) => return Err(self.upload_failed(id, e).await),
        };
        let committed = self
            .meta
            .commit_blob(CommitBlob {
                repo: repo.as_str(),
                digest,
                size,
                origin,
                upload: Some(id),
                content: None,
            })
            .await;
        drop(lock);
        self.committed(repo, digest, size, committed).await
    }

    /// Commits a small blob that arrives whole in the request finishing its
    /// upload (`upload`, or none for a single-request push) by keeping its
    /// bytes in the metadata store: read into memory (at most
    /// [`INLINE_BLOB_MAX`]), verified, and written in the same transaction
    /// as the blob's row and link. No file is created or synced, which for
    /// small blobs is most of the cost of a push. The rules are those of
    /// [`Registry::commit_upload`]: the digest locked shared across the
    /// write, a mismatch ends the session, a quota refusal takes the bytes
    /// back out.
    async fn commit_inline(
        &self,
        repo: &RepoName,
        upload: Option<&str>,
        digest: &Digest,
        chunk: Option<Chunk>,
        limits: Option<&PushLimits>,
    ) -> Result<u64> {
        let bytes = match chunk {
            None => Bytes::new(),
            Some(chunk) => {
                let len = chunk.len.unwrap_or(0);
                if let Some(limits) = limits {
                    if let Err(e) = limits.check(len, false) {
                        return Err(match upload {
                            Some(id) => self.discard_upload(id, e).await,
                            None => RegistryError::LimitExceeded(e),
                        });
                    }
                }
                read_small(chunk.body, len).await?
            }
        };
        let mut hasher = DigestHasher::new(digest.algorithm());
        hasher.update(&bytes);
        let actual = hasher.finish();
        if &actual != digest {
            let mismatch = StorageError::DigestMismatch {
                expected: digest.clone(),
                actual,
            };
            return Err(match upload {
                Some(id) => self.upload_failed(id, mismatch).await,
                None => mismatch.into(),
            });
        }
        let size = bytes.len() as u64;
        let lock = self.meta.lock_blob(digest, LockMode::Shared).await?;
        let committed = self
            .meta
            .commit_blob(CommitBlob {
                repo: repo.as_str(),
                digest,
                size,
                origin: LinkOrigin::Client,
                upload,
                content: Some(&bytes),
            })
            .await;
        drop(lock);
        if let Some(id) = upload {
            // An upload file exists only if a client sent an empty chunk
            // first; it must not outlive the session.
            if let Err(e) = self.blobs.cancel_upload(id).await {
                tracing::warn!(upload = %id, error = %e, "could not remove an empty upload file");
            }
        }
        self.committed(repo, digest, size, committed).await
    }

    /// The answer to a blob's commit: a link refused by a quota (another
    /// push took the space since the limits were read) takes the bytes,
    /// already in place, back out.
    async fn committed(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
        committed: std::result::Result<(), MetaError>,
    ) -> Result<u64> {
        match committed {
            Ok(()) => Ok(size),
            Err(e @ MetaError::OverQuota { .. }) => {
                // The bytes are in place and the session ended, but nothing
                // links them: they go by the one removal path, which keeps
                // them if another push linked the digest meanwhile.
                tracing::info!(%repo, %digest, size, "a quota refused a blob at its commit (a concurrent push took the space); removing its bytes");
                if let Err(err) = self.reclaim_blob(digest, ReclaimRule::Unlinked).await {
                    tracing::warn!(%digest, error = %err, "could not remove a blob refused by a quota; the garbage collector will");
                }
                Err(self.refused(e))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A failed verification discarded the bytes: the session goes too.
    async fn upload_failed(&self, id: &str, e: StorageError) -> RegistryError {
        if matches!(
            e,
            StorageError::DigestMismatch { .. } | StorageError::UploadNotFound
        ) {
            if let Err(meta) = self.meta.delete_upload(id).await {
                tracing::warn!(upload = %id, error = %meta, "could not forget a failed upload");
            }
        }
        e.into()
    }

    /// Pushes a whole blob in one request (`POST ...?digest=`). A blob
    /// whose stated length is over a limit is refused before the upload
    /// starts: nothing is stored and the body is never read.
    pub async fn push_blob(&self, repo: &RepoName, digest: &Digest, chunk: Chunk) -> Result<u64> {
        Self::ensure_writable(repo)?;
        let limits = self.push_limits(repo, Some(digest)).await?;
        if let (Some(limits), Some(len)) = (&limits, chunk.len) {
            limits
                .check(len, false)
                .map_err(RegistryError::LimitExceeded)?;
        }
        if is_small(Some(&chunk)) {
            // Whole in this request and small: no session, no file.
            return self
                .commit_inline(repo, None, digest, Some(chunk), limits.as_ref())
                .await;
        }
        let id = self.start_upload(repo).await?;
        // The upload was just created: it holds nothing yet.
        let result = self
            .finish_within(repo, &id, Some(0), digest, Some(chunk), limits.as_ref())
            .await;
        if result.is_err() {
            // A single-request upload cannot be resumed; drop what arrived.
            self.cancel_upload(repo, &id).await.ok();
        }
        result
    }

    /// Cancels an upload and deletes its bytes.
    pub async fn cancel_upload(&self, repo: &RepoName, id: &str) -> Result<()> {
        self.check_upload(repo, id).await?;
        self.blobs.cancel_upload(id).await?;
        self.meta.delete_upload(id).await?;
        Ok(())
    }

    /// Mounts a blob from `from` (or, without `from`, from any repository
    /// holding it) into `repo`; otherwise starts a normal upload.
    pub async fn mount_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        from: Option<&RepoName>,
    ) -> Result<MountOutcome> {
        Self::ensure_writable(repo)?;
        let lock = self.meta.lock_blob(digest, LockMode::Shared).await?;
        // The inventory says the bytes are there; make sure of it anyway, so
        // a store damaged outside Trow gives an upload, not a broken image.
        if self.bytes_stored(digest).await? {
            let mounted = self
                .meta
                .mount_blob(repo.as_str(), digest, from.map(RepoName::as_str))
                .await
                .map_err(|e| self.refused(e))?;
            if let Some(size) = mounted {
                return Ok(MountOutcome::Mounted { size });
            }
        }
        drop(lock);
        Ok(MountOutcome::UploadStarted {
            id: self.start_upload(repo).await?,
        })
    }

    /// Removes upload sessions idle for longer than the expiry, with their
    /// bytes. An upload that a request is using right now is skipped (it is
    /// not abandoned; the body idle timeout ends a stalled one), and a
    /// failure on one upload does not stop the pass. Returns how many were
    /// removed.
    pub async fn expire_uploads(&self) -> Result<usize> {
        let expiry = i64::try_from(self.limits.upload_expiry.as_secs()).unwrap_or(i64::MAX);
        let cutoff = crate::meta::now_unix().saturating_sub(expiry);
        let mut removed = 0;
        let mut skipped = 0u32;
        loop {
            // Oldest first; the ones skipped before are the oldest left, so
            // each query passes over them.
            let limit = EXPIRY_BATCH + skipped;
            let stale = self.meta.stale_uploads(cutoff, limit).await?;
            let mut progressed = false;
            for upload in stale.iter().skip(skipped as usize) {
                match self.blobs.cancel_idle_upload(&upload.id).await {
                    Ok(true) => {}
                    Ok(false) => {
                        skipped += 1;
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(upload = %upload.id, error = %e, "could not remove an abandoned upload; will retry");
                        skipped += 1;
                        continue;
                    }
                }
                if let Err(e) = self.meta.delete_upload(&upload.id).await {
                    tracing::warn!(upload = %upload.id, error = %e, "could not forget an abandoned upload; will retry");
                    skipped += 1;
                    continue;
                }
                progressed = true;
                removed += 1;
                tracing::info!(upload = %upload.id, repo = %upload.repo, "expired abandoned upload");
            }
            if !progressed || stale.len() < limit as usize {
                break;
            }
        }
        Ok(removed)
    }

    // ----- the pull-through cache's downloads -----

    /// Starts download `id` of the cache into `cache_repo`: an upload
    /// session like a client's, so that an interrupted download expires
    /// (and is dropped at start-up, since it cannot resume).
    pub async fn start_cache_download(&self, cache_repo: &RepoName, id: &str) -> Result<()> {
        self.new_upload(cache_repo, id, UploadKind::CacheFetch)
            .await
    }

    /// Appends a download's body, reporting how much can be read back.
    pub async fn append_cache_download(
        &self,
        id: &str,
        body: ByteStream,
        progress: ProgressFn,
    ) -> Result<u64> {
        Ok(self
            .blobs
            .append_upload_with_progress(id, Some(0), body, Some(progress))
            .await?)
    }

    /// Commits a finished download as `digest` in `cache_repo`.
    pub async fn commit_cached_blob(
        &self,
        cache_repo: &RepoName,
        id: &str,
        digest: &Digest,
    ) -> Result<u64> {
        let size = self
            .commit_upload(cache_repo, id, digest, LinkOrigin::Cache)
            .await?;
        self.meta.touch_cache_blob(digest, size).await?;
        Ok(size)
    }

    /// Drops a failed download and its session.
    pub async fn discard_cache_download(&self, id: &str) {
        if let Err(e) = self.blobs.cancel_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "could not remove a failed download");
        }
        if let Err(e) = self.meta.delete_upload(id).await {
            tracing::warn!(upload = %id, error = %e, "could not forget a failed download");
        }
    }
}

/// Whether the request finishing an upload carries a blob small enough to
/// keep in the metadata store, if the upload holds nothing yet: no body at
/// all, or one that starts the upload and states a length of at most
/// [`INLINE_BLOB_MAX`]. (A body without a stated length is streamed to a
/// file: its size is known only at its end.)
fn is_small(chunk: Option<&Chunk>) -> bool {
    match chunk {
        None => true,
        Some(c) => {
            c.offset.is_none_or(|o| o == 0) && c.len.is_some_and(|len| len <= INLINE_BLOB_MAX)
        }
    }
}

/// Reads a small body that states `len` bytes (at most [`INLINE_BLOB_MAX`])
/// into memory; more than it stated is refused.
async fn read_small(mut body: ByteStream, len: u64) -> Result<Bytes> {
    let mut bytes = BytesMut::with_capacity(len.min(INLINE_BLOB_MAX) as usize);
    while let Some(frame) = body.next().await {
        let frame = frame.map_err(StorageError::BodyInterrupted)?;
        if (bytes.len() + frame.len()) as u64 > len {
            return Err(RegistryError::BlobUploadInvalid(format!(
                "the request body is longer than the {len} bytes its headers state; send a Content-Length or Content-Range that matches the body"
            )));
        }
        bytes.extend_from_slice(&frame);
    }
    Ok(bytes.freeze())
}
