//! Image references as written in Kubernetes objects (`nginx`,
//! `docker.io/library/nginx:1.27`, `ghcr.io/a/b@sha256:…`), parsed and
//! normalised so that one image has one spelling.
//!
//! Normalisation follows the rules of docker and containerd: a reference
//! whose first component is not a host (no `.` or `:`, not `localhost`) is
//! on Docker Hub, written `docker.io`; `index.docker.io` and
//! `registry-1.docker.io` are Docker Hub too; a Docker Hub repository
//! without a `/` is under `library/`; a reference with neither tag nor
//! digest means `:latest`; a tag and a digest are both kept. Hosts are
//! lowercase. So `nginx`, `docker.io/nginx` and
//! `index.docker.io/library/nginx:latest` are all
//! `docker.io/library/nginx:latest`, and a rule cannot be dodged by
//! spelling.
//!
//! [`prefix`] normalises the prefixes of image policies the same way.

use std::fmt;

use super::digest::Digest;
use super::names::{RepoName, Tag};

/// The host Docker Hub's images are named with.
pub const DOCKER_HUB: &str = "docker.io";

/// The longest image reference accepted (Kubernetes itself accepts any
/// string; docker limits names to 255 characters, plus tag and digest).
pub const MAX_IMAGE_REF_LEN: usize = 512;

/// A parsed, normalised image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host[:port], lowercase, Docker Hub as `docker.io`.
    pub host: String,
    /// Repository on that registry (`library/nginx`).
    pub repo: RepoName,
    /// The tag, `latest` when neither a tag nor a digest was given.
    pub tag: Option<Tag>,
    pub digest: Option<Digest>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageRefError {
    #[error("the image reference is empty")]
    Empty,
    #[error("the image reference is {0} characters long; the limit is {MAX_IMAGE_REF_LEN}")]
    TooLong(usize),
    #[error("`{image}` is not a valid image reference: {why}")]
    Invalid { image: String, why: String },
}

/// Whether the first component of a name is a registry host, as docker
/// decides it.
fn is_host(component: &str) -> bool {
    component.contains('.') || component.contains(':') || component == "localhost"
}

/// A registry host as written in references: lowercase, Docker Hub's
/// other names as `docker.io`.
pub fn normalise_host(host: &str) -> String {
    let host = host.to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
        _ => host,
    }
}

/// Whether `host` is a plausible `name[:port]` or `[v6]:port`.
fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= 255
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        && !host.starts_with(['.', '-', ':'])
}

impl ImageRef {
    /// Parses and normalises `s`.
    pub fn parse(s: &str) -> Result<ImageRef, ImageRefError> {
        let s = s.trim();
        if s.is_empty() {
            return Err(ImageRefError::Empty);
        }
        if s.len() > MAX_IMAGE_REF_LEN {
            return Err(ImageRefError::TooLong(s.len()));
        }
        let invalid = |why: String| ImageRefError::Invalid {
            image: s.to_string(),
            why,
        };
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => (
                rest,
                Some(
                    d.parse::<Digest>()
                        .map_err(|e| invalid(format!("bad digest: {e}")))?,
                ),
            ),
            None => (s, None),
        };
        // A `:` after the last `/` starts the tag (one before it is a port).
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                let tag = Tag::parse(&rest[at + 1..]).map_err(invalid)?;
                (&rest[..at], Some(tag))
            }
            None => (rest, None),
        };
        let (host, path) = match name.split_once('/') {
            Some((first, path)) if is_host(first) => (normalise_host(first), path.to_string()),
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if !valid_host(&host) {
            return Err(invalid(format!("`{host}` is not a registry host")));
        }
        let path = if host == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let repo = RepoName::parse(&path).map_err(invalid)?;
        let tag = match (tag, &digest) {
            (None, None) => Some(Tag::parse("latest").map_err(invalid)?),
            (tag, _) => tag,
        };
        Ok(ImageRef {
            host,
            repo,
            tag,
            digest,
        })
    }

    /// `host/repo`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.host, self.repo)
    }

    /// The tag or the digest alone, as a manifest is named on a registry:
    /// the digest when there is one (it is what the runtime pulls).
    pub fn reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.to_string(),
            (None, None) => "latest".to_string(),
        }
    }

    /// The same image on another host and repository, tag and digest kept.
    pub fn moved(&self, host: &str, repo: RepoName) -> ImageRef {
        ImageRef {
            host: host.to_string(),
            repo,
            tag: self.tag.clone(),
            digest: self.digest.clone(),
        }
    }
}

