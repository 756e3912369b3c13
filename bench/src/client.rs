//! A minimal OCI Distribution client: just the calls the workloads time, plus
//! the authentication dance registries commonly require.
//!
//! Authentication: credentials, if given, are sent as Basic auth. If the
//! registry answers 401 with a `Bearer` challenge, the token endpoint named in
//! the challenge is asked (with the Basic credentials, if any) for a token for
//! the challenged scope; the token is cached per scope and the request is sent
//! again. Requests are described by closures rather than built once, so that a
//! request (including a streamed body, regenerated from its seed) can be sent a
//! second time after the token arrives.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use reqwest::header::{
    ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LINK, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Client, RequestBuilder, Response, StatusCode, Url};
use sha2::{Digest, Sha256};

use crate::data::BlobSpec;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// What a container runtime sends when pulling a manifest by tag.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";
const OCTET: &str = "application/octet-stream";
/// Bodies up to this size are sent as one buffer rather than a stream, which
/// lets the HTTP stack write them with a single syscall like real clients do.
const INLINE_BODY: u64 = 64 * 1024;

/// Bytes to upload: either literal (manifests, configs) or a seeded recipe.
#[derive(Clone)]
pub enum Payload {
    Bytes(Bytes),
    Blob(BlobSpec),
}

impl Payload {
    pub fn len(&self) -> u64 {
        match self {
            Payload::Bytes(b) => b.len() as u64,
            Payload::Blob(s) => s.size(),
        }
    }

    /// An HTTP body for `range` of the payload; large ranges are streamed.
    fn body(&self, range: Range<u64>) -> reqwest::Body {
        match self {
            Payload::Bytes(b) => b.slice(range.start as usize..range.end as usize).into(),
            Payload::Blob(s) if range.end - range.start <= INLINE_BODY => {
                let mut v = Vec::with_capacity((range.end - range.start) as usize);
                for c in s.chunks(range) {
                    v.extend_from_slice(&c);
                }
                v.into()
            }
            Payload::Blob(s) => reqwest::Body::wrap_stream(futures_util::stream::iter(
                s.chunks(range).map(Ok::<Bytes, std::io::Error>),
            )),
        }
    }
}

/// What a read returned, with its time to first byte.
pub struct Fetched {
    pub bytes: u64,
    pub ttfb: Duration,
    /// `sha256:<hex>` of the body, when verification was asked for.
    pub digest: Option<String>,
}

/// One page of `_catalog` or `tags/list`.
pub struct Page {
    pub items: usize,
    pub next: Option<Url>,
}

/// Client for one registry; cheap to share behind an `Arc`.
pub struct Registry {
    http: Client,
    base: Url,
    creds: Option<(String, String)>,
    /// Bearer tokens by scope.
    tokens: Mutex<HashMap<String, String>>,
    /// Token endpoint learnt from the first Bearer challenge, so that tokens
    /// can be fetched before a timed case rather than inside it.
    realm: Mutex<Option<Challenge>>,
    /// One token fetch at a time: when 64 workers hit a 401 together (first
    /// request, or an expired token) only one asks the token server.
    token_fetch: tokio::sync::Mutex<()>,
}

/// Whether a repository is read or written; decides the token scope.
#[derive(Clone, Copy)]
pub enum Access {
    Pull,
    Push,
}

pub fn repo_scope(repo: &str, access: Access) -> String {
    match access {
        Access::Pull => format!("repository:{repo}:pull"),
        Access::Push => format!("repository:{repo}:pull,push"),
    }
}

pub const CATALOG_SCOPE: &str = "registry:catalog:*";

/// A parsed `WWW-Authenticate: Bearer ...` challenge.
#[derive(Debug, PartialEq)]
pub struct Challenge {
    pub realm: String,
    pub service: Option<String>,
    pub scope: Option<String>,
}

