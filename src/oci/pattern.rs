//! Repository-name patterns, as the configuration file writes them: exact
//! names (`library/alpine`) or prefixes ending in `*` (`team-a/*`, `*`).
//! Permissions, retention policies and quotas all match repositories with
//! them.

use std::fmt;

use serde::Deserialize;

/// A repository pattern: an exact name, or a prefix when it ends in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepoPattern {
    Exact(String),
    Prefix(String),
}

impl RepoPattern {
    pub fn parse(s: &str) -> Result<RepoPattern, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty repository pattern matches nothing; use `*` for all".into());
        }
        if let Some(prefix) = s.strip_suffix('*') {
            if prefix.contains('*') {
                return Err(format!(
                    "`{s}`: `*` may only end a pattern (e.g. `team-a/*`)"
                ));
            }
            return Ok(RepoPattern::Prefix(prefix.to_string()));
        }
        if s.contains('*') {
            return Err(format!(
                "`{s}`: `*` may only end a pattern (e.g. `team-a/*`)"
            ));
        }
        // A trailing `/` means "everything below", like `/*`.
        if s.ends_with('/') {
            return Ok(RepoPattern::Prefix(s.to_string()));
        }
        Ok(RepoPattern::Exact(s.to_string()))
    }

    pub fn matches(&self, repo: &str) -> bool {
        match self {
            RepoPattern::Exact(name) => repo == name,
            RepoPattern::Prefix(prefix) => repo.starts_with(prefix.as_str()),
        }
    }

    pub fn is_everything(&self) -> bool {
        matches!(self, RepoPattern::Prefix(p) if p.is_empty())
    }
}

impl<'de> Deserialize<'de> for RepoPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RepoPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `repos` in the configuration file: one pattern or a list of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoPatterns(pub Vec<RepoPattern>);

impl RepoPatterns {
    /// Whether any of the patterns matches `repo`.
    pub fn matches(&self, repo: &str) -> bool {
        self.0.iter().any(|p| p.matches(repo))
    }
}

impl<'de> Deserialize<'de> for RepoPatterns {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = RepoPatterns;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a repository pattern or a list of them")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<RepoPatterns, E> {
                RepoPattern::parse(s)
                    .map(|p| RepoPatterns(vec![p]))
                    .map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<RepoPatterns, A::Error> {
                let mut v = Vec::new();
                while let Some(p) = seq.next_element::<RepoPattern>()? {
                    v.push(p);
                }
                Ok(RepoPatterns(v))
            }
        }
        d.deserialize_any(V)
    }
}
