//! Keeps HTTP/1.1 keep-alive connections honest when a request body is
//! refused unread.
//!
//! When a handler answers an error before reading a request's body (a chunk
//! for an unknown upload, an out-of-order chunk), hyper cannot reuse the
//! connection: the unread body is still in it, so hyper closes it after the
//! response. Without `Connection: close` in that response a client would
//! reuse the connection for its next request and see it fail. Saying so lets
//! every client open a fresh connection instead.

use axum::extract::Request;
use axum::http::{header, HeaderValue, Version};
use axum::middleware::Next;
use axum::response::Response;

pub async fn close_after_refused_body(req: Request, next: Next) -> Response {
    let has_body = match req.version() {
        Version::HTTP_10 | Version::HTTP_11 => {
            let headers = req.headers();
            headers.contains_key(header::TRANSFER_ENCODING)
                || headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.trim() != "0")
        }
        _ => false, // HTTP/2 resets the stream, not the connection
    };
    let mut response = next.run(req).await;
    let status = response.status();
    if has_body && (status.is_client_error() || status.is_server_error()) {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}
