//! `trow-bench`: a load generator for any OCI Distribution registry.
//!
//! It exists to compare registries (Trow against CNCF Distribution in
//! `bench/compare.sh`) on the operations that matter to clusters pulling and
//! pushing images: blob uploads, blob downloads under concurrency, manifest
//! traffic and listing. See `docs/PERFORMANCE.md`.

mod ceilings;
mod client;
mod data;
mod report;
mod stats;
mod units;
mod workloads;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use rand::RngCore;

use crate::units::Size;
use crate::workloads::Ctx;

#[derive(Parser)]
#[command(version, about = "Load generator for OCI Distribution registries")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run workloads against a registry.
    Run(Box<RunArgs>),
    /// Measure the machine's ceilings (SHA-256, loopback TCP, synced disk
    /// writes) without any registry.
    Ceilings {
        /// Directory whose file system the disk ceilings write to (e.g. the
        /// registry's data directory or its parent); temporary files there
        /// are removed afterwards.
        #[arg(long)]
        dir: PathBuf,
        /// Seconds each ceiling is measured for.
        #[arg(long, default_value_t = 2.0)]
        ceiling_seconds: f64,
        /// One JSON object per ceiling instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print markdown tables comparing two `run --json` outputs.
    Compare {
        /// JSON lines of the candidate (e.g. Trow).
        #[arg(long)]
        candidate: String,
        /// JSON lines of the baseline (e.g. Distribution).
        #[arg(long)]
        baseline: String,
        #[arg(long, default_value = "Trow")]
        candidate_name: String,
        #[arg(long, default_value = "Distribution")]
        baseline_name: String,
        /// Candidate's RSS after start-up, MiB.
        #[arg(long)]
        candidate_idle_rss_mib: Option<f64>,
        /// Baseline's RSS after start-up, MiB.
        #[arg(long)]
        baseline_idle_rss_mib: Option<f64>,
    },
}

/// The workloads; `all` runs each in this order.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    All,
    PushMono,
    PushChunked,
    SmallBlobs,
    ManifestsPush,
    ManifestGet,
    Pull,
    PullMixed,
    MixedRw,
    Catalog,
}

impl Workload {
    const EVERY: [Workload; 9] = [
        Workload::PushMono,
        Workload::PushChunked,
        Workload::SmallBlobs,
        Workload::ManifestsPush,
        Workload::ManifestGet,
        Workload::Pull,
        Workload::PullMixed,
        Workload::MixedRw,
        Workload::Catalog,
    ];
}

/// Options of `run`. Defaults are the full benchmark; `compare.sh --quick`
/// passes smaller ones.
#[derive(Args, Clone, Debug)]
pub struct RunArgs {
    /// Registry base URL, e.g. http://127.0.0.1:5000
    #[arg(long)]
    pub url: String,
    /// User name for Basic auth / token requests.
    #[arg(long)]
    pub user: Option<String>,
    /// Password for Basic auth / token requests.
    #[arg(long, requires = "user")]
    pub password: Option<String>,
    /// Workloads to run (comma-separated), or `all`.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    pub workload: Vec<Workload>,
    /// Blob sizes for push-mono and push-chunked.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,10MiB,100MiB,1GiB")]
    pub sizes: Vec<Size>,
    /// Blob sizes for the pull workload.
    #[arg(long, value_delimiter = ',', default_value = "1MiB,10MiB,100MiB")]
    pub pull_sizes: Vec<Size>,
    /// Concurrency levels for pull and pull-mixed.
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    pub concurrency: Vec<usize>,
    /// Seconds per timed case of the duration-bound workloads.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Run each case for exactly this many requests instead of `--duration`
    /// (for push-mono/push-chunked: pushes per size).
    #[arg(long)]
    pub requests: Option<u64>,
    /// One JSON object per line per case instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Repository name prefix; a random suffix is appended per run.
    #[arg(long, default_value = "bench/")]
    pub prefix: String,
    /// Seed of the data generator.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Repositories the catalog workload creates.
    #[arg(long, default_value_t = 2000)]
    pub repos: usize,
    /// Tags the catalog workload creates in one repository.
    #[arg(long, default_value_t = 1000)]
    pub tags: usize,
    /// Page size (`n`) for catalog and tag listing.
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
    /// Full listings timed per catalog case.
    #[arg(long, default_value_t = 3)]
    pub catalog_iterations: usize,
    /// Clients for small-blobs, manifests-push and catalog seeding.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Concurrency for manifest-get.
    #[arg(long, default_value_t = 64)]
    pub get_concurrency: usize,
    /// Concurrency for mixed-rw.
    #[arg(long, default_value_t = 8)]
    pub mixed_concurrency: usize,
    /// Concurrent pushes in push-mono and push-chunked.
    #[arg(long, default_value_t = 1)]
    pub push_concurrency: usize,
    /// PATCH size for push-chunked.
    #[arg(long, default_value = "8MiB")]
    pub chunk_size: Size,
    /// Blob size for small-blobs.
    #[arg(long, default_value = "4KiB")]
    pub small_size: Size,
    /// Blob size pushed by mixed-rw.
    #[arg(long, default_value = "10MiB")]
    pub mixed_push_size: Size,
    /// Distinct blobs per size pre-pushed for pulls.
    #[arg(long, default_value_t = 4)]
    pub pull_blobs: u64,
    /// Server process to sample (CPU time, RSS) from /proc around each case.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Per-request timeout in seconds, so that no case can hang.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Measure the machine's ceilings before the workloads, the disk ones in
    /// this directory (on the registry's data file system), and report them
    /// as cases of workload `ceiling`.
    #[arg(long)]
    pub ceilings_dir: Option<PathBuf>,
    /// Seconds each ceiling is measured for.
    #[arg(long, default_value_t = 2.0)]
    pub ceiling_seconds: f64,
}

