//! Which upstream a request is for, and where its copy is cached.
//!
//! Two request forms name an upstream: the path form `f/<host-or-alias>/<repo>`
//! and the mirror form `?ns=<host>` that containerd and cri-o send. Both map
//! to one cache repository `f/<namespace>/<repo>`, so they share a cache.

use std::net::IpAddr;
use std::path::PathBuf;

use super::config::{ProxyConfig, UpstreamConfig};
use super::policy::{classify, AddrClass};
use crate::oci::RepoName;

pub use crate::registry::CACHE_PREFIX;

/// An upstream repository and its local cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host as in image references (`docker.io`, `127.0.0.1:5000`).
    pub host: String,
    /// Repository on the upstream (`library/nginx`).
    pub upstream_repo: String,
    /// Where its content is cached here (`f/docker.io/library/nginx`).
    pub cache_repo: RepoName,
    /// Base URL of the upstream's API (`https://registry-1.docker.io`).
    pub base_url: String,
    /// How Trow may reach it.
    pub access: Access,
    /// Credentials of the entry with the longest matching `path_prefix`.
    pub credentials: Option<Credentials>,
}

/// How an upstream may be reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Access {
    /// Listed in `registry_proxies.registries`: reached wherever it is.
    Listed { insecure: bool, ca: Option<PathBuf> },
    /// Not listed, allowed by `allow_any_public`: HTTPS to public
    /// addresses only, anonymously.
    AnyPublic,
}

impl Access {
    /// Whether plain-HTTP URLs (the API, redirects, token realms) are allowed.
    pub fn allows_http(&self) -> bool {
        matches!(self, Access::Listed { insecure: true, .. })
    }
}

/// A configured username and password (the password is never printed).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

/// Why a request names no upstream Trow may contact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("{0}")]
    Invalid(String),
    #[error("upstream registry `{host}` is not configured: add `- host: {host}` under registry_proxies.registries in the configuration file (--config-file){hint}")]
    NotListed { host: String, hint: &'static str },
    #[error("upstream registry `{host}` is at a {class} address, and only public addresses are allowed for upstreams not listed: add `- host: {host}` under registry_proxies.registries in the configuration file (--config-file)")]
    NotPublic { host: String, class: AddrClass },
}

/// Docker Hub's reference host and where its API really lives.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

fn normalise_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => host,
    }
}

/// The literal IP address of a `host[:port]`, if it is one.
fn literal_ip(host: &str) -> Option<IpAddr> {
    let bare = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => host.rsplit_once(':').map_or(host, |(h, port)| {
            if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') {
                h
            } else {
                host
            }
        }),
    };
    bare.parse().ok()
}

/// Whether `host` is a plain `name[:port]` (no user info, path or other
/// URL syntax), as an unlisted upstream must be.
fn plain_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        && reqwest::Url::parse(&format!("https://{host}/"))
            .is_ok_and(|u| u.host_str().is_some() && u.path() == "/")
}

/// The names Trow itself answers to, for the mirror form: containerd sends
/// `?ns=<registry>` to every host entry that is not the registry itself,
/// so a node pulling `trow.kube-public:31000/app` through the host entry
/// `https://localhost:31000` asks Trow for `app` with
/// `?ns=trow.kube-public:31000`. Such a request is for Trow's own
/// repositories, not for an upstream.
///
/// The names are `--hostname` and the names in the serving certificate.
/// They are matched by host, whatever the port (the Service's port, the
/// NodePort and the container's port all reach the same Trow), and a
/// certificate's `*.domain` covers one label. Loopback names
/// (`localhost`, `*.localhost`, `127.0.0.0/8`, `::1`) count only when
/// `--hostname` names them: the certificate carries `localhost` for
/// clients on the node, but `?ns=localhost:5000` from a node with a
/// registry of its own on port 5000 (kind's local registry, for one) is
/// that registry, not Trow. An upstream listed in
/// `registry_proxies.registries` with exactly the `ns` host[:port] stays an
/// upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnNames {
    hosts: Vec<String>,
}

