//! Talking to upstream registries: one pooled HTTP client per listed
//! upstream (each with the address policy of `policy.rs` in its resolver and
//! redirect rule), the Docker/OCI token flow (anonymous or with configured
//! credentials), tokens cached per host, scope and user until they expire,
//! and every body read bounded in size and time.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use parking_lot::Mutex;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Client, Method, Response, StatusCode, Url};
use serde::Deserialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::policy::{check_url, redirect_policy, refusal_in, AddressGuard, GuardedResolver};
use super::target::{Access, Target};
use crate::oci::Digest;

/// Every manifest type we can cache, for the `Accept` header.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Largest token response read (Docker Hub's are about 4 KiB).
pub const MAX_TOKEN_RESPONSE: u64 = 64 * 1024;
/// Bounds of a token's lifetime, whatever `expires_in` says.
const MIN_TOKEN_LIFETIME: Duration = Duration::from_secs(10);
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);
/// Tokens are used until this long before they expire.
const TOKEN_RENEW_EARLY: Duration = Duration::from_secs(5);
/// Tokens remembered (by host, scope and user); the least recently used
/// goes first.
const TOKEN_CACHE_ENTRIES: usize = 1024;
/// Largest `Retry-After` (seconds) passed on to clients.
const MAX_RETRY_AFTER: u64 = 3600;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {host} did not answer within {after:?}")]
    Timeout { host: String, after: Duration },
    #[error("cannot reach upstream {host}: {message}")]
    Unreachable { host: String, message: String },
    #[error("upstream {host} answered {status}")]
    Status {
        host: String,
        status: StatusCode,
        retry_after: Option<String>,
    },
    #[error("upstream {host} refused our credentials: {message}")]
    Auth { host: String, message: String },
    #[error("upstream {host} sent something unusable: {message}")]
    Protocol { host: String, message: String },
    /// The address policy refused a connection, redirect or token realm.
    #[error("upstream {host}: {message}")]
    Refused { host: String, message: String },
}

impl UpstreamError {
    /// Failures after which a cached copy should be served instead:
    /// timeouts, connection errors, 5xx and 429.
    pub fn is_transient(&self) -> bool {
        match self {
            UpstreamError::Timeout { .. } | UpstreamError::Unreachable { .. } => true,
            UpstreamError::Status { status, .. } => {
                status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamError::Auth { .. }
            | UpstreamError::Protocol { .. }
            | UpstreamError::Refused { .. } => false,
        }
    }

    /// A reqwest failure, told apart: timeouts, policy refusals (anywhere
    /// in the chain of causes) and the rest.
    fn from_reqwest(e: &reqwest::Error, host: &str, timeout: Duration) -> UpstreamError {
        if let Some(r) = refusal_in(e) {
            return UpstreamError::Refused {
                host: host.to_string(),
                message: r.to_string(),
            };
        }
        if e.is_timeout() {
            return UpstreamError::Timeout {
                host: host.to_string(),
                after: timeout,
            };
        }
        UpstreamError::Unreachable {
            host: host.to_string(),
            message: error_chain(e),
        }
    }
}

/// An error and its causes, `: `-separated.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// What a manifest HEAD told us.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
}

/// A fetched manifest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    /// Any JSON number (or anything else, ignored): clamped before use.
    expires_in: Option<serde_json::Value>,
}

/// How long to use a token for, from the `expires_in` an upstream sent
/// (Docker's spec: 60 s when absent), within fixed bounds, renewed a little
/// early. Never overflows whatever the number.
fn token_lifetime(expires_in: Option<&serde_json::Value>) -> Duration {
    let secs = expires_in
        .and_then(serde_json::Value::as_f64)
        .filter(|s| s.is_finite())
        .unwrap_or(60.0);
    let lifetime = if secs <= MIN_TOKEN_LIFETIME.as_secs_f64() {
        MIN_TOKEN_LIFETIME
    } else if secs >= MAX_TOKEN_LIFETIME.as_secs_f64() {
        MAX_TOKEN_LIFETIME
    } else {
        Duration::from_secs_f64(secs)
    };
    lifetime.saturating_sub(TOKEN_RENEW_EARLY)
}

