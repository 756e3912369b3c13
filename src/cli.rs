//! The command line. `trow` with no subcommand serves the registry (the
//! flags of [`Config`]); subcommands run one-off jobs with flags of their
//! own. Every subcommand's flags also fall back to `TROW_*` environment
//! variables.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    /// Run one garbage collection pass on a data directory no server is
    /// using, and print its report (a running server: `POST /admin/gc`).
    Gc(GcArgs),
    /// Kubernetes init container (and, with --watch, sidecar): write the
    /// serving certificate, its key and the CA into --cert-dir, keeping
    /// Trow's CA in a Secret and publishing it in a ConfigMap.
    Init(Box<crate::kube::init::InitArgs>),
    /// On a Kubernetes node (the copy-certs DaemonSet): make containerd and
    /// docker trust Trow's CA and reach Trow, or, with --remove, undo it.
    NodeSetup(Box<crate::kube::node_setup::NodeSetupArgs>),
}

/// `trow gc`.
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// The data directory to collect.
    #[arg(long, env = "TROW_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// The configuration file whose `retention` policies apply.
    #[arg(long, env = "TROW_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,
    /// Report what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Blobs pushed, mounted or linked more recently than this are kept.
    #[arg(long, env = "TROW_GC_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub gc_grace: Duration,
    /// Tag history entries that ended longer ago than this are forgotten.
    #[arg(long, env = "TROW_TAG_HISTORY", default_value = "90days", value_parser = humantime::parse_duration)]
    pub tag_history: Duration,
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

    #[test]
    fn the_kubernetes_jobs_take_the_flags_the_install_uses() {
        let init = Cli::parse_from([
            "trow",
            "init",
            "--cert-dir",
            "/certs",
            "--namespace",
            "kube-public",
            "--service",
            "trow",
            "--extra-names",
            "a,b",
            "--tls-secret",
            "mine",
            "--ca-secret",
            "trow-ca",
            "--ca-configmap",
            "trow-ca",
            "--watch",
        ]);
        match init.command {
            Some(Command::Init(a)) => {
                assert_eq!(a.extra_names, ["a", "b"]);
                assert!(a.watch);
                assert_eq!(a.tls_secret.as_deref(), Some("mine"));
            }
            other => panic!("{other:?}"),
        }
        let node = Cli::parse_from([
            "trow",
            "node-setup",
            "--host-root",
            "/host",
            "--ca",
            "/ca/ca.crt",
            "--registry",
            "trow.kube-public:31000",
            "--endpoint",
            "https://localhost:31000",
            "--mirror-all",
            "--watch",
        ]);
        assert!(matches!(node.command, Some(Command::NodeSetup(a)) if a.mirror_all && a.watch));
        let remove = Cli::parse_from(["trow", "node-setup", "--host-root", "/host", "--remove"]);
        assert!(matches!(remove.command, Some(Command::NodeSetup(a)) if a.remove));
        assert!(Cli::try_parse_from(["trow", "node-setup", "--host-root", "/host"]).is_err());
    }
}
