//! `/healthz` (the process is alive) and `/readyz` (it can serve: the
//! metadata store answers, the data directory takes new bytes, and it is
//! not shutting down). `/readiness` is the old name of `/readyz`.
//!
//! Each readiness check is bounded by [`CHECK_TIMEOUT`], so a hung disk
//! makes `/readyz` answer 503 instead of hanging. A check runs as its own
//! task and at most one of each kind runs at a time: a probe that arrives
//! while one is running waits for that one, so a disk that hangs for good
//! costs one stuck check, not one per probe.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;

use super::AppState;

/// How long a readiness check may take before it counts as failed. Keep the
/// Kubernetes probe's `timeoutSeconds` above it.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What `/readyz` knows beyond its checks: whether the server is shutting
/// down, and the checks running.
#[derive(Default)]
pub struct Health {
    draining: AtomicBool,
    metadata: Check,
    storage: Check,
    /// The last answer of `/readyz`, to log when it changes.
    was_ready: AtomicBool,
}

impl Health {
    pub fn new() -> Health {
        Health {
            was_ready: AtomicBool::new(true),
            ..Health::default()
        }
    }

    /// Shutdown began: `/readyz` answers 503 from now on, so that load
    /// balancers stop sending requests while those in flight finish.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

type CheckResult = Result<(), Arc<str>>;

/// One kind of check, run at most once at a time.
#[derive(Default)]
struct Check {
    running: Mutex<Option<Flight>>,
}

struct Flight {
    done: Arc<AtomicBool>,
    result: Shared<BoxFuture<'static, CheckResult>>,
}

/// Marks a flight done when its task ends, however it ends.
struct Done(Arc<AtomicBool>);

impl Drop for Done {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

impl Check {
    /// Runs `check` (or joins the one running) and waits at most `timeout`.
    async fn run<F>(&self, timeout: Duration, check: F) -> CheckResult
    where
        F: Future<Output = CheckResult> + Send + 'static,
    {
        let result = {
            let mut running = self.running.lock();
            match &*running {
                Some(f) if !f.done.load(Ordering::Acquire) => f.result.clone(),
                _ => {
                    let done = Arc::new(AtomicBool::new(false));
                    let guard = Done(done.clone());
                    let task = tokio::spawn(async move {
                        let _done = guard;
                        check.await
                    });
                    let result = async move {
                        task.await
                            .unwrap_or_else(|e| Err(format!("the check failed: {e}").into()))
                    }
                    .boxed()
                    .shared();
                    *running = Some(Flight {
                        done,
                        result: result.clone(),
                    });
                    result
                }
            }
        };
        match tokio::time::timeout(timeout, result).await {
            Ok(r) => r,
            Err(_) => {
                Err(format!("no answer within {}", humantime::format_duration(timeout)).into())
            }
        }
    }
}

/// `GET /healthz`: the process is alive and answering.
pub async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({ "status": "ok" })))
}

/// `GET /readyz` (and `/readiness`): 200 when every check passes, else 503
/// naming the checks that failed.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let health = &state.health;
    if health.is_draining() {
        return answer(
            health,
            false,
            serde_json::json!({ "shutdown": "the server is shutting down" }),
        );
    }
    let registry = state.registry.clone();
    let metadata = health.metadata.run(CHECK_TIMEOUT, async move {
        registry
            .check_metadata()
            .await
            .map_err(|e| format!("the metadata store does not answer: {e}").into())
    });
    let registry = state.registry.clone();
    let storage = health.storage.run(CHECK_TIMEOUT, async move {
        registry
            .check_storage()
            .await
            .map_err(|e| format!("the data directory does not take new files: {e}").into())
    });
    let (metadata, storage) = tokio::join!(metadata, storage);
    let ready = metadata.is_ok() && storage.is_ok() && !health.is_draining();
    let show = |r: &CheckResult| match r {
        Ok(()) => serde_json::Value::from("ok"),
        Err(e) => serde_json::Value::from(e.as_ref()),
    };
    let mut checks = serde_json::json!({ "metadata": show(&metadata), "storage": show(&storage) });
    if health.is_draining() {
        checks["shutdown"] = "the server is shutting down".into();
    }
    answer(health, ready, checks)
}

fn answer(health: &Health, ready: bool, checks: serde_json::Value) -> Response {
    if health.was_ready.swap(ready, Ordering::AcqRel) != ready {
        if ready {
            tracing::info!("ready again");
        } else {
            tracing::warn!(%checks, "not ready");
        }
    }
    let (status, word) = if ready {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
    };
    (
        status,
        Json(serde_json::json!({ "status": word, "checks": checks })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hung_check_times_out_and_is_joined_not_repeated() {
        let check = Check::default();
        let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let hang = |started: Arc<std::sync::atomic::AtomicUsize>| async move {
            started.fetch_add(1, Ordering::SeqCst);
            std::future::pending::<()>().await;
            Ok(())
        };
        let short = Duration::from_millis(20);
        assert!(check.run(short, hang(started.clone())).await.is_err());
        assert!(check.run(short, hang(started.clone())).await.is_err());
        assert_eq!(
            started.load(Ordering::SeqCst),
            1,
            "joined, not started again"
        );
    }

    #[tokio::test]
    async fn a_finished_check_is_run_afresh() {
        let check = Check::default();
        assert!(check
            .run(Duration::from_secs(5), async { Ok(()) })
            .await
            .is_ok());
        let failed = check
            .run(Duration::from_secs(5), async { Err("broken".into()) })
            .await;
        assert_eq!(failed.unwrap_err().as_ref(), "broken");
    }
}
