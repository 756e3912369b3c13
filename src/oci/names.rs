//! Repository names, tags and manifest references, validated against the
//! grammars of the OCI Distribution Specification before anything touches
//! storage.

use std::fmt;
use std::sync::LazyLock;

use regex::Regex;

use super::digest::Digest;

/// The spec's `<name>` grammar: path components of lowercase alphanumerics
/// joined by `.`, `_`, `__` or runs of `-`, separated by `/`.
static NAME_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$")
        .expect("static regex")
});

/// The spec's `<reference>` grammar for tags.
static TAG_RE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").expect("static regex"));

/// Longest repository name we accept. The spec lets registries limit it; 255
/// is what Docker and Distribution use for the whole reference.
pub const MAX_NAME_LEN: usize = 255;

/// A validated repository name such as `library/nginx`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RepoName(String);

impl RepoName {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.len() > MAX_NAME_LEN {
            return Err(format!(
                "repository name is {} characters long; the limit is {MAX_NAME_LEN}",
                s.len()
            ));
        }
        if !NAME_RE.is_match(s) {
            return Err(format!(
                "`{s}` is not a valid repository name: use lowercase letters, digits and \
                 separators (. _ __ -), with components joined by /"
            ));
        }
        Ok(RepoName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RepoName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated tag such as `v1.2.3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tag(String);

impl Tag {
    pub fn parse(s: &str) -> Result<Self, String> {
        if TAG_RE.is_match(s) {
            Ok(Tag(s.to_string()))
        } else {
            Err(format!(
                "`{s}` is not a valid tag: use up to 128 letters, digits, `_`, `.` and `-`, \
                 not starting with `.` or `-`"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a `/manifests/<reference>` path names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl Reference {
    /// A reference containing `:` must be a digest; anything else must be a tag.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        if s.contains(':') {
            s.parse()
                .map(Reference::Digest)
                .map_err(|e| ReferenceError::Digest(e.to_string()))
        } else {
            Tag::parse(s)
                .map(Reference::Tag)
                .map_err(ReferenceError::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReferenceError {
    Tag(String),
    Digest(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "library/nginx",
            "a-b/c__d/e.f",
            "x--y",
            "0/1/2",
            "f/docker.io/library/nginx",
        ] {
            assert!(RepoName::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "A", "a/", "/a", "a//b", "a/../b", "..", "a_", "-a", "a b", "a:b", "_catalog",
        ] {
            assert!(RepoName::parse(bad).is_err(), "{bad}");
        }
        assert!(RepoName::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "v1.2.3", "_x", "A-b_c.d"] {
            assert!(Tag::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "..", &"a".repeat(129)] {
            assert!(Tag::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!(Reference::parse("latest"), Ok(Reference::Tag(_))));
        assert!(matches!(
            Reference::parse(
                "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
            ),
            Ok(Reference::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("sha256:nothex"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("../x"),
            Err(ReferenceError::Tag(_))
        ));
    }
}