impl fmt::Display for ImageRef {
    /// `host/repo[:tag][@digest]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.host, self.repo)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Normalises a policy prefix like an image reference: `nginx` is
/// `docker.io/library/nginx`, `bitnami/` is `docker.io/bitnami/`,
/// `index.docker.io/` is `docker.io/`, `docker.io/nginx:1` is
/// `docker.io/library/nginx:1`, and hosts are lowercase. A prefix that
/// names an organisation rather than an image should end with `/`
/// (`docker.io/bitnami/`): `docker.io/bitnami` is the image
/// `docker.io/library/bitnami`.
pub fn prefix(p: &str) -> String {
    let p = p.trim();
    if p.is_empty() {
        return String::new();
    }
    let (host, path) = match p.split_once('/') {
        Some((first, path)) if is_host(first) => (normalise_host(first), path.to_string()),
        // A bare host (`quay.io`, `localhost:5000`) is all of that host.
        None if is_bare_host(p) => return normalise_host(p),
        _ => (DOCKER_HUB.to_string(), p.to_string()),
    };
    if path.is_empty() {
        return format!("{host}/");
    }
    // The first path component, up to a tag or digest.
    let repo_end = path.find([':', '@']).unwrap_or(path.len());
    let path = if host == DOCKER_HUB && !path[..repo_end].contains('/') {
        format!("library/{path}")
    } else {
        path
    };
    format!("{host}/{path}")
}

/// Whether `p` (no `/`) is a host rather than `name:tag`: `quay.io`,
/// `localhost:5000`, `10.0.0.1:5000`, but not `nginx:1.27`.
fn is_bare_host(p: &str) -> bool {
    if p.contains('@') {
        return false;
    }
    match p.rsplit_once(':') {
        Some((h, port)) => {
            !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (h.contains('.') || h == "localhost" || h.starts_with('['))
        }
        None => p.contains('.') || p == "localhost",
    }
}

/// Whether the normalised image `image` (as [`ImageRef`]'s `Display`
/// writes it) falls under the normalised `prefix`. A prefix ending in a
/// separator (`/`, `:`, `@`, `.`, `-`, `_`) matches anything that starts
/// with it; any other prefix matches only up to a boundary, so
/// `docker.io/library/nginx` covers `docker.io/library/nginx:1` and
/// `docker.io/library/nginx/sub:1` but not `docker.io/library/nginx-evil:1`,
/// and `docker.io/library/nginx:1` covers `…:1@sha256:…` but not
/// `…:1.27`.
pub fn prefix_matches(prefix: &str, image: &str) -> bool {
    if prefix.is_empty() {
        return false;
    }
    let Some(rest) = image.strip_prefix(prefix) else {
        return false;
    };
    prefix.ends_with(['/', ':', '@', '.', '-', '_'])
        || rest.is_empty()
        || rest.starts_with(['/', ':', '@'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        ImageRef::parse(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .to_string()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_hub_spellings_are_one_image() {
        for s in [
            "nginx",
            "nginx:latest",
            "library/nginx",
            "docker.io/nginx",
            "docker.io/library/nginx",
            "index.docker.io/library/nginx:latest",
            "registry-1.docker.io/nginx",
            "Docker.IO/nginx",
        ] {
            assert_eq!(norm(s), "docker.io/library/nginx:latest", "{s}");
        }
        assert_eq!(norm("bitnami/redis:7"), "docker.io/bitnami/redis:7");
    }

    #[test]
    fn tags_digests_and_ports_are_kept() {
        assert_eq!(
            norm(&format!("nginx@{D}")),
            format!("docker.io/library/nginx@{D}")
        );
        assert_eq!(
            norm(&format!("nginx:1.27@{D}")),
            format!("docker.io/library/nginx:1.27@{D}")
        );
        assert_eq!(norm("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(norm("localhost/app:v1"), "localhost/app:v1");
        assert_eq!(
            norm("trow.kube-public:31000/f/docker.io/library/nginx:1"),
            "trow.kube-public:31000/f/docker.io/library/nginx:1"
        );
        let r = ImageRef::parse(&format!("ghcr.io/a/b:v1@{D}")).unwrap();
        assert_eq!(r.name(), "ghcr.io/a/b");
        assert_eq!(r.reference(), D);
        assert_eq!(ImageRef::parse("ghcr.io/a/b:v1").unwrap().reference(), "v1");
        assert_eq!(norm("[::1]:5000/app:1"), "[::1]:5000/app:1");
    }

    #[test]
    fn malformed_references_are_errors() {
        for s in [
            "",
            "   ",
            "UPPER/case",
            "nginx:",
            "nginx@sha256:abc",
            "nginx@md5:0123",
            "a//b",
            "nginx:bad tag",
            "-host.io/x",
            "host.io/",
            "docker.io/library/nginx:1:2",
            "ho$t.io/x",
        ] {
            assert!(ImageRef::parse(s).is_err(), "{s:?} parsed");
        }
        let long = format!("a/{}", "b".repeat(600));
        assert!(matches!(
            ImageRef::parse(&long),
            Err(ImageRefError::TooLong(_))
        ));
    }

    #[test]
    fn prefixes_are_normalised_like_images() {
        assert_eq!(prefix("nginx"), "docker.io/library/nginx");
        assert_eq!(prefix("nginx:1.27"), "docker.io/library/nginx:1.27");
        assert_eq!(prefix("docker.io/nginx"), "docker.io/library/nginx");
        assert_eq!(prefix("index.docker.io/library/"), "docker.io/library/");
        assert_eq!(prefix("bitnami/"), "docker.io/bitnami/");
        assert_eq!(prefix("docker.io/bitnami/"), "docker.io/bitnami/");
        assert_eq!(prefix("Quay.io/"), "quay.io/");
        assert_eq!(prefix("quay.io"), "quay.io");
        assert_eq!(prefix("localhost:5000"), "localhost:5000");
        assert_eq!(prefix("ghcr.io/org/app"), "ghcr.io/org/app");
    }

    #[test]
    fn prefixes_match_at_boundaries() {
        let nginx = norm("nginx:1.27");
        assert!(prefix_matches(&prefix("nginx"), &nginx));
        assert!(prefix_matches(&prefix("docker.io/"), &nginx));
        assert!(prefix_matches(&prefix("docker.io"), &nginx));
        assert!(prefix_matches(&prefix("nginx:1.27"), &nginx));
        assert!(!prefix_matches(&prefix("nginx:1"), &nginx));
        assert!(prefix_matches(&prefix("nginx:1."), &nginx));
        assert!(!prefix_matches(&prefix("nginx"), &norm("nginx-evil:1")));
        assert!(!prefix_matches(
            &prefix("docker.io"),
            "docker.io.evil.com/x:1"
        ));
        assert!(!prefix_matches(&prefix("quay.io"), "quay.io.evil.com/x:1"));
        assert!(prefix_matches(&prefix("quay.io/"), &norm("quay.io/a/b")));
        assert!(prefix_matches(
            &prefix("nginx:1.27"),
            &norm(&format!("nginx:1.27@{D}"))
        ));
        assert!(!prefix_matches("", &nginx));
    }
}
