//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;

use super::error::ApiResult;
use super::headers::{self, DOCKER_CONTENT_DIGEST};
use super::{parse_digest, repo_name, AppState};
use crate::storage::RangeRequest;

/// Parses a single-range `Range: bytes=…` header. Anything else (several
/// ranges, other units, garbage) is ignored and the whole blob is served, as
/// RFC 9110 allows.
fn parse_range(headers: &HeaderMap) -> Option<RangeRequest> {
    let spec = headers::get(headers, header::RANGE)?
        .trim()
        .strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (start, end) = spec.split_once('-')?;
    let (start, end) = (start.trim(), end.trim());
    if start.is_empty() {
        return end.parse().ok().map(RangeRequest::Suffix);
    }
    let start = start.parse().ok()?;
    let end = if end.is_empty() {
        None
    } else {
        Some(end.parse().ok()?)
    };
    Some(RangeRequest::FromTo { start, end })
}

pub async fn get(state: AppState, name: &str, digest: &str, req: Request, head: bool) -> ApiResult {
    let repo = repo_name(name)?;
    let digest = parse_digest(digest)?;
    let digest_header = headers::value(&digest.to_string());
    if head {
        let size = state.registry.blob_size(&repo, &digest).await?;
        return Ok((
            StatusCode::OK,
            [
                (header::CONTENT_LENGTH, headers::value(&size.to_string())),
                (
                    header::CONTENT_TYPE,
                    headers::value("application/octet-stream"),
                ),
                (header::ACCEPT_RANGES, headers::value("bytes")),
                (DOCKER_CONTENT_DIGEST, digest_header),
            ],
        )
            .into_response());
    }
    let range = parse_range(req.headers());
    let blob = state.registry.read_blob(&repo, &digest, range).await?;
    let (status, length, content_range) = match blob.range {
        Some((first, last)) => (
            StatusCode::PARTIAL_CONTENT,
            last - first + 1,
            Some(format!("bytes {first}-{last}/{}", blob.total_size)),
        ),
        None => (StatusCode::OK, blob.total_size, None),
    };
    let mut response = (
        status,
        [
            (header::CONTENT_LENGTH, headers::value(&length.to_string())),
            (
                header::CONTENT_TYPE,
                headers::value("application/octet-stream"),
            ),
            (header::ACCEPT_RANGES, headers::value("bytes")),
            (header::ETAG, headers::value(&format!("\"{digest}\""))),
            (DOCKER_CONTENT_DIGEST, digest_header),
        ],
        Body::from_stream(blob.body),
    )
        .into_response();
    if let Some(cr) = content_range {
        response
            .headers_mut()
            .insert(header::CONTENT_RANGE, headers::value(&cr));
    }
    Ok(response)
}

pub async fn delete(state: AppState, name: &str, digest: &str) -> ApiResult {
    let repo = repo_name(name)?;
    let digest = parse_digest(digest)?;
    state.registry.delete_blob(&repo, &digest).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn range(v: &str) -> Option<RangeRequest> {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
        parse_range(&h)
    }

    #[test]
    fn parses_ranges() {
        assert_eq!(
            range("bytes=0-9"),
            Some(RangeRequest::FromTo {
                start: 0,
                end: Some(9)
            })
        );
        assert_eq!(
            range("bytes=5-"),
            Some(RangeRequest::FromTo {
                start: 5,
                end: None
            })
        );
        assert_eq!(range("bytes=-5"), Some(RangeRequest::Suffix(5)));
        assert_eq!(range("bytes=0-1,5-6"), None);
        assert_eq!(range("items=0-1"), None);
        assert_eq!(range("bytes=x-1"), None);
    }
}
