//! The HTTP side of authentication: the guard in front of `/v2/…` and the
//! token endpoint `/login` (Docker token authentication specification).
//!
//! - A request without credentials is served if anonymous users may do what
//!   it needs; otherwise it gets 401 with a `Bearer` challenge naming the
//!   scope to ask `/login` for. `GET /v2/` always needs an identity, so that
//!   `docker login` checks the password.
//! - `Authorization: Bearer <jwt>` is checked for signature, expiry,
//!   audience and scope. A token without the needed scope gets 401 with a
//!   challenge for it when its user may have it (the client then fetches a
//!   new token), and 403 `DENIED` when the user may not.
//! - `Authorization: Basic` is checked directly (clients that never ask for
//!   tokens); refusals are 403 `DENIED`. A password verified in the last
//!   minute is not hashed again (`auth::verified`).
//! - Failed password checks are limited per client address (429); behind
//!   `--trusted-proxies` the address is the one they forward.
//! - A pull served by the pull-through cache (`f/…`, or `?ns=<host>` from a
//!   containerd mirror) needs `pull` on the cache repository it is served
//!   from as well as on the name in its path.
//! - The token service name (`aud`) is `--hostname` or a fixed name, never
//!   what the request says; only the realm URL follows the host the client
//!   addressed, so that clients find `/login`.
//!
//! Credentials, tokens and query strings are never logged.
//!
//! The guard runs in three steps, one function each: [`identify`] the
//! caller from its credentials, [`decide`] whether it may do what the
//! request needs, and [`refuse`] shapes a refusal as 401, 403 or 429.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;

use super::error::ApiError;
use super::forwarded::{ClientView, TrustedProxies};
use super::route::{self, Route};
use super::AppState;
use crate::auth::permissions::Action;
use crate::auth::token::{parse_scopes, Claims, Scope};
use crate::auth::{Auth, Identity};

/// The user a request was made as, put in the response's extensions for
/// the request log.
#[derive(Debug, Clone)]
pub struct AuthenticatedUser(pub Arc<str>);

/// Maps a pull of the repository named in a path, with the mirror namespace
/// of its `?ns=` if any, to the cache repository it is served from when the
/// pull-through cache serves it; `None` otherwise. The `api` layer builds it
/// from the proxy, so `auth` knows nothing of the proxy.
pub type CacheRepoOf = Arc<dyn Fn(&str, Option<&str>) -> Option<String> + Send + Sync>;

/// What the guard works with.
#[derive(Clone)]
pub struct Guard {
    pub auth: Arc<Auth>,
    /// Whose `X-Forwarded-*` headers to believe.
    pub proxies: Arc<TrustedProxies>,
    pub cache_repo_of: CacheRepoOf,
}

/// What a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Need {
    /// Any identity (`GET /v2/`, and unknown `/v2/…` paths).
    Identity,
    /// `action` on `repo` (for `Catalog`, `repo` is empty). A pull that the
    /// pull-through cache serves from another repository names it in
    /// `cache_repo`: the rules must allow pulling that one too.
    Access {
        repo: String,
        action: Action,
        cache_repo: Option<String>,
    },
}

