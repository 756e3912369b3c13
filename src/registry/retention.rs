//! Retention policies: which tags a repository keeps, and how long its
//! untagged manifests may stay. Pure decisions over a snapshot of tags; the
//! garbage collector (`gc`) applies them.
//!
//! ```yaml
//! retention:
//!   - repos: "team-a/*"              # one pattern or a list; first match wins
//!     keep_newest: 10                # the 10 most recently pushed tags
//!     keep_within: 30d               # and any tag pushed in the last 30 days
//!     keep_tags: ["v*", "latest"]    # and these, always
//!     delete_untagged_after: 7d      # manifests untagged for 7 days go
//! ```
//!
//! A tag is kept when any `keep_*` rule keeps it; a rule with none of them
//! deletes no tag. Without `delete_untagged_after` untagged manifests are
//! never deleted. Repositories that no rule matches keep everything, and
//! the pull-through cache (`f/…`) follows `registry_proxies.max_size`
//! instead.

use std::time::Duration;

use serde::Deserialize;

use crate::meta::TagInfo;
use crate::oci::RepoPatterns;

/// The `retention` section: rules in order, the first matching one applies.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct RetentionPolicies(pub Vec<RetentionRule>);

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    pub repos: RepoPatterns,
    /// Keep this many of the most recently pushed tags.
    #[serde(default)]
    pub keep_newest: Option<u32>,
    /// Keep tags pushed within this long.
    #[serde(default, deserialize_with = "crate::units::de_duration_opt")]
    pub keep_within: Option<Duration>,
    /// Keep tags matching these patterns (`*` matches any characters).
    #[serde(default)]
    pub keep_tags: Vec<TagPattern>,
    /// Delete manifests no tag keeps once they have been untagged this long.
    #[serde(default, deserialize_with = "crate::units::de_duration_opt")]
    pub delete_untagged_after: Option<Duration>,
}

/// A tag pattern: literal characters and `*` for any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagPattern(String);

impl TagPattern {
    pub fn parse(s: &str) -> Result<TagPattern, String> {
        let ok = !s.is_empty()
            && s.len() <= 128
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-*".contains(&b));
        if ok {
            Ok(TagPattern(s.to_string()))
        } else {
            Err(format!(
                "`{s}` is not a tag pattern: use tag characters (letters, digits, `.`, `_`, `-`) and `*`"
            ))
        }
    }

    pub fn matches(&self, tag: &str) -> bool {
        glob(self.0.as_bytes(), tag.as_bytes())
    }
}

impl<'de> Deserialize<'de> for TagPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        TagPattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// `*`-only glob matching, linear in practice (tags are at most 128 bytes).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

impl RetentionPolicies {
    /// The rule for `repo`: the first whose patterns match.
    pub fn for_repo(&self, repo: &str) -> Option<&RetentionRule> {
        self.0.iter().find(|r| r.repos.matches(repo))
    }

    /// Checks what serde cannot, naming the bad rule.
    pub fn validate(&self) -> Result<(), String> {
        for (i, rule) in self.0.iter().enumerate() {
            if rule.repos.0.is_empty() {
                return Err(format!("retention[{i}].repos: name at least one pattern"));
            }
            if rule.keep_newest.is_none()
                && rule.keep_within.is_none()
                && rule.keep_tags.is_empty()
                && rule.delete_untagged_after.is_none()
            {
                return Err(format!(
                    "retention[{i}]: the rule does nothing; give keep_newest, keep_within, keep_tags or delete_untagged_after"
                ));
            }
        }
        Ok(())
    }
}

impl RetentionRule {
    /// Whether this rule decides which tags stay (otherwise all stay).
    pub fn manages_tags(&self) -> bool {
        self.keep_newest.is_some() || self.keep_within.is_some() || !self.keep_tags.is_empty()
    }

