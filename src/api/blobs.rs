//! `GET`/`HEAD`/`DELETE /v2/<name>/blobs/<digest>`.

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode, Version};
use axum::response::IntoResponse;

use super::error::ApiResult;
use super::headers::{self, DOCKER_CONTENT_DIGEST};
use super::{mark_proxied, parse_digest, proxy_target, repo_name, AppState};
use crate::listen::PlainConnection;
use crate::storage::{Delivery, RangeRequest};

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
    let target = proxy_target(&state, &repo, &req)?;
    let mut response = if head {
        let size = match &target {
            Some(t) => state.proxy.blob_size(t, &digest).await?,
            None => state.registry.blob_size(&repo, &digest).await?,
        };
        let mut r = StatusCode::OK.into_response();
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, headers::value(&size.to_string()));
        r
    } else {
        let range = parse_range(req.headers());
        let delivery = delivery_for(&req);
        let (blob, outcome) = match &target {
            Some(t) => {
                let b = state.proxy.blob(t, &digest, range, delivery).await?;
                ((b.total_size, b.range, b.body), Some(b.outcome))
            }
            None => {
                let b = state
                    .registry
                    .read_blob(&repo, &digest, range, delivery)
                    .await?;
                ((Some(b.total_size), b.range, b.body), None)
            }
        };
        let (total, range, body) = blob;
        let mut r = Body::from_stream(body).into_response();
        let length = match (range, total) {
            (Some((first, last)), Some(total)) => {
                *r.status_mut() = StatusCode::PARTIAL_CONTENT;
                r.headers_mut().insert(
                    header::CONTENT_RANGE,
                    headers::value(&format!("bytes {first}-{last}/{total}")),
                );
                Some(last - first + 1)
            }
            _ => total,
        };
        // Without a known length (an upstream that did not send one) the
        // body is sent chunked.
        if let Some(length) = length {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, headers::value(&length.to_string()));
        }
        r.headers_mut()
            .insert(header::ETAG, headers::value(&format!("\"{digest}\"")));
        if let (Some(t), Some(outcome)) = (&target, outcome) {
            mark_proxied(&mut r, t, outcome);
        }
        r
    };
    let hs = response.headers_mut();
    hs.insert(
        header::CONTENT_TYPE,
        headers::value("application/octet-stream"),
    );
    hs.insert(header::ACCEPT_RANGES, headers::value("bytes"));
    hs.insert(DOCKER_CONTENT_DIGEST, headers::value(&digest.to_string()));
    if let (true, Some(t)) = (head, &target) {
        hs.insert(headers::OCI_NAMESPACE, headers::value(&t.host));
    }
    Ok(response)
}

/// How the response body will be written: only plain HTTP/1.x sockets take
/// the body's bytes as they are (HTTP/2 frames them, TLS encrypts them).
fn delivery_for(req: &Request) -> Delivery {
    match req.extensions().get::<PlainConnection>() {
        Some(PlainConnection(regions)) if req.version() <= Version::HTTP_11 => {
            Delivery::PlainSocket(regions.clone())
        }
        _ => Delivery::Buffered,
    }
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