/// `None` for endpoints outside user auth (`/healthz`, `/readiness`,
/// `/login`, anything not under `/v2`). `ns` is the request's mirror
/// namespace (`?ns=`), as dispatch reads it.
fn need(
    method: &Method,
    path: &str,
    ns: Option<&str>,
    cache_repo_of: &dyn Fn(&str, Option<&str>) -> Option<String>,
) -> Option<Need> {
    if path == "/v2" || path == "/v2/" {
        return Some(Need::Identity);
    }
    if path == "/v2/_catalog" {
        return Some(Need::Access {
            repo: String::new(),
            action: Action::Catalog,
            cache_repo: None,
        });
    }
    if path == "/admin/gc" || path == "/admin/verify" {
        return Some(Need::Access {
            repo: String::new(),
            action: Action::Admin,
            cache_repo: None,
        });
    }
    if let Some(name) = path.strip_prefix("/admin/history/") {
        return Some(Need::Access {
            repo: name.to_string(),
            action: Action::Pull,
            cache_repo: None,
        });
    }
    if path.starts_with("/admin") {
        return Some(Need::Identity);
    }
    let rest = path.strip_prefix("/v2/")?;
    let Some(route) = route::parse(rest) else {
        return Some(Need::Identity);
    };
    let read = matches!(*method, Method::GET | Method::HEAD);
    let (repo, action, proxied) = match route {
        Route::Tags { name } | Route::Referrers { name, .. } => (name, Action::Pull, false),
        Route::Manifest { name, .. } | Route::Blob { name, .. } => {
            let action = if read {
                Action::Pull
            } else if *method == Method::DELETE {
                Action::Delete
            } else {
                Action::Push
            };
            // Manifest and blob reads are what the cache serves.
            (name, action, read)
        }
        Route::UploadStart { name } | Route::Upload { name, .. } => (name, Action::Push, false),
    };
    let cache_repo = proxied
        .then(|| cache_repo_of(&repo, ns))
        .flatten()
        .filter(|c| *c != repo);
    Some(Need::Access {
        repo,
        action,
        cache_repo,
    })
}

/// The scope a client should ask for to do `action` on `repo`.
fn scope_for(repo: &str, action: Action) -> Scope {
    match action {
        Action::Catalog => Scope::Catalog,
        // Pushing clients also read (HEAD before upload), as docker asks.
        Action::Push => Scope::Repository {
            name: repo.to_string(),
            actions: vec![Action::Pull, Action::Push],
        },
        a => Scope::Repository {
            name: repo.to_string(),
            actions: vec![a],
        },
    }
}

/// The scope a challenge for `need` names. Only the name in the path:
/// that is what clients ask tokens for (a cache repository is checked
/// against the rules, not the token).
fn need_scope(need: &Need) -> Option<Scope> {
    match need {
        Need::Access { repo, action, .. } => Some(scope_for(repo, *action)),
        Need::Identity => None,
    }
}

/// This registry as the client sees it: the token service name and the
/// realm URL.
struct Service {
    /// The audience of tokens: `--hostname`, else a fixed name. Never taken
    /// from the request.
    name: String,
    /// `<scheme>://<host>/login`, where the client finds the token endpoint.
    realm: String,
}

fn service(auth: &Auth, client: &ClientView, headers: &HeaderMap, uri: &Uri) -> Service {
    // `https` with `--tls`, or behind a trusted proxy that terminates TLS
    // and says so with `X-Forwarded-Proto: https`.
    let scheme = if auth.https || client.forwarded_https {
        "https"
    } else {
        "http"
    };
    Service {
        name: auth.service.clone(),
        realm: format!(
            "{scheme}://{}/login",
            realm_host(auth, client, headers, uri)
        ),
    }
}

/// `--hostname`, else the host a trusted proxy forwarded, else the host the
/// client addressed; `localhost` when none of them is a plain host[:port].
fn realm_host(auth: &Auth, client: &ClientView, headers: &HeaderMap, uri: &Uri) -> String {
    if let Some(h) = &auth.hostname {
        return h.clone();
    }
    let addressed = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()));
    client
        .forwarded_host
        .as_deref()
        .or(addressed)
        .and_then(plain_host)
        .unwrap_or_else(|| "localhost".into())
}

/// `host` lower-cased if it is only what a host[:port] is made of: the
/// value goes into a quoted header parameter.
fn plain_host(host: &str) -> Option<String> {
    let ok = !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    ok.then(|| host.to_ascii_lowercase())
}

/// `401` with a `Bearer` challenge.
fn challenge(
    service: &Service,
    scope: Option<&Scope>,
    error: Option<&str>,
    message: &'static str,
) -> ApiError {
    let Service { name, realm } = service;
    let mut value = format!("Bearer realm=\"{realm}\",service=\"{name}\"");
    if let Some(s) = scope {
        value.push_str(&format!(",scope=\"{}\"", s.to_challenge()));
    }
    if let Some(e) = error {
        value.push_str(&format!(",error=\"{e}\""));
    }
    ApiError::Unauthorized {
        challenge: value,
        message,
    }
}