    /// Of `tags` (one repository's), those no `keep_*` rule keeps at `now`
    /// (unix seconds).
    pub fn tags_to_delete(&self, tags: &[TagInfo], now: i64) -> Vec<TagInfo> {
        if !self.manages_tags() {
            return Vec::new();
        }
        let mut newest_first: Vec<&TagInfo> = tags.iter().collect();
        newest_first.sort_by(|a, b| b.pushed_at.cmp(&a.pushed_at).then(a.tag.cmp(&b.tag)));
        let keep_newest = self.keep_newest.map_or(0, |n| n as usize);
        let recent_since = self
            .keep_within
            .map(|d| now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
        newest_first
            .into_iter()
            .enumerate()
            .filter(|(rank, t)| {
                let kept = *rank < keep_newest
                    || recent_since.is_some_and(|since| t.pushed_at >= since)
                    || self.keep_tags.iter().any(|p| p.matches(&t.tag));
                !kept
            })
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Manifests untagged before this time (unix seconds) may be deleted.
    pub fn untagged_before(&self, now: i64) -> Option<i64> {
        self.delete_untagged_after
            .map(|d| now.saturating_sub(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::Digest;

    fn tag(name: &str, pushed_at: i64) -> TagInfo {
        TagInfo {
            tag: name.into(),
            digest: Digest::sha256_of(name.as_bytes()),
            pushed_at,
        }
    }

    fn names(tags: Vec<TagInfo>) -> Vec<String> {
        let mut v: Vec<String> = tags.into_iter().map(|t| t.tag).collect();
        v.sort();
        v
    }

    fn policies(yaml: &str) -> RetentionPolicies {
        let p: RetentionPolicies = serde_norway::from_str(yaml).unwrap();
        p.validate().unwrap();
        p
    }

    #[test]
    fn keep_rules_add_up() {
        let p = policies(
            "- repos: team-a/*\n  keep_newest: 2\n  keep_within: 1h\n  keep_tags: ['v*', latest]\n",
        );
        let rule = p.for_repo("team-a/app").unwrap();
        let now = 100_000;
        let tags = vec![
            tag("old-1", 1000),
            tag("old-2", 2000),
            tag("new-1", 90_000),
            tag("new-2", 91_000),
            tag("recent", now - 600),
            tag("v1.0", 10),
            tag("latest", 20),
        ];
        // newest two: recent, new-2; within an hour: recent; patterns: v1.0, latest.
        assert_eq!(
            names(rule.tags_to_delete(&tags, now)),
            ["new-1", "old-1", "old-2"]
        );
        assert!(p.for_repo("team-b/app").is_none());
    }

    #[test]
    fn first_matching_rule_wins_and_rules_without_keep_touch_no_tag() {
        let p = policies(
            "- repos: [team-a/special]\n  delete_untagged_after: 1d\n- repos: '*'\n  keep_newest: 1\n",
        );
        let special = p.for_repo("team-a/special").unwrap();
        assert!(!special.manages_tags());
        assert!(special
            .tags_to_delete(&[tag("a", 1), tag("b", 2)], 10)
            .is_empty());
        assert_eq!(special.untagged_before(100_000), Some(100_000 - 86_400));
        let other = p.for_repo("x").unwrap();
        assert_eq!(
            names(other.tags_to_delete(&[tag("a", 1), tag("b", 2)], 10)),
            ["a"]
        );
        assert_eq!(other.untagged_before(10), None);
    }

    #[test]
    fn tag_patterns() {
        let p = TagPattern::parse("v*-rc*").unwrap();
        assert!(p.matches("v1-rc2"));
        assert!(p.matches("v-rc"));
        assert!(!p.matches("v1"));
        assert!(TagPattern::parse("*").unwrap().matches("anything"));
        assert!(TagPattern::parse("exact").unwrap().matches("exact"));
        assert!(!TagPattern::parse("exact").unwrap().matches("exactly"));
        assert!(TagPattern::parse("bad/one").is_err());
        assert!(TagPattern::parse("").is_err());
    }

    #[test]
    fn useless_rules_are_refused() {
        let p: RetentionPolicies = serde_norway::from_str("- repos: '*'\n").unwrap();
        assert!(p.validate().unwrap_err().contains("retention[0]"));
        let bad: Result<RetentionPolicies, _> =
            serde_norway::from_str("- repos: '*'\n  keep_newest: 1\n  keep_all: true\n");
        assert!(bad.is_err());
    }
}
