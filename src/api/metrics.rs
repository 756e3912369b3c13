//! The metrics of every request (a tower layer), and `GET /metrics`.
//!
//! The middleware labels a request with its method and route *template*
//! (from [`route::endpoint`], the matcher dispatch uses), never its path, and
//! records into the fixed tables of [`crate::metrics::http`]: no lock, and
//! no allocation for requests without a body whose response is in memory
//! (manifests, listings, errors). Bodies are wrapped only when there is
//! something to count: a request body as it is read, a streamed response
//! (a blob) until its last byte is handed over or the client goes away.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tower::{Layer, Service};

use super::route::{self, Endpoint};
use super::AppState;
use crate::metrics::http::{Labels, Method, Route};
use crate::metrics::{Metrics, Scrape, StorageFigures};

/// The route template of a path: one of a fixed list, whatever the path.
pub fn route_of(path: &str) -> Route {
    match path {
        "/v2" | "/v2/" => Route::Base,
        "/v2/_catalog" => Route::Catalog,
        "/healthz" | "/readyz" | "/readiness" => Route::Health,
        "/metrics" => Route::Metrics,
        "/login" => Route::Login,
        "/validate-image" | "/mutate-image" => Route::Admission,
        _ => match path.strip_prefix("/v2/") {
            Some(rest) => match route::endpoint(rest) {
                Some(Endpoint::Tags) => Route::Tags,
                Some(Endpoint::Manifest) => Route::Manifest,
                Some(Endpoint::Blob) => Route::Blob,
                Some(Endpoint::UploadStart | Endpoint::Upload) => Route::Upload,
                Some(Endpoint::Referrers) => Route::Referrers,
                None => Route::Other,
            },
            None if path.starts_with("/admin/") => Route::Admin,
            None => Route::Other,
        },
    }
}

/// The layer that counts every request reaching the application. A tower
/// layer rather than `middleware::from_fn`, whose boxed future would be one
/// more allocation per request.
#[derive(Clone)]
pub struct MetricsLayer {
    metrics: Arc<Metrics>,
}

impl MetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsLayer { metrics }
    }
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request> for MetricsService<S>
where
    S: Service<Request, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let labels = Labels::new(
            Method::of(req.method().as_str()),
            route_of(req.uri().path()),
        );
        let pending = Pending::new(self.metrics.clone(), labels);
        let req = if http_body::Body::is_end_stream(req.body()) {
            req
        } else {
            let metrics = self.metrics.clone();
            req.map(|inner| {
                Body::new(CountedRequest {
                    inner,
                    metrics,
                    labels,
                })
            })
        };
        MetricsFuture {
            inner: self.inner.call(req),
            pending: Some(pending),
        }
    }
}

pin_project_lite::pin_project! {
    /// The application's answer, then its body counted.
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        pending: Option<Pending>,
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = match ready!(this.inner.poll(cx)) {
            Ok(response) => response,
            // No answer: the request leaves the in-flight gauge uncounted.
            Err(e) => return Poll::Ready(Err(e)),
        };
        Poll::Ready(Ok(match this.pending.take() {
            Some(pending) => counted(pending, response),
            None => response,
        }))
    }
}

/// Finishes the request now if its body is in memory (or empty), else when
/// its streamed body has been handed over.
fn counted(pending: Pending, response: Response) -> Response {
    let status = response.status().as_u16();
    match http_body::Body::size_hint(response.body()).exact() {
        Some(len) => {
            pending.finish(status, len);
            response
        }
        None => response.map(|inner| {
            Body::new(CountedResponse {
                inner,
                pending: Some(pending),
                status,
                sent: 0,
            })
        }),
    }
}

/// A request counted as in flight until it is finished; one whose client
/// went away before the answer leaves the in-flight gauge when dropped.
struct Pending {
    metrics: Arc<Metrics>,
    labels: Labels,
    start: Instant,
    finished: bool,
}

impl Pending {
    fn new(metrics: Arc<Metrics>, labels: Labels) -> Pending {
        metrics.http.started();
        Pending {
            metrics,
            labels,
            start: Instant::now(),
            finished: false,
        }
    }

    fn finish(mut self, status: u16, sent: u64) {
        self.finished = true;
        self.metrics
            .http
            .finished(self.labels, status, self.start.elapsed(), sent);
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if !self.finished {
            self.metrics.http.abandoned();
        }
    }
}

/// A request body that counts the bytes read from it.
struct CountedRequest {
    inner: Body,
    metrics: Arc<Metrics>,
    labels: Labels,
}

