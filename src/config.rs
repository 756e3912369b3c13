//! The one typed home of Trow's configuration: command-line flags, each with
//! a `TROW_*` environment-variable fallback, validated at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::config_file::ConfigFile;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// `--sync`: how durable an acknowledged write is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SyncMode {
    Normal,
    Full,
}

/// Trow: a container image registry for Kubernetes (OCI Distribution v1.1).
#[derive(Debug, Clone, Parser)]
#[command(name = "trow", version, about)]
pub struct Config {
    /// Address and port to listen on (port 0 picks a free port).
    #[arg(long, env = "TROW_BIND", default_value = "0.0.0.0:8000")]
    pub bind: SocketAddr,

    /// Serve `/metrics` and the health endpoints (`/healthz`, `/readyz`) on
    /// this address and port too, in plain HTTP and without registry auth;
    /// `/metrics` then leaves the registry port. Default: everything on
    /// `--bind`.
    #[arg(long, env = "TROW_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,

    /// Directory holding blobs, uploads and the metadata database.
    #[arg(long, env = "TROW_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Public host[:port] of this registry. When set, `Location` and `Link`
    /// headers are absolute URLs on it; otherwise they are relative paths.
    #[arg(long, env = "TROW_HOSTNAME")]
    pub hostname: Option<String>,

    /// Log filter: a level (error, warn, info, debug, trace) or a tracing
    /// filter directive such as `info,trow=debug`.
    #[arg(long, env = "TROW_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Log line format.
    #[arg(long, env = "TROW_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Largest manifest accepted, e.g. `4MiB`, `512KiB` or a byte count.
    #[arg(long, env = "TROW_MAX_MANIFEST_SIZE", default_value = "4MiB", value_parser = crate::units::parse_size)]
    pub max_manifest_size: u64,

    /// Largest blob a client may push into any repository, e.g. `10GiB`
    /// (default: no limit). Quota rules can set lower limits per
    /// repository pattern.
    #[arg(long, env = "TROW_MAX_BLOB_SIZE", value_parser = crate::units::parse_size)]
    pub max_blob_size: Option<u64>,

    /// How durable an acknowledged write is. `normal`: blob and manifest
    /// bytes are fsynced before they are acknowledged, and metadata commits
    /// survive a crash of the process; a power loss or OS crash can lose
    /// the last metadata commits (never corrupt the database). `full`: every
    /// metadata commit is also synced, so acknowledged means on disk.
    #[arg(long, env = "TROW_SYNC", value_enum, default_value = "normal")]
    pub sync: SyncMode,

    /// How long an upload may sit idle before it is removed, e.g. `24h`, `30m`.
    #[arg(long, env = "TROW_UPLOAD_EXPIRY", default_value = "24h", value_parser = humantime::parse_duration)]
    pub upload_expiry: Duration,

    /// How often the garbage collector runs, e.g. `1h`; `0` turns the
    /// schedule off (`POST /admin/gc` and `trow gc` still run passes).
    #[arg(long, env = "TROW_GC_INTERVAL", default_value = "1h", value_parser = humantime::parse_duration)]
    pub gc_interval: Duration,

    /// Blobs pushed, mounted or linked more recently than this are never
    /// collected, so a client pushing layers before their manifest keeps
    /// them, e.g. `1h`.
    #[arg(long, env = "TROW_GC_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    pub gc_grace: Duration,

    /// How long a tag's past (which digest it pointed to, and when) is kept
    /// after it changed, e.g. `90d`.
    #[arg(long, env = "TROW_TAG_HISTORY", default_value = "90days", value_parser = humantime::parse_duration)]
    pub tag_history: Duration,

    /// YAML file with the structured settings (e.g. `registry_proxies`, the
    /// pull-through cache's upstreams, and `permissions`); see
    /// docs/CONFIGURATION.md.
    #[arg(long, env = "TROW_CONFIG_FILE")]
    pub config_file: Option<PathBuf>,

    /// Serve HTTPS with this PEM certificate (chain) and key:
    /// `--tls=<cert>,<key>`. The files are re-read when they change.
    #[arg(long, env = "TROW_TLS", value_name = "CERT,KEY", value_parser = crate::tls::parse_tls_arg)]
    pub tls: Option<crate::tls::TlsFiles>,

    /// A user allowed to log in (with --password).
    #[arg(long, env = "TROW_USER")]
    pub user: Option<String>,