/// A `Retry-After` worth passing on: a number of seconds, at most an hour.
/// (HTTP dates and garbage are dropped; clients then back off by themselves.)
fn clamp_retry_after(v: &str) -> Option<String> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs = v.parse::<u64>().unwrap_or(MAX_RETRY_AFTER);
    Some(secs.min(MAX_RETRY_AFTER).to_string())
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Challenge {
    scheme: String,
    params: HashMap<String, String>,
}

/// Parses `Bearer realm="…",service="…",scope="…"` (quoted values may hold
/// commas).
fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            break;
        }
        let value: String = if chars.peek() == Some(&'"') {
            chars.next();
            let mut v = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => v.extend(chars.next()),
                    '"' => break,
                    c => v.push(c),
                }
            }
            v
        } else {
            chars.by_ref().take_while(|c| *c != ',').collect()
        };
        params.insert(key.trim().to_ascii_lowercase(), value);
    }
    Some(Challenge {
        scheme: scheme.to_ascii_lowercase(),
        params,
    })
}

/// Upstream host, scope and user name a token was issued for.
type TokenKey = (String, String, String);

/// Which client a target uses: one per listed upstream host (its own
/// address policy, TLS roots and scheme rule), one for every unlisted
/// public upstream. The configuration bounds how many there are.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ClientKey {
    Listed {
        /// `host[:port]` of the API.
        api: String,
        insecure: bool,
        ca: Option<std::path::PathBuf>,
    },
    AnyPublic,
}

/// A client and the address policy its resolver and redirects apply.
#[derive(Clone)]
struct Guarded {
    client: Client,
    guard: Arc<AddressGuard>,
}

pub struct Upstreams {
    clients: Mutex<HashMap<ClientKey, Guarded>>,
    /// Bearer tokens by (upstream host, scope, user), with their expiry.
    tokens: Mutex<LruCache<TokenKey, (String, Instant)>>,
    /// KiB of manifest bodies being read from upstreams at once (see
    /// [`MANIFEST_READ_BUDGET`]).
    manifest_budget: Arc<Semaphore>,
}

/// Bytes of upstream manifest bodies held in memory at once, across all
/// fetches, at least one `--max-manifest-size`. A manifest fetch reserves
/// its announced length (or, without one, the largest manifest allowed)
/// before reading and waits while the budget is spent. Real manifests are a
/// few KiB, so they never wait; a hostile upstream sending many huge or
/// endless manifests makes Trow hold this much, not `max_concurrent_fetches`
/// times the manifest limit.
pub const MANIFEST_READ_BUDGET: u64 = 16 << 20;

/// The `host[:port]` of a URL (as `Url` spells it).
fn authority(url: &Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    })
}

impl Upstreams {
    /// Upstream clients for manifests of at most `max_manifest_size` bytes.
    pub fn new(max_manifest_size: u64) -> Self {
        let entries = NonZeroUsize::new(TOKEN_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN);
        let budget = MANIFEST_READ_BUDGET.max(max_manifest_size);
        Upstreams {
            clients: Mutex::new(HashMap::new()),
            tokens: Mutex::new(LruCache::new(entries)),
            manifest_budget: Arc::new(Semaphore::new(kib(budget) as usize)),
        }
    }

