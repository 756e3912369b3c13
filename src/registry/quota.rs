//! Storage quotas and blob size limits: the `quotas` section of the
//! configuration file and `--max-blob-size`.
//!
//! ```yaml
//! quotas:
//!   - repos: "team-a/*"        # a pattern or a list, as in `permissions`
//!     max_size: 100GiB         # all of team-a/* together
//!     max_blob_size: 5GiB      # any one blob pushed there
//!   - repos: "*"
//!     max_size: 2TiB           # the whole registry (outside f/)
//! ```
//!
//! Every rule whose patterns match a repository applies to it: a push must
//! fit within all of them. A rule's `max_size` bounds the sum over all the
//! repositories it matches, counting each distinct digest (blob or
//! manifest) once however many of them hold it. The counters live in the
//! metadata store ([`MetaStore::set_quotas`](crate::meta::MetaStore)); the
//! pull-through cache's `f/…` repositories are never counted (its size is
//! `registry_proxies.max_size`).
//!
//! This module decides what applies to a repository and words refusals;
//! where the checks run is in `uploads.rs` and `manifests.rs`.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt as _;
use serde::Deserialize;

use super::CACHE_PREFIX;
use crate::meta::{QuotaScope, QuotaUse};
use crate::oci::{RepoName, RepoPattern, RepoPatterns};
use crate::storage::ByteStream;
use crate::units::format_size;

/// One rule of the `quotas` section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRuleConfig {
    pub repos: RepoPatterns,
    /// The most the matching repositories may hold together.
    #[serde(default, deserialize_with = "crate::units::de_size_opt")]
    pub max_size: Option<u64>,
    /// The largest blob a client may push into one of them.
    #[serde(default, deserialize_with = "crate::units::de_size_opt")]
    pub max_blob_size: Option<u64>,
}

/// The `quotas` section as written: a list of rules.
pub type QuotasConfig = Vec<QuotaRuleConfig>;

/// Checks a `quotas` section; the error names the rule.
pub fn validate(rules: &[QuotaRuleConfig]) -> Result<(), String> {
    for (i, rule) in rules.iter().enumerate() {
        let n = i + 1;
        if rule.repos.0.is_empty() {
            return Err(format!(
                "quotas rule {n}: `repos` is empty; name a pattern such as `team-a/*`"
            ));
        }
        if rule.max_size.is_none() && rule.max_blob_size.is_none() {
            return Err(format!(
                "quotas rule {n} (`{}`): give `max_size`, `max_blob_size` or both",
                rule.repos
            ));
        }
        for p in &rule.repos.0 {
            let cache_only = match p {
                RepoPattern::Exact(name) => name.starts_with(CACHE_PREFIX),
                RepoPattern::Prefix(prefix) => prefix.starts_with(CACHE_PREFIX),
            };
            if cache_only {
                return Err(format!(
                    "quotas rule {n}: `{p}` names pull-through cache repositories (f/...), which quotas never count; limit the cache with registry_proxies.max_size"
                ));
            }
        }
    }
    Ok(())
}

/// Where a blob size limit comes from, for the refusal's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobLimitSource {
    /// `--max-blob-size`.
    Flag,
    /// A `quotas` rule, by its patterns.
    Rule(String),
}

impl fmt::Display for BlobLimitSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlobLimitSource::Flag => f.write_str("--max-blob-size"),
            BlobLimitSource::Rule(repos) => {
                write!(f, "max_blob_size of the quota for `{repos}`")
            }
        }
    }
}

/// Why a push was refused: 403 `DENIED`. The message says the limit, the
/// current use and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitExceeded {
    /// A `max_size` of the `quotas` section.
    Quota {
        /// The rule's patterns, as configured.
        repos: String,
        limit: u64,
        used: u64,
        /// The bytes the push would add (at least this many when `more`).
        adding: u64,
        more: bool,
    },
    /// `--max-blob-size` or a rule's `max_blob_size`.
    BlobSize {
        limit: u64,
        /// The blob's size (at least this many bytes when `more`).
        size: u64,
        more: bool,
        source: BlobLimitSource,
    },
}

impl fmt::Display for LimitExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitExceeded::Quota {
                repos,
                limit,
                used,
                adding,
                more,
            } => {
                let or_more = if *more { " or more" } else { "" };
                write!(
                    f,
                    "storage quota exceeded: the repositories matching `{repos}` may hold {} together and hold {} now; this push of {}{or_more} would take them to {}. Delete images or blobs they no longer need, or ask the registry's operator to raise this quota (max_size in the `quotas` section of the configuration file)",
                    format_size(*limit),
                    format_size(*used),
                    format_size(*adding),
                    format_size(used.saturating_add(*adding)),
                )
            }
            LimitExceeded::BlobSize {
                limit,
                size,
                more,
                source,
            } => {
                let or_more = if *more { " or more" } else { "" };
                write!(
                    f,
                    "blob too large: it is {}{or_more} and this repository accepts blobs of at most {} ({source}). Push smaller layers, or ask the registry's operator to raise the limit",
                    format_size(*size),
                    format_size(*limit),
                )
            }
        }
    }
}

