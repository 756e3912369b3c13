//! Shared machinery of the workloads: the run context, the bounded worker
//! loop, and turning tallies and `/proc` samples into result records.
//!
//! Every case follows the same shape so that figures are comparable: prepare
//! (push fixtures, precompute digests) untimed, start the resource probe, run
//! `concurrency` workers until the [`Limiter`] says stop, stop the probe.

mod catalog;
mod manifest;
mod pull;
mod push;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::Value;

use crate::client::Registry;
use crate::data::DataGen;
use crate::report::{self, WorkloadResult, GIB, MIB};
use crate::stats::{self, Lat, ProcSample};
use crate::{RunArgs, Workload};

/// Blob families: each workload draws from its own so that their bodies differ.
pub const FAMILY_PUSH_MONO: u64 = 0x100;
pub const FAMILY_PUSH_CHUNKED: u64 = 0x200;
pub const FAMILY_SMALL: u64 = 0x300;
pub const FAMILY_PULL: u64 = 0x400;
pub const FAMILY_MIXED_PUSH: u64 = 0x500;
pub const FAMILY_IMAGE: u64 = 0x600;

/// A worker gives up after this many failed requests, so that a dead server
/// ends a case quickly instead of spinning until the deadline.
const MAX_ERRORS_PER_WORKER: u64 = 50;

/// Everything a workload needs; shared by all its workers.
pub struct Ctx {
    pub reg: Registry,
    pub data: DataGen,
    pub args: RunArgs,
    /// `<prefix><run suffix>`; repositories are `<this>/<name>`.
    pub prefix: String,
    results: Mutex<Vec<WorkloadResult>>,
    pull_set: tokio::sync::OnceCell<Arc<pull::PullSet>>,
}

impl Ctx {
    pub fn new(reg: Registry, data: DataGen, args: RunArgs, prefix: String) -> Self {
        Self {
            reg,
            data,
            args,
            prefix,
            results: Mutex::new(Vec::new()),
            pull_set: tokio::sync::OnceCell::new(),
        }
    }

    pub fn repo(&self, name: &str) -> String {
        format!("{}/{name}", self.prefix)
    }

    /// Stops after `--requests` operations if given, else after `--duration`.
    pub fn limiter(&self) -> Limiter {
        match self.args.requests {
            Some(n) => Limiter::count(n),
            None => Limiter::duration(Duration::from_secs_f64(self.args.duration)),
        }
    }

    /// Prints a result at once (so long runs show progress) and keeps it.
    pub fn emit(&self, r: WorkloadResult) {
        let mut all = self.results.lock().unwrap_or_else(|p| p.into_inner());
        if self.args.json {
            match serde_json::to_string(&r) {
                Ok(line) => println!("{line}"),
                Err(e) => eprintln!("trow-bench: cannot encode result: {e}"),
            }
        } else {
            if all.is_empty() {
                println!("{}", report::TABLE_HEADER);
            }
            println!("{}", report::table_row(&r));
        }
        if let Some(e) = &r.first_error {
            eprintln!("trow-bench: {}: {} errors, first: {e}", r.case, r.errors);
        }
        all.push(r);
    }

    pub fn total_errors(&self) -> u64 {
        self.results
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|r| r.errors)
            .sum()
    }
}

pub async fn run(ctx: &Arc<Ctx>, w: Workload) -> Result<()> {
    match w {
        Workload::All => Ok(()),
        Workload::PushMono => push::push_sizes(ctx, false).await,
        Workload::PushChunked => push::push_sizes(ctx, true).await,
        Workload::SmallBlobs => push::small_blobs(ctx).await,
        Workload::ManifestsPush => manifest::manifests_push(ctx).await,
        Workload::ManifestGet => manifest::manifest_get(ctx).await,
        Workload::Pull => pull::pull(ctx).await,
        Workload::PullMixed => pull::pull_mixed(ctx).await,
        Workload::MixedRw => pull::mixed_rw(ctx).await,
        Workload::Catalog => catalog::catalog(ctx).await,
    }
}

/// Decides whether a worker may start another operation: by deadline or by
/// a shared count, whichever the case uses. Operations already started run
/// to completion (bounded by the request timeout).
pub struct Limiter {
    deadline: Option<Duration>,
    max: Option<u64>,
    started: AtomicU64,
    t0: Instant,
}

impl Limiter {
    pub fn duration(d: Duration) -> Self {
        Self {
            deadline: Some(d),
            max: None,
            started: AtomicU64::new(0),
            t0: Instant::now(),
        }
    }

    pub fn count(n: u64) -> Self {
        Self {
            deadline: None,
            max: Some(n),
            started: AtomicU64::new(0),
            t0: Instant::now(),
        }
    }

    /// The index of the next operation, or `None` when the case is over.
    pub fn next(&self) -> Option<u64> {
        if let Some(d) = self.deadline {
            if self.t0.elapsed() >= d {
                return None;
            }
        }
        let i = self.started.fetch_add(1, Ordering::Relaxed);
        match self.max {
            Some(m) if i >= m => None,
            _ => Some(i),
        }
    }
}

/// What one successful operation moved.
pub struct OpOutcome {
    pub bytes: u64,
    pub ttfb: Option<Duration>,
    /// Sub-kind for mixed workloads ("pull"/"push"), to split latencies.
    pub kind: &'static str,
}

impl OpOutcome {
    pub fn bytes(bytes: u64) -> Self {
        Self {
            bytes,
            ttfb: None,
            kind: "",
        }
    }
}

/// Counters of one worker, later of the whole case.
#[derive(Default)]
pub struct Tally {
    pub lat: Lat,
    pub ttfb: Lat,
    pub by_kind: BTreeMap<&'static str, Lat>,
    pub ops: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
}