    /// Reserves room for a manifest body of up to `len` bytes, waiting until
    /// `deadline` at most.
    async fn reserve_manifest(
        &self,
        len: u64,
        deadline: Instant,
        host: &str,
    ) -> Result<OwnedSemaphorePermit, UpstreamError> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let permits = u32::try_from(kib(len).max(1)).unwrap_or(u32::MAX);
        match tokio::time::timeout(
            wait,
            self.manifest_budget.clone().acquire_many_owned(permits),
        )
        .await
        {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(UpstreamError::Timeout {
                host: host.to_string(),
                after: wait,
            }),
        }
    }

    fn client(&self, target: &Target) -> Result<Guarded, UpstreamError> {
        let protocol = |message: String| UpstreamError::Protocol {
            host: target.host.clone(),
            message,
        };
        let base = Url::parse(&target.base_url).map_err(|e| protocol(e.to_string()))?;
        let key = match &target.access {
            Access::Listed { insecure, ca } => ClientKey::Listed {
                api: authority(&base).unwrap_or_default(),
                insecure: *insecure,
                ca: ca.clone(),
            },
            Access::AnyPublic => ClientKey::AnyPublic,
        };
        if let Some(c) = self.clients.lock().get(&key) {
            return Ok(c.clone());
        }
        let guard = Arc::new(match &key {
            ClientKey::Listed { .. } => AddressGuard::listed(base.host_str().unwrap_or_default()),
            ClientKey::AnyPublic => AddressGuard::public_only(),
        });
        // No environment proxies: the address policy must see the real
        // destination.
        let mut builder = Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .no_proxy()
            .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
            .redirect(redirect_policy(guard.clone(), target.access.allows_http()))
            .user_agent(concat!("trow/", env!("CARGO_PKG_VERSION")));
        if let Access::Listed { ca: Some(path), .. } = &target.access {
            let pem = std::fs::read(path)
                .map_err(|e| protocol(format!("cannot read CA {}: {e}", path.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| protocol(format!("bad CA {}: {e}", path.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(|e| protocol(e.to_string()))?;
        let guarded = Guarded { client, guard };
        // Two requests may build a client for the same key at once: keep
        // the first, so that the map never holds more than one per key.
        Ok(self.clients.lock().entry(key).or_insert(guarded).clone())
    }

    fn scope(target: &Target) -> String {
        format!("repository:{}:pull", target.upstream_repo)
    }

    fn token_key(target: &Target) -> TokenKey {
        let user = target
            .credentials
            .as_ref()
            .map(|c| c.username.clone())
            .unwrap_or_default();
        (target.host.clone(), Self::scope(target), user)
    }

    /// A cached token for this target's pull scope, if one is still valid.
    /// An expired one is dropped when found.
    fn cached_token(&self, target: &Target) -> Option<String> {
        let key = Self::token_key(target);
        let mut tokens = self.tokens.lock();
        match tokens.get(&key) {
            Some((token, expiry)) if *expiry > Instant::now() => Some(token.clone()),
            Some(_) => {
                tokens.pop(&key);
                None
            }
            None => None,
        }
    }

    /// Gets a token from the realm of a Bearer challenge. The realm obeys
    /// the redirect rule (scheme and address); the configured credentials
    /// go only to a realm on the upstream's own `host:port`, or over HTTPS.
    async fn fetch_token(
        &self,
        target: &Target,
        challenge: &Challenge,
        timeout: Duration,
    ) -> Result<String, UpstreamError> {
        let auth_err = |message: String| UpstreamError::Auth {
            host: target.host.clone(),
            message,
        };
        let realm = challenge
            .params
            .get("realm")
            .ok_or_else(|| auth_err("Bearer challenge without realm".into()))?;
        let realm_url = Url::parse(realm)
            .map_err(|e| auth_err(format!("token realm `{realm}` is not a URL: {e}")))?;
        let guarded = self.client(target)?;
        check_url(&guarded.guard, &realm_url, target.access.allows_http()).map_err(|r| {
            UpstreamError::Refused {
                host: target.host.clone(),
                message: format!("token realm: {r}"),
            }
        })?;
        let service = challenge.params.get("service").cloned().unwrap_or_default();
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| Self::scope(target));
        let same_origin = Url::parse(&target.base_url).ok().is_some_and(|base| {
            base.host_str() == realm_url.host_str()
                && base.port_or_known_default() == realm_url.port_or_known_default()
        });
        let mut req = guarded
            .client
            .get(realm_url.clone())
            .query(&[("service", &service), ("scope", &scope)]);
        match &target.credentials {
            Some(c) if same_origin || realm_url.scheme() == "https" => {
                req = req.basic_auth(&c.username, Some(&c.password));
            }
            Some(_) => {
                tracing::warn!(host = %target.host, realm = %realm_url, "not sending credentials to a plain-HTTP token realm on another host");
            }
            None => {}
        }
        let started = Instant::now();
        let resp = send_with_timeout(req, timeout, &target.host).await?;
        if !resp.status().is_success() {
            return Err(auth_err(format!(
                "token endpoint {realm_url} answered {}",
                resp.status()
            )));
        }
        let body = read_bounded(
            resp,
            MAX_TOKEN_RESPONSE,
            timeout,
            started + timeout,
            &target.host,
            "token response",
        )
        .await?;
        let body: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| auth_err(format!("token endpoint sent no token: {e}")))?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| auth_err("token endpoint sent no token".into()))?;
        let lifetime = token_lifetime(body.expires_in.as_ref());
        if let Some(expiry) = Instant::now().checked_add(lifetime) {
            self.tokens
                .lock()
                .put(Self::token_key(target), (token.clone(), expiry));
        }
        Ok(token)
    }

    /// Sends a request to the target's repository API (`/v2/<repo>/<path>`),
    /// answering an auth challenge once. `timeout` bounds the time to the
    /// response headers.
    async fn send(
        &self,
        target: &Target,
        method: Method,
        path: &str,
        accept: Option<&str>,
        timeout: Duration,
    ) -> Result<Response, UpstreamError> {
        let guarded = self.client(target)?;
        let url = Url::parse(&format!(
            "{}/v2/{}/{path}",
            target.base_url, target.upstream_repo
        ))
        .map_err(|e| UpstreamError::Protocol {
            host: target.host.clone(),
            message: format!("cannot form a URL: {e}"),
        })?;
        check_url(&guarded.guard, &url, target.access.allows_http()).map_err(|r| {
            UpstreamError::Refused {
                host: target.host.clone(),
                message: r.to_string(),
            }
        })?;
        let client = &guarded.client;
        let build = |auth: Option<Auth>| {
            let mut req = client.request(method.clone(), url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            match auth {
                Some(Auth::Bearer(t)) => req.bearer_auth(t),
                Some(Auth::Basic(u, p)) => req.basic_auth(u, Some(p)),
                None => req,
            }
        };
        let first_auth = self.cached_token(target).map(Auth::Bearer);
        let resp = send_with_timeout(build(first_auth), timeout, &target.host).await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_challenge);
        let auth = match challenge {
            Some(c) if c.scheme == "bearer" => {
                Auth::Bearer(self.fetch_token(target, &c, timeout).await?)
            }
            Some(c) if c.scheme == "basic" => match &target.credentials {
                Some(c) => Auth::Basic(c.username.clone(), c.password.clone()),
                None => {
                    return Err(UpstreamError::Auth {
                        host: target.host.clone(),
                        message: "it wants a username and password; add them to registry_proxies"
                            .into(),
                    })
                }
            },
            _ => return Ok(resp),
        };
        send_with_timeout(build(Some(auth)), timeout, &target.host).await
    }

    /// `HEAD` a manifest: its digest, or `None` when upstream has no such
    /// manifest.
    pub async fn head_manifest(
        &self,
        target: &Target,
        reference: &str,
        timeout: Duration,
    ) -> Result<Option<ManifestHead>, UpstreamError> {
        let resp = self
            .send(
                target,
                Method::HEAD,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
                timeout,
            )
            .await?;
        match check_status(resp, &target.host)? {
            None => Ok(None),
            Some(resp) => Ok(Some(ManifestHead {
                digest: resp
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            })),
        }
    }

    /// `GET` a manifest, bounded by `max_size` bytes whether or not upstream
    /// says its length, and by `timeout` in all (and between chunks).
    pub async fn get_manifest(
        &self,
        target: &Target,
        reference: &str,
        timeout: Duration,
        max_size: u64,
    ) -> Result<Option<FetchedManifest>, UpstreamError> {
        let started = Instant::now();
        let resp = self
            .send(
                target,
                Method::GET,
                &format!("manifests/{reference}"),
                Some(MANIFEST_ACCEPT),
                timeout,
            )
            .await?;
        let Some(resp) = check_status(resp, &target.host)? else {
            return Ok(None);
        };
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let reserve = resp.content_length().unwrap_or(max_size).min(max_size);
        let _room = self
            .reserve_manifest(reserve, started + timeout, &target.host)
            .await?;
        let bytes = read_bounded(
            resp,
            max_size,
            timeout,
            started + timeout,
            &target.host,
            "manifest (see --max-manifest-size)",
        )
        .await?;
        Ok(Some(FetchedManifest {
            bytes,
            content_type,
        }))
    }

    /// `GET` a blob; the response body is streamed (and bounded) by the
    /// caller.
    pub async fn get_blob(
        &self,
        target: &Target,
        digest: &Digest,
        timeout: Duration,
    ) -> Result<Option<Response>, UpstreamError> {
        let resp = self
            .send(
                target,
                Method::GET,
                &format!("blobs/{digest}"),
                None,
                timeout,
            )
            .await?;
        check_status(resp, &target.host)
    }

    /// `GET` the referrers of a manifest (an image index), filtered by
    /// `artifact_type`, bounded by `max_size` bytes and by `timeout` in
    /// all; `None` when upstream has no referrers API (404, or 400, 405
    /// or 501, which registries without the endpoint also answer).
    pub async fn get_referrers(
        &self,
        target: &Target,
        digest: &Digest,
        artifact_type: &str,
        timeout: Duration,
        max_size: u64,
    ) -> Result<Option<Bytes>, UpstreamError> {
        let started = Instant::now();
        let query: String = serde_urlencoded::to_string([("artifactType", artifact_type)])
            .map_err(|e| UpstreamError::Protocol {
                host: target.host.clone(),
                message: format!("cannot form a query: {e}"),
            })?;
        let resp = self
            .send(
                target,
                Method::GET,
                &format!("referrers/{digest}?{query}"),
                Some("application/vnd.oci.image.index.v1+json"),
                timeout,
            )
            .await?;
        if matches!(
            resp.status(),
            StatusCode::BAD_REQUEST | StatusCode::METHOD_NOT_ALLOWED | StatusCode::NOT_IMPLEMENTED
        ) {
            return Ok(None);
        }
        let Some(resp) = check_status(resp, &target.host)? else {
            return Ok(None);
        };
        let bytes = read_bounded(
            resp,
            max_size,
            timeout,
            started + timeout,
            &target.host,
            "referrers list",
        )
        .await?;
        Ok(Some(bytes))
    }

    /// `HEAD` a blob: its size, or `None` when upstream does not have it.
    /// A size above `max_size`, or none at all, is refused.
    pub async fn head_blob(
        &self,
        target: &Target,
        digest: &Digest,
        timeout: Duration,
        max_size: u64,
    ) -> Result<Option<u64>, UpstreamError> {
        let resp = self
            .send(
                target,
                Method::HEAD,
                &format!("blobs/{digest}"),
                None,
                timeout,
            )
            .await?;
        let Some(resp) = check_status(resp, &target.host)? else {
            return Ok(None);
        };
        let size = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| UpstreamError::Protocol {
                host: target.host.clone(),
                message: format!("HEAD of blob {digest} did not say its size"),
            })?;
        if size > max_size {
            return Err(blob_too_large(&target.host, size, max_size));
        }
        Ok(Some(size))
    }
}

/// The error for a blob announced larger than `registry_proxies.max_blob_size`.
pub fn blob_too_large(host: &str, size: u64, max: u64) -> UpstreamError {
    UpstreamError::Protocol {
        host: host.to_string(),
        message: format!(
            "a {size}-byte blob is larger than registry_proxies.max_blob_size ({max} bytes); raise it if such blobs are expected"
        ),
    }
}

enum Auth {
    Bearer(String),
    Basic(String, String),
}

async fn send_with_timeout(
    req: reqwest::RequestBuilder,
    timeout: Duration,
    host: &str,
) -> Result<Response, UpstreamError> {
    match tokio::time::timeout(timeout, req.send()).await {
        Err(_) => Err(UpstreamError::Timeout {
            host: host.to_string(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(UpstreamError::from_reqwest(&e, host, timeout)),
        Ok(Ok(resp)) => Ok(resp),
    }
}

/// Reads a whole body of at most `limit` bytes: refused at once when the
/// announced length is larger, and reading stops (the connection is
/// dropped) as soon as more arrives. Each chunk must come within `idle`,
/// and the whole body by `deadline`.
async fn read_bounded(
    mut resp: Response,
    limit: u64,
    idle: Duration,
    deadline: Instant,
    host: &str,
    what: &str,
) -> Result<Bytes, UpstreamError> {
    let too_big = || UpstreamError::Protocol {
        host: host.to_string(),
        message: format!("{what} larger than {limit} bytes; stopped reading"),
    };
    let announced = resp.content_length();
    if announced.is_some_and(|l| l > limit) {
        return Err(too_big());
    }
    // Exactly the announced length, or growing by doubling up to the limit:
    // never more than the limit (a `BytesMut` would round up past it).
    let capacity = announced.unwrap_or(64 * 1024).min(limit);
    let mut buf: Vec<u8> = Vec::with_capacity(usize::try_from(capacity).unwrap_or(0));
    loop {
        let wait = idle.min(deadline.saturating_duration_since(Instant::now()));
        match tokio::time::timeout(wait, resp.chunk()).await {
            Err(_) => {
                return Err(UpstreamError::Timeout {
                    host: host.to_string(),
                    after: wait,
                })
            }
            Ok(Err(e)) => return Err(UpstreamError::from_reqwest(&e, host, wait)),
            Ok(Ok(None)) => return Ok(Bytes::from(buf)),
            Ok(Ok(Some(chunk))) => {
                let needed = buf.len() + chunk.len();
                if needed as u64 > limit {
                    return Err(too_big());
                }
                if needed > buf.capacity() {
                    let grown = needed
                        .max(buf.capacity().saturating_mul(2))
                        .min(usize::try_from(limit).unwrap_or(usize::MAX));
                    buf.reserve_exact(grown - buf.len());
                }
                buf.extend_from_slice(&chunk);
            }
        }
    }
}

/// Whole KiB needed for `bytes`.
fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

/// 2xx → the response; 404 → `None`; anything else → an error.
fn check_status(resp: Response, host: &str) -> Result<Option<Response>, UpstreamError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(Some(resp));
    }
    if status == StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        return Err(UpstreamError::Auth {
            host: host.to_string(),
            message: format!("access denied ({status}); check the credentials in registry_proxies"),
        });
    }
    Err(UpstreamError::Status {
        host: host.to_string(),
        status,
        retry_after: resp
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(clamp_retry_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_challenges() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull,push""#,
        )
        .unwrap();
        assert_eq!(c.scheme, "bearer");
        assert_eq!(c.params["realm"], "https://auth.docker.io/token");
        assert_eq!(c.params["service"], "registry.docker.io");
        assert_eq!(c.params["scope"], "repository:library/nginx:pull,push");
        let b = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(b.scheme, "basic");
        assert_eq!(b.params["realm"], "Registry Realm");
    }

    #[test]
    fn upstream_numbers_are_clamped() {
        let v = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap();
        let early = TOKEN_RENEW_EARLY;
        assert_eq!(token_lifetime(None), Duration::from_secs(60) - early);
        assert_eq!(
            token_lifetime(Some(&v("300"))),
            Duration::from_secs(300) - early
        );
        for huge in ["18446744073709551615", "1e300", "9223372036854775807"] {
            assert_eq!(token_lifetime(Some(&v(huge))), MAX_TOKEN_LIFETIME - early);
        }
        for tiny in ["0", "-5", "-1e300", "3"] {
            assert_eq!(token_lifetime(Some(&v(tiny))), MIN_TOKEN_LIFETIME - early);
        }
        for not_a_number in ["\"soon\"", "null", "[1]"] {
            let got = token_lifetime(Some(&v(not_a_number)));
            assert_eq!(got, Duration::from_secs(60) - early);
        }
        // Every lifetime can be added to now.
        assert!(Instant::now()
            .checked_add(token_lifetime(Some(&v("1e300"))))
            .is_some());
        assert_eq!(clamp_retry_after("42").as_deref(), Some("42"));
        assert_eq!(
            clamp_retry_after("99999999999999999999").as_deref(),
            Some("3600")
        );
        assert_eq!(clamp_retry_after("86400").as_deref(), Some("3600"));
        assert_eq!(clamp_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn transient_errors() {
        let s = |status| UpstreamError::Status {
            host: "h".into(),
            status,
            retry_after: None,
        };
        assert!(s(StatusCode::SERVICE_UNAVAILABLE).is_transient());
        assert!(s(StatusCode::TOO_MANY_REQUESTS).is_transient());
        assert!(!s(StatusCode::BAD_REQUEST).is_transient());
        assert!(UpstreamError::Timeout {
            host: "h".into(),
            after: Duration::from_secs(1)
        }
        .is_transient());
    }
}
