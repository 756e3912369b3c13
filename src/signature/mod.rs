//! Signature verification (issue 12): whether an image Trow stores, or
//! caches from an upstream, carries a cosign signature by one of the keys a
//! policy names for it.
//!
//! - `config`: the `signatures` section of the configuration file, its
//!   checks and the keys it loads;
//! - `cosign`: cosign's signature format, pure.
//!
//! [`SignatureVerifier::verify`] resolves the reference to a digest in
//! Trow's store (through the pull-through cache for `f/…` repositories),
//! finds the digest's signature manifests (the tag `sha256-<hex>.sig`, and
//! referrers with cosign's artifact type), then takes their signature
//! layers one at a time, reading each payload blob (bounded) only when it
//! is needed, until one verifies for every policy covering the image. It
//! answers within `timeout`, and remembers verdicts per (digest, key set)
//! in a bounded LRU.

pub mod config;
pub mod cosign;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lru::LruCache;
use parking_lot::Mutex;

use crate::oci::{Digest, Reference, ReferenceError, RepoName, Tag};
use crate::proxy::{Proxy, Target};
use crate::registry::error::RegistryError;
use crate::registry::Registry;
use crate::storage::{ByteStream, Delivery};
pub use config::{ConfigError, Policy, SignaturesConfig};
use cosign::{CosignError, SignatureLayer};
use p256::ecdsa::VerifyingKey;

/// Signature manifests looked at per image: the `.sig` tag's and at most
/// this many referrers.
const MAX_REFERRERS: usize = 16;
/// Signature layers checked per image, over all its signature manifests.
const MAX_SIGNATURES: usize = 64;

/// Verifies images against the `signatures` policies.
pub struct SignatureVerifier {
    policies: Vec<Policy>,
    timeout: Duration,
    cache_ttl: Duration,
    negative_ttl: Duration,
    /// Verdicts by (digest, key set): `Ok` or the denial's reason.
    verdicts: Mutex<LruCache<VerdictKey, Verdict>>,
    registry: Arc<Registry>,
    proxy: Arc<Proxy>,
}

/// An image digest and a policy's key set.
type VerdictKey = (Digest, [u8; 32]);
/// A verdict and when it was reached.
type Verdict = (Result<(), Denial>, Instant);

/// Why an image is refused (the part of the message that is about its
/// signatures; the image and what to do are added by `verify`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum Denial {
    #[error("it has no cosign signature (none under the tag {tag} nor among its referrers)")]
    Unsigned { tag: String },
    #[error("none of its {count} signature(s) verifies: {reasons}")]
    NoneVerifies { count: usize, reasons: String },
}

/// Why verification could not decide (not remembered: it may pass).
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Denied(Denial),
    #[error("{0}")]
    NotFound(String),
    #[error("reading it failed: {0}")]
    Registry(RegistryError),
    #[error("verification did not finish within {0}")]
    Timeout(String),
    #[error("the verification task failed: {0}")]
    Task(String),
}

impl From<RegistryError> for Failure {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::ManifestUnknown(m) | RegistryError::NameUnknown(m) => {
                Failure::NotFound(m)
            }
            other => Failure::Registry(other),
        }
    }
}

