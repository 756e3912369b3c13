//! The accept loop: serves the API over HTTP/1.1 and HTTP/2, in plain text
//! or TLS, until shutdown; then drains requests in flight until a deadline.
//!
//! One loop for both so that connections are configured and bounded alike:
//! socket options, the peer address for login rate limits, HTTP/1 buffer
//! limits, and the defences against slow and hostile clients, which each
//! bound how long a client can hold what it holds:
//!
//! | A client that…                           | is stopped by                                    |
//! | ---------------------------------------- | ------------------------------------------------ |
//! | connects and sends nothing               | the idle timeout ([`activity`])                  |
//! | keeps a connection open without requests | the idle timeout ([`activity`])                  |
//! | sends its request head slowly            | the header-read timeout ([`activity`])           |
//! | stops sending a request body             | the body idle timeout ([`body`])                 |
//! | stops reading a response                 | the write stall timer ([`io`]), the idle timeout |
//! | vanishes without closing                 | TCP keepalive ([`socket`])                       |
//! | opens connections by the thousand        | `--max-connections` ([`ConnectionSlots`])        |
//! | keeps a request open through a shutdown  | the shutdown deadline ([`drain`])                |

mod activity;
mod body;
mod connection;
mod io;
mod socket;
mod stall;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto::Builder;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::storage::download::FileRegions;
use connection::Shared;
pub use socket::raise_fd_limit;

/// A request extension: the request came over plain TCP (no TLS), so an
/// HTTP/1.1 response body is written to the socket as it is, and file
/// windows registered here are sent from their files (`sendfile`).
#[derive(Clone)]
pub struct PlainConnection(pub Arc<FileRegions>);

/// Largest read buffer of an HTTP/1 connection (hyper's default is ~400 KiB).
/// Each body frame of an upload is a slice of this buffer and keeps the
/// whole buffer alive until the frame is written and hashed, so a few
/// queued frames of a fast upload pinned megabytes; 64 KiB frames keep an
/// upload's memory under a megabyte and cost the same CPU per GiB pushed
/// (see docs/PERFORMANCE.md). Request heads must fit in it too: 64 KiB is
/// far above what clients send (Distribution and nginx accept 8–32 KiB).
const HTTP1_MAX_BUFFER: usize = 64 * 1024;

/// How often, at most, the log says that the connection cap was reached.
const CAP_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// How connections are bounded (see docs/CONFIGURATION.md).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub body_idle_timeout: Duration,
    pub max_connections: u32,
    pub shutdown_timeout: Duration,
}

impl Settings {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Settings {
            header_read_timeout: config.header_read_timeout,
            idle_timeout: config.idle_timeout,
            body_idle_timeout: config.body_idle_timeout,
            max_connections: config.max_connections,
            shutdown_timeout: config.shutdown_timeout,
        }
    }
}

/// Serves `app` on `listener` (over TLS when `tls` is given) until `shutdown`
/// resolves; then stops accepting and lets the requests in flight finish for
/// at most `settings.shutdown_timeout`. Returns how many connections were
/// still open at that deadline and cut. Each request carries the peer
/// address as [`ConnectInfo<SocketAddr>`](axum::extract::ConnectInfo).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<ServerConfig>>,
    settings: Settings,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<usize> {
    let shared = Arc::new(Shared {
        app,
        builder: http_builder(),
        tls: tls.map(TlsAcceptor::from),
        settings,
        draining: CancellationToken::new(),
        cut: CancellationToken::new(),
    });
    let mut slots = ConnectionSlots::new(settings.max_connections);
    tokio::pin!(shutdown);
    loop {
        let (slot, tcp, peer) = tokio::select! {
            accepted = slots.accept(&listener) => accepted,
            () = &mut shutdown => break,
        };
        tokio::spawn(connection::run(shared.clone(), tcp, peer, slot));
    }
    drop(listener);
    Ok(drain(&shared, &slots, settings.shutdown_timeout).await)
}

/// HTTP/1.1 and HTTP/2, configured once for every connection.
///
/// hyper's header-read timeout stays off (no timer): [`activity`] times
/// request heads from their first byte instead. HTTP/2 keep-alive pings
/// stay off too: a ping answered counts as bytes moving, so they would keep
/// an unused connection open, and TCP keepalive already finds dead peers.
fn http_builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(HTTP1_MAX_BUFFER)
        .header_read_timeout(None);
    builder
}

/// The places under `--max-connections`. A connection needs one before it
/// is accepted: at the cap the loop stops accepting, so new connections wait
/// in the kernel's listen queue (instead of being accepted and dropped) and
/// are served as soon as one closes.
struct ConnectionSlots {
    free: Arc<Semaphore>,
    max: u32,
    last_warning: Option<Instant>,
}

impl ConnectionSlots {
    fn new(max: u32) -> Self {
        ConnectionSlots {
            free: Arc::new(Semaphore::new(max as usize)),
            max,
            last_warning: None,
        }
    }

    /// Waits for a free place, then for a connection.
    async fn accept(
        &mut self,
        listener: &TcpListener,
    ) -> (OwnedSemaphorePermit, TcpStream, SocketAddr) {
        let slot = self.take().await;
        loop {
            match listener.accept().await {
                Ok((tcp, peer)) => return (slot, tcp, peer),
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    // Out of file descriptors and the like: wait, then go on.
                    tracing::error!(error = %e, "cannot accept connections");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn take(&mut self) -> OwnedSemaphorePermit {
        if let Ok(slot) = self.free.clone().try_acquire_owned() {
            return slot;
        }
        self.warn_full();
        match self.free.clone().acquire_owned().await {
            Ok(slot) => slot,
            // The semaphore is never closed.
            Err(_) => std::future::pending().await,
        }
    }

    fn warn_full(&mut self) {
        let now = Instant::now();
        if self
            .last_warning
            .is_some_and(|at| now.duration_since(at) < CAP_WARNING_INTERVAL)
        {
            return;
        }
        self.last_warning = Some(now);
        tracing::warn!(
            max_connections = self.max,
            "connection limit reached; new connections wait in the listen queue until one closes"
        );
    }

    fn open(&self) -> usize {
        (self.max as usize).saturating_sub(self.free.available_permits())
    }

    /// Resolves when every connection has closed.
    async fn all_closed(&self) {
        // Holding all places means no connection holds one. The permit is
        // given back at once; nothing takes places after the loop ended.
        let _all = self.free.acquire_many(self.max).await;
    }
}

/// Shutdown: every connection finishes its requests in flight and closes;
/// those still open after `deadline` are cut. Returns how many were cut.
async fn drain(shared: &Shared, slots: &ConnectionSlots, deadline: Duration) -> usize {
    shared.draining.cancel();
    if tokio::time::timeout(deadline, slots.all_closed())
        .await
        .is_ok()
    {
        return 0;
    }
    let cut = slots.open();
    tracing::warn!(
        connections = cut,
        shutdown_timeout = %humantime::format_duration(deadline),
        "shutdown deadline passed; cutting the connections still open"
    );
    shared.cut.cancel();
    // Cut connections close at once; wait (briefly) so that they are gone
    // before the process exits.
    let _ = tokio::time::timeout(Duration::from_secs(1), slots.all_closed()).await;
    cut
}

/// Errors of `accept` that concern one connection only.
fn is_connection_error(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}
