//! The OCI value types every layer shares: content digests, repository
//! names, tags and references, validated against the grammars of the OCI
//! specifications. This module is the leaf of the crate: it uses nothing of
//! Trow's own, so `storage` and `meta` can name a digest without depending on
//! the registry layer above them.

pub mod digest;
pub mod image_ref;
pub mod names;
pub mod pattern;

pub use digest::{Algorithm, Digest, DigestError, DigestHasher};
pub use image_ref::{ImageRef, ImageRefError};
pub use names::{Reference, ReferenceError, RepoName, Tag};
pub use pattern::{RepoPattern, RepoPatterns};
