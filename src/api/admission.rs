//! `POST /validate-image` and `POST /mutate-image`: the admission
//! webhooks. AdmissionReview (`admission.k8s.io/v1`) in, AdmissionReview
//! with the same `uid` out; the policy itself is `crate::admission`.
//!
//! Bodies are read up to [`MAX_REVIEW_SIZE`] (the API server's own limit
//! for a request, so any real review fits); a longer one is refused with
//! 413 before it is all read. A body that is not an AdmissionReview v1 is
//! a 400 with a message saying what is wrong ([`AdmissionRequestError`],
//! mapped in `api::error`). Once a review parses, every refusal is an
//! AdmissionReview with `allowed: false` and the reason in
//! `status.message`, which the API server shows the user.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use kube::core::DynamicObject;

use super::error::ApiError;
use super::AppState;
use crate::admission::{workload, Object};
use crate::metrics::{AdmissionVerdict, AdmissionWebhook};

/// The largest AdmissionReview read: 3 MiB, the API server's limit on the
/// objects it stores (a review holds the object, and the old one on
/// updates, so real reviews stay well below 2 × this).
pub const MAX_REVIEW_SIZE: usize = 3 << 20;

/// Why a request is not an AdmissionReview we can answer.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionRequestError {
    #[error("the AdmissionReview is larger than {MAX_REVIEW_SIZE} bytes")]
    TooLarge,
    #[error(
        "the body must be an AdmissionReview in JSON (Content-Type: application/json), not `{0}`"
    )]
    MediaType(String),
    #[error("the body is not an AdmissionReview admission.k8s.io/v1: {0}")]
    Malformed(String),
    #[error("the request body could not be read: {0}")]
    Body(String),
}

/// The API version of the AdmissionReviews we answer.
const REVIEW_API_VERSION: &str = "admission.k8s.io/v1";

/// Reads and parses the review: the body bounded, the envelope checked.
async fn read_review(
    req: Request,
) -> Result<AdmissionRequest<DynamicObject>, AdmissionRequestError> {
    if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let essence = ct.split(';').next().unwrap_or("").trim();
        if essence != "application/json" {
            return Err(AdmissionRequestError::MediaType(essence.to_string()));
        }
    }
    let stated = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if stated.is_some_and(|n| n > MAX_REVIEW_SIZE as u64) {
        return Err(AdmissionRequestError::TooLarge);
    }
    let bytes = read_bounded(req.into_body()).await?;
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(&bytes)
        .map_err(|e| AdmissionRequestError::Malformed(e.to_string()))?;
    if review.types.api_version != REVIEW_API_VERSION || review.types.kind != "AdmissionReview" {
        return Err(AdmissionRequestError::Malformed(format!(
            "apiVersion `{}` and kind `{}`; expected {REVIEW_API_VERSION} AdmissionReview (admissionReviewVersions: [v1] in the webhook configuration)",
            review.types.api_version, review.types.kind
        )));
    }
    let request: AdmissionRequest<DynamicObject> = review
        .try_into()
        .map_err(|_| AdmissionRequestError::Malformed("it has no `request`".into()))?;
    if request.uid.is_empty() {
        return Err(AdmissionRequestError::Malformed(
            "`request.uid` is empty".into(),
        ));
    }
    Ok(request)
}

/// The body, refused as soon as it grows past [`MAX_REVIEW_SIZE`].
async fn read_bounded(body: Body) -> Result<Vec<u8>, AdmissionRequestError> {
    let mut stream = body.into_data_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| AdmissionRequestError::Body(e.to_string()))?;
        if out.len() + chunk.len() > MAX_REVIEW_SIZE {
            return Err(AdmissionRequestError::TooLarge);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// What a review is about, for the log.
struct About<'a> {
    uid: &'a str,
    namespace: &'a str,
    kind: &'a str,
    name: String,
    operation: &'static str,
}

fn about(req: &AdmissionRequest<DynamicObject>) -> About<'_> {
    let name = match (req.name.as_str(), req.object.as_ref()) {
        ("", Some(o)) => o
            .metadata
            .name
            .clone()
            .or_else(|| o.metadata.generate_name.as_ref().map(|g| format!("{g}*")))
            .unwrap_or_default(),
        (n, _) => n.to_string(),
    };
    About {
        uid: &req.uid,
        namespace: req.namespace.as_deref().unwrap_or(""),
        kind: &req.kind.kind,
        name,
        operation: match req.operation {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        },
    }
}

/// The object to check, when the request carries a workload (a kind of a
/// group that runs pods) being created or updated.
fn workload_object(req: &AdmissionRequest<DynamicObject>) -> Option<&serde_json::Value> {
    if !matches!(req.operation, Operation::Create | Operation::Update) {
        return None;
    }
    if !workload::is_workload(&req.kind.group, &req.kind.kind) {
        return None;
    }
    req.object.as_ref().map(|o| &o.data)
}

/// The AdmissionReview answering a request. The patch goes out as a
/// base64 string, as the API server's Go types expect a `[]byte` (kube-core
/// writes an array of numbers, which only some decoders take).
fn answer(response: AdmissionResponse) -> Response {
    use base64::Engine as _;
    let mut review = match serde_json::to_value(response.into_review()) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode an AdmissionReview");
            return ApiError::Admission(AdmissionRequestError::Body(
                "the answer could not be encoded".into(),
            ))
            .into_response();
        }
    };
    if let Some(patch) = review.pointer_mut("/response/patch") {
        if let Some(bytes) = patch.as_array().map(|a| {
            a.iter()
                .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Vec<u8>>()
        }) {
            *patch = base64::engine::general_purpose::STANDARD
                .encode(bytes)
                .into();
        }
    }
    Json(review).into_response()
}

