//! The Kubernetes jobs of the `trow` binary, apart from serving:
//!
//! - `trow init` ([`init`]): the init container (and, with `--watch`, the
//!   sidecar) that puts a serving certificate, its key and the CA into the
//!   certificate volume, keeping the CA in a Secret created with
//!   create-only semantics and publishing its certificate in a ConfigMap;
//! - `trow node-setup` ([`node_setup`]): what the `copy-certs` DaemonSet
//!   runs on every node, writing containerd's and docker's certificate and
//!   mirror files under the host's root, and removing exactly those.
//!
//! [`certs`] is the pure certificate logic, [`api`] the few Kubernetes API
//! calls, [`files`] atomic file writes. Nothing here is used by the server.

pub mod api;
pub mod certs;
pub mod files;
pub mod init;
pub mod node_setup;

use std::path::PathBuf;

/// What stops `trow init` or `trow node-setup`. Each message says what was
/// being done and, where there is one, what to do about it; `main` prints
/// it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Api(#[from] api::ApiError),
    /// A Secret that exists but cannot be used.
    #[error("Secret {name}: {problem}")]
    Secret { name: String, problem: String },
    #[error(transparent)]
    Cert(#[from] certs::CertError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file on the node that `node-setup` did not write (or that was
    /// changed since), which it will not overwrite.
    #[error("{0}")]
    NotOurs(String),
    /// Flags that cannot work together or values that cannot be used.
    #[error("{0}")]
    Usage(String),
}

impl Error {
    fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// `--log-level` and `--log-format` of the subcommands (the same as the
/// server's, with the same environment variables).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing
    /// filter directive.
    #[arg(long, env = "TROW_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Log line format.
    #[arg(long, env = "TROW_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: crate::config::LogFormat,
}

/// Resolves when the process is asked to stop (SIGTERM from the kubelet,
/// or Ctrl-C), for the `--watch` loops.
pub(crate) async fn stop_requested() {
    crate::shutdown::requested().await
}