    /// The --user's password, or `file://<path>` to read it from a file.
    #[arg(long, env = "TROW_PASSWORD", hide_env_values = true, value_parser = crate::auth::parse_secret)]
    pub password: Option<crate::auth::Secret>,

    /// An htpasswd file of users (bcrypt entries, `htpasswd -B`; argon2 too).
    #[arg(long, env = "TROW_HTPASSWD")]
    pub htpasswd: Option<PathBuf>,

    /// File with the secret that signs login tokens (at least 32 bytes), to
    /// share between replicas. Default: generated into <data-dir>/token.key.
    #[arg(long, env = "TROW_TOKEN_KEY")]
    pub token_key: Option<PathBuf>,

    /// How long a login token is valid, e.g. `5m`, `1h`.
    #[arg(long, env = "TROW_TOKEN_LIFETIME", default_value = "5m", value_parser = humantime::parse_duration)]
    pub token_lifetime: Duration,

    /// Reverse proxies (addresses or CIDR blocks, comma-separated) whose
    /// X-Forwarded-For, X-Forwarded-Proto and X-Forwarded-Host headers are
    /// believed. Default: none, so these headers are ignored.
    #[arg(long, env = "TROW_TRUSTED_PROXIES", value_name = "CIDR,...", value_delimiter = ',', value_parser = crate::api::forwarded::parse_cidr)]
    pub trusted_proxies: Vec<crate::api::forwarded::Cidr>,

    /// A client must send a complete HTTP/1.1 request head (request line and
    /// headers) within this time of its first byte, e.g. `30s`.
    #[arg(long, env = "TROW_HEADER_READ_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,

    /// A connection is closed when, for this long, it carries no request, or
    /// no byte moves while Trow is not working on one of its requests
    /// (HTTP/1.1 and HTTP/2). Also the longest a write to a client that stops
    /// reading may wait. Above the 60s after which load balancers (AWS ALB,
    /// ingress-nginx) drop idle connections, so that they are the ones that
    /// close them and never reuse one Trow is closing.
    #[arg(long, env = "TROW_IDLE_TIMEOUT", default_value = "75s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// A request body (blob chunk, manifest) that brings no data for this long
    /// ends its request with an error; an interrupted upload can be resumed.
    #[arg(long, env = "TROW_BODY_IDLE_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub body_idle_timeout: Duration,

    /// Most connections served at once. Beyond it Trow stops accepting, so new
    /// connections wait in the kernel's listen queue until one closes.
    #[arg(long, env = "TROW_MAX_CONNECTIONS", default_value = "4096")]
    pub max_connections: u32,

    /// On SIGTERM, how long requests in flight may take to finish before the
    /// remaining connections are cut and Trow exits (keep it below the pod's
    /// `terminationGracePeriodSeconds`, 30s by default).
    #[arg(long, env = "TROW_SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,

    /// Validate the configuration, print it and exit without serving.
    #[arg(long, env = "TROW_DRY_RUN")]
    pub dry_run: bool,
}

