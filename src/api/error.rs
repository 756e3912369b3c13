//! The one place where registry errors become HTTP responses: status code,
//! OCI error code and the `{"errors":[{"code","message","detail"}]}` envelope.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::registry::error::RegistryError;
use crate::registry::quota::LimitExceeded;

/// An error on its way to the client.
#[derive(Debug)]
pub enum ApiError {
    Registry(RegistryError),
    /// The path names no endpoint.
    NotFound,
    /// The endpoint exists but not with this method.
    MethodNotAllowed,
    /// 401 `UNAUTHORIZED`: no credentials, bad credentials or a token that
    /// does not do. `challenge` is the `WWW-Authenticate` value.
    Unauthorized {
        challenge: String,
        message: &'static str,
    },
    /// 403 `DENIED`: the caller is known but may not do this.
    Denied(String),
    /// 429 `TOOMANYREQUESTS` with `Retry-After` (seconds).
    TooManyRequests {
        retry_after: u64,
    },
    /// 400 `QUERY_INVALID`: a query parameter of a listing or referrers
    /// request that cannot be read (given twice). The OCI codes have none
    /// for this; a bad page size is `PAGINATION_NUMBER_INVALID`.
    QueryInvalid(String),
    /// A request to an admission webhook that is not an AdmissionReview it
    /// can answer: 413, 415 or 400 with the reason.
    Admission(super::admission::AdmissionRequestError),
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        ApiError::Registry(e)
    }
}

impl From<crate::storage::StorageError> for ApiError {
    fn from(e: crate::storage::StorageError) -> Self {
        ApiError::Registry(e.into())
    }
}

pub type ApiResult<T = Response> = Result<T, ApiError>;

