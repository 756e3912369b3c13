//! `GET /v2/<name>/referrers/<digest>`: an OCI image index of the manifests
//! whose `subject` is the digest, optionally filtered by `artifactType`.

use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{json, Value};

use super::error::{ApiError, ApiResult};
use super::headers::{self, OCI_FILTERS_APPLIED};
use super::{parse_digest, query, repo_name, AppState};
use crate::registry::manifest::OCI_INDEX;

#[derive(Deserialize)]
struct ReferrersQuery {
    #[serde(rename = "artifactType")]
    artifact_type: Option<String>,
}

pub async fn list(state: AppState, name: &str, digest: &str, req: Request) -> ApiResult {
    let repo = repo_name(name)?;
    let digest = parse_digest(digest)?;
    let q: ReferrersQuery = query(&req, ApiError::QueryInvalid)?;
    let filter = q.artifact_type.as_deref().filter(|t| !t.is_empty());
    let records = state.registry.referrers(&repo, &digest, filter).await?;
    let manifests: Vec<Value> = records
        .iter()
        .map(|r| {
            let mut d = json!({
                "mediaType": r.media_type,
                "digest": r.digest.to_string(),
                "size": r.size,
            });
            if let Some(t) = &r.artifact_type {
                d["artifactType"] = json!(t);
            }
            if let Some(a) = r
                .annotations
                .as_deref()
                .and_then(|a| serde_json::from_str::<Value>(a).ok())
            {
                d["annotations"] = a;
            }
            d
        })
        .collect();
    let body = json!({ "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests });
    let mut response = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, headers::value(OCI_INDEX))],
        body.to_string(),
    )
        .into_response();
    if filter.is_some() {
        response
            .headers_mut()
            .insert(OCI_FILTERS_APPLIED, headers::value("artifactType"));
    }
    Ok(response)
}
