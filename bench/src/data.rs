//! Seeded, reproducible blob content.
//!
//! Benchmarks must not measure how fast the client can invent bytes, and must
//! not need gigabytes of client memory for a 1 GiB blob. So all generated blobs
//! are views into one pool of pseudo-random bytes made once from the seed
//! before any timing starts:
//!
//! * a blob's *body* is the pool read cyclically from an offset chosen by the
//!   blob's `family`; slicing a shared [`Bytes`] costs no copy, so streaming a
//!   1 GiB body allocates nothing per chunk;
//! * its last [`TAIL_LEN`] bytes are a *tail* holding the blob id, the family and
//!   the run nonce, which makes every blob's digest unique (registries must
//!   store each one) and unique across runs against the same registry.
//!
//! Because every blob of one family and size shares the same body, the SHA-256
//! state after the body is computed once (a first pass over the same stream the
//! upload will send) and cloned per blob: digests for thousands of blobs are
//! ready before timing starts at the cost of hashing one body.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use bytes::Bytes;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Size of the shared random pool. Larger than any CPU cache so that the
/// registry sees no artificially cache-friendly data, small enough to make
/// generation (tens of milliseconds) negligible.
pub const POOL_SIZE: usize = 8 * 1024 * 1024;
/// Bytes at the end of every blob that make it unique.
pub const TAIL_LEN: u64 = 24;
/// Largest slice handed to the HTTP body stream at once.
const CHUNK: usize = 512 * 1024;

/// Generator of blob content, shared by all workers of a run.
pub struct DataGen {
    pool: Bytes,
    seed: u64,
    nonce: u64,
    /// SHA-256 state after hashing a body, keyed by (pool offset, body length).
    body_states: Mutex<HashMap<(usize, u64), Sha256>>,
}

/// A blob that exists only as a recipe; its bytes are produced on demand.
#[derive(Clone)]
pub struct BlobSpec {
    pool: Bytes,
    start: usize,
    size: u64,
    tail: [u8; TAIL_LEN as usize],
}

/// A SplitMix64 step: a cheap, well-mixed hash of a u64, used to derive pool
/// offsets so that families do not overlap in a predictable way.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl DataGen {
    /// Builds the pool from `seed`. `nonce` is mixed into every tail so that two
    /// runs with the same seed still push blobs the registry has not seen.
    pub fn new(seed: u64, nonce: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut pool = vec![0u8; POOL_SIZE];
        rng.fill_bytes(&mut pool);
        Self {
            pool: Bytes::from(pool),
            seed,
            nonce,
            body_states: Mutex::new(HashMap::new()),
        }
    }

    /// The recipe for blob `id` of `family` with `size` bytes.
    pub fn blob(&self, family: u64, id: u64, size: u64) -> BlobSpec {
        let start = (mix64(self.seed ^ mix64(family)) % POOL_SIZE as u64) as usize;
        let mut tail = [0u8; TAIL_LEN as usize];
        // Id first: a blob shorter than the tail keeps the tail's first bytes,
        // and those should still tell blobs apart.
        tail[0..8].copy_from_slice(&id.to_le_bytes());
        tail[8..16].copy_from_slice(&family.to_le_bytes());
        tail[16..24].copy_from_slice(&self.nonce.to_le_bytes());
        BlobSpec {
            pool: self.pool.clone(),
            start,
            size,
            tail,
        }
    }

    /// `sha256:<hex>` of `spec`, reusing the hashed body of earlier blobs of the
    /// same family and size.
    pub fn digest(&self, spec: &BlobSpec) -> String {
        let key = (spec.start, spec.body_len());
        let cached = self
            .body_states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .cloned();
        let mut state = match cached {
            Some(s) => s,
            None => {
                let mut h = Sha256::new();
                for c in spec.chunks(0..spec.body_len()) {
                    h.update(&c);
                }
                self.body_states
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key, h.clone());
                h
            }
        };
        for c in spec.chunks(spec.body_len()..spec.size) {
            state.update(&c);
        }
        format!("sha256:{}", hex::encode(state.finalize()))
    }
}

