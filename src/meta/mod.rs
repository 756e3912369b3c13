//! Metadata: which repositories exist, which blobs each may serve, manifests
//! and their tags, referrers and upload sessions.
//!
//! The [`MetaStore`] trait is what the registry layer sees. [`sqlite`] is the
//! embedded implementation; a PostgreSQL one for multi-replica deployments
//! implements the same trait with the same schema.

pub mod sqlite;

use async_trait::async_trait;

use crate::oci::Digest;

/// A failure of the metadata store. The backend's own error types (sqlx's,
/// today) stay inside the implementation: callers see what kind of failure
/// it was, with the backend's message as the source.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata database error: {0}")]
    Database(#[source] BackendError),
    #[error("metadata database migration failed: {0}")]
    Migrate(#[source] BackendError),
    #[error("metadata database holds an invalid value: {0}")]
    Corrupt(String),
}

/// The backend's own error, boxed so that no backend type leaks out.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// A stored manifest's indexed facts. The bytes themselves live in the blob
/// store under `digest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
    /// The digest of the manifest this one refers to (`subject`), if any.
    pub subject: Option<Digest>,
    /// `artifactType`, or for image manifests without one the config's media type.
    pub artifact_type: Option<String>,
    /// The manifest's `annotations` as a JSON object, for the referrers API.
    pub annotations: Option<String>,
}

/// What a manifest push writes, in one transaction.
#[derive(Debug, Clone)]
pub struct NewManifest<'a> {
    pub repo: &'a str,
    pub record: ManifestRecord,
    /// Tag to point at the manifest (when pushed by tag).
    pub tag: Option<&'a str>,
}

/// One page of a listing, in lexical order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    /// Whether more items follow the last one returned.
    pub more: bool,
}

/// An upload session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRecord {
    pub id: String,
    pub repo: String,
    /// Unix seconds of the last request on this upload.
    pub updated_at: i64,
}

#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    // --- blobs a repository may serve ---

    /// Records that `repo` may serve `digest` (pushed or mounted into it).
    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> Result<()>;
    /// The size of `digest` if `repo` may serve it.
    async fn linked_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>>;
    /// Removes a link; returns whether there was one.
    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool>;
    /// Repositories that may serve `digest` (for mounts without `from`).
    async fn repos_with_blob(&self, digest: &Digest) -> Result<Vec<String>>;
    /// Of `digests`, those that `repo` may not serve as blobs.
    async fn missing_blobs(&self, repo: &str, digests: &[Digest]) -> Result<Vec<Digest>>;
    /// Of `digests`, those that are not manifests of `repo`.
    async fn missing_manifests(&self, repo: &str, digests: &[Digest]) -> Result<Vec<Digest>>;

    // --- manifests and tags ---

    /// Stores a manifest record (and its tag) in one transaction, creating the
    /// repository if needed. Pushing the same manifest again is not an error.
    async fn put_manifest(&self, manifest: NewManifest<'_>) -> Result<()>;
    async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>>;
    async fn manifest_by_tag(&self, repo: &str, tag: &str) -> Result<Option<ManifestRecord>>;
    /// Deletes a manifest with its tags; returns whether it existed.
    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool>;
    /// Deletes a tag only; returns whether it existed.
    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool>;
    /// Manifests whose `subject` is `digest`, optionally of one artifact type.
    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ManifestRecord>>;

    // --- listings ---

    /// Tags of `repo` after `last`, at most `n`; `None` if the repo is unknown.
    async fn list_tags(&self, repo: &str, n: u32, last: Option<&str>) -> Result<Option<Page>>;
    /// Repositories after `last`, at most `n`.
    async fn list_repos(&self, n: u32, last: Option<&str>) -> Result<Page>;

    // --- the pull-through cache's blobs ---

    /// Records that the cache holds `digest` and was just pulled from.
    async fn touch_cache_blob(&self, digest: &Digest, size: u64) -> Result<()>;
    /// Bytes held only by the cache (cached blobs no pushed repository uses).
    async fn cache_usage(&self) -> Result<u64>;
    /// The least recently pulled cached blobs, oldest first.
    async fn cache_lru(&self, limit: u32) -> Result<Vec<(Digest, u64)>>;
    /// Forgets a cached blob: removes it from every cache repository (`f/…`).
    /// Returns whether some other repository still serves it (then its
    /// bytes must stay).
    async fn evict_cache_blob(&self, digest: &Digest) -> Result<bool>;

    // --- upload sessions ---

    async fn create_upload(&self, id: &str, repo: &str) -> Result<()>;
    async fn get_upload(&self, id: &str) -> Result<Option<UploadRecord>>;
    async fn touch_upload(&self, id: &str) -> Result<()>;
    async fn delete_upload(&self, id: &str) -> Result<()>;
    /// Upload sessions whose last request is older than `before` (unix seconds).
    async fn stale_uploads(&self, before: i64) -> Result<Vec<UploadRecord>>;
}

/// Current time in unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
