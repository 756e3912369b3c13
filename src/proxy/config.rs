//! The `registry_proxies` section of the configuration file: which upstream
//! registries Trow caches, with what credentials, and how it behaves when
//! they fail. The field names follow the original Trow's format.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// How the pull-through cache behaves.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Never contact upstream: serve only what is cached.
    pub offline: bool,
    /// Evict least recently pulled cached content beyond this size (e.g.
    /// `50GiB`). Content pushed to Trow directly is never evicted.
    #[serde(deserialize_with = "crate::units::de_size_opt")]
    pub max_size: Option<u64>,
    /// How long a resolved tag is trusted without asking upstream again.
    #[serde(deserialize_with = "crate::units::de_duration")]
    pub tag_ttl: Duration,
    /// How long to wait for upstream before serving a cached tag instead.
    #[serde(deserialize_with = "crate::units::de_duration")]
    pub stale_timeout: Duration,
    /// Timeout for upstream requests when nothing is cached to fall back on.
    #[serde(deserialize_with = "crate::units::de_duration")]
    pub upstream_timeout: Duration,
    /// Per-upstream settings; upstreams not listed are reached anonymously
    /// over HTTPS.
    pub registries: Vec<UpstreamConfig>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            offline: false,
            max_size: None,
            tag_ttl: Duration::from_secs(5),
            stale_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(30),
            registries: Vec::new(),
        }
    }
}

/// One upstream registry (optionally only a path prefix of it).
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Host as it appears in image references, e.g. `registry.example.com`
    /// or `127.0.0.1:5000`.
    pub host: String,
    /// Credentials apply to repositories under this prefix only; the
    /// longest matching prefix wins.
    pub path_prefix: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    /// A short name usable as `f/<alias>/<repo>`; needed for hosts with a
    /// port, since image references do not allow `:` in a path.
    pub alias: Option<String>,
    /// Reach this upstream over plain HTTP.
    pub insecure: bool,
    /// An extra CA certificate (PEM) to trust for this upstream.
    pub ca: Option<PathBuf>,
}

impl ProxyConfig {
    /// Checks values clap and serde cannot, naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        for (i, r) in self.registries.iter().enumerate() {
            let at = format!("registry_proxies.registries[{i}]");
            if r.host.is_empty() || r.host.contains('/') || r.host.contains("://") {
                return Err(format!(
                    "{at}.host: `{}` must be a bare host[:port]",
                    r.host
                ));
            }
            if r.username.is_some() != r.password.is_some() {
                return Err(format!("{at}: give both username and password, or neither"));
            }
            if let Some(alias) = &r.alias {
                if alias.is_empty()
                    || !alias
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                {
                    return Err(format!(
                        "{at}.alias: `{alias}` may only hold lowercase letters, digits and `-`"
                    ));
                }
            }
            if let Some(ca) = &r.ca {
                if !ca.is_file() {
                    return Err(format!("{at}.ca: {} is not a readable file", ca.display()));
                }
            }
        }
        Ok(())
    }
}
