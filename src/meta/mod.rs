//! Metadata: which repositories exist, which blobs each may serve, manifests
//! and their tags, referrers and upload sessions.
//!
//! The [`MetaStore`] trait is what the registry layer sees. [`sqlite`] is the
//! embedded implementation; a PostgreSQL one for multi-replica deployments
//! implements the same trait with the same schema.

mod group_commit;
pub mod locks;
pub mod sqlite;

use async_trait::async_trait;

use crate::oci::{Digest, RepoPattern};

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
    /// A manifest refers to something its repository does not hold.
    #[error("{} {digest} is not in the repository", kind.as_str())]
    MissingReference { digest: Digest, kind: RefKind },
    /// The digest's bytes are being removed (an interrupted removal not yet
    /// finished); the caller should retry shortly.
    #[error("{0} is being removed; retry")]
    BlobGoing(Digest),
    /// The link or manifest would take a quota scope over its `max_size`;
    /// nothing was recorded.
    #[error("quota scope {} would exceed its limit: {} of {} bytes used, adding {adding}", usage.scope, usage.used, usage.max_size)]
    OverQuota { usage: QuotaUse, adding: u64 },
}

/// The backend's own error, boxed so that no backend type leaks out.
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// A stored manifest's indexed facts. The bytes themselves are kept apart:
/// in the metadata store's content table (see [`MetaStore::blob_content`]),
/// or for manifests stored by older versions in the blob store under
/// `digest`.
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

/// A descriptor a manifest refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestRef {
    pub digest: Digest,
    /// The size the descriptor states.
    pub size: u64,
    pub kind: RefKind,
}

/// Whether a manifest refers to a blob (config, layer) or a child manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefKind {
    Blob,
    Manifest,
}

impl RefKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefKind::Blob => "blob",
            RefKind::Manifest => "manifest",
        }
    }
}

/// What a manifest push writes, in one transaction.
#[derive(Debug, Clone)]
pub struct NewManifest<'a> {
    pub repo: &'a str,
    pub record: ManifestRecord,
    /// Tag to point at the manifest (when pushed by tag).
    pub tag: Option<&'a str>,
    /// What the manifest refers to.
    pub refs: &'a [ManifestRef],
    /// A push: every reference must already be in the repository (blobs
    /// linked, child manifests stored), checked in the same transaction as
    /// the insert. The pull-through cache stores manifests whose content
    /// it fetches later, so it does not ask for the check.
    pub require_refs: bool,
    /// The manifest's bytes, kept in the same transaction (`None`: they
    /// are in the blob store already).
    pub content: Option<&'a [u8]>,
}

/// A blob whose bytes are in place, to record in a repository.
#[derive(Debug, Clone, Copy)]
pub struct CommitBlob<'a> {
    pub repo: &'a str,
    pub digest: &'a Digest,
    pub size: u64,
    pub origin: LinkOrigin,
    /// The upload session that delivered the bytes, which ends with it.
    pub upload: Option<&'a str>,
    /// The bytes themselves, for a small blob kept in the metadata store
    /// (written in the same transaction as its row and link); `None` when
    /// they are in the blob store.
    pub content: Option<&'a [u8]>,
}

/// Who made a repository's link to a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOrigin {
    /// A client pushed or mounted it.
    Client,
    /// The pull-through cache fetched it: eviction may drop the link.
    Cache,
}

/// Which references a removal may ignore, i.e. why the blob is going.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReclaimRule {
    /// Cache eviction: the cache's own links are dropped; any other link or
    /// a manifest stored under the digest keeps the bytes.
    CacheEviction,
    /// Garbage collection: no manifest of any repository refers to the
    /// digest or is stored under it, no cache link holds it, and it was
    /// last pushed, mounted or linked before `referenced_before` (unix
    /// seconds): its remaining links (uploads that never got a manifest)
    /// are dropped with it.
    Unreferenced { referenced_before: i64 },
    /// Nothing is dropped: the bytes go only if nothing links or stores
    /// them (a blob moved into place whose link was then refused by a
    /// quota).
    Unlinked,
}

/// A tag and when it was last pushed (unix seconds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagInfo {
    pub tag: String,
    pub digest: Digest,
    pub pushed_at: i64,
}

