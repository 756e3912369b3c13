//! In-process blob locks for the embedded (single-process) metadata store.
//!
//! A fixed set of read-write locks, chosen by the digest: bounded memory
//! whatever the number of digests, and commits (shared) never wait for each
//! other. Two digests that share a stripe only make a removal of one wait
//! for a commit of the other, which is rare and short.

use std::sync::Arc;

use tokio::sync::RwLock;

use super::{BlobLock, LockMode};
use crate::oci::Digest;

/// How many locks digests are spread over.
const STRIPES: usize = 1024;

pub struct BlobLocks {
    stripes: Vec<Arc<RwLock<()>>>,
}

impl Default for BlobLocks {
    fn default() -> Self {
        BlobLocks {
            stripes: (0..STRIPES).map(|_| Arc::new(RwLock::new(()))).collect(),
        }
    }
}

impl BlobLocks {
    fn stripe_index(digest: &Digest) -> usize {
        // Digest hex is uniformly distributed: its first bytes pick the stripe.
        digest.hex().bytes().take(4).fold(0usize, |acc, b| {
            acc.wrapping_mul(31).wrapping_add(usize::from(b))
        }) % STRIPES
    }

    /// Waits for the lock of one digest.
    pub async fn lock(&self, digest: &Digest, mode: LockMode) -> BlobLock {
        self.lock_many(std::slice::from_ref(digest), mode).await
    }

    /// Waits for the locks of several digests, held together. Their stripes
    /// are taken once each and in ascending order; every other holder takes
    /// one lock (or also ascending), so waiting cannot deadlock.
    pub async fn lock_many(&self, digests: &[Digest], mode: LockMode) -> BlobLock {
        let mut indices: Vec<usize> = digests.iter().map(Self::stripe_index).collect();
        indices.sort_unstable();
        indices.dedup();
        let mut guards: Vec<Box<dyn Send + Sync>> = Vec::with_capacity(indices.len());
        for i in indices {
            let stripe = self.stripes[i].clone();
            guards.push(match mode {
                LockMode::Shared => Box::new(stripe.read_owned().await),
                LockMode::Exclusive => Box::new(stripe.write_owned().await),
            });
        }
        BlobLock::new(guards)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn digest(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    #[tokio::test]
    async fn shared_locks_coexist_and_exclusive_waits() {
        let locks = BlobLocks::default();
        let d = digest('a');
        let a = locks.lock(&d, LockMode::Shared).await;
        let _b = locks.lock(&d, LockMode::Shared).await;
        let waiting = tokio::time::timeout(
            Duration::from_millis(50),
            locks.lock(&d, LockMode::Exclusive),
        )
        .await;
        assert!(waiting.is_err(), "exclusive must wait for shared holders");
        drop(a);
        drop(_b);
        let _x = tokio::time::timeout(Duration::from_secs(5), locks.lock(&d, LockMode::Exclusive))
            .await
            .expect("exclusive once shared holders are gone");
    }

    /// Many digests, some sharing a stripe, are locked at once without the
    /// holder waiting on itself.
    #[tokio::test]
    async fn many_digests_share_stripes_without_self_deadlock() {
        let locks = BlobLocks::default();
        let digests: Vec<Digest> = (0..5000u32)
            .map(|i| Digest::sha256_of(&i.to_le_bytes()))
            .collect();
        let all = tokio::time::timeout(
            Duration::from_secs(5),
            locks.lock_many(&digests, LockMode::Exclusive),
        )
        .await
        .expect("no self-deadlock on shared stripes");
        drop(all);
        let _again = locks.lock(&digests[0], LockMode::Shared).await;
    }
}
