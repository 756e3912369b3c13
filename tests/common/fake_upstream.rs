//! A scriptable fake upstream registry for pull-through cache tests: serves
//! manifests and blobs from memory, counts connections and requests, and can
//! hold a blob half-sent, corrupt it, answer 429, redirect blob requests
//! (through any number of hops), flood a manifest, blob or token response
//! (with or without a Content-Length), and demand a Bearer token from a
//! realm. It serves plain HTTP or HTTPS, on loopback or on a listener made
//! elsewhere (another network namespace).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::watch;

/// A body far larger than any bound Trow should accept. It ends after
/// `total` bytes (so that an unbounded reader is noticed without taking
/// the machine down), and records how much was handed to the connection
/// and whether the reader gave up before the end.
#[derive(Clone, Copy, Debug)]
pub struct Flood {
    pub total: usize,
    /// The Content-Length to announce, if any (may differ from `total`).
    pub announce: Option<u64>,
}

/// What the token endpoint (`/token`) answers.
#[derive(Clone, Debug)]
pub enum TokenBody {
    /// This JSON document (it should hold `"token": "good-token"`).
    Json(String),
    /// A flood of bytes without Content-Length.
    Flood(usize),
}

#[derive(Clone, Debug)]
pub struct TokenAuth {
    /// The realm URL sent in the challenge (e.g. `http://127.0.0.1:<port>/token`).
    pub realm: String,
    pub body: TokenBody,
}

/// The token the token endpoint hands out and `/v2/` requests must carry.
pub const GOOD_TOKEN: &str = "good-token";

#[derive(Default)]
pub struct Behaviour {
    /// Serve this many bytes of every blob, then wait for `release()`.
    pub hold_after: Option<usize>,
    /// Flip a byte of every blob served.
    pub corrupt: bool,
    /// Answer every request with 429 and this Retry-After.
    pub rate_limit: Option<String>,
    /// Answer blob GETs with redirects: `hops` of them, the last one to
    /// `<base><path>` (`base` like `http://127.0.0.1:5000`).
    pub redirect_blobs: Option<(String, usize)>,
    /// Answer manifest GETs with a flood.
    pub manifest_flood: Option<Flood>,
    /// Answer blob GETs with a flood.
    pub blob_flood: Option<Flood>,
    /// Require a Bearer token from this realm on `/v2/…`.
    pub token: Option<TokenAuth>,
}

#[derive(Default)]
pub struct Content {
    /// (repo, reference) → (media type, bytes); reference is a tag or digest.
    pub manifests: HashMap<(String, String), (String, Bytes)>,
    /// digest → bytes
    pub blobs: HashMap<String, Bytes>,
}

/// What the fake saw.
#[derive(Default)]
pub struct Stats {
    /// TCP connections accepted.
    pub connections: AtomicUsize,
    /// Blob bytes handed to connections (held and normal blobs).
    pub blob_bytes_sent: AtomicUsize,
    /// Flood bytes handed to connections.
    pub flood_sent: AtomicUsize,
    /// A flood was dropped before its end (the reader stopped).
    pub flood_cut: AtomicBool,
    /// Token requests that carried an Authorization header, and that did not.
    pub token_with_auth: AtomicUsize,
    pub token_without_auth: AtomicUsize,
    /// Blob GETs being answered now, and the most at once.
    pub blob_gets_now: AtomicUsize,
    pub blob_gets_max: AtomicUsize,
}

pub struct FakeUpstream {
    /// `host:port` it listens on.
    pub host: String,
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    pub content: Arc<Mutex<Content>>,
    pub behaviour: Arc<Mutex<Behaviour>>,
    /// Requests by "METHOD path".
    pub counts: Arc<Mutex<HashMap<String, usize>>>,
    pub stats: Arc<Stats>,
    gate: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct Shared {
    me: String,
    content: Arc<Mutex<Content>>,
    behaviour: Arc<Mutex<Behaviour>>,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    gate: Arc<watch::Sender<bool>>,
    stats: Arc<Stats>,
}

impl FakeUpstream {
    /// Plain HTTP on loopback.
    pub async fn start() -> FakeUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener, None)
    }

    /// HTTPS on loopback with this certificate and key (PEM).
    pub async fn start_tls(cert_pem: &str, key_pem: &str) -> FakeUpstream {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(listener, Some(tls_acceptor(cert_pem, key_pem)))
    }

    /// Serves on a listener bound elsewhere (e.g. inside a network
    /// namespace: the socket stays in the namespace it was made in).
    pub fn start_on(
        listener: std::net::TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeUpstream {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let (gate, _) = watch::channel(false);
        let shared = Shared {
            me: format!("{scheme}://{host}"),
            content: Default::default(),
            behaviour: Default::default(),
            counts: Default::default(),
            gate: Arc::new(gate),
            stats: Default::default(),
        };
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let stats = shared.stats.clone();
        let task = tokio::spawn(serve(listener, app, tls, stats));
        FakeUpstream {
            url: shared.me.clone(),
            host,
            content: shared.content,
            behaviour: shared.behaviour,
            counts: shared.counts,
            stats: shared.stats,
            gate: shared.gate,
            task,
        }
    }

    /// Lets every held blob (now and later) be sent in full.
    pub fn release(&self) {
        self.gate.send_replace(true);
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

    /// All requests seen.
    pub fn requests(&self) -> usize {
        self.counts.lock().values().sum()
    }

    pub fn connections(&self) -> usize {
        self.stats.connections.load(Ordering::SeqCst)
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

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// The accept loop: counts connections, then serves HTTP/1.1 and HTTP/2
/// on each (over TLS when given an acceptor).
async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stats: Arc<Stats>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::service::TowerToHyperService;
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        stats.connections.fetch_add(1, Ordering::SeqCst);
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = TowerToHyperService::new(app);
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(acceptor) => {
                    if let Ok(s) = acceptor.accept(sock).await {
                        let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(sock), svc).await;
                }
            }
        });
    }
}

