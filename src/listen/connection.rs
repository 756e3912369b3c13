//! One connection, from the accepted socket to its close: TLS handshake,
//! HTTP (hyper-util picks HTTP/1.1 or HTTP/2), and the three ways it may be
//! ended early: idle, server shutdown, shutdown deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{Response, Version};
use axum::{BoxError, Router};
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt as _;

use super::activity::{Activity, TrackedBody};
use super::body::IdleTimeoutBody;
use super::io::WatchedIo;
use super::{PlainConnection, Settings};
use crate::storage::download::FileRegions;

/// After an idle connection is asked to close (HTTP/2: GOAWAY), how long it
/// may stay idle before it is dropped. Short: it was idle already; this only
/// lets a request that raced the close finish.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A client that has not finished its TLS handshake by then is dropped (or
/// sooner, by the request-head timeout).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection task shares.
pub(super) struct Shared {
    pub(super) app: Router,
    pub(super) builder: Builder<TokioExecutor>,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) settings: Settings,
    /// Cancelled on shutdown: connections finish what is in flight and close.
    pub(super) draining: CancellationToken,
    /// Cancelled at the shutdown deadline: connections close at once.
    pub(super) cut: CancellationToken,
}

/// Serves one accepted connection until it closes. `_slot` is its place
/// under `--max-connections`, given back when the task ends.
pub(super) async fn run(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer: SocketAddr,
    _slot: OwnedSemaphorePermit,
) {
    super::socket::configure(&tcp);
    let activity = Activity::new(shared.settings.header_read_timeout);
    // Only plain connections send file windows directly (under TLS the
    // socket carries ciphertext), and only where there is `sendfile`.
    let regions =
        (shared.tls.is_none() && cfg!(target_os = "linux")).then(Arc::<FileRegions>::default);
    let io = WatchedIo::new(
        tcp,
        activity.clone(),
        shared.settings.idle_timeout,
        regions.clone(),
    );
    let service = ConnService {
        app: shared.app.clone(),
        peer,
        activity: activity.clone(),
        body_idle_timeout: shared.settings.body_idle_timeout,
        regions,
    };
    let result = match &shared.tls {
        None => drive(&shared, io, service, &activity, peer).await,
        Some(acceptor) => {
            let Some(tls) = handshake(&shared, acceptor, io, peer).await else {
                return;
            };
            drive(&shared, tls, service, &activity, peer).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// The TLS handshake, or `None` (logged) when it fails, takes too long or
/// the server shuts down meanwhile.
async fn handshake<I>(
    shared: &Shared,
    acceptor: &TlsAcceptor,
    io: I,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<I>>
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let limit = HANDSHAKE_TIMEOUT.min(shared.settings.header_read_timeout);
    tokio::select! {
        result = tokio::time::timeout(limit, acceptor.accept(io)) => match result {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                None
            }
        },
        () = shared.draining.cancelled() => None,
    }
}

/// Why a connection is being closed before the client closed it.
enum Closing {
    /// Idle, stalled, or its request head too slow: see [`Activity`].
    Idle,
    Shutdown,
}

/// Runs HTTP on `io` until the connection ends, is idle, or shutdown
/// begins; then asks it to close gracefully and drops it if it will not.
async fn drive<I>(
    shared: &Shared,
    io: I,
    service: ConnService,
    activity: &Activity,
    peer: SocketAddr,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let idle_timeout = shared.settings.idle_timeout;
    let conn = shared
        .builder
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(service));
    tokio::pin!(conn);
    let closing = tokio::select! {
        biased;
        result = conn.as_mut() => return result,
        () = activity.closable(idle_timeout) => Closing::Idle,
        () = shared.draining.cancelled() => Closing::Shutdown,
    };
    if matches!(closing, Closing::Idle) {
        tracing::debug!(%peer, "closing an idle or stalled connection");
    }
    // HTTP/1.1: close once the response in flight is sent; HTTP/2: GOAWAY,
    // then close once the open streams finish.
    conn.as_mut().graceful_shutdown();
    let patience = match closing {
        Closing::Idle => CLOSE_GRACE,
        Closing::Shutdown => idle_timeout,
    };
    tokio::select! {
        biased;
        result = conn.as_mut() => result,
        () = shared.cut.cancelled() => Ok(()),
        () = activity.closable(patience) => Ok(()),
    }
}

/// The per-connection service: gives each request the peer address, a body
/// that times out when the client stops sending, and a guard that tells the
/// connection's [`Activity`] whether the request is being worked on.
#[derive(Clone)]
struct ConnService {
    app: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
    body_idle_timeout: Duration,
    /// The connection's file windows; `Some` when it has no TLS (see
    /// [`PlainConnection`]).
    regions: Option<Arc<FileRegions>>,
}

impl<B> tower::Service<Request<B>> for ConnService
where
    B: http_body::Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<TrackedBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let guard = self
            .activity
            .request_started(req.version() == Version::HTTP_2);
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(ConnectInfo(self.peer));
        if let Some(regions) = &self.regions {
            parts.extensions.insert(PlainConnection(regions.clone()));
        }
        let body = Body::new(IdleTimeoutBody::new(body, self.body_idle_timeout));
        let response = self.app.clone().oneshot(Request::from_parts(parts, body));
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody::new(body, guard)))
        })
    }
}
