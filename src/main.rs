//! The `trow` binary: parse the configuration, set up logging, serve.

use clap::Parser;

use trow::config::Config;

fn main() -> std::process::ExitCode {
    trow::memory::limit_malloc_retention();
    let config = Config::parse();
    let file = match config.validate() {
        Ok(file) => file,
        Err(e) => {
            eprintln!("trow: invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    trow::logging::init(&config.log_level, config.log_format);
    if config.dry_run {
        println!("configuration is valid:\n{config:#?}\n{file:#?}");
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
    match runtime.block_on(trow::server::run(config, file)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("trow: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
