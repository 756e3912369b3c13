//! Garbage collection, online: tags that retention policies let go,
//! manifests nothing keeps, and blobs no manifest refers to, removed while
//! the registry serves.
//!
//! A pass has three phases, each in bounded batches so that memory does not
//! grow with the store and no lock is held for more than one small
//! transaction at a time:
//!
//! 1. Tags: for each repository a retention rule matches, the tags its
//!    `keep_*` rules do not keep are deleted, each only if it still points
//!    where it did when the decision was made.
//! 2. Manifests (only with `delete_untagged_after`): those no tag keeps
//!    (directly, as the child of a kept index, as the referrer of a kept
//!    subject or as the subject of a kept referrer), untagged long enough.
//!    Each is deleted in a transaction that checks again that no tag, index
//!    or referrer holds it; what a deletion frees (an index's children, a
//!    subject's referrers) goes in the next round.
//! 3. Blobs: those no manifest of any repository refers to or is stored
//!    under, held by no cache link, and not pushed, mounted or linked
//!    within the grace period, through `Registry::reclaim_blob` — the one
//!    removal path that cache eviction also uses (docs/ARCHITECTURE.md).
//!
//! The pull-through cache's repositories (`f/…`) are left to its own
//! `max_size` eviction.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::error::{RegistryError, Result};
use super::retention::{RetentionPolicies, RetentionRule};
use super::{is_cache_repo, Registry};
use crate::meta::{now_unix, ReclaimRule, UnreachableQuery, UnreferencedQuery};
use crate::oci::{Digest, RepoName};

/// Rows examined per metadata query.
const BATCH: u32 = 256;
/// Blobs removed together (locks, one transaction, their files).
const RECLAIM_GROUP: usize = 64;
/// Repositories listed per page.
const REPO_PAGE: u32 = 500;
/// Deletion rounds per repository (each frees the next layer: an index's
/// children, a subject's referrers).
const MAX_ROUNDS: usize = 64;
/// Items named per category in a report; the counts are always whole.
const LISTED: usize = 1000;

/// How a pass runs.
#[derive(Debug, Clone)]
pub struct GcOptions {
    /// Report what would be deleted, delete nothing.
    pub dry_run: bool,
    /// Blobs pushed, mounted or linked more recently than this are kept
    /// (a client pushes layers before their manifest).
    pub grace: Duration,
    /// Tag history entries that ended longer ago than this are forgotten.
    pub tag_history: Duration,
}

/// The collector's settings for the life of the server: the retention
/// policies, the grace period and how long tag history is kept.
#[derive(Debug, Clone, Default)]
pub struct GcSetup {
    pub policies: RetentionPolicies,
    pub grace: Duration,
    pub tag_history: Duration,
}

impl GcSetup {
    pub fn options(&self, dry_run: bool) -> GcOptions {
        GcOptions {
            dry_run,
            grace: self.grace,
            tag_history: self.tag_history,
        }
    }
}

/// What a pass did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    pub dry_run: bool,
    /// Unix seconds.
    pub started_at: i64,
    pub duration_ms: u64,
    pub tags_deleted: u64,
    pub manifests_deleted: u64,
    pub blobs_deleted: u64,
    pub bytes_freed: u64,
    pub history_entries_pruned: u64,
    pub deleted: GcListing,
}

impl GcReport {
    /// The figures `/metrics` adds up.
    pub fn pass_metrics(&self) -> crate::metrics::GcPassMetrics {
        crate::metrics::GcPassMetrics {
            blobs_deleted: self.blobs_deleted,
            manifests_deleted: self.manifests_deleted,
            bytes_freed: self.bytes_freed,
            duration: std::time::Duration::from_millis(self.duration_ms),
            dry_run: self.dry_run,
        }
    }
}

/// What was deleted, by name: `repo:tag`, `repo@digest`, `digest`; at most
/// `LISTED` of each (then `truncated`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GcListing {
    pub tags: Vec<String>,
    pub manifests: Vec<String>,
    pub blobs: Vec<String>,
    pub truncated: bool,
}

impl GcListing {
    fn note(list: &mut Vec<String>, truncated: &mut bool, item: String) {
        if list.len() < LISTED {
            list.push(item);
        } else {
            *truncated = true;
        }
    }
}

impl GcReport {
    fn tag(&mut self, repo: &str, tag: &str) {
        self.tags_deleted += 1;
        GcListing::note(
            &mut self.deleted.tags,
            &mut self.deleted.truncated,
            format!("{repo}:{tag}"),
        );
    }

    fn manifest(&mut self, repo: &str, digest: &Digest) {
        self.manifests_deleted += 1;
        GcListing::note(
            &mut self.deleted.manifests,
            &mut self.deleted.truncated,
            format!("{repo}@{digest}"),
        );
    }

    fn blob(&mut self, digest: &Digest, size: u64) {
        self.blobs_deleted += 1;
        self.bytes_freed += size;
        GcListing::note(
            &mut self.deleted.blobs,
            &mut self.deleted.truncated,
            digest.to_string(),
        );
    }
}

