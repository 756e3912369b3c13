//! Blob uploads: `POST /v2/<name>/blobs/uploads/` (start, monolithic push,
//! cross-repository mount) and `GET`/`PATCH`/`PUT`/`DELETE
//! /v2/<name>/blobs/uploads/<id>`.

use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::{ApiError, ApiResult};
use super::headers::{self, DOCKER_CONTENT_DIGEST, DOCKER_UPLOAD_UUID};
use super::{body_stream, parse_digest, query, repo_name, AppState};
use crate::oci::Digest;
use crate::oci::RepoName;
use crate::registry::error::RegistryError;
use crate::registry::{Chunk, MountOutcome};

#[derive(Deserialize, Default)]
struct UploadQuery {
    digest: Option<String>,
    mount: Option<String>,
    from: Option<String>,
}

/// An upload's query string that cannot be read (a parameter given twice).
fn upload_query_invalid(message: String) -> ApiError {
    ApiError::Registry(RegistryError::BlobUploadInvalid(message))
}

/// 202 Accepted for an upload in progress, telling the client where to send
/// the next chunk and how much we hold.
fn in_progress(
    state: &AppState,
    repo: &RepoName,
    id: &str,
    size: u64,
    status: StatusCode,
) -> Response {
    (
        status,
        [
            (
                header::LOCATION,
                headers::value(&state.url(&format!("/v2/{repo}/blobs/uploads/{id}"))),
            ),
            (header::RANGE, headers::value(&headers::upload_range(size))),
            (DOCKER_UPLOAD_UUID, headers::value(id)),
            (header::CONTENT_LENGTH, headers::value("0")),
        ],
    )
        .into_response()
}

/// 201 Created for a blob now in the repository.
fn created(state: &AppState, repo: &RepoName, digest: &Digest) -> Response {
    (
        StatusCode::CREATED,
        [
            (
                header::LOCATION,
                headers::value(&state.url(&format!("/v2/{repo}/blobs/{digest}"))),
            ),
            (DOCKER_CONTENT_DIGEST, headers::value(&digest.to_string())),
            (header::CONTENT_LENGTH, headers::value("0")),
        ],
    )
        .into_response()
}

pub async fn start(state: AppState, name: &str, req: Request) -> ApiResult {
    let repo = repo_name(name)?;
    let q: UploadQuery = query(&req, upload_query_invalid)?;
    if let Some(mount) = q.mount.as_deref() {
        let digest = parse_digest(mount)?;
        let from = q.from.as_deref().map(repo_name).transpose()?;
        return Ok(
            match state
                .registry
                .mount_blob(&repo, &digest, from.as_ref())
                .await?
            {
                MountOutcome::Mounted { .. } => created(&state, &repo, &digest),
                MountOutcome::UploadStarted { id } => {
                    in_progress(&state, &repo, &id, 0, StatusCode::ACCEPTED)
                }
            },
        );
    }
    if let Some(digest) = q.digest.as_deref() {
        let digest = parse_digest(digest)?;
        let len = content_length(req.headers());
        let chunk = Chunk {
            offset: None,
            len,
            body: body_stream(req.into_body()),
        };
        state.registry.push_blob(&repo, &digest, chunk).await?;
        return Ok(created(&state, &repo, &digest));
    }
    let id = state.registry.start_upload(&repo).await?;
    Ok(in_progress(&state, &repo, &id, 0, StatusCode::ACCEPTED))
}

pub async fn status(state: AppState, name: &str, id: &str) -> ApiResult {
    let repo = repo_name(name)?;
    let size = state.registry.upload_size(&repo, id).await?;
    Ok(in_progress(&state, &repo, id, size, StatusCode::NO_CONTENT))
}

/// `Content-Length`, when the client sent one that reads as a number.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers::get(headers, header::CONTENT_LENGTH).and_then(|v| v.trim().parse::<u64>().ok())
}

/// A chunk's body with its start offset, from `Content-Range: <start>-<end>`
/// (also accepting the `bytes <start>-<end>/<total>` form some clients
/// send), and its length, from `Content-Length` or else the range; the two
/// must agree.
fn chunk(req: Request) -> Result<Chunk, ApiError> {
    let headers = req.headers();
    let declared = content_length(headers);
    let Some(raw) = headers::get(headers, header::CONTENT_RANGE) else {
        return Ok(Chunk {
            offset: None,
            len: declared,
            body: body_stream(req.into_body()),
        });
    };
    let bad = || {
        ApiError::Registry(RegistryError::BlobUploadInvalid(format!(
            "Content-Range `{raw}` is not of the form <start>-<end>"
        )))
    };
    let spec = raw.trim().trim_start_matches("bytes").trim();
    let spec = spec.split('/').next().unwrap_or("");
    let (start, end) = spec.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end: u64 = end.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    let span = end - start + 1;
    if let Some(len) = declared {
        if len != span {
            return Err(ApiError::Registry(RegistryError::BlobUploadInvalid(
                format!("Content-Range `{raw}` covers {span} bytes but Content-Length is {len}"),
            )));
        }
    }
    Ok(Chunk {
        offset: Some(start),
        len: Some(span),
        body: body_stream(req.into_body()),
    })
}

pub async fn patch(state: AppState, name: &str, id: &str, req: Request) -> ApiResult {
    let repo = repo_name(name)?;
    let size = state.registry.append_upload(&repo, id, chunk(req)?).await?;
    Ok(in_progress(&state, &repo, id, size, StatusCode::ACCEPTED))
}

pub async fn put(state: AppState, name: &str, id: &str, req: Request) -> ApiResult {
    let repo = repo_name(name)?;
    let q: UploadQuery = query(&req, upload_query_invalid)?;
    let digest = q.digest.as_deref().ok_or_else(|| {
        ApiError::Registry(RegistryError::DigestInvalid(
            "the final PUT of an upload needs a ?digest=<algorithm>:<hex> query parameter".into(),
        ))
    })?;
    let digest = parse_digest(digest)?;
    let chunk = chunk(req)?;
    // `Content-Length: 0`: nothing to append.
    let last_chunk = (chunk.len != Some(0)).then_some(chunk);
    state
        .registry
        .finish_upload(&repo, id, &digest, last_chunk)
        .await?;
    Ok(created(&state, &repo, &digest))
}

pub async fn cancel(state: AppState, name: &str, id: &str) -> ApiResult {
    let repo = repo_name(name)?;
    state.registry.cancel_upload(&repo, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
