//! Content discovery: `GET /v2/_catalog` and `GET /v2/<name>/tags/list`, with
//! `n`/`last` pagination and an RFC 5988 `Link` header to the next page.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde_json::json;

use super::error::{ApiError, ApiResult};
use super::headers;
use super::{query_pairs, repo_name, single_param, AppState};
use crate::auth::CatalogFilter;
use crate::meta::Page;
use crate::registry::error::RegistryError;

/// Characters escaped in the `last` of a `Link`: everything but what names
/// and tags are made of, so links stay readable.
const LINK_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'.')
    .remove(b'-')
    .remove(b'_')
    .remove(b'/');

/// The largest page we return; also the page size when `n` is not given.
pub const MAX_PAGE: u32 = 10_000;

/// The page size and start key from the query string: a bad or repeated
/// `n` is `PAGINATION_NUMBER_INVALID`, a repeated `last` `QUERY_INVALID`.
fn page_params(req: &Request) -> Result<(u32, Option<String>), ApiError> {
    let pairs = query_pairs(req);
    let bad_n = |m: String| ApiError::Registry(RegistryError::PaginationNumberInvalid(m));
    let n = match single_param(&pairs, "n").map_err(bad_n)? {
        None | Some("") => MAX_PAGE,
        Some(s) => s.parse::<u32>().map_err(|_| {
            bad_n(format!(
                "n must be a whole number from 0 to {MAX_PAGE}, not `{s}`"
            ))
        })?,
    };
    let last = single_param(&pairs, "last").map_err(ApiError::QueryInvalid)?;
    Ok((
        n.min(MAX_PAGE),
        last.filter(|l| !l.is_empty()).map(str::to_string),
    ))
}

/// A JSON listing with a `Link` header when more items follow.
fn paged(state: &AppState, path: &str, n: u32, page: &Page, body: serde_json::Value) -> Response {
    let mut response = (StatusCode::OK, Json(body)).into_response();
    if let (true, Some(last)) = (page.more, page.items.last()) {
        let last = utf8_percent_encode(last, LINK_ESCAPE);
        let link = format!("<{}?n={n}&last={last}>; rel=\"next\"", state.url(path));
        response
            .headers_mut()
            .insert(header::LINK, headers::value(&link));
    }
    response
}

pub async fn catalog(State(state): State<AppState>, req: Request) -> Response {
    let params = page_params(&req);
    // Set by the auth guard when the caller may pull only some repositories.
    let filter = req.extensions().get::<CatalogFilter>().cloned();
    drop(req);
    let result: ApiResult = async {
        let (n, last) = params?;
        let page = match &filter {
            None => state.registry.catalog(n, last.as_deref()).await?,
            Some(f) => filtered_catalog(&state, f, n, last).await?,
        };
        let body = json!({ "repositories": page.items });
        Ok(paged(&state, "/v2/_catalog", n, &page, body))
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

/// A catalog page of the repositories `filter` lets through: reads the
/// catalog in batches until `n` are found and one more shows that the list
/// goes on, so `Link` and `last` work as without a filter.
async fn filtered_catalog(
    state: &AppState,
    filter: &CatalogFilter,
    n: u32,
    last: Option<String>,
) -> Result<Page, RegistryError> {
    let batch = n.saturating_add(1).clamp(100, MAX_PAGE);
    let mut items = Vec::new();
    let mut cursor = last;
    loop {
        let page = state.registry.catalog(batch, cursor.as_deref()).await?;
        for name in &page.items {
            if filter.allows(name) {
                if items.len() == n as usize {
                    return Ok(Page { items, more: true });
                }
                items.push(name.clone());
            }
        }
        if !page.more || page.items.is_empty() {
            return Ok(Page { items, more: false });
        }
        cursor = page.items.last().cloned();
    }
}

pub async fn tags(state: AppState, name: &str, req: Request) -> ApiResult {
    let repo = repo_name(name)?;
    let (n, last) = page_params(&req)?;
    let page = state.registry.list_tags(&repo, n, last.as_deref()).await?;
    let body = json!({ "name": repo.as_str(), "tags": page.items });
    Ok(paged(
        &state,
        &format!("/v2/{repo}/tags/list"),
        n,
        &page,
        body,
    ))
}
