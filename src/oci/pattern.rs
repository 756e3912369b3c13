//! Repository patterns as written in the configuration file: an exact name
//! (`library/alpine`) or a prefix ending in `*` (`team-a/*`, `*`). The
//! `permissions` rules and the `quotas` rules match repositories with the
//! same patterns, so they live here, beside the names they match.

use std::fmt;

use serde::Deserialize;

/// A repository pattern: an exact name, or a prefix when it ends in `*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// As written in the configuration: `team-a/*`, `library/alpine`, `*`.
impl fmt::Display for RepoPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RepoPattern::Exact(name) => f.write_str(name),
            RepoPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

impl<'de> Deserialize<'de> for RepoPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        RepoPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// A `repos` key: one pattern or a list of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoPatterns(pub Vec<RepoPattern>);

impl RepoPatterns {
    /// Whether any of the patterns matches `repo`.
    pub fn matches(&self, repo: &str) -> bool {
        self.0.iter().any(|p| p.matches(repo))
    }
}

/// `team-a/*`, or `team-a/*, library/alpine` for several.
impl fmt::Display for RepoPatterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = RepoPattern::parse("team-a/*").unwrap();
        assert!(p.matches("team-a/app"));
        assert!(!p.matches("team-ab/app"));
        assert!(!p.matches("team-a"));
        assert_eq!(p.to_string(), "team-a/*");
        let p = RepoPattern::parse("team-a/").unwrap();
        assert!(p.matches("team-a/x/y"));
        let p = RepoPattern::parse("library/alpine").unwrap();
        assert!(p.matches("library/alpine"));
        assert!(!p.matches("library/alpine2"));
        assert_eq!(p.to_string(), "library/alpine");
        assert!(RepoPattern::parse("*").unwrap().is_everything());
        assert!(RepoPattern::parse("a*b").is_err());
        assert!(RepoPattern::parse("**").is_err());
        assert!(RepoPattern::parse("").is_err());
    }

    #[test]
    fn one_or_a_list() {
        let one: RepoPatterns = serde_norway::from_str("team-a/*").unwrap();
        assert_eq!(one.0.len(), 1);
        let two: RepoPatterns = serde_norway::from_str("[team-a/*, lib/x]").unwrap();
        assert!(two.matches("lib/x") && two.matches("team-a/y") && !two.matches("lib/y"));
        assert_eq!(two.to_string(), "team-a/*, lib/x");
        assert!(serde_norway::from_str::<RepoPatterns>("[a*b]").is_err());
    }
}