/// The client of a request: its address (for rate limiting) and what a
/// trusted proxy says about it.
fn client_view(proxies: &TrustedProxies, req: &Request) -> ClientView {
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    proxies.client(peer, req.headers())
}

/// Credentials on a request.
enum Credentials {
    None,
    Basic { user: String, password: String },
    Bearer(String),
    Malformed,
}

fn credentials(headers: &HeaderMap) -> Credentials {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return Credentials::None;
    };
    let Ok(value) = value.to_str() else {
        return Credentials::Malformed;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let rest = rest.trim();
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()
            .and_then(|b| String::from_utf8(b).ok());
        match decoded.as_deref().and_then(|s| s.split_once(':')) {
            Some((user, password)) if !user.is_empty() => Credentials::Basic {
                user: user.to_string(),
                password: password.to_string(),
            },
            _ => Credentials::Malformed,
        }
    } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
        Credentials::Bearer(rest.to_string())
    } else {
        Credentials::Malformed
    }
}

/// Checks a user name and password, with rate limiting.
async fn check_basic(
    auth: &Auth,
    ip: IpAddr,
    user: &str,
    password: &str,
) -> Result<Identity, Refusal> {
    if let Some(wait) = auth.limiter.blocked(ip) {
        tracing::warn!(%ip, "too many failed logins from this address; refusing password attempts for now");
        return Err(Refusal::TooMany {
            retry_after: wait.as_secs() + 1,
        });
    }
    if auth.check_password(user, password).await {
        Ok(Identity::User(user.to_string()))
    } else {
        auth.limiter.record_failure(ip);
        // The user name is logged so that operators can see attacks; the
        // password never is.
        tracing::info!(%ip, user, "failed login");
        Err(Refusal::BadCredentials)
    }
}

/// Who the caller is, as far as the request says.
enum Caller {
    /// No credentials.
    Anonymous,
    /// Basic credentials, checked.
    User(Identity),
    /// A valid token.
    Token(Claims),
}

impl Caller {
    fn identity(&self) -> Identity {
        match self {
            Caller::Anonymous => Identity::Anonymous,
            Caller::User(id) => id.clone(),
            Caller::Token(c) => Identity::from_subject(&c.sub),
        }
    }

    fn allows(&self, auth: &Auth, repo: &str, action: Action) -> bool {
        match self {
            Caller::Token(c) => c.allows(repo, action),
            other => auth.allows(&other.identity(), repo, action),
        }
    }
}

/// Why a request is not let through.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// An `Authorization` header we cannot read.
    Malformed,
    /// Wrong user name or password.
    BadCredentials,
    /// Too many failed logins from the client's address.
    TooMany { retry_after: u64 },
    /// A bearer token that does not verify.
    InvalidToken,
    /// No credentials, and logging in may help.
    LoginRequired,
    /// A token of an anonymous login that does not grant this; logging in
    /// may help.
    AnonymousToken,
    /// The token does not grant this, but its user may: a new token helps.
    InsufficientScope,
    /// The caller may not do `action` on `repo`.
    Denied {
        user: String,
        action: Action,
        repo: String,
    },
}

/// Step one: who the caller is, from its credentials.
async fn identify(
    auth: &Auth,
    ip: IpAddr,
    headers: &HeaderMap,
    service: &Service,
) -> Result<Caller, Refusal> {
    match credentials(headers) {
        Credentials::None => Ok(Caller::Anonymous),
        Credentials::Malformed => Err(Refusal::Malformed),
        Credentials::Basic { user, password } => check_basic(auth, ip, &user, &password)
            .await
            .map(Caller::User),
        Credentials::Bearer(token) => match auth.tokens.verify(&token, &service.name) {
            Ok(claims) => Ok(Caller::Token(claims)),
            Err(e) => {
                tracing::debug!(error = %e, "bearer token refused");
                Err(Refusal::InvalidToken)
            }
        },
    }
}

