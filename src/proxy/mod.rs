//! The pull-through cache: serves `f/<upstream>/<repo>` (and `?ns=`
//! mirror requests) from the local cache, fetching from the upstream
//! registry what is missing. Manifests by tag are revalidated with a cheap
//! `HEAD`; blobs are streamed to clients while being cached; every object is
//! fetched once however many clients ask for it at the same moment.

pub mod config;
mod eviction;
mod fetch;
mod policy;
pub mod target;
mod upstream;

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::StreamExt;
use lru::LruCache;
use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::oci::Digest;
use crate::oci::{Reference, RepoName};
use crate::registry::error::{RegistryError, Result};
use crate::registry::{Registry, StoredManifest};
use crate::storage::{BlobRead, ByteStream, Delivery, RangeRequest};
use config::ProxyConfig;
use fetch::{Fetches, Follower, InFlight, Progress};
use target::TargetError;
pub use target::{OwnNames, Target};
use upstream::{blob_too_large, UpstreamError, Upstreams};

/// How a proxied request was answered; logged with the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Served from the cache (tag still fresh, or revalidated upstream).
    Hit,
    /// Fetched from upstream by this request.
    Miss,
    /// Served from a fetch another request had already started.
    Shared,
    /// Upstream failed; served the cached copy.
    Stale,
}

impl CacheOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Shared => "shared",
            CacheOutcome::Stale => "stale",
        }
    }
}

/// One upstream's counters since start-up.
#[derive(Default, Debug)]
pub struct UpstreamStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub shared: AtomicU64,
    pub stale: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// Manifest and blob bytes received from the upstream.
    pub upstream_bytes: AtomicU64,
}

