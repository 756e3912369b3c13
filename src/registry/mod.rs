//! The registry's domain: repositories, blobs, uploads, manifests, tags and
//! referrers, and the rules for pushing, pulling and deleting them. No HTTP
//! types live here; `api` translates requests into these calls.
//!
//! - `uploads`: blob uploads and mounts, and their expiry;
//! - `manifests`: manifest pushes (clients' and the cache's);
//! - `reclaim`: the one path by which stored bytes are removed, and the
//!   start-up recovery that finishes interrupted removals;
//! - `gc`: garbage collection passes (tags by retention policy, manifests
//!   nothing keeps, unreferenced blobs), through `reclaim`;
//! - `retention`: the retention policies' decisions, pure.
//! - `quota`: storage quotas and blob size limits (what applies to a
//!   repository, and the refusals).

pub mod error;
pub mod gc;
pub mod manifest;
mod manifest_cache;
mod manifests;
pub mod quota;
mod reclaim;
pub mod retention;
mod uploads;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::meta::{ManifestRecord, MetaError, MetaStore, Page, StorageTotals, TagEvent};
use crate::oci::{Digest, Reference, RepoName};
use crate::storage::{BlobRead, BlobStore, Delivery, RangeRequest};
use error::{RegistryError, Result};
use manifest_cache::ManifestCache;
use quota::{PushLimits, Quotas};

pub use reclaim::Recovered;
pub use uploads::{Chunk, MountOutcome};

/// The namespace of the pull-through cache: repositories under `f/` hold
/// copies of upstream content. Clients may read them but never write them;
/// only the cache (through `cache_manifest` and `commit_cached_blob`) does.
/// The registry owns this rule so that it needs nothing from the proxy.
pub const CACHE_PREFIX: &str = "f/";

/// Whether `repo` is a pull-through cache repository (read-only to clients).
pub fn is_cache_repo(repo: &RepoName) -> bool {
    repo.as_str().starts_with(CACHE_PREFIX)
}

/// Limits and timings the registry enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_manifest_size: u64,
    /// Upload sessions idle for longer than this are removed.
    pub upload_expiry: Duration,
}

/// Blobs up to this size pushed in one request are kept in the metadata
/// store instead of a file each (as every manifest is): for small objects,
/// creating and syncing a file costs more than all the rest of the push.
pub const INLINE_BLOB_MAX: u64 = 64 << 10;

/// Bytes of manifests kept in memory. Typical manifests are 0.5 to 4 KiB, so
/// this holds thousands; it bounds the cache's share of resident memory.
const MANIFEST_CACHE_BYTES: usize = 4 << 20;

pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    limits: Limits,
    quotas: Quotas,
    manifest_cache: ManifestCache,
    /// Held by the garbage collection pass that is running, if any.
    gc_pass: tokio::sync::Mutex<()>,
}

/// A manifest ready to be served.
#[derive(Clone)]
pub struct StoredManifest {
    pub record: ManifestRecord,
    pub bytes: Bytes,
}

