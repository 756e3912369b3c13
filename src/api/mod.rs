//! The HTTP face of the registry: axum routers that parse a request, call the
//! [`Registry`](crate::registry::Registry) and shape the response. Errors are
//! turned into the OCI error envelope in [`error`] only.

mod admin;
pub mod admission;
pub mod auth;
mod blobs;
mod connection;
pub mod error;
pub mod forwarded;
pub mod headers;
pub mod health;
mod listing;
mod manifests;
pub mod metrics;
mod referrers;
mod request_log;
pub mod route;
mod uploads;

use std::io;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::{middleware, Json, Router};
use futures_util::TryStreamExt;
use tower_http::set_header::SetResponseHeaderLayer;

use crate::oci::Digest;
use crate::oci::RepoName;
use crate::proxy::{CacheOutcome, Proxy, Target};
use crate::registry::error::RegistryError;
use crate::registry::Registry;
use crate::storage::ByteStream;
use error::{ApiError, ApiResult};
use route::Route;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    pub registry: Arc<Registry>,
    /// The pull-through cache, for `f/…` repositories and `?ns=` requests.
    pub proxy: Arc<Proxy>,
    /// Prefix for URLs we hand out (`Location`, `Link`): empty for relative
    /// URLs, or `http://<hostname>` when a public hostname is configured.
    pub base_url: Arc<str>,
    /// Users, tokens and permissions; `None` when authentication is off.
    pub auth: Option<Arc<crate::auth::Auth>>,
    /// `--trusted-proxies`: peers whose `X-Forwarded-*` headers count.
    pub trusted_proxies: Arc<forwarded::TrustedProxies>,
    /// Retention policies and settings of garbage collection passes.
    pub gc: Arc<crate::registry::gc::GcSetup>,
    /// What `/metrics` serves; every request is recorded in it.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Readiness: shutdown and the checks in progress.
    pub health: Arc<health::Health>,
    /// Signature policies (`signatures`); `None` without the section.
    pub signatures: Option<Arc<crate::signature::SignatureVerifier>>,
    /// The admission webhooks' image policy.
    pub admission: Arc<crate::admission::Admission>,
}

impl AppState {
    /// An absolute path on this registry, made absolute when configured.
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }
}

/// The whole HTTP application. `/metrics` is served here unless
/// `serve_metrics` is false (`--metrics-bind`: it has a listener of its
/// own, [`ops_router`]).
pub fn router(state: AppState, serve_metrics: bool) -> Router {
    let routes = health_routes(Router::new())
        .route("/v2/", get(api_base))
        .route("/v2", get(api_base))
        .route("/v2/_catalog", get(listing::catalog))
        .route("/v2/{*rest}", any(dispatch))
        .route("/login", get(auth::login).post(auth::login))
        .route("/admin/gc", axum::routing::post(admin::gc))
        .route("/admin/history/{*name}", get(admin::history))
        .route("/admin/verify", get(admin::verify))
        .route("/validate-image", axum::routing::post(admission::validate))
        .route("/mutate-image", axum::routing::post(admission::mutate));
    let routes = if serve_metrics {
        routes.route("/metrics", get(metrics::metrics))
    } else {
        routes
    }
    .fallback(|| async { ApiError::NotFound })
    .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed });
    // The auth guard only when logins are on: an open registry pays nothing.
    let routes = match state.auth.clone() {
        Some(a) => routes.layer(middleware::from_fn_with_state(
            auth::Guard {
                auth: a,
                proxies: state.trusted_proxies.clone(),
                cache_repo_of: cache_repo_of(state.proxy.clone()),
            },
            auth::guard,
        )),
        None => routes,
    };
    routes
        .layer(SetResponseHeaderLayer::overriding(
            headers::DOCKER_API_VERSION,
            axum::http::HeaderValue::from_static("registry/2.0"),
        ))
        .layer(middleware::from_fn(connection::close_after_refused_body))
        .layer(metrics::MetricsLayer::new(state.metrics.clone()))
        .layer(middleware::from_fn(request_log::log_request))
        .with_state(state)
}

/// What the `--metrics-bind` listener serves: `/metrics` and the health
/// endpoints, without registry auth.
pub fn ops_router(state: AppState) -> Router {
    health_routes(Router::new())
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .layer(metrics::MetricsLayer::new(state.metrics.clone()))
        .layer(middleware::from_fn(request_log::log_request))
        .with_state(state)
}

/// `/healthz`, and `/readyz` with its old name `/readiness`.
fn health_routes(routes: Router<AppState>) -> Router<AppState> {
    routes
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/readiness", get(health::readyz))
}

/// `GET /v2/`: tells clients this is a v2 registry.
async fn api_base() -> impl IntoResponse {
    Json(serde_json::json!({}))
}

