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
    /// The upstreams Trow may contact. A request for any other host is
    /// answered 404 `NAME_UNKNOWN` without contacting anything (unless
    /// `allow_any_public`).
    pub registries: Vec<UpstreamConfig>,
    /// Also serve upstreams that are not listed, anonymously over HTTPS, as
    /// long as every address their name resolves to is a public one (checked
    /// when connecting, so DNS rebinding cannot point them inside).
    pub allow_any_public: bool,
    /// At most this many upstream fetches (manifest or blob downloads) run
    /// at once; more wait for a free slot.
    pub max_concurrent_fetches: usize,
    /// The largest blob the cache downloads. A larger announced size is
    /// refused before reading; a body without a size stops here.
    #[serde(deserialize_with = "crate::units::de_size")]
    pub max_blob_size: u64,
}

/// Default of `max_concurrent_fetches`.
pub const DEFAULT_MAX_CONCURRENT_FETCHES: usize = 32;
/// Default of `max_blob_size`: above the largest layers seen in practice
/// (CUDA and model images), far below what fills a disk by surprise.
pub const DEFAULT_MAX_BLOB_SIZE: u64 = 16 << 30;
/// Largest accepted `max_concurrent_fetches`.
const MAX_CONCURRENT_FETCHES_LIMIT: usize = 4096;

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            offline: false,
            max_size: None,
            tag_ttl: Duration::from_secs(5),
            stale_timeout: Duration::from_secs(2),
            upstream_timeout: Duration::from_secs(30),
            registries: Vec::new(),
            allow_any_public: false,
            max_concurrent_fetches: DEFAULT_MAX_CONCURRENT_FETCHES,
            max_blob_size: DEFAULT_MAX_BLOB_SIZE,
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
    /// Reach this upstream over plain HTTP (and let it redirect to, and
    /// name token realms at, plain HTTP URLs).
    pub insecure: bool,
    /// An extra CA certificate (PEM) to trust for this upstream.
    pub ca: Option<PathBuf>,
}

impl ProxyConfig {
    /// Checks values clap and serde cannot, naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_concurrent_fetches == 0
            || self.max_concurrent_fetches > MAX_CONCURRENT_FETCHES_LIMIT
        {
            return Err(format!(
                "registry_proxies.max_concurrent_fetches: {} must be between 1 and {MAX_CONCURRENT_FETCHES_LIMIT}",
                self.max_concurrent_fetches
            ));
        }
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
            // One connection setup per host: the entries of a host differ
            // only in path_prefix and credentials.
            if let Some((j, first)) = self
                .registries
                .iter()
                .enumerate()
                .take(i)
                .find(|(_, o)| o.host.eq_ignore_ascii_case(&r.host))
            {
                if first.insecure != r.insecure || first.ca != r.ca {
                    return Err(format!(
                        "{at}: `insecure` and `ca` must be the same as in registry_proxies.registries[{j}], which names the same host `{}`",
                        r.host
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<ProxyConfig, String> {
        let c: ProxyConfig = serde_norway::from_str(yaml).map_err(|e| e.to_string())?;
        c.validate().map(|()| c)
    }

    #[test]
    fn defaults_and_bounds() {
        let c = parse("{}").unwrap();
        assert!(!c.allow_any_public);
        assert_eq!(c.max_concurrent_fetches, DEFAULT_MAX_CONCURRENT_FETCHES);
        assert_eq!(c.max_blob_size, 16 << 30);
        let c = parse("max_blob_size: 8MiB\nmax_concurrent_fetches: 2\n").unwrap();
        assert_eq!((c.max_blob_size, c.max_concurrent_fetches), (8 << 20, 2));
        let e = parse("max_concurrent_fetches: 0\n").unwrap_err();
        assert!(e.contains("max_concurrent_fetches"), "{e}");
        assert!(parse("max_blob_size: 0\n").is_err());
    }

    #[test]
    fn entries_of_one_host_share_their_connection_settings() {
        let e = parse(
            "registries:\n  - host: r.example\n    insecure: true\n  - host: r.example\n    path_prefix: a\n",
        )
        .unwrap_err();
        assert!(
            e.contains("registries[1]") && e.contains("registries[0]"),
            "{e}"
        );
        assert!(parse(
            "registries:\n  - host: r.example\n    insecure: true\n  - host: r.example\n    path_prefix: a\n    insecure: true\n    username: u\n    password: p\n",
        )
        .is_ok());
    }
}