/// Where the image is read from.
enum Source<'a> {
    /// A repository of Trow's own.
    Local(&'a Registry, RepoName),
    /// A cache repository, through the pull-through cache.
    Cache(&'a Proxy, Target),
}

impl Source<'_> {
    fn repo(&self) -> &RepoName {
        match self {
            Source::Local(_, r) => r,
            Source::Cache(_, t) => &t.cache_repo,
        }
    }

    async fn resolve(&self, reference: &Reference) -> Result<Digest, Failure> {
        Ok(match self {
            Source::Local(r, repo) => r.manifest_record(repo, reference).await?.digest,
            Source::Cache(p, t) => p.manifest(t, reference).await?.0.record.digest,
        })
    }

    /// A manifest's bytes, `None` when there is none.
    async fn manifest(&self, reference: &Reference) -> Result<Option<bytes::Bytes>, Failure> {
        let got = match self {
            Source::Local(r, repo) => r.get_manifest(repo, reference).await,
            Source::Cache(p, t) => p.manifest(t, reference).await.map(|(m, _)| m),
        };
        match got {
            Ok(m) => Ok(Some(m.bytes)),
            Err(RegistryError::ManifestUnknown(_)) => Ok(None),
            Err(e) => Err(Failure::Registry(e)),
        }
    }

    /// Referrers with cosign's signature artifact type (at most
    /// `MAX_REFERRERS`): those Trow stores and, for a cache repository,
    /// those the upstream lists. An upstream that fails to list them is
    /// returned beside the list (the list may then be incomplete).
    async fn referrers(
        &self,
        registry: &Registry,
        digest: &Digest,
    ) -> Result<(Vec<Digest>, Option<RegistryError>), Failure> {
        let records = registry
            .referrers(self.repo(), digest, Some(cosign::SIGNATURE_ARTIFACT))
            .await?;
        let mut found: Vec<Digest> = records
            .into_iter()
            .filter(|r| r.size <= cosign::MAX_MANIFEST as u64)
            .map(|r| r.digest)
            .take(MAX_REFERRERS)
            .collect();
        let mut failed = None;
        if let Source::Cache(p, t) = self {
            match p
                .referrers(
                    t,
                    digest,
                    cosign::SIGNATURE_ARTIFACT,
                    MAX_REFERRERS,
                    cosign::MAX_MANIFEST as u64,
                )
                .await
            {
                Ok(upstream) => {
                    for d in upstream {
                        if found.len() < MAX_REFERRERS && !found.contains(&d) {
                            found.push(d);
                        }
                    }
                }
                Err(e) => failed = Some(e),
            }
        }
        Ok((found, failed))
    }

    /// A payload blob, read up to `cosign::MAX_PAYLOAD` bytes.
    async fn payload(&self, digest: &Digest, size: u64) -> Result<Vec<u8>, PayloadError> {
        if size > cosign::MAX_PAYLOAD {
            return Err(PayloadError::TooLarge(
                CosignError::PayloadTooLarge(digest.clone()).to_string(),
            ));
        }
        let unreadable =
            |e: RegistryError| PayloadError::Unreadable(format!("payload {digest}: {e}"));
        let body: ByteStream = match self {
            Source::Local(r, repo) => {
                r.read_blob(repo, digest, None, Delivery::Buffered)
                    .await
                    .map_err(unreadable)?
                    .body
            }
            Source::Cache(p, t) => {
                p.blob(t, digest, None, Delivery::Buffered)
                    .await
                    .map_err(unreadable)?
                    .body
            }
        };
        read_bounded(body, cosign::MAX_PAYLOAD, digest).await
    }
}

