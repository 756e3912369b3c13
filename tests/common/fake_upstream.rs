//! A scriptable fake upstream registry for pull-through cache tests: serves
//! manifests and blobs from memory, counts requests, and can hold a blob
//! half-sent, corrupt it, or answer 429.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
pub struct Behaviour {
    /// Serve this many bytes of every blob, then wait for `release`.
    pub hold_after: Option<usize>,
    /// Flip a byte of every blob served.
    pub corrupt: bool,
    /// Answer every request with 429 and this Retry-After.
    pub rate_limit: Option<String>,
}

#[derive(Default)]
pub struct Content {
    /// (repo, reference) → (media type, bytes); reference is a tag or digest.
    pub manifests: HashMap<(String, String), (String, Bytes)>,
    /// digest → bytes
    pub blobs: HashMap<String, Bytes>,
}

pub struct FakeUpstream {
    pub host: String,
    pub content: Arc<Mutex<Content>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    /// Requests by "METHOD path".
    pub counts: Arc<Mutex<HashMap<String, usize>>>,
    pub release: Arc<Notify>,
    pub blob_bytes_sent: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    content: Arc<Mutex<Content>>,
    behaviour: Arc<Mutex<Behaviour>>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    release: Arc<Notify>,
    sent: Arc<AtomicUsize>,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let shared = Shared {
            content: Default::default(),
            behaviour: Default::default(),
            counts: Default::default(),
            release: Arc::new(Notify::new()),
            sent: Arc::new(AtomicUsize::new(0)),
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeUpstream {
            host,
            content: shared.content,
            behaviour: shared.behaviour,
            counts: shared.counts,
            release: shared.release,
            blob_bytes_sent: shared.sent,
            task,
        }
    }

    pub fn add_blob(&self, bytes: Bytes) -> String {
        let digest = super::oci::sha256(&bytes);
        self.content.lock().blobs.insert(digest.clone(), bytes);
        digest
    }

    /// Adds a manifest under its digest and, if given, a tag.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: Bytes,
    ) -> String {
        let digest = super::oci::sha256(&bytes);
        let mut c = self.content.lock();
        c.manifests.insert(
            (repo.to_string(), digest.clone()),
            (media_type.to_string(), bytes.clone()),
        );
        if let Some(tag) = tag {
            c.manifests.insert(
                (repo.to_string(), tag.to_string()),
                (media_type.to_string(), bytes),
            );
        }
        digest
    }

    pub fn count(&self, method: &str, path: &str) -> usize {
        self.counts
            .lock()
            .get(&format!("{method} {path}"))
            .copied()
            .unwrap_or(0)
    }

    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(State(s): State<Shared>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    *s.counts
        .lock()
        .entry(format!("{method} {path}"))
        .or_default() += 1;
    if let Some(after) = s.behaviour.lock().rate_limit.clone() {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [(header::RETRY_AFTER, after)],
            "slow down",
        )
            .into_response();
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return StatusCode::NOT_FOUND.into_response();
    };
    if let Some((repo, reference)) = rest.rsplit_once("/manifests/") {
        let found = s
            .content
            .lock()
            .manifests
            .get(&(repo.to_string(), reference.to_string()))
            .cloned();
        return match found {
            None => StatusCode::NOT_FOUND.into_response(),
            Some((media_type, bytes)) => {
                let digest = super::oci::sha256(&bytes);
                let mut r = Response::new(if method == axum::http::Method::HEAD {
                    Body::empty()
                } else {
                    Body::from(bytes.clone())
                });
                let h = r.headers_mut();
                h.insert(header::CONTENT_TYPE, media_type.parse().unwrap());
                h.insert(
                    header::CONTENT_LENGTH,
                    bytes.len().to_string().parse().unwrap(),
                );
                h.insert("docker-content-digest", digest.parse().unwrap());
                r
            }
        };
    }
    if let Some((_repo, digest)) = rest.rsplit_once("/blobs/") {
        let Some(mut bytes) = s.content.lock().blobs.get(digest).cloned() else {
            return StatusCode::NOT_FOUND.into_response();
        };
        let (hold, corrupt) = {
            let b = s.behaviour.lock();
            (b.hold_after, b.corrupt)
        };
        if corrupt {
            let mut v = bytes.to_vec();
            v[0] ^= 0xff;
            bytes = Bytes::from(v);
        }
        let len = bytes.len();
        if method == axum::http::Method::HEAD {
            let mut r = Response::new(Body::empty());
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, len.to_string().parse().unwrap());
            return r;
        }
        let release = s.release.clone();
        let sent = s.sent.clone();
        let stream = async_stream_chunks(bytes, hold, release, sent);
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, len.to_string().parse().unwrap());
        return r;
    }
    StatusCode::NOT_FOUND.into_response()
}

/// The blob in 64 KiB chunks, pausing after `hold` bytes until released.
fn async_stream_chunks(
    bytes: Bytes,
    hold: Option<usize>,
    release: Arc<Notify>,
    sent: Arc<AtomicUsize>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    futures_util::stream::unfold((0usize, false), move |(pos, waited)| {
        let bytes = bytes.clone();
        let release = release.clone();
        let sent = sent.clone();
        async move {
            if pos >= bytes.len() {
                return None;
            }
            if let Some(h) = hold {
                if pos >= h && !waited {
                    release.notified().await;
                    return Some((Ok(Bytes::new()), (pos, true)));
                }
            }
            let end = (pos + 65_536).min(bytes.len());
            let end = match hold {
                Some(h) if !waited && pos < h => end.min(h),
                _ => end,
            };
            sent.fetch_add(end - pos, Ordering::Relaxed);
            Some((Ok(bytes.slice(pos..end)), (end, waited)))
        }
    })
}
