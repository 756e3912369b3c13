//! Header names of the Distribution API and small helpers to read and write
//! them.

use axum::http::{HeaderMap, HeaderName, HeaderValue};

pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
pub const DOCKER_UPLOAD_UUID: HeaderName = HeaderName::from_static("docker-upload-uuid");
pub const DOCKER_API_VERSION: HeaderName =
    HeaderName::from_static("docker-distribution-api-version");
pub const OCI_SUBJECT: HeaderName = HeaderName::from_static("oci-subject");
pub const OCI_NAMESPACE: HeaderName = HeaderName::from_static("oci-namespace");
pub const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// The `Range` header value describing an upload of `size` bytes:
/// `0-<last byte>`, and `0-0` for an empty upload (as Distribution answers).
pub fn upload_range(size: u64) -> String {
    format!("0-{}", size.saturating_sub(1))
}

/// A header's value as a string, if present and valid.
pub fn get(headers: &HeaderMap, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A header value from a string we built; our values are always valid, but
/// fall back to an empty value rather than panic.
pub fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static(""))
}
