//! Which upstream a request is for, and where its copy is cached.
//!
//! Two request forms name an upstream: the path form `f/<host-or-alias>/<repo>`
//! and the mirror form `?ns=<host>` that containerd and cri-o send. Both map
//! to one cache repository `f/<namespace>/<repo>`, so they share a cache.

use super::config::{ProxyConfig, UpstreamConfig};
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
    /// The configuration entry that applies (longest `path_prefix`), if any.
    pub settings: Option<UpstreamConfig>,
}

/// Docker Hub's reference host and where its API really lives.
const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_API: &str = "registry-1.docker.io";

fn normalise_host(host: &str) -> &str {
    match host {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB,
        h => h,
    }
}

impl ProxyConfig {
    /// The configuration entries for `host`, if any.
    fn entries<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a UpstreamConfig> + 'a {
        self.registries
            .iter()
            .filter(move |r| normalise_host(&r.host) == host)
    }

    /// The entry for `host` whose `path_prefix` is the longest prefix of `repo`.
    fn settings_for(&self, host: &str, repo: &str) -> Option<UpstreamConfig> {
        self.entries(host)
            .filter(|r| match r.path_prefix.as_deref() {
                None | Some("") => true,
                Some(p) => {
                    let p = p.trim_end_matches('/');
                    repo == p || repo.starts_with(&format!("{p}/"))
                }
            })
            .max_by_key(|r| r.path_prefix.as_deref().map_or(0, str::len))
            .cloned()
    }

    /// The name of `host` inside cache repositories: its alias when one is
    /// configured (hosts with a port need one), else the host itself, with a
    /// `:port` written `-port` so that it forms a valid repository name.
    fn namespace(&self, host: &str) -> String {
        self.entries(host)
            .find_map(|r| r.alias.clone())
            .unwrap_or_else(|| host.replace(':', "-"))
    }

    fn target(&self, host: &str, repo: &str) -> Result<Target, String> {
        let host = normalise_host(host);
        let upstream_repo = if host == DOCKER_HUB && !repo.contains('/') {
            format!("library/{repo}")
        } else {
            repo.to_string()
        };
        let cache_repo = RepoName::parse(&format!(
            "{CACHE_PREFIX}{}/{upstream_repo}",
            self.namespace(host)
        ))?;
        let settings = self.settings_for(host, &upstream_repo);
        let insecure = settings.as_ref().is_some_and(|s| s.insecure);
        let api_host = if host == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            host
        };
        let scheme = if insecure { "http" } else { "https" };
        Ok(Target {
            host: host.to_string(),
            upstream_repo,
            cache_repo,
            base_url: format!("{scheme}://{api_host}"),
            settings,
        })
    }

    /// The target named by a path-form repository `f/<host-or-alias>/<repo>`.
    pub fn target_for_path(&self, repo: &RepoName) -> Option<Result<Target, String>> {
        let rest = repo.as_str().strip_prefix(CACHE_PREFIX)?;
        let Some((first, upstream_repo)) = rest.split_once('/') else {
            return Some(Err(format!(
                "`{repo}` names no upstream repository: use f/<registry-host>/<repository>"
            )));
        };
        let host = self
            .registries
            .iter()
            .find(|r| r.alias.as_deref() == Some(first))
            .map(|r| normalise_host(&r.host).to_string())
            .unwrap_or_else(|| first.to_string());
        Some(self.target(&host, upstream_repo))
    }

    /// The target named by the mirror form: repository `repo` on `ns`.
    pub fn target_for_namespace(&self, ns: &str, repo: &RepoName) -> Result<Target, String> {
        if ns.is_empty() || ns.contains('/') || ns.chars().any(char::is_whitespace) {
            return Err(format!("ns=`{ns}` is not a registry host"));
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
        let other = c.target_for_namespace("10.0.0.1:5000", &name("x")).unwrap();
        assert_eq!(other.cache_repo.as_str(), "f/10.0.0.1-5000/x");
    }

    #[test]
    fn longest_prefix_credentials() {
        let c = config();
        let a = c
            .target_for_path(&name("f/registry.example.com/project-a/app"))
            .unwrap()
            .unwrap();
        assert_eq!(a.settings.unwrap().username.as_deref(), Some("a"));
        let b = c
            .target_for_path(&name("f/registry.example.com/project-ab/app"))
            .unwrap()
            .unwrap();
        assert_eq!(b.settings.unwrap().username.as_deref(), Some("all"));
        let none = c.target_for_path(&name("f/quay.io/x/y")).unwrap().unwrap();
        assert!(none.settings.is_none());
    }

    #[test]
    fn not_cache_paths() {
        let c = config();
        assert!(c.target_for_path(&name("library/nginx")).is_none());
        assert!(c.target_for_path(&name("f/docker.io")).unwrap().is_err());
        assert!(c.target_for_namespace("", &name("x")).is_err());
    }
}