/// A redirect for `path`: through `hops - 1` more hops on this server
/// (`/hop/<n><path>`), then to `<base><path>`.
fn redirect(s: &Shared, base: &str, hops_left: usize, path: &str) -> Response {
    let location = if hops_left > 0 {
        format!("{}/hop/{}{path}", s.me, hops_left - 1)
    } else {
        format!("{base}{path}")
    };
    (
        StatusCode::TEMPORARY_REDIRECT,
        [(header::LOCATION, location)],
    )
        .into_response()
}

/// A flood as a response body.
fn flood_response(s: &Shared, f: Flood) -> Response {
    struct Flooding {
        left: usize,
        stats: Arc<Stats>,
    }
    impl Drop for Flooding {
        fn drop(&mut self) {
            if self.left > 0 {
                self.stats.flood_cut.store(true, Ordering::SeqCst);
            }
        }
    }
    let state = Flooding {
        left: f.total,
        stats: s.stats.clone(),
    };
    let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
    let stream = futures_util::stream::unfold(state, move |mut st| {
        let chunk = chunk.clone();
        async move {
            if st.left == 0 {
                return None;
            }
            let n = st.left.min(chunk.len());
            st.left -= n;
            st.stats.flood_sent.fetch_add(n, Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(chunk.slice(..n)), st))
        }
    });
    let mut r = Response::new(Body::from_stream(stream));
    if let Some(len) = f.announce {
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, len.to_string().parse().unwrap());
    }
    r
}

async fn handle(State(s): State<Shared>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    *s.counts
        .lock()
        .entry(format!("{method} {path}"))
        .or_default() += 1;
    if path == "/token" {
        let counter = if req.headers().contains_key(header::AUTHORIZATION) {
            &s.stats.token_with_auth
        } else {
            &s.stats.token_without_auth
        };
        counter.fetch_add(1, Ordering::SeqCst);
        let body = s.behaviour.lock().token.as_ref().map(|t| t.body.clone());
        return match body {
            Some(TokenBody::Json(json)) => {
                ([(header::CONTENT_TYPE, "application/json")], json).into_response()
            }
            Some(TokenBody::Flood(total)) => flood_response(
                &s,
                Flood {
                    total,
                    announce: None,
                },
            ),
            None => StatusCode::NOT_FOUND.into_response(),
        };
    }
    if let Some(rest) = path.strip_prefix("/hop/") {
        let (n, orig) = rest.split_once('/').unwrap();
        let base = s.behaviour.lock().redirect_blobs.clone().unwrap().0;
        return redirect(&s, &base, n.parse().unwrap(), &format!("/{orig}"));
    }
    let token = s.behaviour.lock().token.clone();
    if let Some(t) = token {
        let authorized = req
            .headers()
            .get(header::AUTHORIZATION)
            .is_some_and(|v| v.as_bytes() == format!("Bearer {GOOD_TOKEN}").as_bytes());
        if !authorized {
            return (
                StatusCode::UNAUTHORIZED,
                [(
                    header::WWW_AUTHENTICATE,
                    format!("Bearer realm=\"{}\",service=\"fake\"", t.realm),
                )],
            )
                .into_response();
        }
    }
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
        let flood = s.behaviour.lock().manifest_flood;
        if let (Some(f), true) = (flood, method == axum::http::Method::GET) {
            return flood_response(&s, f);
        }
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
        if method == axum::http::Method::GET {
            let (redirect_to, flood) = {
                let b = s.behaviour.lock();
                (b.redirect_blobs.clone(), b.blob_flood)
            };
            if let Some((base, hops)) = redirect_to {
                return redirect(&s, &base, hops.saturating_sub(1), &path);
            }
            if let Some(f) = flood {
                return flood_response(&s, f);
            }
        }
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
        let stream = async_stream_chunks(bytes, hold, s.gate.subscribe(), s.stats.clone());
        let mut r = Response::new(Body::from_stream(stream));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, len.to_string().parse().unwrap());
        return r;
    }
    StatusCode::NOT_FOUND.into_response()
}

/// The blob in 64 KiB chunks, pausing after `hold` bytes until released;
/// counts the GETs being answered at once.
fn async_stream_chunks(
    bytes: Bytes,
    hold: Option<usize>,
    gate: watch::Receiver<bool>,
    stats: Arc<Stats>,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> {
    struct Answering(Arc<Stats>);
    impl Drop for Answering {
        fn drop(&mut self) {
            self.0.blob_gets_now.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let now = stats.blob_gets_now.fetch_add(1, Ordering::SeqCst) + 1;
    stats.blob_gets_max.fetch_max(now, Ordering::SeqCst);
    let answering = Answering(stats.clone());
    futures_util::stream::unfold(
        (0usize, false, gate, answering),
        move |(pos, waited, mut gate, answering)| {
            let bytes = bytes.clone();
            let stats = stats.clone();
            async move {
                if pos >= bytes.len() {
                    return None;
                }
                if let Some(h) = hold {
                    if pos >= h && !waited {
                        let _ = gate.wait_for(|open| *open).await;
                        return Some((Ok(Bytes::new()), (pos, true, gate, answering)));
                    }
                }
                let end = (pos + 65_536).min(bytes.len());
                let end = match hold {
                    Some(h) if !waited && pos < h => end.min(h),
                    _ => end,
                };
                stats
                    .blob_bytes_sent
                    .fetch_add(end - pos, Ordering::Relaxed);
                Some((Ok(bytes.slice(pos..end)), (end, waited, gate, answering)))
            }
        },
    )
}