/// Step two: whether `caller` may do what the request needs.
fn decide(auth: &Auth, caller: &Caller, need: &Need) -> Result<(), Refusal> {
    let (repo, action, cache_repo) = match need {
        Need::Identity if matches!(caller, Caller::Anonymous) => {
            return Err(Refusal::LoginRequired)
        }
        Need::Identity => return Ok(()),
        Need::Access {
            repo,
            action,
            cache_repo,
        } => (repo, *action, cache_repo.as_deref()),
    };
    let who = caller.identity();
    // The name in the path: as the token grants it, or as the rules allow.
    // `admin` is never in a token: the rules decide for the identity.
    let name_ok = if action == Action::Admin {
        auth.allows(&who, repo, action)
    } else {
        caller.allows(auth, repo, action)
    };
    // The cache repository the pull is served from: as the rules allow it
    // for the caller's identity, token or not (clients ask tokens for the
    // name they pull, and the rules have the last word on the cache).
    let cache_ok = cache_repo.is_none_or(|c| auth.allows(&who, c, action));
    if name_ok && cache_ok {
        return Ok(());
    }
    Err(match caller {
        Caller::Anonymous => Refusal::LoginRequired,
        Caller::Token(_) if who == Identity::Anonymous => Refusal::AnonymousToken,
        Caller::Token(_) if cache_ok && auth.allows(&who, repo, action) => {
            Refusal::InsufficientScope
        }
        _ => Refusal::Denied {
            user: who.name().to_string(),
            action,
            repo: match (name_ok, cache_repo) {
                (true, Some(c)) => c.to_string(),
                _ => repo.clone(),
            },
        },
    })
}

/// Step three: the response to a refusal.
fn refuse(refusal: Refusal, service: &Service, need: &Need) -> ApiError {
    let scope = need_scope(need);
    match refusal {
        Refusal::Malformed => challenge(
            service,
            None,
            Some("invalid_request"),
            "malformed Authorization header; send Basic credentials or a Bearer token",
        ),
        Refusal::BadCredentials => challenge(service, None, None, "invalid user name or password"),
        Refusal::TooMany { retry_after } => ApiError::TooManyRequests { retry_after },
        Refusal::InvalidToken => challenge(
            service,
            scope.as_ref(),
            Some("invalid_token"),
            "the token is invalid or expired; log in again",
        ),
        Refusal::LoginRequired => {
            challenge(service, scope.as_ref(), None, "authentication required")
        }
        Refusal::AnonymousToken => challenge(
            service,
            scope.as_ref(),
            Some("insufficient_scope"),
            "authentication required",
        ),
        Refusal::InsufficientScope => challenge(
            service,
            scope.as_ref(),
            Some("insufficient_scope"),
            "the token does not grant this; ask for a token with this scope",
        ),
        Refusal::Denied { user, action, repo } => ApiError::Denied(format!(
            "user `{user}` may not {action} {}",
            match action {
                Action::Catalog => "the catalog".to_string(),
                Action::Admin =>
                    "this registry: name the user with `actions: [admin]` in the configuration file's permissions".to_string(),
                _ => format!("`{repo}`"),
            }
        )),
    }
}

fn with_user(mut response: Response, who: Option<&Identity>) -> Response {
    if let Some(who) = who {
        response
            .extensions_mut()
            .insert(AuthenticatedUser(who.name().into()));
    }
    response
}

/// The middleware in front of every route.
pub async fn guard(State(g): State<Guard>, mut req: Request, next: Next) -> Response {
    let ns = super::mirror_namespace(req.uri());
    let Some(need) = need(
        req.method(),
        req.uri().path(),
        ns.as_deref(),
        &*g.cache_repo_of,
    ) else {
        return next.run(req).await;
    };
    let client = client_view(&g.proxies, &req);
    let service = service(&g.auth, &client, req.headers(), req.uri());
    let caller = match identify(&g.auth, client.ip, req.headers(), &service).await {
        Ok(caller) => caller,
        Err(r) => return refuse(r, &service, &need).into_response(),
    };
    let who = caller.identity();
    if let Err(r) = decide(&g.auth, &caller, &need) {
        return with_user(refuse(r, &service, &need).into_response(), Some(&who));
    }
    admit(&g.auth, &caller, &need, &mut req);
    req.extensions_mut().insert(who.clone());
    with_user(next.run(req).await, Some(&who))
}

