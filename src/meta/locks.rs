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
    fn stripe(&self, digest: &Digest) -> Arc<RwLock<()>> {
        // Digest hex is uniformly distributed: its first bytes pick the stripe.
        let index = digest.hex().bytes().take(4).fold(0usize, |acc, b| {
            acc.wrapping_mul(31).wrapping_add(usize::from(b))
        });
        self.stripes[index % STRIPES].clone()
    }

    /// Waits for the lock. Callers never hold two blob locks at once, so
    /// waiting cannot deadlock.
    pub async fn lock(&self, digest: &Digest, mode: LockMode) -> BlobLock {
        let stripe = self.stripe(digest);
        match mode {
            LockMode::Shared => BlobLock::new(stripe.read_owned().await),
            LockMode::Exclusive => BlobLock::new(stripe.write_owned().await),
        }
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
}