/// One entry of a tag's history: it pointed to `digest` from `pushed_at`
/// until `replaced_at` (`None`: it still does).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagEvent {
    pub tag: String,
    pub digest: Digest,
    pub pushed_at: i64,
    pub replaced_at: Option<i64>,
}

/// Manifests of a repository that nothing keeps: no tag reaches them
/// (directly, as a child of a kept index, as a referrer of a kept subject
/// or as the subject of a kept referrer) and they have been untagged since
/// `untagged_before` or earlier. Keyset-paginated by digest.
#[derive(Debug, Clone, Copy)]
pub struct UnreachableQuery<'a> {
    pub repo: &'a str,
    /// Tags to count as gone (a dry run of a retention policy).
    pub ignoring_tags: &'a [String],
    pub untagged_before: i64,
    /// Counts as the time tags in `ignoring_tags` stop pointing anywhere.
    pub now: i64,
    pub after: Option<&'a Digest>,
    pub limit: u32,
}

/// Blobs that garbage collection may remove (see
/// [`ReclaimRule::Unreferenced`]). Keyset-paginated by digest.
#[derive(Debug, Clone, Copy)]
pub struct UnreferencedQuery<'a> {
    pub referenced_before: i64,
    /// Manifests (repository, digest) to count as gone (a dry run).
    pub ignoring_manifests: &'a [(String, Digest)],
    pub after: Option<&'a Digest>,
    pub limit: u32,
}

/// A storage quota as the metadata store keeps it: the repositories that
/// match one of `include` and none of `exclude` together hold at most
/// `max_size` bytes, counting each distinct digest linked or stored as a
/// manifest in them once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaScope {
    /// Stable for one configuration (the rule's position); the registry
    /// maps it back to the rule.
    pub id: u32,
    pub include: Vec<RepoPattern>,
    pub exclude: Vec<RepoPattern>,
    pub max_size: u64,
}

/// A quota scope's usage, as seen for one repository (and digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaUse {
    pub scope: u32,
    /// Bytes the scope holds now.
    pub used: u64,
    pub max_size: u64,
    /// Whether the digest asked about is already counted in the scope (so
    /// linking it into another of its repositories adds nothing).
    pub counted: bool,
}

impl QuotaUse {
    /// Whether adding a digest of `size` bytes (nothing if it is already
    /// counted) would take the scope over its limit.
    pub fn refuses(&self, size: u64) -> bool {
        !self.counted && self.used.saturating_add(size) > self.max_size
    }
}

/// Kinds of upload session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UploadKind {
    /// A client's upload through the API.
    Client,
    /// A download of the pull-through cache (not resumable).
    CacheFetch,
}

impl UploadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UploadKind::Client => "client",
            UploadKind::CacheFetch => "cache",
        }
    }
}

/// Whether a blob lock shares the digest (commits) or holds it alone
/// (removal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