impl BlobSpec {
    /// Total size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn body_len(&self) -> u64 {
        self.size.saturating_sub(TAIL_LEN)
    }

    /// The bytes in `range`, as cheap slices of the pool (plus the tail).
    pub fn chunks(&self, range: Range<u64>) -> ChunkIter {
        ChunkIter {
            spec: self.clone(),
            pos: range.start.min(self.size),
            end: range.end.min(self.size),
        }
    }

    /// The whole blob in one contiguous buffer; for tests.
    #[cfg(test)]
    pub fn to_bytes(&self) -> Bytes {
        let mut v = Vec::with_capacity(self.size as usize);
        for c in self.chunks(0..self.size) {
            v.extend_from_slice(&c);
        }
        Bytes::from(v)
    }
}

/// Iterator over a byte range of a [`BlobSpec`].
pub struct ChunkIter {
    spec: BlobSpec,
    pos: u64,
    end: u64,
}

impl Iterator for ChunkIter {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.pos >= self.end {
            return None;
        }
        let body_len = self.spec.body_len();
        let out = if self.pos < body_len {
            let off = (self.spec.start as u64 + self.pos) % POOL_SIZE as u64;
            let n = (CHUNK as u64)
                .min(POOL_SIZE as u64 - off)
                .min(body_len - self.pos)
                .min(self.end - self.pos);
            self.spec.pool.slice(off as usize..(off + n) as usize)
        } else {
            // A blob smaller than the tail keeps the tail's first bytes.
            let tail_len = self.spec.size - body_len;
            let from = (self.pos - body_len) as usize;
            let to = (self.end.min(body_len + tail_len) - body_len) as usize;
            Bytes::copy_from_slice(&self.spec.tail[from..to])
        };
        self.pos += out.len() as u64;
        Some(out)
    }
}

/// `sha256:<hex>` of literal bytes (configs, manifests).
pub fn sha256_digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        sha256_digest(b)
    }

    #[test]
    fn same_seed_same_bytes() {
        let a = DataGen::new(7, 1)
            .blob(3, 5, 3 * 1024 * 1024 + 17)
            .to_bytes();
        let b = DataGen::new(7, 1)
            .blob(3, 5, 3 * 1024 * 1024 + 17)
            .to_bytes();
        assert_eq!(a, b);
        let c = DataGen::new(8, 1)
            .blob(3, 5, 3 * 1024 * 1024 + 17)
            .to_bytes();
        assert_ne!(a, c);
    }

    #[test]
    fn digest_matches_content_and_ids_differ() {
        let g = DataGen::new(42, 9);
        for size in [0u64, 1, 23, 24, 25, 4096, POOL_SIZE as u64 + 1000] {
            let s1 = g.blob(1, 1, size);
            let s2 = g.blob(1, 2, size);
            assert_eq!(g.digest(&s1), sha(&s1.to_bytes()), "size {size}");
            // Second call goes through the cached body state.
            assert_eq!(g.digest(&s2), sha(&s2.to_bytes()), "size {size}");
            assert_eq!(s1.to_bytes().len() as u64, size);
            if size > 0 {
                assert_ne!(g.digest(&s1), g.digest(&s2));
            }
        }
    }

    #[test]
    fn ranges_concatenate_to_whole() {
        let g = DataGen::new(1, 2);
        let s = g.blob(9, 9, 2 * POOL_SIZE as u64 + 333);
        let whole = s.to_bytes();
        let mut joined = Vec::new();
        let step = 3 * 1024 * 1024 + 1;
        let mut at = 0;
        while at < s.size() {
            let end = (at + step).min(s.size());
            for c in s.chunks(at..end) {
                joined.extend_from_slice(&c);
            }
            at = end;
        }
        assert_eq!(joined, whole);
    }
}