/// What an admitted request carries on: the catalog filter, and a push
/// without the mount parameters the caller may not use.
fn admit(auth: &Auth, caller: &Caller, need: &Need, req: &mut Request) {
    let Need::Access { action, .. } = need else {
        return;
    };
    match action {
        Action::Catalog => {
            if let Some(filter) = auth.catalog_filter(&caller.identity()) {
                req.extensions_mut().insert(filter);
            }
        }
        Action::Push => strip_unreadable_mount(auth, caller, req),
        _ => {}
    }
}

/// A cross-repository mount copies a blob out of `from` (or, without
/// `from`, out of any repository). When the caller may not pull what it
/// would copy, the mount parameters are dropped, so the request becomes a
/// plain upload and the client sends the bytes itself.
fn strip_unreadable_mount(auth: &Auth, caller: &Caller, req: &mut Request) {
    #[derive(Deserialize)]
    struct MountQuery {
        mount: Option<String>,
        from: Option<String>,
    }
    if *req.method() != Method::POST {
        return;
    }
    let Some(query) = req.uri().query() else {
        return;
    };
    let Ok(q) = serde_urlencoded::from_str::<MountQuery>(query) else {
        return;
    };
    if q.mount.is_none() {
        return;
    }
    let readable = match &q.from {
        Some(from) => caller.allows(auth, from, Action::Pull),
        // Any repository could be the source: only for those who may pull
        // every repository.
        None => {
            !matches!(caller, Caller::Token(_))
                && auth.catalog_filter(&caller.identity()).is_none()
                && auth.allows(&caller.identity(), "", Action::Pull)
        }
    };
    if readable {
        return;
    }
    let kept: Vec<(String, String)> = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| k != "mount" && k != "from")
        .collect();
    let new_query = serde_urlencoded::to_string(&kept).unwrap_or_default();
    let path = req.uri().path();
    let pq = if new_query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{new_query}")
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = pq.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
}

/// Parameters of a token request (`GET /login?…` or the form of `POST`).
#[derive(Debug, Default, Deserialize)]
struct TokenParams {
    service: Option<String>,
    #[serde(default)]
    scope: Vec<String>,
    grant_type: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

/// Why the token endpoint issued no token.
#[derive(Debug)]
enum LoginError {
    /// An OAuth2-style `400` (`invalid_request`, `unsupported_grant_type`…).
    Request {
        error: &'static str,
        description: String,
    },
    /// 401 or 429.
    Api(ApiError),
    /// The token could not be signed (logged).
    Internal,
}

impl IntoResponse for LoginError {
    fn into_response(self) -> Response {
        match self {
            LoginError::Request { error, description } => {
                let body = serde_json::json!({ "error": error, "error_description": description });
                (StatusCode::BAD_REQUEST, Json(body)).into_response()
            }
            LoginError::Api(e) => e.into_response(),
            LoginError::Internal => super::error::envelope(
                StatusCode::INTERNAL_SERVER_ERROR,
                "UNKNOWN",
                "internal error in the registry; the registry's log has the cause",
                serde_json::Value::Null,
            ),
        }
    }
}

fn token_error(error: &'static str, description: &str) -> LoginError {
    LoginError::Request {
        error,
        description: description.to_string(),
    }
}

/// Parses a query string or form with repeated `scope` parameters.
fn token_params(text: &str) -> Result<TokenParams, LoginError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(text).map_err(|_| {
        token_error(
            "invalid_request",
            "the token request's parameters are not valid URL encoding",
        )
    })?;
    let mut p = TokenParams::default();
    for (k, v) in pairs {
        match k.as_str() {
            "service" => p.service = Some(v),
            "scope" => p.scope.push(v),
            "grant_type" => p.grant_type = Some(v),
            "username" => p.username = Some(v),
            "password" => p.password = Some(v),
            _ => {}
        }
    }
    Ok(p)
}