impl http_body::Body for CountedRequest {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &poll {
            if let Some(data) = frame.data_ref() {
                self.metrics.http.received(self.labels, data.len() as u64);
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A streamed response body: the request is finished (duration, bytes
/// sent) when its last frame is handed over, or when it is dropped before
/// (the client went away).
struct CountedResponse {
    inner: Body,
    pending: Option<Pending>,
    status: u16,
    sent: u64,
}

impl CountedResponse {
    fn finish(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(self.status, self.sent);
        }
    }
}

impl http_body::Body for CountedResponse {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let poll = Pin::new(&mut self.inner).poll_frame(cx);
        match &poll {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(None | Some(Err(_))) => self.finish(),
            Poll::Pending => {}
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CountedResponse {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let registry = state.registry.clone();
    let storage = state
        .metrics
        .storage_figures(|| async move {
            match registry.storage_totals().await {
                Ok(t) => Some(StorageFigures {
                    bytes: t.bytes,
                    blobs: t.blobs,
                    client_uploads: t.client_uploads,
                    cache_downloads: t.cache_downloads,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read storage figures for /metrics");
                    None
                }
            }
        })
        .await;
    let scrape = Scrape {
        storage,
        cache: state
            .proxy
            .stats
            .figures(state.proxy.config().allow_any_public),
        logins: state.auth.as_ref().map(|a| a.limiter.figures()),
        downloads: crate::storage::download::figures(),
    };
    match state.metrics.encode(scrape) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
            )],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode /metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the layer adds to a manifest GET, in nanoseconds, against the
    /// same router without it (not run by default; optimise Trow's own
    /// code for a meaningful figure):
    /// `CARGO_PROFILE_DEV_OPT_LEVEL=2 cargo test --lib metrics_layer_cost -- --ignored --nocapture`
    #[tokio::test(flavor = "current_thread")]
    #[ignore]
    async fn metrics_layer_cost() {
        use tower::ServiceExt as _;
        // CPU time of this thread (the runtime has one): other processes
        // on the machine do not inflate it, as they do wall-clock time.
        fn cpu_ns() -> f64 {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: clock_gettime writes the timespec it is given.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
            ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
        }
        let manifest = Bytes::from(vec![b'x'; 1200]);
        let app = axum::Router::new().route(
            "/v2/{*rest}",
            axum::routing::get(move || {
                let m = manifest.clone();
                async move { m }
            }),
        );
        let metrics = Arc::new(Metrics::new());
        // Router::layer re-boxes every route: measure that apart from the
        // layer's own work (a layer that does nothing, the same way).
        let noop = app.clone().layer(tower::layer::util::Identity::new());
        let layered = app.clone().layer(MetricsLayer::new(metrics.clone()));
        let outside = MetricsLayer::new(metrics).layer(app.clone());
        let request = || {
            Request::get("/v2/library/alpine/manifests/3.19")
                .body(Body::empty())
                .unwrap()
        };
        const N: u32 = 200_000;
        let mut best = [f64::MAX; 4];
        for _round in 0..5 {
            for (i, router) in [&app, &noop, &layered].into_iter().enumerate() {
                let start = cpu_ns();
                for _ in 0..N {
                    let r = router.clone().oneshot(request()).await.unwrap();
                    assert_eq!(r.status(), StatusCode::OK);
                }
                let ns = (cpu_ns() - start) / f64::from(N);
                best[i] = best[i].min(ns);
            }
            let start = cpu_ns();
            for _ in 0..N {
                let r = outside.clone().oneshot(request()).await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
            }
            let ns = (cpu_ns() - start) / f64::from(N);
            best[3] = best[3].min(ns);
        }
        // The parts of the layer's work, alone.
        let time = |f: &mut dyn FnMut()| {
            let start = cpu_ns();
            for _ in 0..N {
                f();
            }
            (cpu_ns() - start) / f64::from(N)
        };
        let path = std::hint::black_box("/v2/library/alpine/manifests/3.19");
        let route_ns = time(&mut || {
            std::hint::black_box(route_of(std::hint::black_box(path)));
        });
        let m = Metrics::new();
        let labels = Labels::new(Method::of("GET"), Route::Manifest);
        let record_ns = time(&mut || {
            let start = Instant::now();
            m.http.started();
            m.http.finished(labels, 200, start.elapsed(), 1200);
        });
        println!("route_of: {route_ns:.0} ns; clock and counters: {record_ns:.0} ns");
        println!(
            "manifest GET through the router: {:.0} ns bare; {:.0} ns with a no-op Router::layer; {:.0} ns with the metrics layer through Router::layer; {:.0} ns with it around the router",
            best[0], best[1], best[2], best[3]
        );
    }

    #[test]
    fn routes_are_templates() {
        let cases = [
            ("/v2/", Route::Base),
            ("/v2", Route::Base),
            ("/v2/_catalog", Route::Catalog),
            ("/v2/a/b/tags/list", Route::Tags),
            ("/v2/a/manifests/latest", Route::Manifest),
            ("/v2/a/blobs/sha256:00", Route::Blob),
            ("/v2/a/blobs/uploads/", Route::Upload),
            ("/v2/a/blobs/uploads/1234-ab", Route::Upload),
            ("/v2/a/referrers/sha256:00", Route::Referrers),
            ("/login", Route::Login),
            ("/healthz", Route::Health),
            ("/readyz", Route::Health),
            ("/readiness", Route::Health),
            ("/metrics", Route::Metrics),
            ("/admin/gc", Route::Admin),
            ("/validate-image", Route::Admission),
            ("/mutate-image", Route::Admission),
            ("/validate-image/x", Route::Other),
            ("/v2/a", Route::Other),
            ("/v2/_catalog/", Route::Other),
            ("/anything/else", Route::Other),
            ("/", Route::Other),
        ];
        for (path, route) in cases {
            assert_eq!(route_of(path), route, "{path}");
        }
    }
}
