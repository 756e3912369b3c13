//! The registry's typed errors. Each variant corresponds to one OCI error code;
//! `api::error` maps them to HTTP status codes and the error envelope in one
//! place. Messages are written for the person at the client: they say what
//! went wrong and what to do.

use super::quota::LimitExceeded;
use crate::meta::MetaError;
use crate::storage::StorageError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("blob unknown to this repository")]
    BlobUnknown(String),

    #[error(
        "blob upload unknown: the upload session does not exist or has expired; start a new upload"
    )]
    BlobUploadUnknown,

    #[error("blob upload invalid: {0}")]
    BlobUploadInvalid(String),

    /// A chunk's `Content-Range` does not start where the upload ends. The
    /// client should ask for the upload's status and resume from there.
    #[error("chunk out of order: the upload holds {size} bytes, so the next chunk must start at offset {size}")]
    UploadRangeInvalid { size: u64 },

    /// A `Range` request for a blob lies outside the blob.
    #[error("requested range not satisfiable: the blob is {size} bytes long")]
    RangeNotSatisfiable { size: u64 },

    #[error("digest invalid: {0}")]
    DigestInvalid(String),

    #[error("manifest references {0}, which is not in this repository: push the blob (or child manifest) first")]
    ManifestBlobUnknown(String),

    #[error("manifest invalid: {0}")]
    ManifestInvalid(String),

    #[error("manifest unknown: {0}")]
    ManifestUnknown(String),

    #[error("invalid repository name: {0}")]
    NameInvalid(String),

    #[error("repository `{0}` is not known to this registry")]
    NameUnknown(String),

    #[error("size invalid: {0}")]
    SizeInvalid(String),

    #[error("manifest is {size} bytes, larger than this registry's limit of {limit} bytes (see --max-manifest-size)")]
    ManifestTooLarge { size: u64, limit: u64 },

    #[error("invalid pagination: {0}")]
    PaginationNumberInvalid(String),

    /// A pull-through request for an upstream Trow may not contact (not
    /// listed in the configuration); the message says what to add.
    #[error("{0}")]
    UpstreamNotListed(String),

    /// An upstream registry failed and nothing cached could stand in.
    #[error("{0}")]
    UpstreamFailed(String),

    /// An upstream registry is rate limiting and nothing cached could stand in.
    #[error(
        "upstream registry {host} is rate limiting pulls and this image is not cached; retry later"
    )]
    UpstreamRateLimited {
        host: String,
        retry_after: Option<String>,
    },

    #[error("unsupported: {0}")]
    Unsupported(String),

    /// A push over a storage quota or a blob size limit (403 `DENIED`);
    /// nothing of it was kept.
    #[error("{0}")]
    LimitExceeded(LimitExceeded),

    /// A storage failure the client cannot fix (I/O errors).
    #[error(transparent)]
    Storage(StorageError),

    /// A conflict with a removal in progress: retrying shortly succeeds.
    #[error("temporarily unavailable: {0}")]
    Unavailable(String),

    /// A metadata failure the client cannot fix (see `From<MetaError>` in
    /// `registry`, which maps the others).
    #[error(transparent)]
    Meta(MetaError),
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl From<StorageError> for RegistryError {
    /// Storage errors that the client caused become the matching OCI error;
    /// the rest stay internal.
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::DigestMismatch { expected, actual } => RegistryError::DigestInvalid(format!(
                "the uploaded content hashes to {actual}, not {expected}; the upload was discarded, push the blob again"
            )),
            StorageError::UploadNotFound => RegistryError::BlobUploadUnknown,
            StorageError::UploadOffsetMismatch { size, .. } => RegistryError::UploadRangeInvalid { size },
            StorageError::RangeNotSatisfiable { size } => RegistryError::RangeNotSatisfiable { size },
            StorageError::BodyInterrupted(e) => RegistryError::BlobUploadInvalid(format!(
                "the request body ended early ({e}); ask for the upload's status (GET) and resume from the offset it gives"
            )),
            StorageError::Digest(e) => RegistryError::DigestInvalid(e.to_string()),
            io @ StorageError::Io(_) => RegistryError::Storage(io),
        }
    }
}
