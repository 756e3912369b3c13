//! The registry's domain: repositories, blobs, uploads, manifests, tags and
//! referrers, and the rules for pushing, pulling and deleting them. No HTTP
//! types live here; `api` translates requests into these calls.

pub mod error;
pub mod manifest;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;

use crate::meta::{ManifestRecord, MetaStore, NewManifest, Page};
use crate::oci::{Digest, Reference, RepoName};
use crate::storage::{BlobRead, BlobStore, ByteStream, RangeRequest};
use error::{RegistryError, Result};

/// Limits and timings the registry enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_manifest_size: u64,
    /// Upload sessions idle for longer than this are removed.
    pub upload_expiry: Duration,
}

/// The namespace of the pull-through cache: repositories under `f/` hold
/// copies of upstream content. Clients may read them but never write them;
/// only the cache (through `cache_manifest` and `commit_cached_blob`) does.
/// The registry owns this rule so that it needs nothing from the proxy.
pub const CACHE_PREFIX: &str = "f/";

/// Whether `repo` is a pull-through cache repository (read-only to clients).
pub fn is_cache_repo(repo: &RepoName) -> bool {
    repo.as_str().starts_with(CACHE_PREFIX)
}

/// How many manifests' bytes to keep in memory. Manifests are small and
/// immutable by digest, so caching them is always safe, even across replicas.
const MANIFEST_CACHE_ENTRIES: usize = 1024;

pub struct Registry {
    blobs: Arc<dyn BlobStore>,
    meta: Arc<dyn MetaStore>,
    limits: Limits,
    manifest_cache: Mutex<LruCache<Digest, Bytes>>,
}

/// The result of a mount request.
pub enum MountOutcome {
    /// The blob is now in the repository.
    Mounted { size: u64 },
    /// It could not be mounted; a normal upload was started instead.
    UploadStarted { id: String },
}

/// A manifest ready to be served.
#[derive(Clone)]
pub struct StoredManifest {
    pub record: ManifestRecord,
    pub bytes: Bytes,
}

impl Registry {
    pub fn new(blobs: Arc<dyn BlobStore>, meta: Arc<dyn MetaStore>, limits: Limits) -> Self {
        let entries = NonZeroUsize::new(MANIFEST_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        Registry {
            blobs,
            meta,
            limits,
            manifest_cache: Mutex::new(LruCache::new(entries)),
        }
    }

    /// Keeps a pushed or fetched manifest in the cache. The bytes are copied:
    /// a request body is a slice of the connection's read buffer, and
    /// keeping the slice would keep the whole buffer (8 to 64 KiB) alive for
    /// a manifest of a few KiB (measured: 7.6 MB held by 1000 cached pushes).
    fn remember_manifest(&self, digest: &Digest, bytes: &Bytes) {
        self.manifest_cache
            .lock()
            .put(digest.clone(), Bytes::copy_from_slice(bytes));
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The blob store, for the pull-through cache's streaming fetches.
    pub fn blob_store(&self) -> Arc<dyn BlobStore> {
        self.blobs.clone()
    }

    /// The metadata store, for the pull-through cache's bookkeeping.
    pub fn meta_store(&self) -> Arc<dyn MetaStore> {
        self.meta.clone()
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

    // ----- the pull-through cache's writes -----

    /// Stores a manifest fetched (and verified against `digest`) from
    /// upstream. Its blobs are fetched lazily, so unlike a push they need not
    /// be present.
    pub async fn cache_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        content_type: Option<&str>,
        tag: Option<&str>,
    ) -> Result<ManifestRecord> {
        let parsed = manifest::parse(&bytes, content_type)?;
        self.blobs.put(digest, bytes.clone()).await?;
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: parsed.media_type,
            size: bytes.len() as u64,
            subject: parsed.subject,
            artifact_type: parsed.artifact_type,
            annotations: parsed.annotations,
        };
        self.meta
            .put_manifest(NewManifest {
                repo: repo.as_str(),
                record: record.clone(),
                tag,
            })
            .await?;
        self.remember_manifest(digest, &bytes);
        Ok(record)
    }

    /// Records that a cache repository now holds a fetched blob.
    pub async fn link_cached_blob(
        &self,
        repo: &RepoName,
        digest: &Digest,
        size: u64,
    ) -> Result<()> {
        Ok(self.meta.link_blob(repo.as_str(), digest, size).await?)
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
    ) -> Result<BlobRead> {
        self.blob_size(repo, digest).await?;
        self.blobs
            .read(digest, range)
            .await?
            .ok_or_else(|| RegistryError::BlobUnknown(digest.to_string()))
    }

    /// Removes a blob from the repository. Its bytes stay while other
    /// repositories may serve them.
    pub async fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        Self::ensure_writable(repo)?;
        if self.meta.unlink_blob(repo.as_str(), digest).await? {
            Ok(())
        } else {
            Err(RegistryError::BlobUnknown(digest.to_string()))
        }
    }

    // ----- uploads -----