/// Routes everything under `/v2/<name>/…` by the endpoint at the end of the
/// path, since names contain slashes.
async fn dispatch(State(state): State<AppState>, req: Request) -> Response {
    let rest = req.uri().path().strip_prefix("/v2/").unwrap_or("");
    let Some(route) = route::parse(rest) else {
        return ApiError::NotFound.into_response();
    };
    let method = req.method().clone();
    let own_ns = mirror_namespace(req.uri()).is_some_and(|ns| state.proxy.is_own_namespace(&ns));
    let result = match (route, method) {
        (Route::Tags { name }, Method::GET) => listing::tags(state, &name, req).await,
        (Route::Manifest { name, reference }, Method::GET) => {
            manifests::get(state, &name, &reference, req, false).await
        }
        (Route::Manifest { name, reference }, Method::HEAD) => {
            manifests::get(state, &name, &reference, req, true).await
        }
        (Route::Manifest { name, reference }, Method::PUT) => {
            manifests::put(state, &name, &reference, req).await
        }
        (Route::Manifest { name, reference }, Method::DELETE) => {
            manifests::delete(state, &name, &reference).await
        }
        (Route::Blob { name, digest }, Method::GET) => {
            blobs::get(state, &name, &digest, req, false).await
        }
        (Route::Blob { name, digest }, Method::HEAD) => {
            blobs::get(state, &name, &digest, req, true).await
        }
        (Route::Blob { name, digest }, Method::DELETE) => {
            blobs::delete(state, &name, &digest).await
        }
        (Route::UploadStart { name }, Method::POST) => uploads::start(state, &name, req).await,
        (Route::Upload { name, id }, Method::GET) => uploads::status(state, &name, &id).await,
        (Route::Upload { name, id }, Method::PATCH) => uploads::patch(state, &name, &id, req).await,
        (Route::Upload { name, id }, Method::PUT) => uploads::put(state, &name, &id, req).await,
        (Route::Upload { name, id }, Method::DELETE) => uploads::cancel(state, &name, &id).await,
        (Route::Referrers { name, digest }, Method::GET) => {
            referrers::list(state, &name, &digest, req).await
        }
        _ => Err(ApiError::MethodNotAllowed),
    };
    let mut response = result.unwrap_or_else(IntoResponse::into_response);
    if own_ns {
        response.extensions_mut().insert(OwnNamespace);
    }
    response
}

/// On a response to a mirror request whose `?ns=` named Trow itself, so
/// served from its own repositories: the request log says `ns="own"`.
#[derive(Debug, Clone, Copy)]
pub struct OwnNamespace;

/// Validates a repository name from the path.
fn repo_name(name: &str) -> Result<RepoName, ApiError> {
    RepoName::parse(name).map_err(|e| RegistryError::NameInvalid(e).into())
}

/// Validates a digest from the path or query.
fn parse_digest(s: &str) -> Result<Digest, ApiError> {
    s.parse::<Digest>()
        .map_err(|e| RegistryError::DigestInvalid(e.to_string()).into())
}

/// A request body as a stream of byte chunks.
fn body_stream(body: Body) -> ByteStream {
    Box::pin(body.into_data_stream().map_err(io::Error::other))
}

/// The `ns` query parameter that containerd and cri-o send to a mirror: the
/// registry the pull is for. The one reading of it, for dispatch and for
/// the auth guard alike, so what is checked is what is served.
pub(crate) fn mirror_namespace(uri: &Uri) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Ns {
        ns: Option<String>,
    }
    serde_urlencoded::from_str::<Ns>(uri.query().unwrap_or(""))
        .ok()
        .and_then(|q| q.ns)
        .filter(|ns| !ns.is_empty())
}

/// For the auth guard: the cache repository a pull of a path name (with
/// its mirror namespace) is served from, as `proxy_target` finds it.
fn cache_repo_of(proxy: Arc<Proxy>) -> auth::CacheRepoOf {
    Arc::new(move |name: &str, ns: Option<&str>| {
        let repo = RepoName::parse(name).ok()?;
        match proxy.target(&repo, ns)? {
            Ok(t) => Some(t.cache_repo.to_string()),
            // Refused by dispatch before anything is served.
            Err(_) => None,
        }
    })
}

/// The upstream a pull is for, if it is one for the pull-through cache:
/// an `f/…` repository, or the `ns` query parameter that containerd and
/// cri-o send to a mirror.
fn proxy_target(
    state: &AppState,
    repo: &RepoName,
    req: &Request,
) -> Result<Option<Target>, ApiError> {
    let ns = mirror_namespace(req.uri());
    match state.proxy.target(repo, ns.as_deref()) {
        None => Ok(None),
        Some(Ok(t)) => Ok(Some(t)),
        Some(Err(e)) => Err(e.into()),
    }
}

/// Marks a response with how the cache answered it (for the request log)
/// and, for mirror requests, the upstream it came from.
fn mark_proxied(response: &mut Response, target: &Target, outcome: CacheOutcome) {
    response.extensions_mut().insert(outcome);
    response
        .headers_mut()
        .insert(headers::OCI_NAMESPACE, headers::value(&target.host));
}

/// The query string's parameters, in order.
fn query_pairs(req: &Request) -> Vec<(String, String)> {
    // Lenient (bad escapes are kept as they are): never fails in practice.
    serde_urlencoded::from_str(req.uri().query().unwrap_or("")).unwrap_or_default()
}

/// The value of `key` in `pairs`, if given; `Err` when given more than
/// once, since then which one counts is a guess.
fn single_param<'a>(pairs: &'a [(String, String)], key: &str) -> Result<Option<&'a str>, String> {
    let mut values = pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.as_str());
    match (values.next(), values.next()) {
        (first, None) => Ok(first),
        _ => Err(format!(
            "the query parameter `{key}` is given more than once"
        )),
    }
}

/// Parses the query string into `T`; a query it cannot be (a parameter
/// given twice) becomes the error `bad` makes of the parser's message, so
/// that each endpoint answers with its own code.
fn query<T: serde::de::DeserializeOwned>(
    req: &Request,
    bad: impl FnOnce(String) -> ApiError,
) -> ApiResult<T> {
    serde_urlencoded::from_str(req.uri().query().unwrap_or(""))
        .map_err(|e| bad(format!("bad query string: {e}")))
}
