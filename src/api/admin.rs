//! Operator endpoints: `POST /admin/gc` (a garbage collection pass, or with
//! `?dry_run=true` what one would delete), `GET /admin/history/<name>`
//! (what a repository's tags pointed to, and when) and `GET /admin/verify`
//! (whether an image carries a signature its policy accepts).
//!
//! `/admin/gc` needs a user with the `admin` permission: the guard checks
//! it when logins are on, and with logins off it is refused (an open
//! registry must not let anyone delete; `trow gc` runs offline instead).
//! `/admin/verify` is admin-only the same way: it makes Trow fetch from
//! upstreams.

use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::json;

use super::error::{ApiError, ApiResult};
use super::{query, repo_name, AppState};
use crate::auth::Identity;
use crate::oci::Tag;

#[derive(Deserialize, Default)]
struct GcQuery {
    dry_run: Option<String>,
}

/// Whether the request comes from a logged-in user (whom the guard has
/// checked for the `admin` permission).
fn is_admin(state: &AppState, req: &Request) -> bool {
    state.auth.is_some()
        && req
            .extensions()
            .get::<Identity>()
            .is_some_and(|who| who.user().is_some())
}

/// `POST /admin/gc[?dry_run=true]`: one pass, answered with its report.
pub async fn gc(State(state): State<AppState>, req: Request) -> ApiResult {
    if !is_admin(&state, &req) {
        return Err(ApiError::Denied(
            "garbage collection on demand needs a login with the `admin` permission; without logins, run `trow gc` while the server is stopped".into(),
        ));
    }
    let q: GcQuery = query(&req, ApiError::QueryInvalid)?;
    let dry_run = match q.dry_run.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::QueryInvalid(format!(
                "dry_run must be true or false, not `{other}`"
            )))
        }
    };
    let report = state
        .registry
        .collect_garbage(&state.gc.policies, &state.gc.options(dry_run))
        .await?;
    state.metrics.observe_gc(&report.pass_metrics());
    Ok(Json(report).into_response())
}

#[derive(Deserialize, Default)]
struct HistoryQuery {
    tag: Option<String>,
    /// RFC 3339 time: only the entry in effect then.
    at: Option<String>,
    n: Option<u32>,
}

/// Most entries returned at once.
const MAX_HISTORY: u32 = 1000;

fn rfc3339(unix: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}

/// `GET /admin/history/<name>[?tag=<tag>][&at=<time>][&n=<count>]`: the
/// history of a repository's tags, newest first.
pub async fn history(State(state): State<AppState>, req: Request) -> ApiResult<Response> {
    let name = req
        .uri()
        .path()
        .strip_prefix("/admin/history/")
        .unwrap_or("")
        .to_string();
    let repo = repo_name(&name)?;
    let q: HistoryQuery = query(&req, ApiError::QueryInvalid)?;
    let tag = q
        .tag
        .as_deref()
        .map(|t| Tag::parse(t).map_err(|e| ApiError::QueryInvalid(format!("tag: {e}"))))
        .transpose()?;
    let at =
        q.at.as_deref()
            .map(|t| {
                humantime::parse_rfc3339_weak(t)
                    .map_err(|e| {
                        ApiError::QueryInvalid(format!(
                            "at=`{t}` is not an RFC 3339 time such as 2026-12-01T10:00:00Z: {e}"
                        ))
                    })
                    .map(|t| {
                        t.duration_since(UNIX_EPOCH)
                            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
                    })
            })
            .transpose()?;
    let n = q.n.unwrap_or(100).min(MAX_HISTORY);
    let events = state
        .registry
        .tag_history(&repo, tag.as_ref().map(Tag::as_str), at, n)
        .await?;
    let entries: Vec<serde_json::Value> = events
        .iter()
        .map(|e| {
            json!({
                "tag": e.tag,
                "digest": e.digest.to_string(),
                "pushed_at": rfc3339(e.pushed_at),
                "replaced_at": e.replaced_at.map(rfc3339),
            })
        })
        .collect();
    Ok(Json(json!({ "name": repo.as_str(), "history": entries })).into_response())
}

#[derive(Deserialize)]
struct VerifyQuery {
    image: String,
    repo: String,
    reference: String,
}

/// `GET /admin/verify?image=<normalised name>&repo=<repository>&reference=<tag or digest>`:
/// `{"verified": "<digest>"}` when a signature by one of the keys of the
/// policies covering `image` verifies for the digest `repo:reference`
/// resolves to (the call an admission webhook makes), else 403 `DENIED`
/// with the reason.
pub async fn verify(State(state): State<AppState>, req: Request) -> ApiResult {
    if !is_admin(&state, &req) {
        return Err(ApiError::Denied(
            "signature verification on demand needs a login with the `admin` permission".into(),
        ));
    }
    let Some(verifier) = state.signatures.clone() else {
        return Err(ApiError::Denied(
            "no signature policies are configured (the `signatures` section of the configuration file)".into(),
        ));
    };
    let q: VerifyQuery = query(&req, ApiError::QueryInvalid)?;
    if !verifier.applies(&q.image) {
        return Err(ApiError::Denied(format!(
            "image {}: no signature policy covers it (signatures.policies in the configuration file)",
            q.image
        )));
    }
    let digest = verifier
        .verify(&q.image, &q.repo, &q.reference)
        .await
        .map_err(ApiError::Denied)?;
    Ok(Json(json!({ "image": q.image, "verified": digest.to_string() })).into_response())
}