fn deny(req: &AdmissionRequest<DynamicObject>, message: String) -> AdmissionResponse {
    let mut r = AdmissionResponse::from(req).deny(message);
    r.result.code = 403;
    r.result.reason = "Forbidden".into();
    r
}

/// `POST /validate-image`
pub async fn validate(State(state): State<AppState>, req: Request) -> Response {
    let webhook = AdmissionWebhook::Validate;
    let review = match read_review(req).await {
        Ok(r) => r,
        Err(e) => return refuse(&state, webhook, e),
    };
    let a = about(&review);
    let Some(object) = workload_object(&review) else {
        state
            .metrics
            .observe_admission(webhook, AdmissionVerdict::Allowed);
        tracing::debug!(uid = a.uid, namespace = a.namespace, kind = a.kind, name = ?a.name, operation = a.operation, "image policy: not a workload being created or updated; allowed");
        return answer(AdmissionResponse::from(&review));
    };
    let obj = Object {
        kind: a.kind,
        namespace: a.namespace,
        object,
    };
    match state.admission.validate(obj).await {
        Ok(None) => {
            state
                .metrics
                .observe_admission(webhook, AdmissionVerdict::Allowed);
            answer(AdmissionResponse::from(&review))
        }
        Ok(Some(v)) => {
            let images: Vec<&str> = v.images.iter().map(|i| i.written.as_str()).collect();
            let rules = v.rules();
            match v.message() {
                None => {
                    state
                        .metrics
                        .observe_admission(webhook, AdmissionVerdict::Allowed);
                    tracing::info!(uid = a.uid, namespace = a.namespace, kind = a.kind, name = ?a.name, operation = a.operation, ?images, exempt = v.exempt, ?rules, verdict = "allowed", "image policy");
                    answer(AdmissionResponse::from(&review))
                }
                Some(message) => {
                    state
                        .metrics
                        .observe_admission(webhook, AdmissionVerdict::Denied);
                    tracing::info!(uid = a.uid, namespace = a.namespace, kind = a.kind, name = ?a.name, operation = a.operation, ?images, ?rules, verdict = "denied", ?message, "image policy");
                    answer(deny(&review, message))
                }
            }
        }
        Err(e) => {
            let message = format!(
                "Trow image policy: cannot read the containers of {} {}: {e}",
                a.kind, a.name
            );
            state
                .metrics
                .observe_admission(webhook, AdmissionVerdict::Denied);
            tracing::info!(uid = a.uid, namespace = a.namespace, kind = a.kind, name = ?a.name, operation = a.operation, verdict = "denied", ?message, "image policy");
            answer(deny(&review, message))
        }
    }
}

/// `POST /mutate-image`
pub async fn mutate(State(state): State<AppState>, req: Request) -> Response {
    let webhook = AdmissionWebhook::Mutate;
    let review = match read_review(req).await {
        Ok(r) => r,
        Err(e) => return refuse(&state, webhook, e),
    };
    let a = about(&review);
    let allowed = |state: &AppState| {
        state
            .metrics
            .observe_admission(webhook, AdmissionVerdict::Allowed);
        answer(AdmissionResponse::from(&review))
    };
    let Some(object) = workload_object(&review) else {
        return allowed(&state);
    };
    let obj = Object {
        kind: a.kind,
        namespace: a.namespace,
        object,
    };
    let rewrites = match state.admission.mutate(obj).await {
        Ok(r) => r,
        // Left to the validating webhook, which names the problem.
        Err(_) => return allowed(&state),
    };
    if rewrites.is_empty() {
        tracing::debug!(uid = a.uid, namespace = a.namespace, kind = a.kind, name = ?a.name, "image rewrite: nothing to rewrite");
        return allowed(&state);
    }
    let mut ops = Vec::with_capacity(rewrites.len() * 2);
    for r in &rewrites {
        let Ok(path) = json_patch::jsonptr::PointerBuf::parse(&r.pointer) else {
            // Our own pointers always parse; never patch blind.
            return allowed(&state);
        };
        ops.push(json_patch::PatchOperation::Test(
            json_patch::TestOperation {
                path: path.clone(),
                value: r.old.clone().into(),
            },
        ));
        ops.push(json_patch::PatchOperation::Replace(
            json_patch::ReplaceOperation {
                path,
                value: r.new.clone().into(),
            },
        ));
    }
    match AdmissionResponse::from(&review).with_patch(json_patch::Patch(ops)) {
        Ok(response) => {
            state
                .metrics
                .observe_admission(webhook, AdmissionVerdict::Patched);
            let changes: Vec<String> = rewrites
                .iter()
                .map(|r| format!("{}: {} -> {}", r.container, r.old, r.new))
                .collect();
            tracing::info!(uid = a.uid, namespace = a.namespace, kind = a.kind, name = ?a.name, operation = a.operation, ?changes, verdict = "patched", "image rewrite");
            answer(response)
        }
        Err(e) => {
            tracing::warn!(error = %e, "image rewrite: cannot encode the patch; leaving the object unchanged");
            allowed(&state)
        }
    }
}

fn refuse(state: &AppState, webhook: AdmissionWebhook, e: AdmissionRequestError) -> Response {
    state
        .metrics
        .observe_admission(webhook, AdmissionVerdict::Invalid);
    tracing::info!(webhook = webhook.as_str(), error = %e, "admission review refused");
    ApiError::Admission(e).into_response()
}
