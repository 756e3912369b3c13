//! Manifest pushes: a client's (`put_manifest`) and the pull-through
//! cache's (`cache_manifest`). Both record the bytes exactly as received,
//! the manifest, its references and its tag in one transaction, which also
//! keeps the repository's quotas.

use bytes::Bytes;

use super::error::{RegistryError, Result};
use super::manifest::{self, ParsedManifest};
use super::Registry;
use crate::meta::{LockMode, ManifestRecord, NewManifest};
use crate::oci::{Digest, Reference, RepoName};

impl Registry {
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
        // A first check of the quotas, so that a refused manifest leaves no
        // bytes behind; the one that counts is part of the metadata write.
        if self.quotas.has_quota(repo) {
            let uses = self.meta.quota_use(repo.as_str(), Some(&digest)).await?;
            if let Some(q) = uses.iter().find(|q| q.refuses(size)) {
                return Err(RegistryError::LimitExceeded(
                    self.quotas.over_quota(q, size, false),
                ));
            }
        }
        let subject = parsed.subject.clone();
        let tag = match reference {
            Reference::Tag(t) => Some(t.as_str()),
            Reference::Digest(_) => None,
        };
        self.store_manifest(repo, &digest, bytes, parsed, tag, true)
            .await?;
        Ok((digest, subject))
    }

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
        self.store_manifest(repo, digest, bytes, parsed, tag, false)
            .await
    }

    /// The bytes are kept in the metadata store, in the transaction that
    /// records the manifest, so metadata never names missing bytes and a
    /// manifest push creates no file. The digest is locked shared, so a
    /// removal of it waits. With `require_refs`, the check that every blob
    /// and child is in the repository is part of the same transaction: a
    /// delete cannot slip between check and insert.
    async fn store_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        bytes: Bytes,
        parsed: ParsedManifest,
        tag: Option<&str>,
        require_refs: bool,
    ) -> Result<ManifestRecord> {
        let record = ManifestRecord {
            digest: digest.clone(),
            media_type: parsed.media_type,
            size: bytes.len() as u64,
            subject: parsed.subject,
            artifact_type: parsed.artifact_type,
            annotations: parsed.annotations,
        };
        let lock = self.meta.lock_blob(digest, LockMode::Shared).await?;
        self.meta
            .put_manifest(NewManifest {
                repo: repo.as_str(),
                record: record.clone(),
                tag,
                refs: &parsed.refs,
                require_refs,
                content: Some(&bytes),
            })
            .await
            .map_err(|e| self.refused(e))?;
        drop(lock);
        self.manifest_cache.put(digest, &bytes);
        Ok(record)
    }
}