/// Reads a payload whole if it holds at most `max` bytes.
async fn read_bounded(
    mut body: ByteStream,
    max: u64,
    digest: &Digest,
) -> Result<Vec<u8>, PayloadError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| {
            PayloadError::Unreadable(format!("payload {digest}: reading failed: {e}"))
        })?;
        if (out.len() + chunk.len()) as u64 > max {
            return Err(PayloadError::TooLarge(
                CosignError::PayloadTooLarge(digest.clone()).to_string(),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Why a payload blob was not read.
#[derive(Debug, Clone)]
enum PayloadError {
    /// It is larger than payloads may be: the signature does not count.
    TooLarge(String),
    /// Reading it failed (an upstream or storage error): it may pass later.
    Unreadable(String),
}

impl SignatureVerifier {
    /// The verifier for the `signatures` section; its keys are loaded now.
    pub fn new(
        config: SignaturesConfig,
        registry: Arc<Registry>,
        proxy: Arc<Proxy>,
    ) -> Result<Self, ConfigError> {
        let policies = config.load()?;
        let entries = NonZeroUsize::new(config.cache_entries).unwrap_or(NonZeroUsize::MIN);
        Ok(SignatureVerifier {
            policies,
            timeout: config.timeout,
            cache_ttl: config.cache_ttl,
            negative_ttl: config.negative_ttl,
            verdicts: Mutex::new(LruCache::new(entries)),
            registry,
            proxy,
        })
    }

    /// The policies covering `image`.
    fn policies_for<'a>(&'a self, image: &'a str) -> impl Iterator<Item = &'a Policy> + 'a {
        self.policies.iter().filter(move |p| {
            p.prefixes
                .iter()
                .any(|prefix| image.starts_with(prefix.as_str()))
        })
    }

    /// Whether some signature policy covers `image` (a normalised full
    /// name like `docker.io/library/nginx`, no tag).
    pub fn applies(&self, image: &str) -> bool {
        self.policies_for(image).next().is_some()
    }

    /// Verifies the image Trow stores at `repo` (`team/app`, or a cache
    /// repository `f/docker.io/library/nginx`, fetched through the cache
    /// when not cached yet) and `reference` (tag or digest) against every
    /// policy covering `image`. `Ok(digest)`: a signature by one of each
    /// policy's keys verified for that digest (pin the reference to it);
    /// `Err(message)`: deny, with a message naming the image and saying
    /// what to do.
    pub async fn verify(&self, image: &str, repo: &str, reference: &str) -> Result<Digest, String> {
        let shown = format!("{image} ({repo}:{reference})");
        let policies: Vec<&Policy> = self.policies_for(image).collect();
        if policies.is_empty() {
            return Err(format!(
                "image {image}: no signature policy covers it (signatures.policies in the configuration file), so there is nothing to verify it against"
            ));
        }
        let repo = RepoName::parse(repo).map_err(|e| format!("image {shown}: {e}"))?;
        let reference = Reference::parse(reference).map_err(|e| {
            let (ReferenceError::Tag(why) | ReferenceError::Digest(why)) = e;
            format!("image {shown}: the reference is neither a tag nor a digest: {why}")
        })?;
        let source = match self.proxy.target(&repo, None) {
            None => Source::Local(&self.registry, repo),
            Some(Ok(t)) => Source::Cache(&self.proxy, t),
            Some(Err(e)) => return Err(format!("image {shown}: {e}")),
        };
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.verify_in(&source, &reference, &policies)).await {
            Ok(Ok(digest)) => Ok(digest),
            Ok(Err(f)) => Err(self.message(&shown, &f)),
            Err(_) => Err(self.message(
                &shown,
                &Failure::Timeout(humantime::format_duration(timeout).to_string()),
            )),
        }
    }

    fn message(&self, shown: &str, f: &Failure) -> String {
        match f {
            Failure::Denied(d) => format!(
                "image {shown} is not allowed: {d}; sign it with one of the public keys the signatures policy for it names (for example `cosign sign --key <private key> <image>@<digest>`), push the signature to the same repository, and retry"
            ),
            Failure::NotFound(m) => format!(
                "image {shown} cannot be verified: it is not in this registry ({m}); push it (or, for a cached upstream, check the name) and retry"
            ),
            Failure::Registry(_) | Failure::Task(_) => format!(
                "image {shown} cannot be verified: {f}; retry"
            ),
            Failure::Timeout(t) => format!(
                "image {shown} cannot be verified: verification did not finish within {t} (signatures.timeout); retry"
            ),
        }
    }

    async fn verify_in(
        &self,
        source: &Source<'_>,
        reference: &Reference,
        policies: &[&Policy],
    ) -> Result<Digest, Failure> {
        let digest = source.resolve(reference).await?;
        let mut pending = Vec::new();
        for p in policies {
            match self.remembered(&digest, p.key_set) {
                Some(Ok(())) => {}
                Some(Err(d)) => return Err(Failure::Denied(d)),
                None => pending.push(*p),
            }
        }
        if pending.is_empty() {
            return Ok(digest);
        }
        let (layers, tag, incomplete) = self.signature_layers(source, &digest).await?;
        let mut satisfied = vec![false; pending.len()];
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); pending.len()];
        // A denial that a payload which could not be read, or referrers
        // that could not be listed, might have changed is not remembered:
        // the next call tries again.
        let mut unreadable = incomplete;
        // One layer at a time, payload read only when needed: the first
        // signature that verifies for every policy ends the search.
        for layer in &layers {
            if satisfied.iter().all(|s| *s) {
                break;
            }
            let payload = match source.payload(&layer.payload, layer.size).await {
                Ok(p) => p,
                Err(e) => {
                    let (PayloadError::TooLarge(why) | PayloadError::Unreadable(why)) = &e;
                    unreadable |= matches!(e, PayloadError::Unreadable(_));
                    for r in &mut reasons {
                        r.push(why.clone());
                    }
                    continue;
                }
            };
            let open: Vec<(usize, Vec<VerifyingKey>)> = pending
                .iter()
                .enumerate()
                .filter(|(i, _)| !satisfied[*i])
                .map(|(i, p)| (i, p.keys.clone()))
                .collect();
            let (layer, image) = (layer.clone(), digest.clone());
            // ECDSA on the blocking pool (up to 64 keys per policy).
            let outcomes = tokio::task::spawn_blocking(move || {
                open.into_iter()
                    .map(|(i, keys)| (i, cosign::verify(&layer, &payload, &image, &keys)))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| Failure::Task(e.to_string()))?;
            for (i, outcome) in outcomes {
                match outcome {
                    Ok(()) => satisfied[i] = true,
                    Err(e) => reasons[i].push(e.to_string()),
                }
            }
        }
        for (i, p) in pending.iter().enumerate() {
            let verdict = if satisfied[i] {
                Ok(())
            } else if layers.is_empty() {
                Err(Denial::Unsigned { tag: tag.clone() })
            } else {
                let mut why = std::mem::take(&mut reasons[i]);
                let count = why.len();
                why.sort();
                why.dedup();
                Err(Denial::NoneVerifies {
                    count,
                    reasons: why.join("; "),
                })
            };
            if verdict.is_ok() || !unreadable {
                self.remember(&digest, p.key_set, verdict.clone());
            }
            verdict.map_err(Failure::Denied)?;
        }
        Ok(digest)
    }

    /// The signature layers of `digest` (at most `MAX_SIGNATURES`), the
    /// `.sig` tag looked at, and whether the upstream's referrers could not
    /// be listed.
    async fn signature_layers(
        &self,
        source: &Source<'_>,
        digest: &Digest,
    ) -> Result<(Vec<SignatureLayer>, String, bool), Failure> {
        let tag = format!("{}-{}.sig", digest.algorithm().name(), digest.hex());
        let mut manifests = Vec::new();
        if let Ok(t) = Tag::parse(&tag) {
            if let Some(bytes) = source.manifest(&Reference::Tag(t)).await? {
                manifests.push(bytes);
            }
        }
        let (referrers, listing_failed) = source.referrers(&self.registry, digest).await?;
        for r in referrers {
            if let Some(bytes) = source.manifest(&Reference::Digest(r)).await? {
                manifests.push(bytes);
            }
        }
        let mut candidates = Vec::new();
        let mut malformed = Vec::new();
        for m in &manifests {
            match cosign::signature_layers(m) {
                Ok(layers) => {
                    let room = MAX_SIGNATURES.saturating_sub(candidates.len());
                    candidates.extend(layers.into_iter().take(room));
                }
                Err(e) => malformed.push(e.to_string()),
            }
        }
        if let (true, Some(e)) = (candidates.is_empty(), listing_failed.as_ref()) {
            // Nothing found, and a place that may hold signatures could not
            // be looked at: undecided, not unsigned.
            return Err(Failure::Registry(RegistryError::UpstreamFailed(format!(
                "listing its referrers upstream failed: {e}"
            ))));
        }
        if candidates.is_empty() && !malformed.is_empty() {
            // Signature manifests that hold nothing usable: say why.
            let reasons = malformed.join("; ");
            return Err(Failure::Denied(Denial::NoneVerifies {
                count: malformed.len(),
                reasons,
            }));
        }
        Ok((candidates, tag, listing_failed.is_some()))
    }

    fn remembered(&self, digest: &Digest, key_set: [u8; 32]) -> Option<Result<(), Denial>> {
        let mut verdicts = self.verdicts.lock();
        let key = (digest.clone(), key_set);
        let (verdict, at) = verdicts.get(&key)?;
        let ttl = if verdict.is_ok() {
            self.cache_ttl
        } else {
            self.negative_ttl
        };
        if at.elapsed() < ttl {
            return Some(verdict.clone());
        }
        verdicts.pop(&key);
        None
    }

    fn remember(&self, digest: &Digest, key_set: [u8; 32], verdict: Result<(), Denial>) {
        self.verdicts
            .lock()
            .put((digest.clone(), key_set), (verdict, Instant::now()));
    }
}
