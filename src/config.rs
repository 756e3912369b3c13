//! The one typed home of Trow's configuration: command-line flags, each with
//! a `TROW_*` environment-variable fallback, validated at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Trow: a container image registry for Kubernetes (OCI Distribution v1.1).
#[derive(Debug, Clone, Parser)]
#[command(name = "trow", version, about)]
pub struct Config {
    /// Address and port to listen on (port 0 picks a free port).
    #[arg(long, env = "TROW_BIND", default_value = "0.0.0.0:8000")]
    pub bind: SocketAddr,

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
    #[arg(long, env = "TROW_MAX_MANIFEST_SIZE", default_value = "4MiB", value_parser = parse_size)]
    pub max_manifest_size: u64,

    /// How long an upload may sit idle before it is removed, e.g. `24h`, `30m`.
    #[arg(long, env = "TROW_UPLOAD_EXPIRY", default_value = "24h", value_parser = humantime::parse_duration)]
    pub upload_expiry: Duration,

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

/// Parses a size such as `4MiB`, `512KiB`, `1GiB`, `100` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let num: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size; write e.g. 4MiB, 512KiB or 1048576"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" | "k" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use B, KiB, MiB or GiB"
            ))
        }
    };
    num.checked_mul(mult)
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("size `{s}` must be greater than zero and fit in 64 bits"))
}

impl Config {
    /// Checks what clap cannot: the fields' values make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(h) = &self.hostname {
            if h.is_empty()
                || h.contains('/')
                || h.contains("://")
                || h.chars().any(char::is_whitespace)
            {
                return Err(format!(
                    "--hostname: `{h}` should be a bare host[:port] such as registry.example.com:8000"
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
        crate::auth::validate_config(self, &self.file()?)?;
        Ok(())
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
        Ok(())
    }

    /// The sections of `--config-file` shared through `ConfigFile` (empty
    /// without a file).
    pub fn file(&self) -> Result<crate::config_file::ConfigFile, String> {
        match &self.config_file {
            Some(path) => crate::config_file::ConfigFile::load(path),
            None => Ok(Default::default()),
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
    fn sizes() {
        assert_eq!(parse_size("4MiB"), Ok(4 << 20));
        assert_eq!(parse_size("100"), Ok(100));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert!(parse_size("0").is_err());
        assert!(parse_size("4XB").is_err());
        assert!(parse_size("MiB").is_err());
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse_from(["trow"]);
        assert!(c.validate().is_ok());
        assert_eq!(c.bind.port(), 8000);
        assert_eq!(c.max_manifest_size, 4 << 20);
        let bad = Config::parse_from(["trow", "--hostname", "http://x"]);
        assert!(bad.validate().is_err());
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
