//! Blob uploads (monolithic, chunked, streamed), cross-repository mounts,
//! the pull-through cache's downloads, and the expiry of abandoned ones.
//!
//! Committing a blob follows the reference-safety rule (docs/ARCHITECTURE.md):
//! the digest is locked shared while its file is moved into place and its
//! link recorded, so a removal of the same digest can never slip between
//! "the file exists" and "the link is recorded".

use super::error::{RegistryError, Result};
use super::Registry;
use crate::meta::{CommitBlob, LinkOrigin, LockMode, UploadKind};
use crate::oci::{Digest, RepoName};
use crate::storage::{ByteStream, ProgressFn, StorageError};

/// Upload sessions examined per expiry query.
const EXPIRY_BATCH: u32 = 1000;

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

    async fn new_upload(&self, repo: &RepoName, id: &str, kind: UploadKind) -> Result<()> {
        self.meta.create_upload(id, repo.as_str(), kind).await?;
        self.blobs.create_upload(id).await?;
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

    /// Appends a chunk; `offset` (from `Content-Range`) must be the current
    /// size. The session counts as active from the moment a chunk starts.
    pub async fn append_upload(
        &self,
        repo: &RepoName,
        id: &str,
        offset: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        self.check_upload(repo, id).await?;
        self.meta.touch_upload(id).await?;
        Ok(self.blobs.append_upload(id, offset, body).await?)
    }

    /// Completes an upload with an optional last chunk, verifying `digest`.
    pub async fn finish_upload(
        &self,
        repo: &RepoName,
        id: &str,
        digest: &Digest,
        last_chunk: Option<(Option<u64>, ByteStream)>,
    ) -> Result<u64> {
        self.check_upload(repo, id).await?;
        if let Some((offset, body)) = last_chunk {
            self.blobs.append_upload(id, offset, body).await?;
        }
        self.commit_upload(repo, id, digest, LinkOrigin::Client)
            .await
    }

    /// Verifies an upload, moves it into place as `digest` and links it
    /// into `repo`; the session ends. On a digest mismatch the bytes and the
    /// session are gone.
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
        self.meta
            .commit_blob(CommitBlob {
                repo: repo.as_str(),
                digest,
                size,
                origin,
                upload: Some(id),
            })
            .await?;
        drop(lock);
        Ok(size)
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

    /// Pushes a whole blob in one request (`POST ...?digest=`).
    pub async fn push_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        body: ByteStream,
    ) -> Result<u64> {
        let id = self.start_upload(repo).await?;
        let result = self
            .finish_upload(repo, &id, digest, Some((None, body)))
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
        if self.blobs.stat(digest).await?.is_some() {
            let mounted = self
                .meta
                .mount_blob(repo.as_str(), digest, from.map(RepoName::as_str))
                .await?;
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
