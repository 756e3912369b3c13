//! Talking to upstream registries: pooled HTTP clients, the Docker/OCI token
//! flow (anonymous or with configured credentials) and tokens cached per
//! realm, service, scope and user until they expire.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use reqwest::header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use reqwest::{Client, Method, Response, StatusCode};
use serde::Deserialize;

use super::target::Target;
use crate::oci::Digest;

/// Every manifest type we can cache, for the `Accept` header.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

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
            UpstreamError::Auth { .. } | UpstreamError::Protocol { .. } => false,
        }
    }
}

/// What a manifest HEAD told us.
#[derive(Debug, Clone)]
pub struct ManifestHead {
    pub digest: Option<Digest>,
}

/// A fetched manifest.
#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: bytes::Bytes,
    pub content_type: Option<String>,
}

#[derive(Deserialize)]
struct TokenResponse {
    token: Option<String>,
    access_token: Option<String>,
    expires_in: Option<u64>,
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

pub struct Upstreams {
    /// One pooled client per distinct TLS setup (default, or with an extra CA).
    clients: Mutex<HashMap<Option<std::path::PathBuf>, Client>>,
    /// Bearer tokens by (upstream host, scope, user), with their expiry.
    tokens: Mutex<HashMap<TokenKey, (String, Instant)>>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Upstreams {
            clients: Mutex::new(HashMap::new()),
            tokens: Mutex::new(HashMap::new()),
        }
    }
}

impl Upstreams {
    fn client(&self, target: &Target) -> Result<Client, UpstreamError> {
        let ca = target.settings.as_ref().and_then(|s| s.ca.clone());
        if let Some(c) = self.clients.lock().get(&ca) {
            return Ok(c.clone());
        }
        let protocol = |message: String| UpstreamError::Protocol {
            host: target.host.clone(),
            message,
        };
        let mut builder = Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("trow/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &ca {
            let pem = std::fs::read(path)
                .map_err(|e| protocol(format!("cannot read CA {}: {e}", path.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|e| protocol(format!("bad CA {}: {e}", path.display())))?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(|e| protocol(e.to_string()))?;
        self.clients.lock().insert(ca, client.clone());
        Ok(client)
    }

    fn credentials(target: &Target) -> Option<(String, String)> {
        let s = target.settings.as_ref()?;
        Some((s.username.clone()?, s.password.clone()?))
    }

    fn scope(target: &Target) -> String {
        format!("repository:{}:pull", target.upstream_repo)
    }

    /// A cached token for this target's pull scope, if one is still valid.
    fn token_key(target: &Target) -> TokenKey {
        let user = Self::credentials(target).map(|c| c.0).unwrap_or_default();
        (target.host.clone(), Self::scope(target), user)
    }

    fn cached_token(&self, target: &Target) -> Option<String> {
        let now = Instant::now();
        let mut tokens = self.tokens.lock();
        tokens.retain(|_, (_, expiry)| *expiry > now);
        tokens
            .get(&Self::token_key(target))
            .map(|(token, _)| token.clone())
    }

    /// Gets a token from the realm of a Bearer challenge.
    async fn fetch_token(
        &self,
        target: &Target,
        challenge: &Challenge,
        timeout: Duration,
    ) -> Result<String, UpstreamError> {
        let realm = challenge
            .params
            .get("realm")
            .cloned()
            .ok_or_else(|| UpstreamError::Auth {
                host: target.host.clone(),
                message: "Bearer challenge without realm".into(),
            })?;
        let service = challenge.params.get("service").cloned().unwrap_or_default();
        let scope = challenge
            .params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| Self::scope(target));
        let creds = Self::credentials(target);
        let mut req = self
            .client(target)?
            .get(&realm)
            .query(&[("service", &service), ("scope", &scope)]);
        if let Some((user, password)) = &creds {
            req = req.basic_auth(user, Some(password));
        }
        let resp = send_with_timeout(req, timeout, &target.host).await?;
        if !resp.status().is_success() {
            return Err(UpstreamError::Auth {
                host: target.host.clone(),
                message: format!("token endpoint {realm} answered {}", resp.status()),
            });
        }
        let body: TokenResponse = resp.json().await.map_err(|e| UpstreamError::Auth {
            host: target.host.clone(),
            message: format!("token endpoint sent no token: {e}"),
        })?;
        let token = body
            .token
            .or(body.access_token)
            .ok_or_else(|| UpstreamError::Auth {
                host: target.host.clone(),
                message: "token endpoint sent no token".into(),
            })?;
        // Docker's spec: 60 s when unspecified; renew a little early.
        let lifetime = Duration::from_secs(body.expires_in.unwrap_or(60).max(10));
        self.tokens.lock().insert(
            Self::token_key(target),
            (
                token.clone(),
                Instant::now() + lifetime - Duration::from_secs(5),
            ),
        );
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
        let client = self.client(target)?;
        let url = format!("{}/v2/{}/{path}", target.base_url, target.upstream_repo);
        let build = |auth: Option<Auth>| {
            let mut req = client.request(method.clone(), &url);
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
            Some(c) if c.scheme == "basic" => match Self::credentials(target) {
                Some((u, p)) => Auth::Basic(u, p),
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

    /// `GET` a manifest, bounded by `max_size` bytes.
    pub async fn get_manifest(
        &self,
        target: &Target,
        reference: &str,
        timeout: Duration,
        max_size: u64,
    ) -> Result<Option<FetchedManifest>, UpstreamError> {
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
        let too_big = || UpstreamError::Protocol {
            host: target.host.clone(),
            message: format!("manifest larger than --max-manifest-size ({max_size} bytes)"),
        };
        if resp.content_length().is_some_and(|l| l > max_size) {
            return Err(too_big());
        }
        let bytes = tokio::time::timeout(timeout, resp.bytes())
            .await
            .map_err(|_| UpstreamError::Timeout {
                host: target.host.clone(),
                after: timeout,
            })?
            .map_err(|e| UpstreamError::Unreachable {
                host: target.host.clone(),
                message: e.to_string(),
            })?;
        if bytes.len() as u64 > max_size {
            return Err(too_big());
        }
        Ok(Some(FetchedManifest {
            bytes,
            content_type,
        }))
    }

    /// `GET` a blob; the response body is streamed by the caller.
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

    /// `HEAD` a blob: its size, or `None` when upstream does not have it.
    pub async fn head_blob(
        &self,
        target: &Target,
        digest: &Digest,
        timeout: Duration,
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
        Ok(check_status(resp, &target.host)?.map(|r| {
            r.headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        }))
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
        Ok(Err(e)) if e.is_timeout() => Err(UpstreamError::Timeout {
            host: host.to_string(),
            after: timeout,
        }),
        Ok(Err(e)) => Err(UpstreamError::Unreachable {
            host: host.to_string(),
            message: e.to_string(),
        }),
        Ok(Ok(resp)) => Ok(resp),
    }
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
            .map(str::to_string),
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