async fn run(args: RunArgs) -> Result<bool> {
    if args.concurrency.contains(&0)
        || args.clients == 0
        || args.get_concurrency == 0
        || args.mixed_concurrency == 0
        || args.push_concurrency == 0
    {
        bail!("concurrency values must be at least 1");
    }
    if args.chunk_size.0 == 0 || args.page_size == 0 {
        bail!("--chunk-size and --page-size must be positive");
    }
    if !(args.duration > 0.0 && args.duration.is_finite()) {
        bail!("--duration must be positive");
    }
    if !(args.ceiling_seconds > 0.0 && args.ceiling_seconds.is_finite()) {
        bail!("--ceiling-seconds must be positive");
    }
    let creds = match (&args.user, &args.password) {
        (Some(u), p) => Some((u.clone(), p.clone().unwrap_or_default())),
        _ => None,
    };
    let reg = client::Registry::new(&args.url, creds, Duration::from_secs(args.timeout))?;
    reg.ping()
        .await
        .with_context(|| format!("registry at {} is not answering GET /v2/", args.url))?;
    if let Some(dir) = args.ceilings_dir.clone() {
        // Before the workloads, so that nothing of the run competes with it.
        let (secs, json) = (args.ceiling_seconds, args.json);
        tokio::task::spawn_blocking(move || ceilings::measure_and_print(&dir, secs, json))
            .await
            .context("ceilings task failed")??;
        if !json {
            println!();
        }
    }

    // The nonce names this run's repositories and salts every blob, so reruns
    // against the same registry neither collide nor hit existing blobs.
    let nonce = rand::thread_rng().next_u64();
    let prefix = format!("{}{:08x}", args.prefix, nonce as u32);
    eprintln!(
        "trow-bench: target {}, repositories under {prefix}/",
        args.url
    );
    let data = data::DataGen::new(args.seed, nonce);

    let list: Vec<Workload> = if args.workload.contains(&Workload::All) {
        Workload::EVERY.to_vec()
    } else {
        args.workload.clone()
    };
    let ctx = Arc::new(Ctx::new(reg, data, args, prefix));
    let mut ok = true;
    for w in list {
        eprintln!("trow-bench: running {w:?}");
        if let Err(e) = workloads::run(&ctx, w).await {
            eprintln!("trow-bench: workload {w:?} failed: {e:#}");
            ok = false;
        }
    }
    Ok(ok && ctx.total_errors() == 0)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("starting tokio runtime")
            .and_then(|rt| rt.block_on(run(*args))),
        Cmd::Ceilings {
            dir,
            ceiling_seconds,
            json,
        } => ceilings::measure_and_print(&dir, ceiling_seconds, json).map(|()| true),
        Cmd::Compare {
            candidate,
            baseline,
            candidate_name,
            baseline_name,
            candidate_idle_rss_mib,
            baseline_idle_rss_mib,
        } => report::compare_markdown(
            &candidate,
            &baseline,
            (&candidate_name, &baseline_name),
            (candidate_idle_rss_mib, baseline_idle_rss_mib),
        )
        .map(|md| {
            print!("{md}");
            true
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("trow-bench: some requests failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("trow-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