/// A compiled rule.
#[derive(Debug, Clone)]
struct Rule {
    repos: RepoPatterns,
    max_size: Option<u64>,
    max_blob_size: Option<u64>,
}

/// The quotas and blob size limits in force.
#[derive(Debug, Clone, Default)]
pub struct Quotas {
    rules: Vec<Rule>,
    /// `--max-blob-size`, for every repository.
    max_blob_size: Option<u64>,
}

impl Quotas {
    /// From the `quotas` section (already validated) and `--max-blob-size`.
    pub fn new(rules: &[QuotaRuleConfig], max_blob_size: Option<u64>) -> Quotas {
        Quotas {
            rules: rules
                .iter()
                .map(|r| Rule {
                    repos: r.repos.clone(),
                    max_size: r.max_size,
                    max_blob_size: r.max_blob_size,
                })
                .collect(),
            max_blob_size,
        }
    }

    /// No limits at all.
    pub fn none() -> Quotas {
        Quotas::default()
    }

    /// The rules with a `max_size`, as the metadata store counts them: the
    /// scope's id is the rule's position (from 1), and cache repositories
    /// are left out whatever the patterns say.
    pub fn scopes(&self) -> Vec<QuotaScope> {
        self.rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                Some(QuotaScope {
                    id: u32::try_from(i + 1).ok()?,
                    include: r.repos.0.clone(),
                    exclude: vec![RepoPattern::Prefix(CACHE_PREFIX.to_string())],
                    max_size: r.max_size?,
                })
            })
            .collect()
    }

    /// Whether some `max_size` applies to `repo` (only then is its usage
    /// worth reading before a push).
    pub fn has_quota(&self, repo: &RepoName) -> bool {
        !super::is_cache_repo(repo)
            && self
                .rules
                .iter()
                .any(|r| r.max_size.is_some() && r.repos.matches(repo.as_str()))
    }

    /// The smallest blob size limit that applies to `repo`, and where it
    /// comes from.
    pub fn max_blob_size(&self, repo: &RepoName) -> Option<(u64, BlobLimitSource)> {
        let flag = self.max_blob_size.map(|l| (l, BlobLimitSource::Flag));
        self.rules
            .iter()
            .filter(|r| r.repos.matches(repo.as_str()))
            .filter_map(|r| {
                r.max_blob_size
                    .map(|l| (l, BlobLimitSource::Rule(r.repos.to_string())))
            })
            .chain(flag)
            .min_by_key(|(l, _)| *l)
    }

    /// The patterns of the rule behind quota scope `id`.
    fn describe(&self, scope: u32) -> String {
        (scope as usize)
            .checked_sub(1)
            .and_then(|i| self.rules.get(i))
            .map(|r| r.repos.to_string())
            .unwrap_or_else(|| format!("quota rule {scope}"))
    }

    /// The refusal for a quota scope that cannot take `adding` more bytes.
    pub fn over_quota(&self, usage: &QuotaUse, adding: u64, more: bool) -> LimitExceeded {
        LimitExceeded::Quota {
            repos: self.describe(usage.scope),
            limit: usage.max_size,
            used: usage.used,
            adding,
            more,
        }
    }
}

/// The limits that apply to one push, read before its bytes are stored.
/// They are a first check, to refuse early; the quota check that counts is
/// the one inside the metadata write.
#[derive(Debug, Clone)]
pub struct PushLimits {
    blob: Option<(u64, BlobLimitSource)>,
    /// The quota scopes of the repository, with their rules' patterns.
    quotas: Vec<(QuotaUse, String)>,
}

impl PushLimits {
    pub fn new(
        blob: Option<(u64, BlobLimitSource)>,
        quotas: Vec<QuotaUse>,
        rules: &Quotas,
    ) -> PushLimits {
        let quotas = quotas
            .into_iter()
            .map(|q| (q, rules.describe(q.scope)))
            .collect();
        PushLimits { blob, quotas }
    }

    /// Whether nothing limits the push.
    pub fn is_empty(&self) -> bool {
        self.blob.is_none() && self.quotas.is_empty()
    }

    /// Refuses a blob of `size` bytes (at least, when `more`).
    pub fn check(&self, size: u64, more: bool) -> Result<(), LimitExceeded> {
        if let Some((limit, source)) = &self.blob {
            if size > *limit {
                return Err(LimitExceeded::BlobSize {
                    limit: *limit,
                    size,
                    more,
                    source: source.clone(),
                });
            }
        }
        match self.quotas.iter().find(|(q, _)| q.refuses(size)) {
            Some((q, repos)) => Err(LimitExceeded::Quota {
                repos: repos.clone(),
                limit: q.max_size,
                used: q.used,
                adding: size,
                more,
            }),
            None => Ok(()),
        }
    }

