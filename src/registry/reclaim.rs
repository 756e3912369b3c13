//! The one path by which stored bytes are removed, and the start-up work
//! that keeps the store consistent after a crash.
//!
//! Removal (cache eviction today; manifest deletion and garbage collection
//! will use the same call) takes the digest's lock exclusively, then in one
//! metadata transaction drops the references its rule lets go of and, only
//! if nothing else refers to the digest, marks it `deleting`. Then the file
//! goes, then the row. A commit of the same digest (upload, mount, manifest
//! push, cache fetch) holds the lock shared from "the file is in place" to
//! "the link is recorded", so it runs wholly before the removal (which then
//! sees the new reference and keeps the bytes) or wholly after it (and
//! writes the file anew). A crash after the mark leaves a `deleting` row;
//! [`Registry::recover`] finishes it before the server answers requests.

use super::error::Result;
use super::manifest;
use super::Registry;
use crate::meta::{LockMode, ReclaimRule, UploadKind};
use crate::oci::Digest;

/// Rows handled per metadata query at start-up.
const RECOVERY_BATCH: u32 = 1000;

/// What start-up recovery did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Removals interrupted by a crash, now finished.
    pub removals_finished: usize,
    /// Pull-through cache downloads cut off by the restart, dropped.
    pub downloads_dropped: usize,
    /// Upload files without a session (left by older versions), removed.
    pub orphan_uploads_removed: usize,
    /// Manifests stored before references were indexed, now indexed.
    pub manifests_indexed: usize,
}

impl Registry {
    /// Removes `digest`'s bytes if, once `rule` has dropped the references
    /// it may drop, nothing refers to them. Returns the bytes freed, or
    /// `None` when they are kept.
    pub async fn reclaim_blob(&self, digest: &Digest, rule: ReclaimRule) -> Result<Option<u64>> {
        let freed = self
            .reclaim_blobs(std::slice::from_ref(digest), rule)
            .await?;
        Ok(freed.into_iter().next().map(|(_, size)| size))
    }

    /// [`Registry::reclaim_blob`] for several digests at once: their locks
    /// taken together (in one order, so two callers cannot deadlock), one
    /// transaction, the files, one more transaction. Returns the digests
    /// removed with their sizes.
    pub async fn reclaim_blobs(
        &self,
        digests: &[Digest],
        rule: ReclaimRule,
    ) -> Result<Vec<(Digest, u64)>> {
        let locks = self.meta.lock_blobs(digests, LockMode::Exclusive).await?;
        let condemned = self.meta.condemn_blobs(digests, rule).await?;
        // If a delete fails the rows stay `deleting`: no commit can use
        // those digests, and the next start-up tries again.
        let gone: Vec<Digest> = condemned.iter().map(|(d, _)| d.clone()).collect();
        self.blobs.delete_many(&gone).await?;
        self.meta.forget_blobs(&gone).await?;
        drop(locks);
        Ok(condemned)
    }

    /// Brings the store back to a consistent state after a crash; run
    /// before serving. Each step is idempotent.
    pub async fn recover(&self) -> Result<Recovered> {
        let mut done = Recovered::default();
        let condemned = self.meta.condemned_blobs().await?;
        self.blobs.delete_many(&condemned).await?;
        self.meta.forget_blobs(&condemned).await?;
        done.removals_finished = condemned.len();
        loop {
            let downloads = self
                .meta
                .uploads_of_kind(UploadKind::CacheFetch, RECOVERY_BATCH)
                .await?;
            if downloads.is_empty() {
                break;
            }
            for upload in downloads {
                self.blobs.cancel_upload(&upload.id).await?;
                self.meta.delete_upload(&upload.id).await?;
                done.downloads_dropped += 1;
            }
        }
        for id in self.blobs.list_uploads().await? {
            if self.meta.get_upload(&id).await?.is_none() {
                self.blobs.cancel_upload(&id).await?;
                done.orphan_uploads_removed += 1;
            }
        }
        done.manifests_indexed = self.index_old_manifests().await?;
        Ok(done)
    }

    /// Records the references of manifests stored by versions that did not
    /// index them, reading each manifest's bytes once.
    async fn index_old_manifests(&self) -> Result<usize> {
        let mut indexed = 0;
        loop {
            let batch = self.meta.unindexed_manifests(RECOVERY_BATCH).await?;
            if batch.is_empty() {
                return Ok(indexed);
            }
            for (repo, digest) in batch {
                let refs = match self.blobs.read_all(&digest).await? {
                    Some(bytes) => match manifest::parse(&bytes, None) {
                        Ok(parsed) => parsed.refs,
                        Err(e) => {
                            tracing::warn!(%repo, %digest, error = %e, "stored manifest does not parse; indexing it without references");
                            Vec::new()
                        }
                    },
                    None => {
                        tracing::warn!(%repo, %digest, "stored manifest has no bytes; indexing it without references");
                        Vec::new()
                    }
                };
                self.meta.index_manifest_refs(&repo, &digest, &refs).await?;
                indexed += 1;
            }
        }
    }
}
