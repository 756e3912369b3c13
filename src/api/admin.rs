//! Operator endpoints: `POST /admin/gc` (a garbage collection pass, or with
//! `?dry_run=true` what one would delete) and `GET /admin/history/<name>`
//! (what a repository's tags pointed to, and when).
//!
//! `/admin/gc` needs a user with the `admin` permission: the guard checks
//! it when logins are on, and with logins off it is refused (an open
//! registry must not let anyone delete; `trow gc` runs offline instead).

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

/// `POST /admin/gc[?dry_run=true]`: one pass, answered with its report.
pub async fn gc(State(state): State<AppState>, req: Request) -> ApiResult {
    let is_user = req
        .extensions()
        .get::<Identity>()
        .is_some_and(|who| who.user().is_some());
    if state.auth.is_none() || !is_user {
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