impl UpstreamStats {
    fn count(&self, outcome: CacheOutcome) {
        let counter = match outcome {
            CacheOutcome::Hit => &self.hits,
            CacheOutcome::Miss => &self.misses,
            CacheOutcome::Shared => &self.shared,
            CacheOutcome::Stale => &self.stale,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self) {
        self.upstream_errors.fetch_add(1, Ordering::Relaxed);
    }

    fn received(&self, bytes: usize) {
        self.upstream_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

/// The label of upstreams that are not listed (`allow_any_public`): they
/// share one set of counters, so clients cannot create new ones.
pub const UNLISTED_UPSTREAM: &str = "unlisted";

/// Counters of cache outcomes, upstream errors and bytes, per upstream:
/// one set per host listed in the configuration, and one for unlisted
/// hosts. Fixed at start-up, so counting takes no lock.
#[derive(Debug)]
pub struct CacheStats {
    upstreams: Vec<(String, Arc<UpstreamStats>)>,
    unlisted: Arc<UpstreamStats>,
}

impl CacheStats {
    fn new(config: &ProxyConfig) -> CacheStats {
        CacheStats {
            upstreams: config
                .listed_hosts()
                .into_iter()
                .map(|host| (host, Arc::default()))
                .collect(),
            unlisted: Arc::default(),
        }
    }

    /// The counters of `target`'s upstream.
    fn of(&self, target: &Target) -> &Arc<UpstreamStats> {
        match target.access {
            target::Access::AnyPublic => &self.unlisted,
            target::Access::Listed { .. } => self
                .upstreams
                .iter()
                .find(|(host, _)| *host == target.host)
                .map_or(&self.unlisted, |(_, stats)| stats),
        }
    }

    /// Every upstream's counters, for `/metrics`; the unlisted ones only
    /// when unlisted upstreams are allowed.
    pub fn figures(&self, allow_any_public: bool) -> Vec<crate::metrics::UpstreamCacheFigures> {
        let unlisted = allow_any_public.then_some((UNLISTED_UPSTREAM, &self.unlisted));
        self.upstreams
            .iter()
            .map(|(host, stats)| (host.as_str(), stats))
            .chain(unlisted)
            .map(|(upstream, s)| crate::metrics::UpstreamCacheFigures {
                upstream: upstream.to_string(),
                hits: s.hits.load(Ordering::Relaxed),
                misses: s.misses.load(Ordering::Relaxed),
                stale: s.stale.load(Ordering::Relaxed),
                shared: s.shared.load(Ordering::Relaxed),
                upstream_errors: s.upstream_errors.load(Ordering::Relaxed),
                upstream_bytes: s.upstream_bytes.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// A blob being served through the cache.
pub struct ProxiedBlob {
    /// The whole blob's size; `None` when upstream did not say it.
    pub total_size: Option<u64>,
    /// The inclusive range served, when a range of a cached blob was asked.
    pub range: Option<(u64, u64)>,
    pub body: ByteStream,
    pub outcome: CacheOutcome,
}

impl ProxiedBlob {
    fn cached(read: BlobRead) -> Self {
        ProxiedBlob {
            total_size: Some(read.total_size),
            range: read.range,
            body: read.body,
            outcome: CacheOutcome::Hit,
        }
    }
}

/// A shared manifest fetch: the manifest, and whether it was already in the
/// cache when the fetch's task looked (a fetch that finished just before it
/// started had cached it).
type ManifestFlight = Shared<BoxFuture<'static, Result<(StoredManifest, bool), Arc<str>>>>;

/// How many resolved tags to remember as fresh.
const FRESH_TAGS: usize = 10_000;

pub struct Proxy {
    config: ProxyConfig,
    /// Trow's own names: `?ns=` naming one is not a mirror request.
    own: OwnNames,
    registry: Arc<Registry>,
    upstreams: Upstreams,
    blob_fetches: Fetches,
    /// Manifest fetches in progress by key, each with an id so that a
    /// finished fetch removes its own entry and never a newer one.
    manifest_fetches: Mutex<HashMap<String, (u64, ManifestFlight)>>,
    next_flight_id: AtomicU64,
    /// One permit per upstream fetch running (`max_concurrent_fetches`);
    /// fetches beyond that wait for one.
    fetch_slots: Arc<Semaphore>,
    /// When each (cache repo, tag) was last confirmed upstream.
    fresh_tags: Mutex<LruCache<(String, String), Instant>>,
    pub stats: CacheStats,
    /// When each cached blob's last pull was recorded (to record at most
    /// once a minute per blob).
    touched: Mutex<LruCache<Digest, Instant>>,
    /// Wakes the eviction task after a fetch.
    eviction_wake: Arc<tokio::sync::Notify>,
    /// A handle on ourselves for the fetch tasks we spawn; weak, so that
    /// tasks never keep a dropped proxy alive.
    me: Weak<Proxy>,
}

impl Proxy {
    pub fn new(config: ProxyConfig, registry: Arc<Registry>) -> Arc<Self> {
        Self::with_own_names(config, registry, OwnNames::default())
    }

    /// A proxy for which `?ns=` naming one of `own` is a request for
    /// Trow's own repositories.
    pub fn with_own_names(
        config: ProxyConfig,
        registry: Arc<Registry>,
        own: OwnNames,
    ) -> Arc<Self> {
        let entries = NonZeroUsize::new(FRESH_TAGS).unwrap_or(NonZeroUsize::MIN);
        let stats = CacheStats::new(&config);
        Arc::new_cyclic(|me| Proxy {
            me: me.clone(),
            fetch_slots: Arc::new(Semaphore::new(config.max_concurrent_fetches.max(1))),
            upstreams: Upstreams::new(registry.limits().max_manifest_size),
            config,
            own,
            registry,
            blob_fetches: Fetches::default(),
            manifest_fetches: Mutex::new(HashMap::new()),
            next_flight_id: AtomicU64::new(0),
            fresh_tags: Mutex::new(LruCache::new(entries)),
            stats,
            touched: Mutex::new(LruCache::new(entries)),
            eviction_wake: Arc::new(tokio::sync::Notify::new()),
        })
    }

    pub fn config(&self) -> &ProxyConfig {
        &self.config
    }

    /// Whether `ns` names Trow itself (see [`OwnNames`]).
    pub fn is_own_namespace(&self, ns: &str) -> bool {
        self.config.is_own_namespace(&self.own, ns)
    }

    /// The upstream a request is for: the path form `f/…`, or `ns` (the
    /// mirror form) for any other repository. `None` for ordinary requests,
    /// including those whose `ns` names Trow itself.
    /// Upstreams that are not listed (or, with `allow_any_public`, not
    /// public) are refused here, before anything is contacted.
    pub fn target(&self, repo: &RepoName, ns: Option<&str>) -> Option<Result<Target>> {
        let refused = |e: TargetError| match e {
            TargetError::Invalid(m) => RegistryError::NameInvalid(m),
            e @ (TargetError::NotListed { .. } | TargetError::NotPublic { .. }) => {
                RegistryError::UpstreamNotListed(e.to_string())
            }
        };
        if let Some(t) = self.config.target_for_path(repo) {
            return Some(t.map_err(refused));
        }
        ns.filter(|ns| !self.is_own_namespace(ns))
            .map(|ns| self.config.target_for_namespace(ns, repo).map_err(refused))
    }

    /// A slot to fetch from upstream in, waiting for one if
    /// `max_concurrent_fetches` are running.
    async fn fetch_slot(&self) -> Result<OwnedSemaphorePermit> {
        self.fetch_slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| RegistryError::UpstreamFailed("the registry is shutting down".into()))
    }

    fn upstream_failed(&self, target: &Target, e: &UpstreamError) -> RegistryError {
        self.stats.of(target).error();
        match e {
            UpstreamError::Status {
                host,
                status,
                retry_after,
            } if *status == reqwest::StatusCode::TOO_MANY_REQUESTS => {
                RegistryError::UpstreamRateLimited {
                    host: host.clone(),
                    retry_after: retry_after.clone(),
                }
            }
            other => RegistryError::UpstreamFailed(format!(
                "{other}; this content is not cached, so it cannot be served"
            )),
        }
    }

    fn offline_miss(&self, target: &Target, what: &str) -> RegistryError {
        RegistryError::ManifestUnknown(format!(
            "{what} of {} is not cached and the cache is offline (registry_proxies.offline)",
            target.cache_repo
        ))
    }

    // ----- manifests -----

    /// A manifest through the cache.
    pub async fn manifest(
        &self,
        target: &Target,
        reference: &Reference,
    ) -> Result<(StoredManifest, CacheOutcome)> {
        let result = match reference {
            Reference::Digest(d) => self.manifest_by_digest(target, d).await,
            Reference::Tag(t) => self.manifest_by_tag(target, t.as_str()).await,
        };
        if let Ok((_, outcome)) = &result {
            self.stats.of(target).count(*outcome);
            tracing::debug!(repo = %target.cache_repo, %reference, outcome = outcome.as_str(), "manifest through cache");
        }
        result
    }

    async fn cached(
        &self,
        target: &Target,
        reference: &Reference,
    ) -> Result<Option<StoredManifest>> {
        match self
            .registry
            .get_manifest(&target.cache_repo, reference)
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(RegistryError::ManifestUnknown(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn manifest_by_digest(
        &self,
        target: &Target,
        digest: &Digest,
    ) -> Result<(StoredManifest, CacheOutcome)> {
        let reference = Reference::Digest(digest.clone());
        if let Some(m) = self.cached(target, &reference).await? {
            return Ok((m, CacheOutcome::Hit));
        }
        if self.config.offline {
            return Err(self.offline_miss(target, &digest.to_string()));
        }
        self.fetch_manifest(target, digest, None).await
    }

    fn is_fresh(&self, target: &Target, tag: &str) -> bool {
        let key = (target.cache_repo.to_string(), tag.to_string());
        self.fresh_tags
            .lock()
            .get(&key)
            .is_some_and(|at| at.elapsed() < self.config.tag_ttl)
    }

    fn mark_fresh(&self, target: &Target, tag: &str) {
        let key = (target.cache_repo.to_string(), tag.to_string());
        self.fresh_tags.lock().put(key, Instant::now());
    }

    async fn manifest_by_tag(
        &self,
        target: &Target,
        tag: &str,
    ) -> Result<(StoredManifest, CacheOutcome)> {
        let reference =
            Reference::Tag(crate::oci::Tag::parse(tag).map_err(RegistryError::ManifestUnknown)?);
        let cached = self.cached(target, &reference).await?;
        if self.config.offline {
            return cached
                .map(|m| (m, CacheOutcome::Hit))
                .ok_or_else(|| self.offline_miss(target, tag));
        }
        if let Some(m) = &cached {
            if self.is_fresh(target, tag) {
                return Ok((m.clone(), CacheOutcome::Hit));
            }
        }
        // With a cached copy to fall back on, do not keep clients waiting.
        let timeout = if cached.is_some() {
            self.config.stale_timeout
        } else {
            self.config.upstream_timeout
        };
        let head = match self.upstreams.head_manifest(target, tag, timeout).await {
            Ok(Some(head)) => head,
            Ok(None) => {
                return Err(RegistryError::ManifestUnknown(format!(
                    "{}:{tag} does not exist upstream ({})",
                    target.upstream_repo, target.host
                )))
            }
            Err(e) if e.is_transient() && cached.is_some() => {
                tracing::warn!(repo = %target.cache_repo, tag, error = %e, "upstream failed; serving the cached tag");
                self.stats.of(target).error();
                return cached
                    .map(|m| (m, CacheOutcome::Stale))
                    .ok_or_else(|| self.upstream_failed(target, &e));
            }
            Err(e) => return Err(self.upstream_failed(target, &e)),
        };
        let Some(digest) = head.digest else {
            // Upstream does not say the digest on HEAD: fetch by tag.
            let fetched = self.fetch_manifest_by_tag(target, tag, timeout).await?;
            self.mark_fresh(target, tag);
            return Ok(fetched);
        };
        if let Some(m) = cached.filter(|m| m.record.digest == digest) {
            self.mark_fresh(target, tag);
            return Ok((m, CacheOutcome::Hit));
        }
        // The tag moved (or is new). Reuse the manifest if it is cached.
        let by_digest = Reference::Digest(digest.clone());
        let result = match self.cached(target, &by_digest).await? {
            Some(m) => {
                self.registry
                    .cache_manifest(
                        &target.cache_repo,
                        &m.record.digest,
                        m.bytes.clone(),
                        Some(&m.record.media_type),
                        Some(tag),
                    )
                    .await?;
                (m, CacheOutcome::Hit)
            }
            None => self.fetch_manifest(target, &digest, Some(tag)).await?,
        };
        self.mark_fresh(target, tag);
        Ok(result)
    }

    /// Fetches a manifest by digest from upstream, once however many
    /// requests want it, verifies and caches it (tagging it when `tag`).
    async fn fetch_manifest(
        &self,
        target: &Target,
        digest: &Digest,
        tag: Option<&str>,
    ) -> Result<(StoredManifest, CacheOutcome)> {
        let key = format!("{}@{digest}", target.cache_repo);
        let (flight, outcome) = {
            let mut flights = self.manifest_fetches.lock();
            match flights.get(&key) {
                Some((_, f)) => (f.clone(), CacheOutcome::Shared),
                None => {
                    // Inserted under the lock the task needs to remove it, so
                    // the entry is in place before the task can end.
                    let id = self.next_flight_id.fetch_add(1, Ordering::Relaxed);
                    let forget = ForgetManifestFlight {
                        proxy: self.self_ref(),
                        key: key.clone(),
                        id,
                    };
                    let f = self.spawn_manifest_fetch(target.clone(), digest.clone(), forget);
                    flights.insert(key.clone(), (id, f.clone()));
                    (f, CacheOutcome::Miss)
                }
            }
        };
        let (stored, was_cached) = flight
            .await
            .map_err(|m| RegistryError::UpstreamFailed(m.to_string()))?;
        let outcome = if was_cached {
            CacheOutcome::Hit
        } else {
            outcome
        };
        if let Some(tag) = tag {
            self.registry
                .cache_manifest(
                    &target.cache_repo,
                    digest,
                    stored.bytes.clone(),
                    Some(&stored.record.media_type),
                    Some(tag),
                )
                .await?;
        }
        Ok((stored, outcome))
    }

    /// Starts the shared fetch of one manifest. It runs as its own task, so
    /// a client that disconnects does not cancel it for the others, and the
    /// task forgets the fetch when it ends, even if every client has left.
    ///
    /// The task looks in the cache first: a request that missed the cache
    /// can reach the in-flight map just after an earlier fetch cached the
    /// manifest and left it, and must not fetch it from upstream again.
    fn spawn_manifest_fetch(
        &self,
        target: Target,
        digest: Digest,
        forget: ForgetManifestFlight,
    ) -> ManifestFlight {
        let registry = self.registry.clone();
        let upstreams_fetch = self.fetch_manifest_bytes(target.clone(), digest.clone());
        let task = tokio::spawn(async move {
            let _forget = forget;
            let result = async {
                let cached = registry
                    .get_manifest(&target.cache_repo, &Reference::Digest(digest.clone()))
                    .await;
                match cached {
                    Ok(stored) => return Ok((stored, true)),
                    Err(RegistryError::ManifestUnknown(_)) => {}
                    Err(e) => return Err(e),
                }
                let (bytes, content_type) = upstreams_fetch.await?;
                if !digest.matches(&bytes) {
                    return Err(RegistryError::UpstreamFailed(format!(
                        "upstream {} sent a manifest that does not match {digest}; nothing was cached",
                        target.host
                    )));
                }
                let record = registry
                    .cache_manifest(&target.cache_repo, &digest, bytes.clone(), content_type.as_deref(), None)
                    .await?;
                Ok((StoredManifest { record, bytes }, false))
            }
            .await;
            result.map_err(|e| Arc::<str>::from(e.to_string()))
        });
        async move {
            match task.await {
                Ok(r) => r,
                Err(e) => Err(Arc::<str>::from(format!("manifest fetch task failed: {e}"))),
            }
        }
        .boxed()
        .shared()
    }

    fn fetch_manifest_bytes(
        &self,
        target: Target,
        digest: Digest,
    ) -> BoxFuture<'static, Result<(bytes::Bytes, Option<String>)>> {
        let proxy = self.self_ref();
        async move {
            let proxy = proxy.upgrade().ok_or_else(|| {
                RegistryError::UpstreamFailed("the registry is shutting down".into())
            })?;
            let max = proxy.registry.limits().max_manifest_size;
            let _slot = proxy.fetch_slot().await?;
            match proxy
                .upstreams
                .get_manifest(
                    &target,
                    &digest.to_string(),
                    proxy.config.upstream_timeout,
                    max,
                )
                .await
            {
                Ok(Some(m)) => {
                    proxy.stats.of(&target).received(m.bytes.len());
                    Ok((m.bytes, m.content_type))
                }
                Ok(None) => Err(RegistryError::ManifestUnknown(format!(
                    "{}@{digest} does not exist upstream ({})",
                    target.upstream_repo, target.host
                ))),
                Err(e) => Err(proxy.upstream_failed(&target, &e)),
            }
        }
        .boxed()
    }

    async fn fetch_manifest_by_tag(
        &self,
        target: &Target,
        tag: &str,
        timeout: std::time::Duration,
    ) -> Result<(StoredManifest, CacheOutcome)> {
        let max = self.registry.limits().max_manifest_size;
        let slot = self.fetch_slot().await?;
        let fetched = self.upstreams.get_manifest(target, tag, timeout, max).await;
        drop(slot);
        let fetched = match fetched {
            Ok(Some(m)) => m,
            Ok(None) => {
                return Err(RegistryError::ManifestUnknown(format!(
                    "{}:{tag} does not exist upstream",
                    target.upstream_repo
                )))
            }
            Err(e) => return Err(self.upstream_failed(target, &e)),
        };
        self.stats.of(target).received(fetched.bytes.len());
        let digest = Digest::sha256_of(&fetched.bytes);
        let record = self
            .registry
            .cache_manifest(
                &target.cache_repo,
                &digest,
                fetched.bytes.clone(),
                fetched.content_type.as_deref(),
                Some(tag),
            )
            .await?;
        Ok((
            StoredManifest {
                record,
                bytes: fetched.bytes,
            },
            CacheOutcome::Miss,
        ))
    }

    // ----- referrers -----

    /// The digests of the manifests upstream lists as referrers of
    /// `digest` with this `artifact_type` (at most `max`; the list read is
    /// bounded by `max_bytes`). Empty when the cache is offline or the
    /// upstream has no referrers API. The referrers themselves are fetched
    /// (and verified) like any manifest, by digest.
    pub async fn referrers(
        &self,
        target: &Target,
        digest: &Digest,
        artifact_type: &str,
        max: usize,
        max_bytes: u64,
    ) -> Result<Vec<Digest>> {
        #[derive(serde::Deserialize)]
        struct Index {
            #[serde(default)]
            manifests: Vec<Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            digest: String,
            #[serde(rename = "artifactType")]
            artifact_type: Option<String>,
        }
        if self.config.offline {
            return Ok(Vec::new());
        }
        let _slot = self.fetch_slot().await?;
        let bytes = match self
            .upstreams
            .get_referrers(
                target,
                digest,
                artifact_type,
                self.config.upstream_timeout,
                max_bytes,
            )
            .await
        {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return Ok(Vec::new()),
            Err(e) => return Err(self.upstream_failed(target, &e)),
        };
        let index: Index = serde_json::from_slice(&bytes).map_err(|e| {
            RegistryError::UpstreamFailed(format!(
                "{}: the referrers list of {digest} is not an image index: {e}",
                target.host
            ))
        })?;
        Ok(index
            .manifests
            .into_iter()
            .filter(|m| m.artifact_type.as_deref() == Some(artifact_type))
            .filter_map(|m| m.digest.parse().ok())
            .take(max)
            .collect())
    }

    // ----- blobs -----

    /// The size of a blob through the cache (for `HEAD`): from the cache, else
    /// from upstream without fetching the bytes.
    pub async fn blob_size(&self, target: &Target, digest: &Digest) -> Result<u64> {
        if let Ok(size) = self.registry.blob_size(&target.cache_repo, digest).await {
            return Ok(size);
        }
        if self.config.offline {
            return Err(RegistryError::BlobUnknown(digest.to_string()));
        }
        match self
            .upstreams
            .head_blob(
                target,
                digest,
                self.config.upstream_timeout,
                self.config.max_blob_size,
            )
            .await
        {
            Ok(Some(size)) => Ok(size),
            Ok(None) => Err(RegistryError::BlobUnknown(digest.to_string())),
            Err(e) => Err(self.upstream_failed(target, &e)),
        }
    }

    /// A blob through the cache: from the cache, else streamed from a
    /// (shared) upstream fetch. Ranges are honoured for cached blobs.
    pub async fn blob(
        &self,
        target: &Target,
        digest: &Digest,
        range: Option<RangeRequest>,
        delivery: Delivery,
    ) -> Result<ProxiedBlob> {
        let result = self.blob_inner(target, digest, range, delivery).await;
        if let Ok(b) = &result {
            self.stats.of(target).count(b.outcome);
        }
        result
    }

    async fn blob_inner(
        &self,
        target: &Target,
        digest: &Digest,
        range: Option<RangeRequest>,
        delivery: Delivery,
    ) -> Result<ProxiedBlob> {
        // In-flight first, then the cache: a fetch links the blob before it
        // leaves the in-flight map, so one of the two always sees it.
        let mut flight = self
            .blob_fetches
            .get(digest)
            .map(|f| (f, CacheOutcome::Shared));
        if let (Some(_), Some((f, _))) = (range, &flight) {
            // A range is served from the committed blob: let the fetch finish.
            if fetch::wait_until_settled(f).await.is_ok() {
                flight = None;
            }
        }
        if flight.is_none() {
            match self
                .registry
                .read_blob(&target.cache_repo, digest, range, delivery)
                .await
            {
                Ok(read) => {
                    self.touch(digest, read.total_size).await;
                    return Ok(ProxiedBlob::cached(read));
                }
                Err(RegistryError::BlobUnknown(_)) => {}
                Err(e) => return Err(e),
            }
            if self.config.offline {
                return Err(RegistryError::BlobUnknown(digest.to_string()));
            }
            flight = Some(self.start_blob_fetch(target, digest).await?);
        }
        let Some((flight, outcome)) = flight else {
            return Err(RegistryError::BlobUnknown(digest.to_string()));
        };
        let total = match fetch::wait_for_headers(&flight).await {
            Ok(total) => total,
            Err(Progress::Failed {
                message,
                not_found: true,
                ..
            }) => return Err(RegistryError::BlobUnknown(format!("{digest} ({message})"))),
            Err(Progress::Failed { message, .. }) => {
                return Err(RegistryError::UpstreamFailed(message.to_string()))
            }
            Err(_) => {
                return Err(RegistryError::UpstreamFailed(
                    "upstream fetch failed".into(),
                ))
            }
        };
        Ok(ProxiedBlob {
            total_size: total,
            range: None,
            body: Box::pin(Follower::new(
                self.registry.blob_store(),
                flight,
                digest.clone(),
            )),
            outcome,
        })
    }

    /// Registers and starts the fetch of a blob (or joins one that raced in).
    async fn start_blob_fetch(
        &self,
        target: &Target,
        digest: &Digest,
    ) -> Result<(Arc<InFlight>, CacheOutcome)> {
        let upload_id = uuid::Uuid::new_v4().to_string();
        let (tx, rx) = watch::channel(Progress::Connecting);
        let tx = Arc::new(tx);
        let (flight, is_new) = self.blob_fetches.register(
            digest,
            InFlight {
                upload_id: upload_id.clone(),
                progress: rx,
            },
        );
        if !is_new {
            return Ok((flight, CacheOutcome::Shared));
        }
        let forget = ForgetBlobFetch {
            proxy: self.self_ref(),
            digest: digest.clone(),
            flight: flight.clone(),
        };
        let proxy = self.self_ref();
        let target = target.clone();
        let digest = digest.clone();
        tokio::spawn(async move {
            // Forgets the fetch however the task ends (even by a panic).
            let _forget = forget;
            let Some(proxy) = proxy.upgrade() else { return };
            // A fetch that finished between this request's look into the
            // cache and its registration has already cached the blob.
            let outcome = match proxy.committed_in_cache(&target, &digest).await {
                Some(size) => Ok(size),
                None => match proxy.fetch_slot().await {
                    Ok(_slot) => {
                        proxy
                            .run_blob_fetch(&target, &digest, &upload_id, &tx)
                            .await
                    }
                    Err(e) => Err((e.to_string(), false)),
                },
            };
            let final_state = match outcome {
                Ok(size) => Progress::Done { size },
                Err((message, not_found)) => {
                    tracing::warn!(repo = %target.cache_repo, %digest, error = %message, "blob fetch from upstream failed");
                    proxy.registry.discard_cache_download(&upload_id).await;
                    Progress::Failed {
                        message: message.into(),
                        not_found,
                    }
                }
            };
            // Forget the fetch before announcing its end: a request arriving
            // after a failure must start a new fetch, not join this one; after
            // a success the blob is already linked in the cache.
            proxy.blob_fetches.remove(&digest, &_forget.flight);
            tx.send_replace(final_state);
        });
        Ok((flight, CacheOutcome::Miss))
    }

    /// The size of `digest` if the cache repository serves it from the blob
    /// store (where a follower drains committed blobs from).
    async fn committed_in_cache(&self, target: &Target, digest: &Digest) -> Option<u64> {
        let size = self
            .registry
            .blob_size(&target.cache_repo, digest)
            .await
            .ok()?;
        match self.registry.blob_store().stat(digest).await {
            Ok(Some(_)) => Some(size),
            _ => None,
        }
    }

    /// Downloads a blob into an upload file, publishing progress, then
    /// verifies and commits it to the cache. Errors carry a message and
    /// whether upstream said 404.
    async fn run_blob_fetch(
        &self,
        target: &Target,
        digest: &Digest,
        upload_id: &str,
        tx: &Arc<watch::Sender<Progress>>,
    ) -> std::result::Result<u64, (String, bool)> {
        let store = self.registry.blob_store();
        let failed = |m: String| (m, false);
        self.registry
            .start_cache_download(&target.cache_repo, upload_id)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let resp = match self
            .upstreams
            .get_blob(target, digest, self.config.upstream_timeout)
            .await
        {
            Ok(Some(r)) => r,
            Ok(None) => {
                return Err((
                    format!("upstream {} has no blob {digest}", target.host),
                    true,
                ))
            }
            Err(e) => {
                self.stats.of(target).error();
                return Err(failed(e.to_string()));
            }
        };
        let (total, limit) = self
            .blob_bounds(target, digest, resp.content_length())
            .await
            .map_err(failed)?;
        let _ = tx.send(Progress::Streaming { total, written: 0 });
        // One pipelined append: network, hashing and disk overlap, and the
        // writer reports how far clients may read.
        let body = bounded_body(
            resp,
            limit,
            self.config.upstream_timeout,
            target.host.clone(),
            self.stats.of(target).clone(),
        );
        let report = tx.clone();
        let written = store
            .append_upload_with_progress(
                upload_id,
                Some(0),
                body,
                Some(Box::new(move |written| {
                    report.send_replace(Progress::Streaming { total, written });
                })),
            )
            .await
            .map_err(|e| failed(format!("download from {} broke off: {e}", target.host)))?;
        if total.is_some_and(|t| t != written) {
            return Err(failed(format!(
                "upstream {} sent {written} bytes of a {}-byte blob",
                target.host,
                total.unwrap_or(0)
            )));
        }
        // Verified bytes can go to clients while they are made durable.
        let size = store
            .verify_upload(upload_id, digest)
            .await
            .map_err(|e| failed(format!("{e}; nothing was cached")))?;
        let _ = tx.send(Progress::Verified { size });
        self.registry
            .commit_cached_blob(&target.cache_repo, upload_id, digest)
            .await
            .map_err(|e| failed(format!("{e}; nothing was cached")))?;
        if self.config.max_size.is_some() {
            self.eviction_wake.notify_one();
        }
        Ok(size)
    }

    /// How many bytes a blob download may bring, and the total to announce
    /// to clients: the size upstream announces (refused above
    /// `max_blob_size`, or when it contradicts the manifest's descriptor);
    /// without one, the descriptor's size; without either, `max_blob_size`.
    async fn blob_bounds(
        &self,
        target: &Target,
        digest: &Digest,
        announced: Option<u64>,
    ) -> std::result::Result<(Option<u64>, u64), String> {
        let max = self.config.max_blob_size;
        match (announced, self.descriptor_size(target, digest).await) {
            (Some(a), _) if a > max => Err(blob_too_large(&target.host, a, max).to_string()),
            (Some(a), Some(d)) if a != d => Err(format!(
                "upstream {} announced {a} bytes for blob {digest}, but the manifest says {d}",
                target.host
            )),
            (Some(a), _) => Ok((Some(a), a)),
            (None, Some(d)) if d > max => Err(blob_too_large(&target.host, d, max).to_string()),
            (None, Some(d)) => Ok((Some(d), d)),
            (None, None) => Ok((None, max)),
        }
    }

    /// The size that a cached manifest's descriptor gives for `digest` in
    /// `target`'s cache repository (`manifest_refs`): it bounds a download
    /// whose upstream sends no Content-Length and catches one that
    /// announces a different size. `None` when no cached manifest refers to
    /// the digest (then `max_blob_size` bounds the download).
    async fn descriptor_size(&self, target: &Target, digest: &Digest) -> Option<u64> {
        match self
            .registry
            .described_size(&target.cache_repo, digest)
            .await
        {
            Ok(size) => size,
            Err(e) => {
                tracing::warn!(%digest, error = %e, "could not look up a descriptor size");
                None
            }
        }
    }

    /// Records a pull of a cached blob for eviction order, at most once a
    /// minute per blob so that hot blobs do not cost a write per pull.
    async fn touch(&self, digest: &Digest, size: u64) {
        if self.config.max_size.is_none() {
            return;
        }
        {
            let mut touched = self.touched.lock();
            let recent = touched
                .get(digest)
                .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(60));
            if recent {
                return;
            }
            touched.put(digest.clone(), Instant::now());
        }
        if let Err(e) = self
            .registry
            .meta_store()
            .touch_cache_blob(digest, size)
            .await
        {
            tracing::warn!(%digest, error = %e, "could not record a cache pull");
        }
    }

    fn self_ref(&self) -> Weak<Proxy> {
        self.me.clone()
    }
}

/// Removes a manifest fetch from the in-flight map when its task ends,
/// unless a newer fetch took the key.
struct ForgetManifestFlight {
    proxy: Weak<Proxy>,
    key: String,
    id: u64,
}

impl Drop for ForgetManifestFlight {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.upgrade() {
            let mut flights = proxy.manifest_fetches.lock();
            if flights.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
                flights.remove(&self.key);
            }
        }
    }
}

/// Removes a blob fetch from the in-flight map when its task ends, unless a
/// newer fetch of the digest took its place.
struct ForgetBlobFetch {
    proxy: Weak<Proxy>,
    digest: Digest,
    flight: Arc<InFlight>,
}

impl Drop for ForgetBlobFetch {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.upgrade() {
            proxy.blob_fetches.remove(&self.digest, &self.flight);
        }
    }
}

/// A blob response body as a stream that ends with an error (and so stops
/// reading, dropping the connection) once more than `limit` bytes arrive or
/// no chunk comes within `idle`. What arrives is counted in `stats`.
fn bounded_body(
    resp: reqwest::Response,
    limit: u64,
    idle: std::time::Duration,
    host: String,
    stats: Arc<UpstreamStats>,
) -> ByteStream {
    struct State {
        body: futures_util::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
        received: u64,
        done: bool,
    }
    let state = State {
        body: resp.bytes_stream().boxed(),
        received: 0,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, move |mut st| {
        let host = host.clone();
        let stats = stats.clone();
        async move {
            if st.done {
                return None;
            }
            let item = match tokio::time::timeout(idle, st.body.next()).await {
                Err(_) => Err(std::io::Error::other(format!(
                    "upstream {host} stalled for {idle:?}"
                ))),
                Ok(None) => return None,
                Ok(Some(Err(e))) => Err(std::io::Error::other(e)),
                Ok(Some(Ok(chunk))) => {
                    stats.received(chunk.len());
                    st.received = st.received.saturating_add(chunk.len() as u64);
                    if st.received > limit {
                        Err(std::io::Error::other(format!(
                            "upstream {host} sent more than the {limit} bytes this blob may have; stopped reading"
                        )))
                    } else {
                        Ok(chunk)
                    }
                }
            };
            st.done = item.is_err();
            Some((item, st))
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::config::UpstreamConfig;
    use super::*;
    use crate::meta::sqlite::{Durability, SqliteMeta};
    use crate::registry::Limits;
    use crate::storage::fs::FsBlobStore;

    /// A proxy over a fresh data directory whose one upstream (`up`) is a
    /// listener that accepts connections, counts them and never answers.
    async fn proxy_with_silent_upstream() -> (
        tempfile::TempDir,
        Arc<Proxy>,
        Target,
        Arc<AtomicU64>,
        tokio::task::JoinHandle<()>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let blobs = FsBlobStore::open(dir.path(), false).unwrap();
        let meta = SqliteMeta::open(&dir.path().join("trow.db"), Durability::Normal)
            .await
            .unwrap();
        let registry = Arc::new(Registry::new(
            Arc::new(blobs),
            Arc::new(meta),
            Limits {
                max_manifest_size: 1 << 20,
                upload_expiry: std::time::Duration::from_secs(3600),
            },
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let silent = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        let config = ProxyConfig {
            upstream_timeout: std::time::Duration::from_millis(300),
            registries: vec![UpstreamConfig {
                host,
                alias: Some("up".into()),
                insecure: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let proxy = Proxy::new(config, registry);
        let repo = RepoName::parse("f/up/r").unwrap();
        let target = proxy.target(&repo, None).unwrap().unwrap();
        (dir, proxy, target, connections, silent)
    }

    /// A request that missed the cache can reach the in-flight maps just
    /// after another fetch cached the content and left them. The fetch it
    /// then starts must find the content cached, not go upstream again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_started_after_another_cached_the_content_does_not_go_upstream() {
        let (_dir, proxy, target, connections, silent) = proxy_with_silent_upstream().await;
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let config_digest = Digest::sha256_of(config);
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[]}}"#,
            config.len()
        );
        let manifest_digest = Digest::sha256_of(manifest.as_bytes());
        proxy
            .registry
            .cache_manifest(
                &target.cache_repo,
                &manifest_digest,
                bytes::Bytes::from(manifest.clone()),
                Some("application/vnd.oci.image.manifest.v1+json"),
                None,
            )
            .await
            .unwrap();
        // Cached as a fetch caches a blob: an upload file, committed.
        let layer = vec![7u8; 300 * 1024];
        let layer_digest = Digest::sha256_of(&layer);
        let store = proxy.registry.blob_store();
        let earlier = uuid::Uuid::new_v4().to_string();
        proxy
            .registry
            .start_cache_download(&target.cache_repo, &earlier)
            .await
            .unwrap();
        let body: ByteStream = Box::pin(futures_util::stream::iter([Ok(bytes::Bytes::from(
            layer.clone(),
        ))]));
        store
            .append_upload_with_progress(&earlier, Some(0), body, None)
            .await
            .unwrap();
        store.verify_upload(&earlier, &layer_digest).await.unwrap();
        proxy
            .registry
            .commit_cached_blob(&target.cache_repo, &earlier, &layer_digest)
            .await
            .unwrap();

        // What a request does after its look into the cache missed.
        let (stored, outcome) = proxy
            .fetch_manifest(&target, &manifest_digest, None)
            .await
            .unwrap();
        assert_eq!(stored.bytes, manifest.as_bytes());
        assert_eq!(outcome, CacheOutcome::Hit);
        let (flight, _) = proxy
            .start_blob_fetch(&target, &layer_digest)
            .await
            .unwrap();
        let mut follower = Follower::new(store, flight, layer_digest.clone());
        let mut served = Vec::new();
        while let Some(chunk) = follower.next().await {
            served.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(served, layer);
        assert_eq!(
            connections.load(Ordering::SeqCst),
            0,
            "nothing went upstream"
        );
        assert!(proxy.manifest_fetches.lock().is_empty());
        assert!(proxy.blob_fetches.get(&layer_digest).is_none());
        silent.abort();
    }

    /// Fetches whose every waiter gave up still leave the in-flight maps
    /// when they end (here: when the silent upstream times out).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetches_leave_their_maps_when_every_waiter_left() {
        let (_dir, proxy, target, _, silent) = proxy_with_silent_upstream().await;
        let digest = Digest::sha256_of(b"never served");
        let give_up = std::time::Duration::from_millis(50);
        let reference = Reference::Digest(digest.clone());
        assert!(
            tokio::time::timeout(give_up, proxy.manifest(&target, &reference))
                .await
                .is_err()
        );
        assert!(tokio::time::timeout(
            give_up,
            proxy.blob(&target, &digest, None, Delivery::Buffered)
        )
        .await
        .is_err());
        assert_eq!(proxy.manifest_fetches.lock().len(), 1);
        assert!(proxy.blob_fetches.get(&digest).is_some());
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while !proxy.manifest_fetches.lock().is_empty() || proxy.blob_fetches.get(&digest).is_some()
        {
            assert!(
                Instant::now() < deadline,
                "a finished fetch stayed in its map"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        silent.abort();
    }
}
