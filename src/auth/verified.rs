//! Credentials verified a moment ago, so that a client sending Basic
//! credentials on every request (skopeo, scripts with curl) pays for one
//! bcrypt or argon2 check per minute, not one per request.
//!
//! Entries are keyed by SHA-256 over a per-process random key, the user
//! name's length, the user name and the password: neither the password nor
//! anything that could be checked against it without the key is kept, and
//! the key never leaves the process. Only successful checks are remembered;
//! a wrong password always takes the full check (and counts toward the
//! failed-login limit).

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

/// How long a verified password is trusted without a new check.
pub const VERIFIED_TTL: Duration = Duration::from_secs(60);
/// Credentials remembered at most.
pub const VERIFIED_CAPACITY: usize = 1024;

type Fingerprint = [u8; 32];

#[derive(Debug)]
pub struct VerifiedCache {
    key: [u8; 32],
    ttl: Duration,
    /// Fingerprint → when the password was checked.
    entries: Mutex<LruCache<Fingerprint, Instant>>,
}

impl VerifiedCache {
    /// `None` when the system has no randomness for the key (then every
    /// request is checked in full).
    pub fn new(capacity: usize, ttl: Duration) -> Option<VerifiedCache> {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).ok()?;
        Some(Self::with_key(key, capacity, ttl))
    }

    fn with_key(key: [u8; 32], capacity: usize, ttl: Duration) -> VerifiedCache {
        VerifiedCache {
            key,
            ttl,
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }

    fn fingerprint(&self, user: &str, password: &str) -> Fingerprint {
        // The length makes the encoding unambiguous: ("a", "bc") and
        // ("ab", "c") never share a fingerprint.
        Sha256::new()
            .chain_update(self.key)
            .chain_update((user.len() as u64).to_be_bytes())
            .chain_update(user.as_bytes())
            .chain_update(password.as_bytes())
            .finalize()
            .into()
    }

    /// Whether `user` proved `password` within the last `ttl`.
    pub fn contains(&self, user: &str, password: &str) -> bool {
        self.contains_at(user, password, Instant::now())
    }

    fn contains_at(&self, user: &str, password: &str, now: Instant) -> bool {
        let f = self.fingerprint(user, password);
        let mut entries = self.entries.lock();
        match entries.get(&f) {
            Some(at) if now.saturating_duration_since(*at) < self.ttl => true,
            Some(_) => {
                entries.pop(&f);
                false
            }
            None => false,
        }
    }

    /// Remembers a successful check.
    pub fn insert(&self, user: &str, password: &str) {
        self.insert_at(user, password, Instant::now())
    }

    fn insert_at(&self, user: &str, password: &str, now: Instant) {
        let f = self.fingerprint(user, password);
        self.entries.lock().put(f, now);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_for_the_ttl_only() {
        let c = VerifiedCache::with_key([1; 32], 10, Duration::from_secs(60));
        let t0 = Instant::now();
        assert!(!c.contains_at("alice", "pw", t0));
        c.insert_at("alice", "pw", t0);
        assert!(c.contains_at("alice", "pw", t0 + Duration::from_secs(59)));
        assert!(!c.contains_at("alice", "pw2", t0));
        assert!(!c.contains_at("bob", "pw", t0));
        assert!(!c.contains_at("alice", "pw", t0 + Duration::from_secs(60)));
        // The expired entry is gone.
        assert_eq!(c.len(), 0);
    }

    #[test]
    fn the_encoding_is_unambiguous_and_keyed() {
        let c = VerifiedCache::with_key([1; 32], 10, Duration::from_secs(60));
        assert_ne!(c.fingerprint("a", "bc"), c.fingerprint("ab", "c"));
        assert_ne!(c.fingerprint("a\0b", "c"), c.fingerprint("a", "b\0c"));
        let other = VerifiedCache::with_key([2; 32], 10, Duration::from_secs(60));
        assert_ne!(c.fingerprint("a", "b"), other.fingerprint("a", "b"));
        // Nothing of the password is stored in the clear.
        let plain: [u8; 32] = Sha256::digest(b"pw").into();
        c.insert("alice", "pw");
        assert!(c.entries.lock().iter().all(|(k, _)| *k != plain));
    }

    #[test]
    fn bounded() {
        let c = VerifiedCache::with_key([1; 32], 3, Duration::from_secs(60));
        for i in 0..10 {
            c.insert(&format!("u{i}"), "pw");
        }
        assert_eq!(c.len(), 3);
        assert!(c.contains("u9", "pw"));
        assert!(!c.contains("u0", "pw"));
    }
}
