//! One log line per request at info level: method, path, status, response
//! bytes, duration and, when authentication is on, the user. Query strings and headers are not logged, so nothing
//! secret (credentials, tokens) can end up in the log.

use std::time::Instant;

use axum::extract::Request;
use axum::http::header::CONTENT_LENGTH;
use axum::middleware::Next;
use axum::response::Response;

pub async fn log_request(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let response = next.run(req).await;
    let bytes = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .or_else(|| http_body::Body::size_hint(response.body()).exact())
        .unwrap_or(0);
    let cache = response
        .extensions()
        .get::<crate::proxy::CacheOutcome>()
        .map(|o| o.as_str());
    // A mirror request (`?ns=`) that named Trow itself.
    let ns = response
        .extensions()
        .get::<super::OwnNamespace>()
        .map(|_| "own");
    // Who made the request, when authentication is on (set by the guard).
    let user = response
        .extensions()
        .get::<super::auth::AuthenticatedUser>()
        .map(|u| u.0.clone());
    // For streamed bodies the duration is the time to the response headers;
    // the byte count is the full body length the client will receive.
    tracing::info!(
        target: "trow::request",
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        bytes,
        cache,
        ns,
        user = user.as_deref(),
        duration_ms = start.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    response
}
