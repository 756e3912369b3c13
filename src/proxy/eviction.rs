//! Keeps the pull-through cache under `registry_proxies.max_size`.
//!
//! When the bytes held only by the cache exceed `max_size` (the high
//! watermark), the least recently pulled cached blobs are evicted until usage
//! is below 90 % of it (the low watermark), so that eviction does not run
//! again at every fetch. Eviction goes through `Registry::reclaim_blob`, the
//! one removal path: blobs that a pushed repository links, or whose digest
//! is also a stored manifest, keep their bytes; blobs being fetched are
//! skipped. A client already streaming a blob
//! keeps reading it: on Unix the open file outlives its directory entry. A
//! client arriving later finds the blob gone from the cache and it is fetched
//! again. Manifests are small and are kept.

use std::sync::Arc;
use std::time::Duration;

use super::Proxy;
use crate::meta::ReclaimRule;
use crate::registry::error::Result;

/// Share of `max_size` that eviction brings usage down to.
const LOW_WATERMARK_PERCENT: u64 = 90;
/// How often usage is checked besides after each fetch.
const CHECK_EVERY: Duration = Duration::from_secs(30);

impl Proxy {
    /// Evicts least recently pulled blobs while over the limit; returns the
    /// bytes freed.
    pub async fn evict_if_needed(&self) -> Result<u64> {
        let Some(max) = self.config.max_size else {
            return Ok(0);
        };
        let meta = self.registry.meta_store();
        let mut used = meta.cache_usage().await?;
        if used <= max {
            return Ok(0);
        }
        let low = max / 100 * LOW_WATERMARK_PERCENT;
        let mut freed = 0;
        let mut skipped = std::collections::HashSet::new();
        while used > low {
            let batch = meta.cache_lru(100 + skipped.len() as u32).await?;
            let mut progressed = false;
            for (digest, size) in batch {
                if used <= low {
                    break;
                }
                if skipped.contains(&digest) {
                    continue;
                }
                if self.blob_fetches.get(&digest).is_some() {
                    skipped.insert(digest);
                    continue;
                }
                progressed = true;
                // The one reference-safety path: the bytes go only if no
                // pushed repository or manifest still needs them.
                let reclaimed = self
                    .registry
                    .reclaim_blob(&digest, ReclaimRule::CacheEviction)
                    .await?;
                if let Some(reclaimed) = reclaimed {
                    used = used.saturating_sub(size);
                    freed += reclaimed;
                }
                tracing::info!(%digest, size, kept_bytes = reclaimed.is_none(), "evicted from the pull-through cache");
            }
            if !progressed {
                break;
            }
        }
        Ok(freed)
    }

    /// Runs eviction after fetches and every half minute, for as long as the
    /// proxy lives.
    pub fn spawn_eviction(self: &Arc<Self>) {
        if self.config.max_size.is_none() {
            return;
        }
        let weak = Arc::downgrade(self);
        let wake = self.eviction_wake.clone();
        tokio::spawn(async move {
            loop {
                let _ = tokio::time::timeout(CHECK_EVERY, wake.notified()).await;
                let Some(proxy) = weak.upgrade() else { return };
                if let Err(e) = proxy.evict_if_needed().await {
                    tracing::warn!(error = %e, "cache eviction failed; will retry");
                }
            }
        });
    }
}