    /// The most bytes a blob may have under these limits (`None`: no bound).
    pub fn allowance(&self) -> Option<u64> {
        let blob = self.blob.as_ref().map(|(l, _)| *l);
        let quota = self
            .quotas
            .iter()
            .filter(|(q, _)| !q.counted)
            .map(|(q, _)| q.max_size.saturating_sub(q.used))
            .min();
        match (blob, quota) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A request body cut off once the upload it feeds would pass `allowance`
/// bytes (the upload holds `start` already): the chunk that would cross is
/// not passed on, so what is stored never exceeds the limit. Afterwards
/// `reached` holds the size the upload would have had with that chunk (at
/// least; 0 when the limit did not end the body).
pub fn bounded(body: ByteStream, start: u64, allowance: u64) -> (ByteStream, Arc<AtomicU64>) {
    let reached = Arc::new(AtomicU64::new(0));
    let flag = reached.clone();
    let mut total = start;
    let stream = body.map(move |item| {
        let chunk = item?;
        total = total.saturating_add(chunk.len() as u64);
        if total > allowance {
            flag.store(total, Ordering::Release);
            return Err(io::Error::other("the upload is over its size limit"));
        }
        Ok(chunk)
    });
    (Box::pin(stream), reached)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(yaml: &str) -> QuotasConfig {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn rules_parse_and_validate() {
        let r = rules(
            "- repos: team-a/*\n  max_size: 10GiB\n  max_blob_size: 1GiB\n- repos: ['*']\n  max_size: 1TiB\n",
        );
        assert!(validate(&r).is_ok());
        assert_eq!(r[0].max_size, Some(10 << 30));
        assert!(validate(&rules("- repos: x\n"))
            .unwrap_err()
            .contains("max_size"));
        assert!(validate(&rules("- repos: []\n  max_size: 1\n"))
            .unwrap_err()
            .contains("empty"));
        assert!(validate(&rules("- repos: f/docker.io/*\n  max_size: 1\n"))
            .unwrap_err()
            .contains("registry_proxies.max_size"));
        assert!(serde_norway::from_str::<QuotasConfig>("- repos: x\n  max_sise: 1\n").is_err());
        assert!(serde_norway::from_str::<QuotasConfig>("- repos: x\n  max_size: 0\n").is_err());
    }

    #[test]
    fn every_matching_rule_applies() {
        let q = Quotas::new(
            &rules(
                "- repos: team-a/*\n  max_size: 10GiB\n  max_blob_size: 1GiB\n- repos: '*'\n  max_size: 1TiB\n  max_blob_size: 4GiB\n",
            ),
            Some(2 << 30),
        );
        let a = RepoName::parse("team-a/app").unwrap();
        let b = RepoName::parse("team-b/app").unwrap();
        let cache = RepoName::parse("f/docker.io/library/alpine").unwrap();
        assert_eq!(
            q.max_blob_size(&a),
            Some((1 << 30, BlobLimitSource::Rule("team-a/*".into())))
        );
        assert_eq!(q.max_blob_size(&b), Some((2 << 30, BlobLimitSource::Flag)));
        assert!(q.has_quota(&a) && q.has_quota(&b) && !q.has_quota(&cache));
        let scopes = q.scopes();
        assert_eq!(scopes.len(), 2);
        assert_eq!(scopes[0].id, 1);
        assert_eq!(scopes[1].exclude, vec![RepoPattern::Prefix("f/".into())]);
        assert_eq!(q.describe(2), "*");
    }

    #[test]
    fn limits_check_and_bound() {
        let q = Quotas::new(&rules("- repos: t/*\n  max_size: 1000\n"), None);
        let usage = |used, counted| QuotaUse {
            scope: 1,
            used,
            max_size: 1000,
            counted,
        };
        let limits = PushLimits::new(
            Some((600, BlobLimitSource::Flag)),
            vec![usage(700, false)],
            &q,
        );
        assert_eq!(limits.allowance(), Some(300));
        assert!(limits.check(300, false).is_ok());
        let e = limits.check(301, false).unwrap_err();
        assert!(
            e.to_string()
                .contains("`t/*` may hold 1000 B together and hold 700 B now"),
            "{e}"
        );
        let e = limits.check(601, true).unwrap_err();
        assert!(e.to_string().contains("601 B or more"), "{e}");
        assert!(e.to_string().contains("--max-blob-size"), "{e}");
        // A digest the scope already counts adds nothing.
        let limits = PushLimits::new(None, vec![usage(1000, true)], &q);
        assert!(limits.check(500, false).is_ok());
        assert_eq!(limits.allowance(), None);
    }

    #[tokio::test]
    async fn a_bounded_body_stops_before_the_crossing_chunk() {
        use futures_util::StreamExt as _;
        let chunks: Vec<io::Result<bytes::Bytes>> = (0..5)
            .map(|_| Ok(bytes::Bytes::from(vec![0u8; 100])))
            .collect();
        let (mut body, reached) = bounded(Box::pin(futures_util::stream::iter(chunks)), 50, 300);
        let mut passed = 0;
        while let Some(Ok(chunk)) = body.next().await {
            passed += chunk.len();
        }
        assert_eq!(passed, 200);
        assert_eq!(reached.load(Ordering::Acquire), 350);
    }
}