fn seconds(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Registry {
    /// Runs one pass. One pass at a time: a second caller gets a retryable
    /// `Unavailable` instead of waiting.
    pub async fn collect_garbage(
        &self,
        policies: &RetentionPolicies,
        opts: &GcOptions,
    ) -> Result<GcReport> {
        let Ok(_pass) = self.gc_pass.try_lock() else {
            return Err(RegistryError::Unavailable(
                "a garbage collection pass is already running; retry when it has finished".into(),
            ));
        };
        let started = Instant::now();
        let now = now_unix();
        let mut report = GcReport {
            dry_run: opts.dry_run,
            started_at: now,
            ..GcReport::default()
        };
        // In a dry run, the manifests that would go (their references must
        // not keep blobs in phase 3).
        let mut doomed: Vec<(String, Digest)> = Vec::new();
        self.collect_repositories(policies, opts.dry_run, now, &mut report, &mut doomed)
            .await?;
        self.collect_blobs(opts, now, &doomed, &mut report).await?;
        if !opts.dry_run {
            report.history_entries_pruned = self
                .meta
                .prune_tag_history(now.saturating_sub(seconds(opts.tag_history)))
                .await?;
        }
        report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        tracing::info!(
            dry_run = report.dry_run,
            tags = report.tags_deleted,
            manifests = report.manifests_deleted,
            blobs = report.blobs_deleted,
            bytes_freed = report.bytes_freed,
            duration_ms = report.duration_ms,
            "garbage collection pass finished"
        );
        Ok(report)
    }

    /// Phases 1 and 2, repository by repository.
    async fn collect_repositories(
        &self,
        policies: &RetentionPolicies,
        dry_run: bool,
        now: i64,
        report: &mut GcReport,
        doomed: &mut Vec<(String, Digest)>,
    ) -> Result<()> {
        if policies.0.is_empty() {
            return Ok(());
        }
        let mut last: Option<String> = None;
        loop {
            let page = self.meta.list_repos(REPO_PAGE, last.as_deref()).await?;
            for repo in &page.items {
                let cache = RepoName::parse(repo).map_or(true, |r| is_cache_repo(&r));
                if let (false, Some(rule)) = (cache, policies.for_repo(repo)) {
                    self.collect_repository(repo, rule, dry_run, now, report, doomed)
                        .await?;
                }
            }
            if !page.more {
                return Ok(());
            }
            last = page.items.last().cloned();
        }
    }

    async fn collect_repository(
        &self,
        repo: &str,
        rule: &RetentionRule,
        dry_run: bool,
        now: i64,
        report: &mut GcReport,
        doomed: &mut Vec<(String, Digest)>,
    ) -> Result<()> {
        // Phase 1: tags.
        let mut untagged_now: Vec<String> = Vec::new();
        if rule.manages_tags() {
            let going = rule.tags_to_delete(&self.meta.tags_with_times(repo).await?, now);
            let gone = if dry_run {
                going.into_iter().map(|t| t.tag).collect()
            } else {
                self.meta.delete_tags_as_seen(repo, &going).await?
            };
            for tag in &gone {
                report.tag(repo, tag);
            }
            if dry_run {
                untagged_now = gone;
            }
        }
        // Phase 2: manifests nothing keeps.
        let Some(untagged_before) = rule.untagged_before(now) else {
            return Ok(());
        };
        if dry_run {
            let mut after: Option<Digest> = None;
            loop {
                let batch = self
                    .meta
                    .unreachable_manifests(UnreachableQuery {
                        repo,
                        ignoring_tags: &untagged_now,
                        untagged_before,
                        now,
                        after: after.as_ref(),
                        limit: BATCH,
                    })
                    .await?;
                for digest in &batch {
                    report.manifest(repo, digest);
                    doomed.push((repo.to_string(), digest.clone()));
                }
                if batch.len() < BATCH as usize {
                    return Ok(());
                }
                after = batch.last().cloned();
            }
        }
        for _ in 0..MAX_ROUNDS {
            let mut deleted_any = false;
            let mut after: Option<Digest> = None;
            loop {
                let batch = self
                    .meta
                    .unreachable_manifests(UnreachableQuery {
                        repo,
                        ignoring_tags: &[],
                        untagged_before,
                        now,
                        after: after.as_ref(),
                        limit: BATCH,
                    })
                    .await?;
                for digest in &batch {
                    if self
                        .meta
                        .delete_unreachable_manifest(repo, digest, untagged_before)
                        .await?
                    {
                        report.manifest(repo, digest);
                        deleted_any = true;
                    }
                }
                if batch.len() < BATCH as usize {
                    break;
                }
                after = batch.last().cloned();
            }
            if !deleted_any {
                break;
            }
        }
        Ok(())
    }

    /// Phase 3: unreferenced blobs past their grace period.
    async fn collect_blobs(
        &self,
        opts: &GcOptions,
        now: i64,
        doomed: &[(String, Digest)],
        report: &mut GcReport,
    ) -> Result<()> {
        let referenced_before = now.saturating_sub(seconds(opts.grace));
        let rule = ReclaimRule::Unreferenced { referenced_before };
        let mut after: Option<Digest> = None;
        loop {
            let batch = self
                .meta
                .unreferenced_blobs(UnreferencedQuery {
                    referenced_before,
                    ignoring_manifests: doomed,
                    after: after.as_ref(),
                    limit: BATCH,
                })
                .await?;
            if opts.dry_run {
                for (digest, size) in &batch {
                    report.blob(digest, *size);
                }
            } else {
                // In small groups: each holds its digests' locks (so commits
                // of those digests wait) for one transaction and its files.
                let digests: Vec<Digest> = batch.iter().map(|(d, _)| d.clone()).collect();
                for group in digests.chunks(RECLAIM_GROUP) {
                    for (digest, size) in self.reclaim_blobs(group, rule).await? {
                        report.blob(&digest, size);
                    }
                }
            }
            if batch.len() < BATCH as usize {
                return Ok(());
            }
            after = batch.last().map(|(d, _)| d.clone());
        }
    }
}