impl Registry {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, limits: Limits) -> Self {
        Registry {
            blobs,
            meta,
            limits,
            quotas: Quotas::none(),
            manifest_cache: ManifestCache::new(MANIFEST_CACHE_BYTES),
            gc_pass: tokio::sync::Mutex::new(()),
        }
    }

    /// The registry with these quotas and blob size limits; call
    /// [`Registry::apply_quotas`] before serving.
    pub fn with_quotas(mut self, quotas: Quotas) -> Self {
        self.quotas = quotas;
        self
    }

    /// Hands the quotas to the metadata store, which recomputes its
    /// counters if the rules' patterns changed since the last start.
    /// Returns whether it did.
    pub async fn apply_quotas(&self) -> Result<bool> {
        Ok(self.meta.set_quotas(&self.quotas.scopes()).await?)
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The limits a push into `repo` (of `digest`, when known) must keep,
    /// read now; `None` when nothing limits it, which costs no query.
    async fn push_limits(
        &self,
        repo: &RepoName,
        digest: Option<&Digest>,
    ) -> Result<Option<PushLimits>> {
        let blob = self.quotas.max_blob_size(repo);
        let quotas = if self.quotas.has_quota(repo) {
            self.meta.quota_use(repo.as_str(), digest).await?
        } else {
            Vec::new()
        };
        let limits = PushLimits::new(blob, quotas, &self.quotas);
        Ok((!limits.is_empty()).then_some(limits))
    }

    /// A metadata error, with a quota refusal worded with its rule.
    fn refused(&self, e: MetaError) -> RegistryError {
        match e {
            MetaError::OverQuota { usage, adding } => {
                RegistryError::LimitExceeded(self.quotas.over_quota(&usage, adding, false))
            }
            other => other.into(),
        }
    }

    /// The blob store, for the pull-through cache's streaming fetches.
    pub fn blob_store(&self) -> Arc<dyn BlobStore> {
        self.blobs.clone()
    }

    /// The metadata store, for the pull-through cache's bookkeeping.
    pub fn meta_store(&self) -> Arc<dyn MetaStore> {
        self.meta.clone()
    }

    /// Whether the metadata store answers (readiness).
    pub async fn check_metadata(&self) -> std::result::Result<(), MetaError> {
        self.meta.ping().await
    }

    /// Whether new bytes can be stored (readiness).
    pub async fn check_storage(&self) -> std::result::Result<(), crate::storage::StorageError> {
        self.blobs.probe_writable().await
    }

    /// What is stored, for `/metrics`.
    pub async fn storage_totals(&self) -> std::result::Result<StorageTotals, MetaError> {
        self.meta.storage_totals().await
    }

    /// Refuses writes to pull-through cache repositories: their content
    /// comes from upstream only.
    fn ensure_writable(repo: &RepoName) -> Result<()> {
        if is_cache_repo(repo) {
            return Err(RegistryError::Unsupported(format!(
                "`{repo}` is a read-only pull-through cache of an upstream registry (f/...); push to a repository outside f/"
            )));
        }
        Ok(())
    }

    // ----- blobs -----

    /// The size of a blob the repository may serve.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        self.meta
            .linked_blob(repo.as_str(), digest)
            .await?
            .ok_or_else(|| RegistryError::BlobUnknown(digest.to_string()))
    }

    /// Opens a blob of the repository for streaming.
    pub async fn read_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        range: Option<RangeRequest>,
        delivery: Delivery,
    ) -> Result<BlobRead> {
        let size = self.blob_size(repo, digest).await?;
        // A small blob is most likely kept in the metadata store; a large
        // one is a file (or, pushed once each way, both).
        if size <= INLINE_BLOB_MAX {
            if let Some(bytes) = self.meta.blob_content(digest).await? {
                return Ok(inline_read(bytes, range)?);
            }
        }
        if let Some(read) = self.blobs.read(digest, range, delivery).await? {
            return Ok(read);
        }
        match self.meta.blob_content(digest).await? {
            Some(bytes) if size > INLINE_BLOB_MAX => Ok(inline_read(bytes, range)?),
            _ => Err(RegistryError::BlobUnknown(digest.to_string())),
        }
    }

    /// Whether the bytes of `digest` are stored, in either place.
    async fn bytes_stored(&self, digest: &Digest) -> Result<bool> {
        Ok(self.meta.blob_content(digest).await?.is_some()
            || self.blobs.stat(digest).await?.is_some())
    }

    /// Removes a blob from the repository. Its bytes stay while anything
    /// else refers to them; removing them is the garbage collector's job.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        Self::ensure_writable(repo)?;
        if self.meta.unlink_blob(repo.as_str(), digest).await? {
            Ok(())
        } else {
            Err(RegistryError::BlobUnknown(digest.to_string()))
        }
    }

    /// The size a manifest of `repo` states for `digest`, if one refers to
    /// it (the pull-through cache bounds downloads by it).
    pub async fn described_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>> {
        Ok(self.meta.described_size(repo.as_str(), digest).await?)
    }

    // ----- manifests: reads and deletes -----

    /// Looks a manifest up by tag or digest, without its bytes.
    pub async fn manifest_record(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<ManifestRecord> {
        let record = match reference {
            Reference::Tag(t) => self.meta.manifest_by_tag(repo.as_str(), t.as_str()).await?,
            Reference::Digest(d) => self.meta.manifest_by_digest(repo.as_str(), d).await?,
        };
        record.ok_or_else(|| {
            RegistryError::ManifestUnknown(format!("{repo}:{reference} is not in this registry"))
        })
    }

    /// A manifest with its bytes, exactly as pushed.
    pub async fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<StoredManifest> {
        let record = self.manifest_record(repo, reference).await?;
        if let Some(bytes) = self.manifest_cache.get(&record.digest) {
            return Ok(StoredManifest { record, bytes });
        }
        let bytes = match self.meta.blob_content(&record.digest).await? {
            Some(bytes) => Some(bytes),
            // Stored by a version that kept manifests as files.
            None => self.blobs.read_all(&record.digest).await?,
        };
        let bytes = bytes.ok_or_else(|| {
            RegistryError::ManifestUnknown(format!(
                "the bytes of {} are missing from storage",
                record.digest
            ))
        })?;
        self.manifest_cache.put(&record.digest, &bytes);
        Ok(StoredManifest { record, bytes })
    }

    /// Deletes a manifest by digest (with its tags, which also removes it
    /// from its subject's referrers), or only a tag when given one.
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<()> {
        Self::ensure_writable(repo)?;
        let deleted = match reference {
            Reference::Tag(t) => self.meta.delete_tag(repo.as_str(), t.as_str()).await?,
            Reference::Digest(d) => self.meta.delete_manifest(repo.as_str(), d).await?,
        };
        if deleted {
            Ok(())
        } else {
            Err(RegistryError::ManifestUnknown(format!(
                "{repo}:{reference} is not in this registry"
            )))
        }
    }

    /// Manifests of `repo` whose subject is `digest`.
    pub async fn referrers(
        &self,
        repo: &RepoName,
        digest: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ManifestRecord>> {
        Ok(self
            .meta
            .referrers(repo.as_str(), digest, artifact_type)
            .await?)
    }

    /// The history of `repo`'s tags (one, or all), newest first; with `at`
    /// (unix seconds), only the entries in effect at that moment.
    pub async fn tag_history(
        &self,
        repo: &RepoName,
        tag: Option<&str>,
        at: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TagEvent>> {
        let known = self.meta.list_tags(repo.as_str(), 0, None).await?.is_some()
            || !self
                .meta
                .tag_history(repo.as_str(), None, None, 1)
                .await?
                .is_empty();
        if !known {
            return Err(RegistryError::NameUnknown(repo.to_string()));
        }
        Ok(self.meta.tag_history(repo.as_str(), tag, at, limit).await?)
    }

    // ----- listings -----

    pub async fn list_tags(&self, repo: &RepoName, n: u32, last: Option<&str>) -> Result<Page> {
        self.meta
            .list_tags(repo.as_str(), n, last)
            .await?
            .ok_or_else(|| RegistryError::NameUnknown(repo.to_string()))
    }

    pub async fn catalog(&self, n: u32, last: Option<&str>) -> Result<Page> {
        Ok(self.meta.list_repos(n, last).await?)
    }
}

/// The metadata store's verdicts that a client acts on become the matching
/// registry error; the rest are internal.
impl From<MetaError> for RegistryError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::MissingReference { digest, kind } => {
                RegistryError::ManifestBlobUnknown(format!("{} {digest}", kind.as_str()))
            }
            MetaError::BlobGoing(digest) => RegistryError::Unavailable(format!(
                "{digest} is being removed from storage right now; retry in a moment"
            )),
            // `Registry::refused` names the rule; this is the fallback.
            MetaError::OverQuota { usage, adding } => {
                RegistryError::LimitExceeded(quota::LimitExceeded::Quota {
                    repos: format!("quota rule {}", usage.scope),
                    limit: usage.max_size,
                    used: usage.used,
                    adding,
                    more: false,
                })
            }
            other => RegistryError::Meta(other),
        }
    }
}

/// A blob kept in the metadata store, opened like a file: its bytes, or the
/// range of them that was asked for.
fn inline_read(
    bytes: Bytes,
    range: Option<RangeRequest>,
) -> std::result::Result<BlobRead, crate::storage::StorageError> {
    let total_size = bytes.len() as u64;
    let range = match range {
        None => None,
        Some(r) => Some(
            r.resolve(total_size)
                .ok_or(crate::storage::StorageError::RangeNotSatisfiable { size: total_size })?,
        ),
    };
    // Within `bytes`: `resolve` keeps `last` below the size.
    let body = match range {
        Some((first, last)) => bytes.slice(first as usize..=last as usize),
        None => bytes,
    };
    crate::storage::download::record_copied(body.len());
    Ok(BlobRead {
        total_size,
        range,
        body: Box::pin(futures_util::stream::once(async move { Ok(body) })),
    })
}