/// The host of `host[:port]` or `[v6]:port`, lowercase, without a final dot.
fn host_part(s: &str) -> String {
    let s = s.trim();
    let host = match s.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(rest),
        None => match s.rsplit_once(':') {
            Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => s,
        },
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn is_loopback_name(host: &str) -> bool {
    host == "localhost"
        || host.ends_with(".localhost")
        || host == "localhost.localdomain"
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl OwnNames {
    /// From `--hostname` and the names (DNS names, IP addresses) of the
    /// serving certificate.
    pub fn new(hostname: Option<&str>, cert_names: &[String]) -> OwnNames {
        let mut hosts = Vec::new();
        let mut add = |h: String| {
            if !h.is_empty() && !hosts.contains(&h) {
                hosts.push(h);
            }
        };
        if let Some(h) = hostname {
            add(host_part(h));
        }
        for n in cert_names {
            let h = host_part(n);
            if !is_loopback_name(h.trim_start_matches("*.")) {
                add(h);
            }
        }
        OwnNames { hosts }
    }

    /// These names and `host` (a name Trow is reached by, given by the
    /// configuration: the admission webhooks' registry name).
    pub fn with_host(mut self, host: &str) -> OwnNames {
        let h = host_part(host);
        if !h.is_empty() && !self.hosts.contains(&h) {
            self.hosts.push(h);
        }
        self
    }

    /// The host names, as matched.
    pub fn hosts(&self) -> &[String] {
        &self.hosts
    }

    /// Whether `ns` (host[:port]) is one of these names.
    pub fn contains(&self, ns: &str) -> bool {
        let host = host_part(ns);
        self.hosts.iter().any(|own| {
            own == &host
                || own.strip_prefix("*.").is_some_and(|domain| {
                    host.split_once('.')
                        .is_some_and(|(label, rest)| !label.is_empty() && rest == domain)
                })
        })
    }
}

impl ProxyConfig {
    /// Whether a mirror request's `ns` names Trow itself (see [`OwnNames`]):
    /// one of `own`, and not an upstream listed with exactly that host.
    pub fn is_own_namespace(&self, own: &OwnNames, ns: &str) -> bool {
        own.contains(ns) && self.entries(&normalise_host(ns)).next().is_none()
    }

    /// The distinct listed hosts, normalised (`docker.io` for Docker Hub's
    /// other names), in the order of the configuration.
    pub fn listed_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = Vec::new();
        for r in &self.registries {
            let host = normalise_host(&r.host);
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        }
        hosts
    }

    /// The configuration entries for `host` (normalised).
    fn entries<'a>(&'a self, host: &str) -> impl Iterator<Item = &'a UpstreamConfig> + 'a {
        let host = host.to_string();
        self.registries
            .iter()
            .filter(move |r| normalise_host(&r.host) == host)
    }

    /// The entry for `host` whose `path_prefix` is the longest prefix of `repo`.
    fn settings_for(&self, host: &str, repo: &str) -> Option<&UpstreamConfig> {
        self.entries(host)
            .filter(|r| match r.path_prefix.as_deref() {
                None | Some("") => true,
                Some(p) => {
                    let p = p.trim_end_matches('/');
                    repo == p || repo.starts_with(&format!("{p}/"))
                }
            })
            .max_by_key(|r| r.path_prefix.as_deref().map_or(0, str::len))
    }

    /// The name of `host` inside cache repositories: its alias when one is
    /// configured (hosts with a port need one), else the host itself, with a
    /// `:port` written `-port` so that it forms a valid repository name.
    fn namespace(&self, host: &str) -> String {
        self.entries(host)
            .find_map(|r| r.alias.clone())
            .unwrap_or_else(|| host.replace(':', "-"))
    }

    fn target(&self, host: &str, repo: &str) -> Result<Target, TargetError> {
        let host = normalise_host(host);
        let first = self.entries(&host).next();
        let access = match first {
            Some(first) => Access::Listed {
                insecure: first.insecure,
                ca: first.ca.clone(),
            },
            None if !self.allow_any_public => {
                return Err(TargetError::NotListed {
                    hint: if host.contains(':') {
                        " with an `alias:`, or set registry_proxies.allow_any_public: true for public registries"
                    } else {
                        ", or set registry_proxies.allow_any_public: true for public registries"
                    },
                    host,
                })
            }
            None => {
                if !plain_host(&host) {
                    return Err(TargetError::Invalid(format!(
                        "`{host}` is not a registry host[:port]"
                    )));
                }
                // Names are checked when they are resolved, literal
                // addresses here.
                if let Some(ip) = literal_ip(&host) {
                    let class = classify(ip);
                    if class != AddrClass::Public {
                        return Err(TargetError::NotPublic { host, class });
                    }
                }
                Access::AnyPublic
            }
        };
        let upstream_repo = if host == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        };
        let cache_repo = RepoName::parse(&format!(
            "{CACHE_PREFIX}{}/{upstream_repo}",
            self.namespace(&host)
        ))
        .map_err(TargetError::Invalid)?;
        let credentials = self.settings_for(&host, &upstream_repo).and_then(|s| {
            match (&s.username, &s.password) {
                (Some(u), Some(p)) => Some(Credentials {
                    username: u.clone(),
                    password: p.clone(),
                }),
                _ => None,
            }
        });
        let api_host = if host == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &host
        };
        let scheme = if access.allows_http() {
            "http"
        } else {
            "https"
        };
        Ok(Target {
            base_url: format!("{scheme}://{api_host}"),
            host,
            upstream_repo,
            cache_repo,
            access,
            credentials,
        })
    }

    /// The target named by a path-form repository `f/<host-or-alias>/<repo>`.
    /// The first segment is an alias, a listed host's namespace
    /// (`127.0.0.1-5000` for `127.0.0.1:5000`) or a host name.
    pub fn target_for_path(&self, repo: &RepoName) -> Option<Result<Target, TargetError>> {
        let rest = repo.as_str().strip_prefix(CACHE_PREFIX)?;
        let Some((first, upstream_repo)) = rest.split_once('/') else {
            return Some(Err(TargetError::Invalid(format!(
                "`{repo}` names no upstream repository: use f/<registry-host>/<repository>"
            ))));
        };
        let host = self
            .registries
            .iter()
            .find(|r| r.alias.as_deref() == Some(first))
            .or_else(|| {
                self.registries
                    .iter()
                    .find(|r| normalise_host(&r.host).replace(':', "-") == first)
            })
            .map(|r| r.host.clone())
            .unwrap_or_else(|| first.to_string());
        Some(self.target(&host, upstream_repo))
    }

    /// The target named by the mirror form: repository `repo` on `ns`.
    pub fn target_for_namespace(&self, ns: &str, repo: &RepoName) -> Result<Target, TargetError> {
        if ns.is_empty() || ns.contains('/') || ns.chars().any(char::is_whitespace) {
            return Err(TargetError::Invalid(format!(
                "ns=`{ns}` is not a registry host"
            )));
        }
        self.target(ns, repo.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ProxyConfig {
        ProxyConfig {
            registries: vec![
                UpstreamConfig {
                    host: "docker.io".into(),
                    ..Default::default()
                },
                UpstreamConfig {
                    host: "127.0.0.1:5000".into(),
                    alias: Some("local".into()),
                    insecure: true,
                    ..Default::default()
                },
                UpstreamConfig {
                    host: "registry.example.com".into(),
                    username: Some("all".into()),
                    password: Some("p".into()),
                    ..Default::default()
                },
                UpstreamConfig {
                    host: "registry.example.com".into(),
                    path_prefix: Some("project-a".into()),
                    username: Some("a".into()),
                    password: Some("p".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn name(s: &str) -> RepoName {
        RepoName::parse(s).unwrap()
    }

    #[test]
    fn docker_hub_short_names() {
        let c = config();
        let t = c
            .target_for_path(&name("f/docker.io/nginx"))
            .unwrap()
            .unwrap();
        assert_eq!(t.upstream_repo, "library/nginx");
        assert_eq!(t.cache_repo.as_str(), "f/docker.io/library/nginx");
        assert_eq!(t.base_url, "https://registry-1.docker.io");
        let m = c
            .target_for_namespace("docker.io", &name("library/nginx"))
            .unwrap();
        assert_eq!(m.cache_repo, t.cache_repo);
    }

    #[test]
    fn aliases_and_ports_share_the_cache() {
        let c = config();
        let p = c
            .target_for_path(&name("f/local/team/app"))
            .unwrap()
            .unwrap();
        assert_eq!(p.host, "127.0.0.1:5000");
        assert_eq!(p.base_url, "http://127.0.0.1:5000");
        assert_eq!(p.cache_repo.as_str(), "f/local/team/app");
        let m = c
            .target_for_namespace("127.0.0.1:5000", &name("team/app"))
            .unwrap();
        assert_eq!(m.cache_repo, p.cache_repo);
        // The namespace form of a listed host with a port, without alias.
        let mut c2 = c.clone();
        c2.registries[1].alias = None;
        let n = c2
            .target_for_path(&name("f/127.0.0.1-5000/team/app"))
            .unwrap()
            .unwrap();
        assert_eq!(n.host, "127.0.0.1:5000");
        assert_eq!(n.cache_repo.as_str(), "f/127.0.0.1-5000/team/app");
    }

    #[test]
    fn longest_prefix_credentials() {
        let c = config();
        let a = c
            .target_for_path(&name("f/registry.example.com/project-a/app"))
            .unwrap()
            .unwrap();
        assert_eq!(a.credentials.unwrap().username, "a");
        let b = c
            .target_for_path(&name("f/registry.example.com/project-ab/app"))
            .unwrap()
            .unwrap();
        assert_eq!(b.credentials.unwrap().username, "all");
    }

    #[test]
    fn not_cache_paths() {
        let c = config();
        assert!(c.target_for_path(&name("library/nginx")).is_none());
        assert!(c.target_for_path(&name("f/docker.io")).unwrap().is_err());
        assert!(c.target_for_namespace("", &name("x")).is_err());
    }

    #[test]
    fn only_listed_upstreams() {
        let c = config();
        let e = c
            .target_for_path(&name("f/quay.io/x/y"))
            .unwrap()
            .unwrap_err();
        assert!(matches!(e, TargetError::NotListed { .. }));
        assert!(e
            .to_string()
            .contains("add `- host: quay.io` under registry_proxies.registries"));
        let e = c
            .target_for_namespace("127.0.0.1:6000", &name("x"))
            .unwrap_err();
        assert!(e.to_string().contains("`- host: 127.0.0.1:6000`"), "{e}");
        assert!(e.to_string().contains("alias"), "{e}");
        // Listed hosts are matched whatever their case.
        assert!(c
            .target_for_namespace("Registry.Example.com", &name("x"))
            .is_ok());
    }

    #[test]
    fn ns_naming_trow_itself_is_not_an_upstream() {
        let own = OwnNames::new(
            Some("trow.example.org:8443"),
            &[
                "trow.kube-public".into(),
                "trow.kube-public.svc".into(),
                "Trow.Kube-Public.svc.cluster.local".into(),
                "localhost".into(),
                "127.0.0.1".into(),
                "*.apps.example.com".into(),
            ],
        );
        let c = config();
        for ns in [
            "trow.kube-public:31000",
            "trow.kube-public",
            "TROW.kube-public.svc:443",
            "trow.kube-public.svc.cluster.local.:8000",
            "trow.example.org",
            "trow.example.org:8443",
            "trow.apps.example.com:443",
        ] {
            assert!(c.is_own_namespace(&own, ns), "{ns}");
        }
        for ns in [
            // Loopback names in the certificate are not enough.
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "docker.io",
            // Listed as an upstream.
            "registry.example.com",
            "trow.kube-public.evil.com",
            "a.b.apps.example.com",
            "kube-public",
        ] {
            assert!(!c.is_own_namespace(&own, ns), "{ns}");
        }
        // --hostname may name a loopback host on purpose.
        let local = OwnNames::new(Some("localhost:31000"), &[]);
        assert!(c.is_own_namespace(&local, "localhost:31000"));
        // A listed upstream with exactly that host:port stays an upstream.
        let listed = OwnNames::new(Some("127.0.0.1:5000"), &[]);
        assert!(!c.is_own_namespace(&listed, "127.0.0.1:5000"));
        assert!(listed.contains("127.0.0.1:5000"));
        assert!(!OwnNames::default().contains("anything"));
    }

    #[test]
    fn any_public_allows_unlisted_public_hosts_only() {
        let mut c = config();
        c.allow_any_public = true;
        let t = c.target_for_path(&name("f/quay.io/x/y")).unwrap().unwrap();
        assert_eq!(t.access, Access::AnyPublic);
        assert_eq!(t.base_url, "https://quay.io");
        assert!(t.credentials.is_none());
        for inside in [
            "127.0.0.1:5001",
            "10.0.0.1",
            "169.254.169.254",
            "[::1]:80",
            "[fd00:ec2::254]",
            "100.64.0.1:443",
        ] {
            let e = c.target_for_namespace(inside, &name("x")).unwrap_err();
            assert!(matches!(e, TargetError::NotPublic { .. }), "{inside}: {e}");
        }
        assert!(c.target_for_namespace("8.8.8.8:443", &name("x")).is_ok());
        for bad in ["user@host", "host?x", "host#f", "a..b%2f"] {
            assert!(c.target_for_namespace(bad, &name("x")).is_err(), "{bad}");
        }
        // Listed hosts keep their settings.
        let l = c
            .target_for_path(&name("f/local/team/app"))
            .unwrap()
            .unwrap();
        assert!(l.access.allows_http());
    }
}