impl Tally {
    pub fn merge(&mut self, o: Tally) {
        self.lat.merge(&o.lat);
        self.ttfb.merge(&o.ttfb);
        for (k, l) in o.by_kind {
            self.by_kind.entry(k).or_default().merge(&l);
        }
        self.ops += o.ops;
        self.bytes += o.bytes;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error = o.first_error;
        }
    }

    pub fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// Runs `op(worker, index)` on `concurrency` tasks until `limiter` stops
/// them; returns the merged tally and the wall time of the whole case.
pub async fn run_workers<F, Fut>(concurrency: usize, limiter: Limiter, op: F) -> (Tally, Duration)
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<OpOutcome>> + Send + 'static,
{
    let op = Arc::new(op);
    let limiter = Arc::new(limiter);
    let t0 = Instant::now();
    let handles: Vec<_> = (0..concurrency)
        .map(|w| {
            let op = op.clone();
            let limiter = limiter.clone();
            tokio::spawn(async move {
                let mut t = Tally::default();
                while let Some(i) = limiter.next() {
                    let start = Instant::now();
                    match op(w, i).await {
                        Ok(o) => {
                            let el = start.elapsed();
                            t.lat.record(el);
                            if !o.kind.is_empty() {
                                t.by_kind.entry(o.kind).or_default().record(el);
                            }
                            if let Some(tt) = o.ttfb {
                                t.ttfb.record(tt);
                            }
                            t.ops += 1;
                            t.bytes += o.bytes;
                        }
                        Err(e) => {
                            t.error(format!("{e:#}"));
                            if t.errors >= MAX_ERRORS_PER_WORKER {
                                break;
                            }
                        }
                    }
                }
                t
            })
        })
        .collect();
    let mut total = Tally::default();
    for h in handles {
        match h.await {
            Ok(t) => total.merge(t),
            Err(e) => total.error(format!("worker task failed: {e}")),
        }
    }
    (total, t0.elapsed())
}

/// CPU and memory of the server (if `--server-pid`) and of this client
/// around one timed case.
pub struct Probe {
    pid: Option<String>,
    server: Option<ProcSample>,
    client_cpu: f64,
    reset: bool,
}

impl Probe {
    pub fn start(ctx: &Ctx) -> Self {
        let pid = ctx.args.server_pid.map(|p| p.to_string());
        let reset = pid.as_deref().map(stats::reset_peak).unwrap_or(false);
        let server = pid.as_deref().and_then(|p| stats::sample(p).ok());
        let client_cpu = stats::sample("self").map(|s| s.cpu_s).unwrap_or(0.0);
        Self {
            pid,
            server,
            client_cpu,
            reset,
        }
    }

    /// Fills the resource fields of `r`; a server that vanished is an error.
    pub fn finish(self, r: &mut WorkloadResult) {
        r.client_cpu_s = stats::sample("self")
            .map(|s| s.cpu_s - self.client_cpu)
            .unwrap_or(0.0);
        let Some(pid) = self.pid else { return };
        let why = match (self.server, stats::sample(&pid)) {
            (Some(before), Ok(after)) => {
                let cpu = after.cpu_s - before.cpu_s;
                r.server_cpu_s = Some(cpu);
                if r.headline == "mib_per_s" && r.bytes > 0 {
                    r.server_cpu_s_per_gib = Some(cpu / (r.bytes as f64 / GIB));
                } else if r.ops > 0 {
                    r.server_cpu_ms_per_op = Some(cpu * 1000.0 / r.ops as f64);
                }
                r.server_peak_rss_mib = Some(after.hwm_kib as f64 / 1024.0);
                r.server_rss_mib = Some(after.rss_kib as f64 / 1024.0);
                r.server_peak_rss_reset = Some(self.reset);
                return;
            }
            (None, _) => format!("server process {pid} was not readable when the case started"),
            (_, Err(e)) => format!("server process {pid} not readable after the case: {e:#}"),
        };
        r.errors += 1;
        if r.first_error.is_none() {
            r.first_error = Some(why);
        }
    }
}

/// Builds the record of a case from its tally.
pub fn result(
    ctx: &Ctx,
    workload: &str,
    case: String,
    params: BTreeMap<String, Value>,
    t: &Tally,
    elapsed: Duration,
    headline: &str,
) -> WorkloadResult {
    let secs = elapsed.as_secs_f64().max(1e-9);
    let has_ttfb = t.ttfb.count() > 0;
    let ttfb = |q: f64| has_ttfb.then(|| t.ttfb.ms(q));
    WorkloadResult {
        workload: workload.to_string(),
        case,
        target: ctx.args.url.clone(),
        params,
        ops: t.ops,
        bytes: t.bytes,
        seconds: secs,
        mib_per_s: t.bytes as f64 / MIB / secs,
        ops_per_s: t.ops as f64 / secs,
        p50_ms: t.lat.ms(0.50),
        p90_ms: t.lat.ms(0.90),
        p99_ms: t.lat.ms(0.99),
        max_ms: t.lat.max_ms(),
        ttfb_p50_ms: ttfb(0.50),
        ttfb_p90_ms: ttfb(0.90),
        ttfb_p99_ms: ttfb(0.99),
        errors: t.errors,
        first_error: t.first_error.clone(),
        headline: headline.to_string(),
        ..Default::default()
    }
}

/// `params!{"size" => x, "c" => y}` as a JSON map.
#[macro_export]
macro_rules! params {
    ($($k:expr => $v:expr),* $(,)?) => {{
        let mut m = std::collections::BTreeMap::<String, serde_json::Value>::new();
        $( m.insert($k.to_string(), serde_json::json!($v)); )*
        m
    }};
}