/// Parses a Bearer challenge; values may be quoted and contain commas.
pub fn parse_bearer_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let mut params: HashMap<String, String> = HashMap::new();
    let mut s = rest.trim_start();
    while !s.is_empty() {
        let eq = s.find('=')?;
        let key = s[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        s = &s[eq + 1..];
        let value;
        if let Some(q) = s.strip_prefix('"') {
            let end = q.find('"')?;
            value = q[..end].to_string();
            s = &q[end + 1..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            value = s[..end].trim().to_string();
            s = &s[end..];
        }
        params.insert(key, value);
        s = s.trim_start().trim_start_matches(',').trim_start();
    }
    Some(Challenge {
        realm: params.remove("realm")?,
        service: params.remove("service"),
        scope: params.remove("scope"),
    })
}

/// The target of the `rel="next"` link in an RFC 8288 `Link` header, which is
/// how the Distribution spec paginates `_catalog` and `tags/list`.
pub fn parse_next_link(h: &str) -> Option<String> {
    let mut rest = h;
    while let Some(open) = rest.find('<') {
        let close = open + rest[open..].find('>')?;
        let target = &rest[open + 1..close];
        let after = &rest[close + 1..];
        let params_end = after.find('<').unwrap_or(after.len());
        let is_next = after[..params_end].split(';').any(|p| {
            p.trim()
                .trim_end_matches(',')
                .split_once('=')
                .map(|(k, v)| {
                    k.trim().eq_ignore_ascii_case("rel")
                        && v.trim()
                            .trim_matches('"')
                            .split_whitespace()
                            .any(|r| r.eq_ignore_ascii_case("next"))
                })
                .unwrap_or(false)
        });
        if is_next {
            return Some(target.to_string());
        }
        rest = &after[params_end..];
    }
    None
}

/// Fails with the status and the start of the body unless `resp` has one of
/// the `ok` statuses.
async fn expect(resp: Response, ok: &[StatusCode], what: &str) -> Result<Response> {
    if ok.contains(&resp.status()) {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    let body: String = body.chars().take(300).collect();
    bail!("{what}: unexpected status {status}: {body}")
}

impl Registry {
    pub fn new(base: &str, creds: Option<(String, String)>, timeout: Duration) -> Result<Self> {
        let base = Url::parse(base).with_context(|| format!("parsing registry URL {base}"))?;
        let http = Client::builder()
            .user_agent(concat!("trow-bench/", env!("CARGO_PKG_VERSION")))
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            // Every request is bounded so that no workload can hang forever.
            .timeout(timeout)
            .build()
            .context("building HTTP client")?;
        Ok(Self {
            http,
            base,
            creds,
            tokens: Mutex::new(HashMap::new()),
            realm: Mutex::new(None),
            token_fetch: tokio::sync::Mutex::new(()),
        })
    }

    fn url(&self, path: &str) -> Result<Url> {
        self.base
            .join(path)
            .with_context(|| format!("joining {path} to {}", self.base))
    }

    fn cached_token(&self, scope: &str) -> Option<String> {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(scope)
            .cloned()
    }

    fn authorize(&self, rb: RequestBuilder, token: Option<&str>) -> RequestBuilder {
        match (token, &self.creds) {
            (Some(t), _) => rb.bearer_auth(t),
            (None, Some((u, p))) => rb.basic_auth(u, Some(p)),
            (None, None) => rb,
        }
    }

    /// Sends the request `build` describes, doing the token flow on a Bearer
    /// challenge (once per request).
    async fn send(&self, scope: &str, build: impl Fn() -> RequestBuilder) -> Result<Response> {
        let token = self.cached_token(scope);
        let resp = self
            .authorize(build(), token.as_deref())
            .send()
            .await
            .context("sending request")?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let Some(challenge) = resp
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_bearer_challenge)
        else {
            return Ok(resp);
        };
        drop(resp);
        *self.realm.lock().unwrap_or_else(|p| p.into_inner()) = Some(Challenge {
            realm: challenge.realm.clone(),
            service: challenge.service.clone(),
            scope: None,
        });
        let guard = self.token_fetch.lock().await;
        // Another worker may have fetched a fresh token while we waited.
        let token = match self.cached_token(scope) {
            Some(t) if Some(&t) != token.as_ref() => t,
            _ => self.fetch_and_cache(&challenge, scope).await?,
        };
        drop(guard);
        self.authorize(build(), Some(&token))
            .send()
            .await
            .context("sending request with bearer token")
    }

    async fn fetch_and_cache(&self, ch: &Challenge, scope: &str) -> Result<String> {
        let token = self.fetch_token(ch, scope).await?;
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scope.to_string(), token.clone());
        Ok(token)
    }

    /// Gets a token for `scope` now, if the registry uses tokens, so that the
    /// first timed request does not pay for the token round trip.
    pub async fn prefetch(&self, scope: &str) -> Result<()> {
        let realm = self
            .realm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| Challenge {
                realm: c.realm.clone(),
                service: c.service.clone(),
                scope: None,
            });
        let Some(ch) = realm else { return Ok(()) };
        let _guard = self.token_fetch.lock().await;
        if self.cached_token(scope).is_none() {
            self.fetch_and_cache(&ch, scope).await?;
        }
        Ok(())
    }

    async fn fetch_token(&self, ch: &Challenge, scope: &str) -> Result<String> {
        let mut url = Url::parse(&ch.realm).with_context(|| format!("token realm {}", ch.realm))?;
        {
            let mut q = url.query_pairs_mut();
            if let Some(s) = &ch.service {
                q.append_pair("service", s);
            }
            let scope = ch.scope.as_deref().unwrap_or(scope);
            if !scope.is_empty() {
                q.append_pair("scope", scope);
            }
        }
        let mut rb = self.http.get(url.clone());
        if let Some((u, p)) = &self.creds {
            rb = rb.basic_auth(u, Some(p));
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("requesting token from {url}"))?;
        let resp = expect(resp, &[StatusCode::OK], "token request").await?;
        let v: serde_json::Value = resp.json().await.context("decoding token response")?;
        v.get("token")
            .or_else(|| v.get("access_token"))
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .context("token response has neither token nor access_token")
    }

    /// The upload URL from a `Location` header, which may be relative.
    fn location(&self, resp: &Response) -> Result<Url> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .context("response has no Location header")?
            .to_str()
            .context("Location header is not text")?;
        self.url(loc)
    }

    /// `GET /v2/`: is the registry there and do our credentials work?
    pub async fn ping(&self) -> Result<()> {
        let url = self.url("/v2/")?;
        let resp = self.send("", || self.http.get(url.clone())).await?;
        expect(resp, &[StatusCode::OK], "GET /v2/").await?;
        Ok(())
    }

    /// Opens an upload session and returns its URL.
    pub async fn start_upload(&self, repo: &str) -> Result<Url> {
        let url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        let scope = repo_scope(repo, Access::Push);
        let resp = self
            .send(&scope, || {
                self.http.post(url.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        let resp = expect(resp, &[StatusCode::ACCEPTED], "starting upload").await?;
        self.location(&resp)
    }

    /// PUT to `loc?digest=` with `range` of the payload (possibly empty),
    /// which completes an upload session.
    async fn finish_upload(
        &self,
        repo: &str,
        mut loc: Url,
        payload: &Payload,
        range: Range<u64>,
        digest: &str,
    ) -> Result<()> {
        loc.query_pairs_mut().append_pair("digest", digest);
        let scope = repo_scope(repo, Access::Push);
        let len = range.end - range.start;
        let resp = self
            .send(&scope, || {
                self.http
                    .put(loc.clone())
                    .header(CONTENT_TYPE, OCTET)
                    .header(CONTENT_LENGTH, len)
                    .body(payload.body(range.clone()))
            })
            .await?;
        expect(resp, &[StatusCode::CREATED], "completing upload").await?;
        Ok(())
    }

    /// Monolithic upload: POST, then PUT of the whole blob with its digest.
    pub async fn push_monolithic(&self, repo: &str, payload: &Payload, digest: &str) -> Result<()> {
        let loc = self.start_upload(repo).await?;
        self.finish_upload(repo, loc, payload, 0..payload.len(), digest)
            .await
    }

    /// Chunked upload: POST, PATCH each `chunk`-sized range, then PUT.
    pub async fn push_chunked(
        &self,
        repo: &str,
        payload: &Payload,
        digest: &str,
        chunk: u64,
    ) -> Result<()> {
        let mut loc = self.start_upload(repo).await?;
        let scope = repo_scope(repo, Access::Push);
        let len = payload.len();
        let mut at = 0;
        while at < len {
            let end = (at + chunk).min(len);
            let resp = self
                .send(&scope, || {
                    self.http
                        .patch(loc.clone())
                        .header(CONTENT_TYPE, OCTET)
                        .header(CONTENT_RANGE, format!("{}-{}", at, end - 1))
                        .header(CONTENT_LENGTH, end - at)
                        .body(payload.body(at..end))
                })
                .await?;
            let resp = expect(resp, &[StatusCode::ACCEPTED], "uploading chunk").await?;
            loc = self.location(&resp)?;
            at = end;
        }
        self.finish_upload(repo, loc, payload, len..len, digest)
            .await
    }

    /// Cross-repository mount of `digest` from `from`; falls back to a
    /// monolithic upload when the registry declines the mount (202).
    pub async fn mount_or_push(
        &self,
        repo: &str,
        from: &str,
        payload: &Payload,
        digest: &str,
    ) -> Result<()> {
        let mut url = self.url(&format!("/v2/{repo}/blobs/uploads/"))?;
        url.query_pairs_mut()
            .append_pair("mount", digest)
            .append_pair("from", from);
        let scope = repo_scope(repo, Access::Push);
        let resp = self
            .send(&scope, || {
                self.http.post(url.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        let resp = expect(
            resp,
            &[StatusCode::CREATED, StatusCode::ACCEPTED],
            "mounting blob",
        )
        .await?;
        if resp.status() == StatusCode::CREATED {
            return Ok(());
        }
        let loc = self.location(&resp)?;
        self.finish_upload(repo, loc, payload, 0..payload.len(), digest)
            .await
    }

    /// Reads a whole response body, timing the first chunk and optionally
    /// hashing it.
    async fn drain(mut resp: Response, t0: Instant, verify: bool) -> Result<Fetched> {
        let mut hasher = verify.then(Sha256::new);
        let mut ttfb = None;
        let mut bytes = 0u64;
        while let Some(c) = resp.chunk().await.context("reading response body")? {
            if ttfb.is_none() {
                ttfb = Some(t0.elapsed());
            }
            bytes += c.len() as u64;
            if let Some(h) = hasher.as_mut() {
                h.update(&c);
            }
        }
        Ok(Fetched {
            bytes,
            ttfb: ttfb.unwrap_or_else(|| t0.elapsed()),
            digest: hasher.map(|h| format!("sha256:{}", hex::encode(h.finalize()))),
        })
    }

    /// `GET /v2/<repo>/blobs/<digest>`, reading the body to the end.
    pub async fn get_blob(&self, repo: &str, digest: &str, verify: bool) -> Result<Fetched> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"))?;
        let scope = repo_scope(repo, Access::Pull);
        let t0 = Instant::now();
        let resp = self.send(&scope, || self.http.get(url.clone())).await?;
        let resp = expect(resp, &[StatusCode::OK], "GET blob").await?;
        Self::drain(resp, t0, verify).await
    }

    pub async fn put_manifest(&self, repo: &str, reference: &str, body: &Bytes) -> Result<()> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let scope = repo_scope(repo, Access::Push);
        let resp = self
            .send(&scope, || {
                self.http
                    .put(url.clone())
                    .header(CONTENT_TYPE, OCI_MANIFEST)
                    .body(body.clone())
            })
            .await?;
        expect(resp, &[StatusCode::CREATED], "PUT manifest").await?;
        Ok(())
    }

    /// GET or HEAD of a manifest with the Accept header of a runtime.
    pub async fn get_manifest(&self, repo: &str, reference: &str, head: bool) -> Result<Fetched> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"))?;
        let scope = repo_scope(repo, Access::Pull);
        let t0 = Instant::now();
        let resp = self
            .send(&scope, || {
                let rb = if head {
                    self.http.head(url.clone())
                } else {
                    self.http.get(url.clone())
                };
                rb.header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        let resp = expect(resp, &[StatusCode::OK], "GET manifest").await?;
        Self::drain(resp, t0, false).await
    }

    /// URL of the first page of the catalog.
    pub fn catalog_url(&self, n: usize) -> Result<Url> {
        self.url(&format!("/v2/_catalog?n={n}"))
    }

    /// URL of the first page of a repository's tag list.
    pub fn tags_url(&self, repo: &str, n: usize) -> Result<Url> {
        self.url(&format!("/v2/{repo}/tags/list?n={n}"))
    }

    /// Fetches one page of `_catalog` or `tags/list` and its `next` link.
    pub async fn list_page(&self, url: &Url, scope: &str) -> Result<Page> {
        let resp = self.send(scope, || self.http.get(url.clone())).await?;
        let resp = expect(resp, &[StatusCode::OK], "listing").await?;
        let next = match resp
            .headers()
            .get(LINK)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_next_link)
        {
            Some(n) => Some(url.join(&n).with_context(|| format!("Link target {n}"))?),
            None => None,
        };
        let v: serde_json::Value = resp.json().await.context("decoding listing")?;
        let items = v
            .get("repositories")
            .or_else(|| v.get("tags"))
            .and_then(|a| a.as_array())
            .map(|a| a.len())
            .unwrap_or(0);
        Ok(Page { items, next })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_link_simple() {
        let h = r#"</v2/_catalog?last=b%2Fc&n=100>; rel="next""#;
        assert_eq!(
            parse_next_link(h).as_deref(),
            Some("/v2/_catalog?last=b%2Fc&n=100")
        );
    }

    #[test]
    fn next_link_among_others() {
        let h = r#"<https://r/v2/_catalog?n=1>; rel="prev", <https://r/v2/_catalog?n=1&last=x>; rel=next"#;
        assert_eq!(
            parse_next_link(h).as_deref(),
            Some("https://r/v2/_catalog?n=1&last=x")
        );
        assert_eq!(parse_next_link(r#"</a>; rel="prev""#), None);
        assert_eq!(parse_next_link(""), None);
    }

    #[test]
    fn bearer_challenge() {
        let h = r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#;
        assert_eq!(
            parse_bearer_challenge(h),
            Some(Challenge {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        let h = r#"bearer realm="http://x/t", service=svc"#;
        let c = parse_bearer_challenge(h).unwrap();
        assert_eq!(c.service.as_deref(), Some("svc"));
        assert_eq!(c.scope, None);
        assert_eq!(parse_bearer_challenge(r#"Basic realm="x""#), None);
    }
}

#[cfg(test)]
#[path = "client_tests.rs"]
mod auth_tests;
