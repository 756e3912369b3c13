//! The command line. `trow` with no subcommand serves the registry (the
//! flags of [`Config`]); subcommands run one-off jobs with flags of their
//! own. Every subcommand's flags also fall back to `TROW_*` environment
//! variables.

use clap::{Parser, Subcommand};

use crate::config::Config;

/// Trow: a container image registry for Kubernetes (OCI Distribution v1.1).
#[derive(Debug, Parser)]
#[command(name = "trow", version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Serving flags, for `trow` without a subcommand.
    #[command(flatten)]
    pub serve: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry (the same as `trow` with no subcommand).
    Serve(Box<Config>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_subcommand_serves_and_serve_is_the_same() {
        let plain = Cli::parse_from(["trow", "--bind", "127.0.0.1:9"]);
        assert!(plain.command.is_none());
        assert_eq!(plain.serve.bind.port(), 9);
        let explicit = Cli::parse_from(["trow", "serve", "--bind", "127.0.0.1:9"]);
        match explicit.command {
            Some(Command::Serve(config)) => assert_eq!(config.bind.port(), 9),
            other => panic!("{other:?}"),
        }
    }
}