    /// Starts an upload session and returns its id. The metadata record is
    /// written first, so a crash never leaves upload bytes nobody can expire.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<String> {
        Self::ensure_writable(repo)?;
        let id = uuid::Uuid::new_v4().to_string();
        self.meta.create_upload(&id, repo.as_str()).await?;
        self.blobs.create_upload(&id).await?;
        Ok(id)
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

    /// Appends a chunk; `offset` (from `Content-Range`) must be the current size.
    pub async fn append_upload(
        &self,
        repo: &RepoName,
        id: &str,
        offset: Option<u64>,
        body: ByteStream,
    ) -> Result<u64> {
        self.check_upload(repo, id).await?;
        let size = self.blobs.append_upload(id, offset, body).await?;
        self.meta.touch_upload(id).await?;
        Ok(size)
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
        let finished = self.blobs.finish_upload(id, digest).await;
        if matches!(
            finished,
            Err(crate::storage::StorageError::DigestMismatch { .. })
        ) {
            // The bytes are gone; so is the session.
            self.meta.delete_upload(id).await?;
        }
        let size = finished?;
        self.meta.link_blob(repo.as_str(), digest, size).await?;
        self.meta.delete_upload(id).await?;
        Ok(size)
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
        let source_size = match from {
            Some(from) => self.meta.linked_blob(from.as_str(), digest).await?,
            None => match self.meta.repos_with_blob(digest).await?.first() {
                Some(any) => self.meta.linked_blob(any, digest).await?,
                None => None,
            },
        };
        // The metadata says the blob is there; make sure the bytes are too.
        if let Some(size) = source_size {
            if self.blobs.stat(digest).await?.is_some() {
                self.meta.link_blob(repo.as_str(), digest, size).await?;
                return Ok(MountOutcome::Mounted { size });
            }
        }
        Ok(MountOutcome::UploadStarted {
            id: self.start_upload(repo).await?,
        })
    }

    /// Removes upload sessions idle for longer than the expiry, with their
    /// bytes. Returns how many were removed.
    pub async fn expire_uploads(&self) -> Result<usize> {
        let cutoff = crate::meta::now_unix() - self.limits.upload_expiry.as_secs() as i64;
        let stale = self.meta.stale_uploads(cutoff).await?;
        for upload in &stale {
            self.blobs.cancel_upload(&upload.id).await?;
            self.meta.delete_upload(&upload.id).await?;
            tracing::info!(upload = %upload.id, repo = %upload.repo, "expired abandoned upload");
        }
        Ok(stale.len())
    }

    // ----- manifests -----

    /// Validates and stores a manifest; returns its digest and its subject.
    pub async fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        content_type: Option<&str>,
        bytes: Bytes,
    ) -> Result<(Digest, Option<Digest>)> {
        Self::ensure_writable(repo)?;
        let size = bytes.len() as u64;
        if size > self.limits.max_manifest_size {
            return Err(RegistryError::ManifestTooLarge {
                size,
                limit: self.limits.max_manifest_size,
            });
        }
        let digest = match reference {
            Reference::Digest(d) => {
                if !d.matches(&bytes) {
                    return Err(RegistryError::DigestInvalid(format!(
                        "the manifest body does not hash to {d}; push the exact bytes that digest names"
                    )));
                }
                d.clone()
            }
            Reference::Tag(_) => Digest::sha256_of(&bytes),
        };
        let parsed = manifest::parse(&bytes, content_type)?;
        if let Some(missing) = self
            .meta
            .missing_blobs(repo.as_str(), &parsed.blobs)
            .await?
            .first()
        {
            return Err(RegistryError::ManifestBlobUnknown(format!(
                "blob {missing}"
            )));
        }
        if let Some(missing) = self
            .meta
            .missing_manifests(repo.as_str(), &parsed.children)
            .await?
            .first()
        {
            return Err(RegistryError::ManifestBlobUnknown(format!(
                "manifest {missing}"
            )));
        }
        // Bytes first, then metadata: metadata never names missing bytes.
        self.blobs.put(&digest, bytes.clone()).await?;
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: parsed.media_type,
            size,
            subject: parsed.subject.clone(),
            artifact_type: parsed.artifact_type,
            annotations: parsed.annotations,
        };
        let tag = match reference {
            Reference::Tag(t) => Some(t.as_str()),
            Reference::Digest(_) => None,
        };
        self.meta
            .put_manifest(NewManifest {
                repo: repo.as_str(),
                record,
                tag,
            })
            .await?;
        self.remember_manifest(&digest, &bytes);
        Ok((digest, parsed.subject))
    }

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
        if let Some(bytes) = self.manifest_cache.lock().get(&record.digest).cloned() {
            return Ok(StoredManifest { record, bytes });
        }
        let bytes = self.blobs.read_all(&record.digest).await?.ok_or_else(|| {
            RegistryError::ManifestUnknown(format!(
                "the bytes of {} are missing from storage",
                record.digest
            ))
        })?;
        self.manifest_cache
            .lock()
            .put(record.digest.clone(), bytes.clone());
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