impl Config {
    /// Checks what clap cannot (the fields' values make sense together),
    /// reads and checks the configuration file, and checks the users and
    /// permissions: everything a start would refuse. Returns the parsed
    /// file, so that it is read once.
    pub fn validate(&self) -> Result<ConfigFile, String> {
        if let Some(h) = &self.hostname {
            // It goes into URLs and, quoted, into `WWW-Authenticate`.
            if h.is_empty()
                || !h
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
            {
                return Err(format!(
                    "--hostname: `{h}` should be a bare host[:port] such as registry.example.com:8000 (letters, digits and `-._:[]`)"
                ));
            }
        }
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            format!(
                "--log-level: `{}` is not a valid filter: {e}",
                self.log_level
            )
        })?;
        if self.upload_expiry < Duration::from_secs(1) {
            return Err("--upload-expiry: must be at least 1s".into());
        }
        self.validate_connection_limits()?;
        if let Some(tls) = &self.tls {
            crate::tls::validate(tls).map_err(|e| format!("--tls: {e}"))?;
        }
        if self.token_lifetime < Duration::from_secs(10) {
            return Err("--token-lifetime: must be at least 10s".into());
        }
        if let Some(path) = &self.token_key {
            crate::auth::token::read_key(path).map_err(|e| format!("--token-key: {e}"))?;
        }
        let file = self.load_file()?;
        crate::auth::AuthSetup::load(self.user_sources(), file.permissions.as_ref())?;
        Ok(file)
    }

    /// The timeouts and the connection cap: timers below a second would cut
    /// clients on an ordinary network hiccup, and beyond a day they protect
    /// nothing (and deadlines far enough out overflow the clock).
    fn validate_connection_limits(&self) -> Result<(), String> {
        const DAY: Duration = Duration::from_secs(24 * 3600);
        for (flag, value) in [
            ("--header-read-timeout", self.header_read_timeout),
            ("--idle-timeout", self.idle_timeout),
            ("--body-idle-timeout", self.body_idle_timeout),
        ] {
            if value < Duration::from_secs(1) || value > DAY {
                return Err(format!("{flag}: must be between 1s and 24h"));
            }
        }
        if self.max_connections == 0 {
            return Err("--max-connections: must be at least 1".into());
        }
        if let Some(m) = self.metrics_bind {
            if m == self.bind && m.port() != 0 {
                return Err(format!(
                    "--metrics-bind: {m} is the registry's own address (--bind); give it another port, or leave it out to serve /metrics on the registry port"
                ));
            }
        }
        Ok(())
    }

    /// Reads `--config-file` (an empty configuration without one).
    fn load_file(&self) -> Result<ConfigFile, String> {
        match &self.config_file {
            Some(path) => ConfigFile::load(path),
            None => Ok(ConfigFile::default()),
        }
    }

    /// Where the users come from, for `auth`.
    pub fn user_sources(&self) -> crate::auth::UserSources<'_> {
        crate::auth::UserSources {
            user: self.user.as_deref(),
            password: self.password.as_ref(),
            htpasswd: self.htpasswd.as_deref(),
        }
    }

    /// Prefix for absolute URLs, or empty for relative ones.
    pub fn base_url(&self) -> String {
        self.hostname
            .as_ref()
            .map(|h| {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{h}")
            })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse_from(["trow"]);
        assert!(c.validate().is_ok());
        assert_eq!(c.bind.port(), 8000);
        assert_eq!(c.max_manifest_size, 4 << 20);
        let bad = Config::parse_from(["trow", "--hostname", "http://x"]);
        assert!(bad.validate().is_err());
        assert!(c.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_are_a_list_of_blocks() {
        let c = Config::parse_from([
            "trow",
            "--trusted-proxies",
            "10.0.0.0/8, 127.0.0.1,fd00::/8",
        ]);
        let shown: Vec<String> = c.trusted_proxies.iter().map(|n| n.to_string()).collect();
        assert_eq!(shown, ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8"]);
        let c = Config::parse_from([
            "trow",
            "--trusted-proxies=10.0.0.0/8",
            "--trusted-proxies=10.1.0.0/16",
        ]);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert!(Config::try_parse_from(["trow", "--trusted-proxies", "10.0.0.0/40"]).is_err());
        assert!(Config::try_parse_from(["trow", "--trusted-proxies", "ingress.local"]).is_err());
    }

    #[test]
    fn connection_limits() {
        let c = Config::parse_from(["trow"]);
        assert_eq!(c.header_read_timeout, Duration::from_secs(30));
        assert_eq!(c.idle_timeout, Duration::from_secs(75));
        assert_eq!(c.body_idle_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 4096);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        let invalid = |args: &[&str]| {
            let mut argv = vec!["trow"];
            argv.extend_from_slice(args);
            Config::parse_from(argv).validate().unwrap_err()
        };
        assert!(invalid(&["--idle-timeout", "500ms"]).contains("--idle-timeout"));
        assert!(invalid(&["--header-read-timeout", "0s"]).contains("--header-read-timeout"));
        assert!(invalid(&["--body-idle-timeout", "1000years"]).contains("--body-idle-timeout"));
        assert!(invalid(&["--max-connections", "0"]).contains("--max-connections"));
        assert!(invalid(&[
            "--bind",
            "127.0.0.1:9000",
            "--metrics-bind",
            "127.0.0.1:9000"
        ])
        .contains("--metrics-bind"));
        assert_eq!(Config::parse_from(["trow"]).metrics_bind, None);
        let short = Config::parse_from([
            "trow",
            "--idle-timeout",
            "2s",
            "--header-read-timeout",
            "2s",
        ]);
        assert!(short.validate().is_ok());
    }
}
