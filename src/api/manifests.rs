//! `GET`/`HEAD`/`PUT`/`DELETE /v2/<name>/manifests/<reference>`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::TryStreamExt as _;

use super::error::{ApiError, ApiResult};
use super::headers::{self, DOCKER_CONTENT_DIGEST, OCI_SUBJECT};
use super::{mark_proxied, proxy_target, repo_name, AppState};
use crate::meta::ManifestRecord;
use crate::oci::names::{Reference, ReferenceError};
use crate::registry::error::RegistryError;

/// Parses a reference. A malformed digest is `DIGEST_INVALID`; a malformed tag
/// can name nothing stored, so reads answer `MANIFEST_UNKNOWN` and pushes
/// `MANIFEST_INVALID`.
fn reference(s: &str, for_push: bool) -> Result<Reference, ApiError> {
    Reference::parse(s).map_err(|e| {
        ApiError::Registry(match e {
            ReferenceError::Digest(m) => RegistryError::DigestInvalid(m),
            ReferenceError::Tag(m) if for_push => RegistryError::ManifestInvalid(m),
            ReferenceError::Tag(m) => RegistryError::ManifestUnknown(m),
        })
    })
}

fn manifest_headers(record: &ManifestRecord) -> Vec<(header::HeaderName, header::HeaderValue)> {
    vec![
        (header::CONTENT_TYPE, headers::value(&record.media_type)),
        (
            header::CONTENT_LENGTH,
            headers::value(&record.size.to_string()),
        ),
        (
            DOCKER_CONTENT_DIGEST,
            headers::value(&record.digest.to_string()),
        ),
        (
            header::ETAG,
            headers::value(&format!("\"{}\"", record.digest)),
        ),
    ]
}

fn with_headers(
    status: StatusCode,
    hs: Vec<(header::HeaderName, header::HeaderValue)>,
    body: Body,
) -> Response {
    let mut response = (status, body).into_response();
    for (k, v) in hs {
        response.headers_mut().insert(k, v);
    }
    response
}

pub async fn get(
    state: AppState,
    name: &str,
    reference_str: &str,
    req: Request,
    head: bool,
) -> ApiResult {
    let repo = repo_name(name)?;
    let reference = reference(reference_str, false)?;
    if let Some(target) = proxy_target(&state, &repo, &req)? {
        let (manifest, outcome) = state.proxy.manifest(&target, &reference).await?;
        let body = if head {
            Body::empty()
        } else {
            Body::from(manifest.bytes)
        };
        let mut response = with_headers(StatusCode::OK, manifest_headers(&manifest.record), body);
        mark_proxied(&mut response, &target, outcome);
        return Ok(response);
    }
    if head {
        let record = state.registry.manifest_record(&repo, &reference).await?;
        return Ok(with_headers(
            StatusCode::OK,
            manifest_headers(&record),
            Body::empty(),
        ));
    }
    let manifest = state.registry.get_manifest(&repo, &reference).await?;
    Ok(with_headers(
        StatusCode::OK,
        manifest_headers(&manifest.record),
        Body::from(manifest.bytes),
    ))
}

pub async fn put(state: AppState, name: &str, reference_str: &str, req: Request) -> ApiResult {
    let repo = repo_name(name)?;
    let reference = reference(reference_str, true)?;
    let limit = state.registry.limits().max_manifest_size;
    let too_large = |size: u64| ApiError::Registry(RegistryError::ManifestTooLarge { size, limit });
    if let Some(len) =
        headers::get(req.headers(), header::CONTENT_LENGTH).and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(too_large(len));
        }
    }
    let content_type = headers::get(req.headers(), header::CONTENT_TYPE).map(str::to_string);
    let bytes = match read_body(req.into_body(), limit).await {
        Ok(bytes) => bytes,
        Err(BodyError::TooLarge(size)) => return Err(too_large(size)),
        Err(BodyError::Interrupted(e)) => {
            return Err(ApiError::Registry(RegistryError::ManifestInvalid(format!(
                "the request body ended early ({e}); push the manifest again"
            ))))
        }
    };
    let (digest, subject) = state
        .registry
        .put_manifest(&repo, &reference, content_type.as_deref(), bytes)
        .await?;
    let mut hs = vec![
        (
            header::LOCATION,
            headers::value(&state.url(&format!("/v2/{repo}/manifests/{digest}"))),
        ),
        (DOCKER_CONTENT_DIGEST, headers::value(&digest.to_string())),
        (header::CONTENT_LENGTH, headers::value("0")),
    ];
    if let Some(subject) = subject {
        hs.push((OCI_SUBJECT, headers::value(&subject.to_string())));
    }
    Ok(with_headers(StatusCode::CREATED, hs, Body::empty()))
}

enum BodyError {
    /// At least this many bytes, over the limit.
    TooLarge(u64),
    /// The client disconnected or stopped sending (the body idle timeout).
    Interrupted(axum::Error),
}

/// Reads a manifest body of at most `limit` bytes, stopping as soon as it
/// is larger, so an oversized body is never held whole. A body that arrives
/// in one frame is returned as is, without a copy.
async fn read_body(body: Body, limit: u64) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut chunks = Vec::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.try_next().await.map_err(BodyError::Interrupted)? {
        size += chunk.len() as u64;
        if size > limit {
            return Err(BodyError::TooLarge(size));
        }
        chunks.push(chunk);
    }
    Ok(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => Bytes::from(chunks.concat()),
    })
}

pub async fn delete(state: AppState, name: &str, reference_str: &str) -> ApiResult {
    let repo = repo_name(name)?;
    let reference = reference(reference_str, false)?;
    state.registry.delete_manifest(&repo, &reference).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}
