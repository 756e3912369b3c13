//! The `trow` binary: parse the command line, then serve or run the job a
//! subcommand names.

use std::process::ExitCode;

use clap::Parser;

use trow::cli::{Cli, Command};
use trow::config::Config;

fn main() -> ExitCode {
    trow::memory::limit_malloc_retention();
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(config)) => serve(*config),
        Some(Command::Gc(args)) => gc(args),
        Some(Command::Init(args)) => {
            let log = args.log.clone();
            job("init", &log, trow::kube::init::run(*args))
        }
        Some(Command::NodeSetup(args)) => {
            let log = args.log.clone();
            job("node-setup", &log, trow::kube::node_setup::run(*args))
        }
    }
}

/// Runs a Kubernetes job (`trow init`, `trow node-setup`): its error is
/// logged (so `kubectl logs` shows it) and printed, and the exit code is 2
/// for flags that cannot work, 1 for anything else.
fn job(
    name: &str,
    log: &trow::kube::LogArgs,
    work: impl std::future::Future<Output = Result<(), trow::kube::Error>>,
) -> ExitCode {
    trow::logging::init(&log.log_level, log.log_format);
    // One worker thread is plenty for a few API calls and file writes.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trow {name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("trow {name} failed: {e}");
            eprintln!("trow {name}: {e}");
            match e {
                trow::kube::Error::Usage(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// A multi-threaded tokio runtime, or the exit code for failing to get one.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("trow: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// `trow` (or `trow serve`): validate, set up logging, serve until SIGTERM.
fn serve(config: Config) -> ExitCode {
    let file = match config.validate() {
        Ok(file) => file,
        Err(e) => {
            eprintln!("trow: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    trow::logging::init(&config.log_level, config.log_format);
    if config.dry_run {
        println!("configuration is valid:\n{config:#?}\n{file:#?}");
        return ExitCode::SUCCESS;
    }
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(trow::server::run(config, file)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("trow: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `trow gc`: one pass offline, its report on standard output.
fn gc(args: trow::cli::GcArgs) -> ExitCode {
    trow::logging::init("warn", trow::config::LogFormat::Text);
    let runtime = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(trow::server::gc_offline(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trow gc: {e:#}");
            ExitCode::FAILURE
        }
    }
}