/// Most scopes one token may ask for.
const MAX_SCOPES: usize = 64;
/// Largest token request form we read.
const MAX_FORM: usize = 64 * 1024;

/// `GET /login` (Docker token spec) and `POST /login` (OAuth2 password
/// grant, as containerd sends): issues a token for the intersection of the
/// scopes asked and what the user may do.
pub async fn login(State(state): State<AppState>, req: Request) -> Response {
    let Some(auth) = state.auth.clone() else {
        return ApiError::NotFound.into_response();
    };
    match login_inner(&auth, &state.trusted_proxies, req).await {
        Ok((response, who)) => with_user(response, Some(&who)),
        Err(e) => e.into_response(),
    }
}

async fn login_inner(
    auth: &Auth,
    proxies: &TrustedProxies,
    req: Request,
) -> Result<(Response, Identity), LoginError> {
    let client = client_view(proxies, &req);
    let our_service = service(auth, &client, req.headers(), req.uri());
    let header_creds = credentials(req.headers());
    let oauth = *req.method() == Method::POST;
    let params = if oauth {
        let body = axum::body::to_bytes(req.into_body(), MAX_FORM)
            .await
            .map_err(|_| token_error("invalid_request", "the token request form is too large"))?;
        let text = std::str::from_utf8(&body)
            .map_err(|_| token_error("invalid_request", "the token request form is not UTF-8"))?;
        let p = token_params(text)?;
        if p.grant_type.as_deref() != Some("password") {
            // containerd falls back to GET on 400.
            return Err(token_error(
                "unsupported_grant_type",
                "use grant_type=password, or GET with Basic credentials",
            ));
        }
        p
    } else {
        token_params(req.uri().query().unwrap_or(""))?
    };
    if let Some(s) = &params.service {
        if !s.eq_ignore_ascii_case(&our_service.name) {
            return Err(token_error(
                "invalid_request",
                &format!(
                    "this registry issues tokens for service `{}`, not `{s}`",
                    our_service.name
                ),
            ));
        }
    }
    let creds = match (oauth, params.username, params.password) {
        (true, Some(user), Some(password)) => Credentials::Basic { user, password },
        _ => header_creds,
    };
    let who = match creds {
        Credentials::None | Credentials::Bearer(_) => Identity::Anonymous,
        Credentials::Malformed => {
            return Err(LoginError::Api(challenge(
                &our_service,
                None,
                Some("invalid_request"),
                "malformed Authorization header; send Basic credentials",
            )))
        }
        Credentials::Basic { user, password } => {
            match check_basic(auth, client.ip, &user, &password).await {
                Ok(who) => who,
                Err(Refusal::TooMany { retry_after }) => {
                    return Err(LoginError::Api(ApiError::TooManyRequests { retry_after }))
                }
                Err(_) => {
                    return Err(LoginError::Api(ApiError::Unauthorized {
                        challenge: "Basic realm=\"trow\"".into(),
                        message: "invalid user name or password",
                    }))
                }
            }
        }
    };
    let scopes = parse_scopes(params.scope.iter().map(String::as_str));
    if scopes.len() > MAX_SCOPES {
        return Err(token_error(
            "invalid_scope",
            &format!("too many scopes; at most {MAX_SCOPES} per token"),
        ));
    }
    let access = auth.grant(&who, &scopes);
    let (token, claims) = auth
        .tokens
        .issue(who.name(), &our_service.name, access)
        .map_err(|e| {
            tracing::error!(error = %e, "cannot sign a token");
            LoginError::Internal
        })?;
    let issued_at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(claims.iat),
    )
    .to_string();
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": claims.exp - claims.iat,
        "issued_at": issued_at,
    });
    let mut response = (StatusCode::OK, Json(body)).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    Ok((response, who))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needs() {
        let n = |m: Method, p: &str| need(&m, p, None, &|_, _| None);
        assert_eq!(n(Method::GET, "/healthz"), None);
        assert_eq!(n(Method::GET, "/login"), None);
        assert_eq!(n(Method::GET, "/v2/"), Some(Need::Identity));
        assert_eq!(n(Method::GET, "/v2/nope"), Some(Need::Identity));
        let acc = |r: &str, a| {
            Some(Need::Access {
                repo: r.into(),
                action: a,
                cache_repo: None,
            })
        };
        assert_eq!(n(Method::GET, "/v2/_catalog"), acc("", Action::Catalog));
        assert_eq!(
            n(Method::HEAD, "/v2/a/b/manifests/x"),
            acc("a/b", Action::Pull)
        );
        assert_eq!(n(Method::PUT, "/v2/a/manifests/x"), acc("a", Action::Push));
        assert_eq!(
            n(Method::DELETE, "/v2/a/manifests/x"),
            acc("a", Action::Delete)
        );
        assert_eq!(
            n(Method::DELETE, "/v2/a/blobs/sha256:0"),
            acc("a", Action::Delete)
        );
        assert_eq!(
            n(Method::POST, "/v2/a/blobs/uploads/"),
            acc("a", Action::Push)
        );
        assert_eq!(
            n(Method::GET, "/v2/a/blobs/uploads/u"),
            acc("a", Action::Push)
        );
        assert_eq!(
            n(Method::DELETE, "/v2/a/blobs/uploads/u"),
            acc("a", Action::Push)
        );
        assert_eq!(n(Method::GET, "/v2/a/tags/list"), acc("a", Action::Pull));
        assert_eq!(
            n(Method::GET, "/v2/a/referrers/sha256:0"),
            acc("a", Action::Pull)
        );
        assert_eq!(n(Method::POST, "/v2/a/manifests/x"), acc("a", Action::Push));
    }

    /// Like the proxy: `f/<ns>/<repo>` for a path under `f/`, or for a
    /// mirror request `?ns=<ns>`.
    fn cache_repo_of(name: &str, ns: Option<&str>) -> Option<String> {
        if name.starts_with("f/") {
            return Some(name.replace("f/hub/", "f/hub/library/"));
        }
        ns.map(|ns| format!("f/{ns}/{name}"))
    }

    #[test]
    fn cache_pulls_need_the_cache_repository_too() {
        let n = |m: Method, p: &str, ns: Option<&str>| need(&m, p, ns, &cache_repo_of);
        let pull = |r: &str, c: Option<&str>| {
            Some(Need::Access {
                repo: r.into(),
                action: Action::Pull,
                cache_repo: c.map(Into::into),
            })
        };
        for m in [Method::GET, Method::HEAD] {
            assert_eq!(
                n(m.clone(), "/v2/team/app/manifests/v1", Some("up")),
                pull("team/app", Some("f/up/team/app"))
            );
            assert_eq!(
                n(m.clone(), "/v2/team/app/blobs/sha256:0", Some("up")),
                pull("team/app", Some("f/up/team/app"))
            );
        }
        // Not a cache pull: no second name.
        assert_eq!(
            n(Method::GET, "/v2/team/app/manifests/v1", None),
            pull("team/app", None)
        );
        assert_eq!(
            n(Method::GET, "/v2/f/up/x/manifests/v1", None),
            pull("f/up/x", None)
        );
        assert_eq!(
            n(Method::GET, "/v2/team/app/tags/list", Some("up")),
            pull("team/app", None)
        );
        // A path name that the cache stores under another name.
        assert_eq!(
            n(Method::GET, "/v2/f/hub/nginx/manifests/v1", None),
            pull("f/hub/nginx", Some("f/hub/library/nginx"))
        );
        // Writes are not served by the cache.
        assert_eq!(
            n(Method::DELETE, "/v2/team/app/manifests/v1", Some("up")),
            Some(Need::Access {
                repo: "team/app".into(),
                action: Action::Delete,
                cache_repo: None
            })
        );
    }

    fn test_auth(yaml: &str) -> Auth {
        let c: crate::auth::permissions::PermissionsConfig = serde_norway::from_str(yaml).unwrap();
        let setup = crate::auth::AuthSetup {
            users: crate::auth::passwords::Users::load(Some(("alice", "pw")), None).unwrap(),
            permissions: crate::auth::permissions::Permissions::from_config(&c),
            warnings: vec![],
        };
        Auth::new(
            setup,
            &[1u8; 32],
            std::time::Duration::from_secs(60),
            None,
            false,
        )
    }

    fn token_for(auth: &Auth, sub: &str, repo: &str) -> Caller {
        let access = vec![crate::auth::token::Access {
            kind: "repository".into(),
            name: repo.into(),
            actions: vec!["pull".into()],
        }];
        let (t, _) = auth.tokens.issue(sub, &auth.service, access).unwrap();
        Caller::Token(auth.tokens.verify(&t, &auth.service).unwrap())
    }

    #[test]
    fn decisions() {
        let auth = test_auth(
            "anonymous:\n  - repos: team/*\n    actions: [pull]\nalice:\n  - repos: '*'\n    actions: [pull]\n",
        );
        let mirror = Need::Access {
            repo: "team/app".into(),
            action: Action::Pull,
            cache_repo: Some("f/up/team/app".into()),
        };
        let alice = Caller::User(Identity::User("alice".into()));
        // Anonymous may pull team/app but not its cache repository.
        assert_eq!(
            decide(&auth, &Caller::Anonymous, &mirror),
            Err(Refusal::LoginRequired)
        );
        assert_eq!(decide(&auth, &alice, &mirror), Ok(()));
        // A token for the path name is enough when the rules allow the
        // cache repository to its user, not when they do not.
        assert_eq!(
            decide(&auth, &token_for(&auth, "alice", "team/app"), &mirror),
            Ok(())
        );
        assert_eq!(
            decide(&auth, &token_for(&auth, "anonymous", "team/app"), &mirror),
            Err(Refusal::AnonymousToken)
        );
        // A token for another repository: a new token would help alice.
        assert_eq!(
            decide(&auth, &token_for(&auth, "alice", "other"), &mirror),
            Err(Refusal::InsufficientScope)
        );
        let carol = Caller::User(Identity::User("carol".into()));
        assert_eq!(
            decide(&auth, &carol, &mirror),
            Err(Refusal::Denied {
                user: "carol".into(),
                action: Action::Pull,
                repo: "f/up/team/app".into()
            })
        );
        let push = Need::Access {
            repo: "team/app".into(),
            action: Action::Push,
            cache_repo: None,
        };
        assert_eq!(
            decide(&auth, &alice, &push),
            Err(Refusal::Denied {
                user: "alice".into(),
                action: Action::Push,
                repo: "team/app".into()
            })
        );
        assert_eq!(
            decide(&auth, &Caller::Anonymous, &Need::Identity),
            Err(Refusal::LoginRequired)
        );
        assert_eq!(decide(&auth, &alice, &Need::Identity), Ok(()));
    }

    #[test]
    fn credentials_parse() {
        let mut h = HeaderMap::new();
        assert!(matches!(credentials(&h), Credentials::None));
        h.insert(header::AUTHORIZATION, "Basic dTpwOmM=".parse().unwrap());
        assert!(
            matches!(credentials(&h), Credentials::Basic { user, password } if user == "u" && password == "p:c")
        );
        for bad in [
            "Basic !!!",
            "Basic OnA=",
            "Bearer",
            "Negotiate abc",
            "",
            "Basic",
        ] {
            h.insert(header::AUTHORIZATION, bad.parse().unwrap());
            assert!(matches!(credentials(&h), Credentials::Malformed), "{bad}");
        }
        h.insert(header::AUTHORIZATION, "bearer abc.def.ghi".parse().unwrap());
        assert!(matches!(credentials(&h), Credentials::Bearer(t) if t == "abc.def.ghi"));
    }

    #[test]
    fn params_allow_repeated_scopes() {
        let p = token_params("service=x&scope=repository:a:pull&scope=repository:b:push&account=u")
            .unwrap();
        assert_eq!(p.service.as_deref(), Some("x"));
        assert_eq!(p.scope.len(), 2);
    }
}