/// Status and OCI code for each error.
fn classify(e: &RegistryError) -> (StatusCode, &'static str) {
    use RegistryError::*;
    match e {
        BlobUnknown(_) => (StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        BlobUploadUnknown => (StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN"),
        BlobUploadInvalid(_) => (StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID"),
        UploadRangeInvalid { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UPLOAD_INVALID"),
        RangeNotSatisfiable { .. } => (StatusCode::RANGE_NOT_SATISFIABLE, "BLOB_UNKNOWN"),
        DigestInvalid(_) => (StatusCode::BAD_REQUEST, "DIGEST_INVALID"),
        ManifestBlobUnknown(_) => (StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN"),
        ManifestInvalid(_) => (StatusCode::BAD_REQUEST, "MANIFEST_INVALID"),
        ManifestUnknown(_) => (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN"),
        NameInvalid(_) => (StatusCode::BAD_REQUEST, "NAME_INVALID"),
        NameUnknown(_) | UpstreamNotListed(_) => (StatusCode::NOT_FOUND, "NAME_UNKNOWN"),
        SizeInvalid(_) => (StatusCode::BAD_REQUEST, "SIZE_INVALID"),
        ManifestTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
        PaginationNumberInvalid(_) => (StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID"),
        UpstreamFailed(_) => (StatusCode::BAD_GATEWAY, "UNKNOWN"),
        UpstreamRateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS"),
        Unsupported(_) => (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED"),
        // The spec's code for an operation the registry does not allow; the
        // message says which limit, how full it is and what to do.
        LimitExceeded(_) => (StatusCode::FORBIDDEN, "DENIED"),
        // Distribution's code for 503; clients retry 5xx answers.
        Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        Storage(_) | Meta(_) => (StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN"),
    }
}

/// Builds an error envelope response.
pub fn envelope(
    status: StatusCode,
    code: &str,
    message: &str,
    detail: serde_json::Value,
) -> Response {
    let body = json!({ "errors": [{ "code": code, "message": message, "detail": detail }] });
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::NotFound => envelope(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "no such endpoint; see the OCI Distribution Specification for the /v2/ API",
                serde_json::Value::Null,
            ),
            ApiError::MethodNotAllowed => envelope(
                StatusCode::METHOD_NOT_ALLOWED,
                "UNSUPPORTED",
                "this endpoint does not support that HTTP method",
                serde_json::Value::Null,
            ),
            ApiError::Unauthorized { challenge, message } => {
                let mut r = envelope(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    message,
                    serde_json::Value::Null,
                );
                if let Ok(v) = HeaderValue::from_str(&challenge) {
                    r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                }
                r
            }
            ApiError::Admission(e) => {
                use super::admission::AdmissionRequestError as E;
                let (status, code) = match &e {
                    E::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID"),
                    E::MediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED"),
                    E::Malformed(_) | E::Body(_) => {
                        (StatusCode::BAD_REQUEST, "ADMISSION_REVIEW_INVALID")
                    }
                };
                envelope(status, code, &e.to_string(), serde_json::Value::Null)
            }
            ApiError::QueryInvalid(message) => envelope(
                StatusCode::BAD_REQUEST,
                "QUERY_INVALID",
                &message,
                serde_json::Value::Null,
            ),
            ApiError::Denied(message) => envelope(
                StatusCode::FORBIDDEN,
                "DENIED",
                &message,
                serde_json::Value::Null,
            ),
            ApiError::TooManyRequests { retry_after } => {
                let mut r = envelope(
                    StatusCode::TOO_MANY_REQUESTS,
                    "TOOMANYREQUESTS",
                    "too many failed logins from your address; wait before trying again",
                    json!({ "retry_after_seconds": retry_after }),
                );
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                r
            }
            ApiError::Registry(e) => {
                let (status, code) = classify(&e);
                let internal = matches!(e, RegistryError::Storage(_) | RegistryError::Meta(_));
                let message = if internal {
                    // Internal details go to the log, not to the client.
                    tracing::error!(error = %e, "request failed");
                    "internal error in the registry; the registry's log has the cause".to_string()
                } else {
                    e.to_string()
                };
                let detail = match &e {
                    RegistryError::BlobUnknown(d) => json!({ "digest": d }),
                    RegistryError::NameUnknown(n) => json!({ "name": n }),
                    RegistryError::UploadRangeInvalid { size }
                    | RegistryError::RangeNotSatisfiable { size } => {
                        json!({ "size": size })
                    }
                    RegistryError::ManifestTooLarge { size, limit } => {
                        json!({ "size": size, "limit": limit })
                    }
                    RegistryError::LimitExceeded(LimitExceeded::Quota {
                        repos,
                        limit,
                        used,
                        adding,
                        more,
                    }) => json!({
                        "limit": "quota",
                        "repos": repos,
                        "max_size": limit,
                        "used": used,
                        "size": adding,
                        "size_at_least": more,
                    }),
                    RegistryError::LimitExceeded(LimitExceeded::BlobSize {
                        limit,
                        size,
                        more,
                        source,
                    }) => json!({
                        "limit": "max_blob_size",
                        "source": source.to_string(),
                        "max_blob_size": limit,
                        "size": size,
                        "size_at_least": more,
                    }),
                    _ => serde_json::Value::Null,
                };
                let mut response = envelope(status, code, &message, detail);
                let headers = response.headers_mut();
                match e {
                    // Tell the client where the upload really is, so it can resume.
                    RegistryError::UploadRangeInvalid { size } => {
                        if let Ok(v) = HeaderValue::from_str(&super::headers::upload_range(size)) {
                            headers.insert(header::RANGE, v);
                        }
                    }
                    RegistryError::RangeNotSatisfiable { size } => {
                        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                            headers.insert(header::CONTENT_RANGE, v);
                        }
                    }
                    RegistryError::Unavailable(_) => {
                        headers.insert(header::RETRY_AFTER, HeaderValue::from(1u32));
                    }
                    RegistryError::UpstreamRateLimited {
                        retry_after: Some(after),
                        ..
                    } => {
                        if let Ok(v) = HeaderValue::from_str(&after) {
                            headers.insert(header::RETRY_AFTER, v);
                        }
                    }
                    _ => {}
                }
                response
            }
        }
    }
}