/// A held blob lock; released when dropped.
pub struct BlobLock(#[allow(dead_code)] Box<dyn Send + Sync>);

impl BlobLock {
    pub fn new(guard: impl Send + Sync + 'static) -> Self {
        BlobLock(Box::new(guard))
    }
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

/// The metadata store.
///
/// Reference safety (see docs/ARCHITECTURE.md): every stored digest has an
/// inventory row. Writers that make a digest referenced (`commit_blob`,
/// `mount_blob`, `put_manifest`) hold a shared [`BlobLock`] on it across
/// the file commit and their transaction; removal holds it exclusively
/// across `condemn_blobs` (one transaction: still unreferenced → marked
/// `deleting`), the file delete and `forget_blobs`. So a removal and a
/// commit of the same digest never interleave, and a crash in between
/// leaves a `deleting` row that start-up finishes.
#[async_trait]
pub trait MetaStore: Send + Sync + 'static {
    /// Locks a digest against concurrent removal (shared) or commits
    /// (exclusive). In-process for SQLite; a multi-replica backend uses a
    /// lock its database arbitrates (e.g. PostgreSQL advisory locks).
    async fn lock_blob(&self, digest: &Digest, mode: LockMode) -> Result<BlobLock>;
    /// Locks several digests together, without deadlock against other
    /// holders (a removal of many blobs at once).
    async fn lock_blobs(&self, digests: &[Digest], mode: LockMode) -> Result<BlobLock>;

    // --- blobs a repository may serve ---

    /// Records that the blob `digest`, whose bytes are stored, is in `repo`:
    /// its inventory row is created or refreshed, the link added and the
    /// upload session `upload` (if any) ended. `BlobGoing` (and no link) if
    /// the digest is being removed; `OverQuota` (and no link, though the
    /// inventory row stays and the session is ended) if the link would take
    /// a quota scope of `repo` over its limit: the check is part of the
    /// write, so racing commits cannot overshoot. Call with the digest
    /// locked shared.
    async fn commit_blob(&self, blob: CommitBlob<'_>) -> Result<()>;
    /// The bytes of `digest` when the metadata store keeps them (a
    /// manifest, a small blob) and it is not being removed; `None` when
    /// they are in the blob store or not stored. Callers check first that
    /// the repository may serve the digest.
    async fn blob_content(&self, digest: &Digest) -> Result<Option<bytes::Bytes>>;
    /// The size of `digest` if `repo` may serve it.
    async fn linked_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>>;
    /// Removes a link; returns whether there was one.
    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool>;
    /// Links a blob that `from` (or, without `from`, any repository) holds
    /// into `repo`, in one transaction; returns its size, or `None` when
    /// there is nothing to mount. `OverQuota` (writing nothing) if the link
    /// would take a quota scope of `repo` over its limit.
    async fn mount_blob(
        &self,
        repo: &str,
        digest: &Digest,
        from: Option<&str>,
    ) -> Result<Option<u64>>;

    // --- manifests and tags ---

    /// Stores a manifest record, its references and its tag in one
    /// transaction, creating the repository if needed; with `require_refs`,
    /// fails with `MissingReference` (writing nothing) unless every
    /// reference is in the repository. `OverQuota` (writing nothing) if
    /// the manifest would take a quota scope of the repository over its
    /// limit. Pushing the same manifest again is not an error.
    async fn put_manifest(&self, manifest: NewManifest<'_>) -> Result<()>;
    async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>>;
    async fn manifest_by_tag(&self, repo: &str, tag: &str) -> Result<Option<ManifestRecord>>;
    /// Deletes a manifest with its tags and references; returns whether it
    /// existed. The repository leaves the catalog with its last manifest.
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
    /// The size that a manifest of `repo` states for `digest`, if one
    /// refers to it (the pull-through cache bounds downloads by it).
    async fn described_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>>;
    /// Up to `limit` manifests stored before references were indexed.
    async fn unindexed_manifests(&self, limit: u32) -> Result<Vec<(String, Digest)>>;
    /// Records the references of a manifest stored before they were indexed.
    async fn index_manifest_refs(
        &self,
        repo: &str,
        digest: &Digest,
        refs: &[ManifestRef],
    ) -> Result<()>;

    // --- listings ---

    /// Tags of `repo` after `last`, at most `n`; `None` if the repo is unknown.
    async fn list_tags(&self, repo: &str, n: u32, last: Option<&str>) -> Result<Option<Page>>;
    /// Repositories after `last`, at most `n`.
    async fn list_repos(&self, n: u32, last: Option<&str>) -> Result<Page>;

    // --- the pull-through cache's blobs ---

    /// Records that the cache holds `digest` and was just pulled from.
    async fn touch_cache_blob(&self, digest: &Digest, size: u64) -> Result<()>;
    /// Bytes held only by the cache (cached blobs no client link uses).
    async fn cache_usage(&self) -> Result<u64>;
    /// The least recently pulled cached blobs, oldest first.
    async fn cache_lru(&self, limit: u32) -> Result<Vec<(Digest, u64)>>;

    // --- removing bytes (the one reference-safety path) ---

    /// In one transaction, for each of `digests`: drops the references
    /// `rule` lets go of, and if nothing else refers to the digest, marks it
    /// `deleting`. Returns the digests marked, with their sizes: the caller
    /// then deletes their files and calls `forget_blobs`. Call with the
    /// digests locked exclusively.
    async fn condemn_blobs(
        &self,
        digests: &[Digest],
        rule: ReclaimRule,
    ) -> Result<Vec<(Digest, u64)>>;
    /// Removes the inventory rows of condemned digests whose files are gone.
    async fn forget_blobs(&self, digests: &[Digest]) -> Result<()>;
    /// Digests whose removal was interrupted (to finish at start-up).
    async fn condemned_blobs(&self) -> Result<Vec<Digest>>;

    // --- garbage collection and retention ---

    /// Every tag of `repo` with its digest and last push time.
    async fn tags_with_times(&self, repo: &str) -> Result<Vec<TagInfo>>;
    /// Deletes tags of `repo` that still point where `tags` says and were
    /// not pushed again since (a retention decision made on a snapshot);
    /// closes their history. Returns the tags deleted.
    async fn delete_tags_as_seen(&self, repo: &str, tags: &[TagInfo]) -> Result<Vec<String>>;
    /// See [`UnreachableQuery`].
    async fn unreachable_manifests(&self, q: UnreachableQuery<'_>) -> Result<Vec<Digest>>;
    /// Deletes a manifest in one transaction if it is still untagged since
    /// `untagged_before`, no index of the repository lists it and no
    /// manifest of the repository has it as subject. Returns whether it was
    /// deleted.
    async fn delete_unreachable_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        untagged_before: i64,
    ) -> Result<bool>;
    /// See [`UnreferencedQuery`]: digests with their sizes.
    async fn unreferenced_blobs(&self, q: UnreferencedQuery<'_>) -> Result<Vec<(Digest, u64)>>;
    /// The history of `repo`'s tags (one tag, or all), newest first; with
    /// `at` (unix seconds), only the entries in effect at that moment.
    async fn tag_history(
        &self,
        repo: &str,
        tag: Option<&str>,
        at: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TagEvent>>;
    /// Forgets history entries that ended before `before`.
    async fn prune_tag_history(&self, before: i64) -> Result<u64>;
    // --- storage quotas ---

    /// Makes `scopes` the quota scopes (at start-up, from the
    /// configuration). When their ids and patterns are those already
    /// stored, only the limits are updated; otherwise the usage counters are
    /// recomputed from the links and manifests, in one transaction. Returns
    /// whether they were recomputed. From then on every insert and delete
    /// of a link or manifest keeps the counters, whichever method makes it.
    async fn set_quotas(&self, scopes: &[QuotaScope]) -> Result<bool>;
    /// The quota scopes `repo` is in, with their usage; `counted` says
    /// whether `digest` is already counted in each. Cheap: a read of one
    /// counter per scope, however much the scope holds.
    async fn quota_use(&self, repo: &str, digest: Option<&Digest>) -> Result<Vec<QuotaUse>>;

    // --- upload sessions ---

    async fn create_upload(&self, id: &str, repo: &str, kind: UploadKind) -> Result<()>;
    async fn get_upload(&self, id: &str) -> Result<Option<UploadRecord>>;
    /// Marks `repo`'s upload session `id` active now, in one statement
    /// that also checks it: false when `repo` has no such session.
    async fn touch_upload(&self, id: &str, repo: &str) -> Result<bool>;
    async fn delete_upload(&self, id: &str) -> Result<()>;
    /// Upload sessions whose last request is older than `before` (unix
    /// seconds), at most `limit`.
    async fn stale_uploads(&self, before: i64, limit: u32) -> Result<Vec<UploadRecord>>;
    /// Upload sessions of one kind, at most `limit`.
    async fn uploads_of_kind(&self, kind: UploadKind, limit: u32) -> Result<Vec<UploadRecord>>;

    // --- operations ---

    /// Answers when the store can be read (for readiness).
    async fn ping(&self) -> Result<()>;
    /// What is stored, for `/metrics`: one read of the inventory and the
    /// upload sessions (a scan of `blobs`; callers cache the answer).
    async fn storage_totals(&self) -> Result<StorageTotals>;
}

/// What the inventory holds ([`MetaStore::storage_totals`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageTotals {
    /// Bytes of every stored digest (blobs and manifest bytes), whatever
    /// their state.
    pub bytes: u64,
    /// Stored digests.
    pub blobs: u64,
    /// Open upload sessions, by kind.
    pub client_uploads: u64,
    pub cache_downloads: u64,
}

/// Current time in unix seconds.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
