//! The `trow` binary: parse the configuration, set up logging, serve.

use clap::Parser;

use trow::config::Config;

fn main() -> std::process::ExitCode {
    limit_malloc_retention();
    let config = Config::parse();
    if let Err(e) = config.validate() {
        eprintln!("trow: invalid configuration: {e}");
        return std::process::ExitCode::from(2);
    }
    trow::logging::init(&config.log_level, config.log_format);
    if config.dry_run {
        println!("configuration is valid:\n{config:#?}");
        return std::process::ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trow: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(trow::server::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("trow: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc raises its mmap threshold each time a large block is freed, after
/// which large transient buffers (HTTP read buffers during uploads) come from
/// the per-thread arenas and stay resident once freed. A fixed threshold
/// keeps blocks of 128 KiB and more in their own mappings, returned to the
/// OS on free (measured: peak RSS of a mixed run 37 MiB instead of 47 to
/// 49 MiB; docs/PERFORMANCE.md).
fn limit_malloc_retention() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before
    // any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}
