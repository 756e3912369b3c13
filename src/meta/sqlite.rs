//! The embedded metadata store: one SQLite file in WAL mode.
//!
//! Writes go through a pool of exactly one connection, so they queue in our
//! process instead of failing with `SQLITE_BUSY`; reads use a separate pool
//! and never wait for writers (WAL). `synchronous=NORMAL` (the default)
//! keeps every committed transaction across a process crash (`kill -9`); a
//! power loss or OS crash can lose the last few, which only ever name blobs
//! that were fsynced first or whose bytes are in the same transaction (the
//! `blob_content` table: manifests and small blobs). `synchronous=FULL`
//! (`--sync full`) syncs the WAL at every commit, so an acknowledged write
//! survives a power loss too.

use std::collections::BTreeSet;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::group_commit::{GroupCommit, ManifestWrite, SmallWrite};
use super::locks::BlobLocks;
use super::{
    now_unix, BlobLock, CommitBlob, LinkOrigin, LockMode, ManifestRecord, ManifestRef, MetaError,
    MetaStore, NewManifest, Page, QuotaScope, QuotaUse, ReclaimRule, Result, StorageTotals,
    TagEvent, TagInfo, UnreachableQuery, UnreferencedQuery, UploadKind, UploadRecord,
};
use crate::oci::{Digest, RepoPattern};

impl From<sqlx::Error> for MetaError {
    fn from(e: sqlx::Error) -> Self {
        MetaError::Database(Box::new(e))
    }
}

impl From<sqlx::migrate::MigrateError> for MetaError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        MetaError::Migrate(Box::new(e))
    }
}

pub struct SqliteMeta {
    reader: SqlitePool,
    writer: SqlitePool,
    locks: BlobLocks,
    /// Blob commits and new upload sessions, committed in groups.
    group: GroupCommit,
    /// The task that checkpoints the WAL; stopped with the store.
    checkpoints: tokio::task::JoinHandle<()>,
}

/// How SQLite makes commits durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=NORMAL`: durable across process crashes.
    #[default]
    Normal,
    /// `synchronous=FULL`: durable across power loss.
    Full,
}

type ManifestRow = (
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<String>,
);

const MANIFEST_COLUMNS: &str = "digest, media_type, size, subject, artifact_type, annotations";

impl SqliteMeta {
    /// Opens (creating and migrating if needed) the database at `path`.
    pub async fn open(path: &Path, durability: Durability) -> Result<Self> {
        let synchronous = match durability {
            Durability::Normal => SqliteSynchronous::Normal,
            Durability::Full => SqliteSynchronous::Full,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(Duration::from_secs(30));
        // Connections are local and never go stale, so the pools skip the
        // health check (a round trip to the connection's thread) on every
        // acquire. Page caches stay small: what misses them is read from the
        // OS page cache, and each connection's cache is resident memory.
        // The writer never checkpoints the WAL itself: a checkpoint copies
        // pages into the database file and syncs it, and one run inside a
        // commit stalled every queued write (measured: up to 300 ms during
        // a collection pass). A separate connection does it (see
        // `spawn_checkpointer`).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(
                options
                    .clone()
                    .pragma("cache_size", WRITER_CACHE_KIB)
                    // Statement and savepoint journals (the group commit
                    // sets a savepoint per manifest) in memory, not in a
                    // temporary file created, written and removed for each
                    // (measured: over 40 % of the writer's time in manifest
                    // pushes). They hold one manifest's pages at a time.
                    .pragma("temp_store", "MEMORY")
                    .pragma("wal_autocheckpoint", "0")
                    // When the WAL starts over, its file is cut back to
                    // this size: a long burst (a collection pass under
                    // pushes left 260 MiB) does not keep its disk space.
                    .pragma("journal_size_limit", WAL_SIZE_LIMIT),
            )
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
        let checkpointer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone().pragma("cache_size", "-256"))
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .min_connections(1)
            .test_before_acquire(false)
            .connect_with(
                options
                    .pragma("cache_size", READER_CACHE_KIB)
                    .read_only(true),
            )
            .await?;
        // TROW_WAL_RESTART_FRAMES: a lower threshold, for tests that make
        // the WAL start over all the time (tests/wal_restart.rs).
        let restart_frames = std::env::var("TROW_WAL_RESTART_FRAMES")
            .ok()
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|n| *n > 0)
            .unwrap_or(WAL_RESTART_FRAMES);
        let checkpoints = spawn_checkpointer(checkpointer, writer.clone(), restart_frames);
        Ok(SqliteMeta {
            group: GroupCommit::start(writer.clone()),
            reader,
            writer,
            locks: BlobLocks::default(),
            checkpoints,
        })
    }
}

impl Drop for SqliteMeta {
    fn drop(&mut self) {
        self.checkpoints.abort();
    }
}

/// The size (bytes) the WAL file is cut back to when it starts over, if it
/// grew past it. Above what the WAL reaches between two restarts under a
/// steady stream of writes (`WAL_RESTART_FRAMES` of 4 KiB pages and what
/// one `CHECKPOINT_EVERY` of writes adds: about 200 MiB at 1 300 manifest
/// pushes a second), so that in normal running nothing is cut: cutting the
/// file freed blocks (a synchronous discard on this kind of disk) that the
/// next pass of the WAL allocated again. Only a WAL grown further, past a
/// checkpoint that could not restart it, is cut back.
const WAL_SIZE_LIMIT: &str = "268435456";

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// WAL frames (pages) past which the checkpointer also starts the WAL over.
/// Under a steady stream of writes a `PASSIVE` checkpoint never finds the
/// WAL idle, so SQLite never starts it over and it grows with every commit
/// (measured: 970 MiB during a collection pass of 100 000 blobs with pushes
/// going on). Each restart stalls the writer (about 200 ms measured under
/// manifest pushes: its syncs, then the next commit's sync of the new WAL
/// header), so this is a trade of the WAL's size on disk against those
/// stalls: 32 768 pushed 1 350-1 366 manifests/s at 16 clients against
/// 1 087-1 253 with 16 384 (and a 64 MiB cut-back limit).
const WAL_RESTART_FRAMES: i64 = 32 * 1024;

/// Copies the WAL into the database file now and then, beside the writer:
/// a `PASSIVE` checkpoint never waits for writers or readers, so writes go
/// on meanwhile (they append to the WAL). When the WAL has grown past
/// `WAL_RESTART_FRAMES` anyway, a `RESTART` checkpoint runs on the writer
/// connection itself, between two write transactions: writes queue for the
/// pool meanwhile, while it copies what the passive one left (little: it
/// just ran) and waits for readers to finish, so that the next commit
/// writes the WAL from its start again, over the blocks the file already
/// has. A stall now and then instead of a WAL that only grows. Not
/// `TRUNCATE`: emptying the file made every commit after it allocate new
/// blocks again (measured: `RESTART` pushed 1009-1108 manifests/s at 16
/// clients against 897-1032 with `TRUNCATE`). (Run from another connection
/// it would hold SQLite's write lock while a write transaction that began
/// by reading tries to upgrade, which SQLite refuses at once with
/// SQLITE_BUSY: an error for the push.)
fn spawn_checkpointer(
    pool: SqlitePool,
    writer: SqlitePool,
    restart_frames: i64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let passive: Result<(i64, i64, i64), sqlx::Error> =
                sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                    .fetch_one(&pool)
                    .await;
            match passive {
                Ok((_, frames, _)) if frames > restart_frames => {
                    let started = std::time::Instant::now();
                    match sqlx::query("PRAGMA wal_checkpoint(RESTART)")
                        .execute(&writer)
                        .await
                    {
                        Ok(_) => tracing::debug!(
                            frames,
                            took_ms = started.elapsed().as_millis() as u64,
                            "metadata WAL started over"
                        ),
                        Err(e) => {
                            tracing::warn!(error = %e, "could not start the metadata WAL over; will retry")
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "could not checkpoint the metadata database; will retry")
                }
            }
        }
    })
}

impl SqliteMeta {
    /// The error for a write that a quota refused: the scope that refuses
    /// `size` more bytes of `digest` in `repo`, as it stands now.
    async fn over_quota(&self, repo: &str, digest: &Digest, size: u64) -> MetaError {
        let uses = match self.quota_use(repo, Some(digest)).await {
            Ok(uses) => uses,
            Err(e) => return e,
        };
        // Another write may have freed space since; then name any scope.
        match uses.iter().find(|u| u.refuses(size)).or(uses.first()) {
            Some(usage) => MetaError::OverQuota {
                usage: *usage,
                adding: size,
            },
            None => MetaError::Corrupt(format!(
                "a quota refused {digest} in {repo}, which is in no quota scope"
            )),
        }
    }
}

/// Read-only connections (reads run in parallel in WAL mode).
const READERS: u32 = 4;
/// SQLite page cache of the writer and of each reader, as `cache_size`
/// (negative: KiB). A page that misses is read from the OS page cache in a
/// microsecond or two; a page held here is resident memory in each
/// connection. Halving the writer's (2 MiB) and quartering the readers'
/// (1 MiB each) took 1.3 MiB off the peak RSS with the same manifest push
/// and GET throughput (docs/PERFORMANCE.md).
const WRITER_CACHE_KIB: &str = "-1024";
const READER_CACHE_KIB: &str = "-256";

/// A write transaction on the writer connection.
type WriteTx<'c> = sqlx::Transaction<'c, sqlx::Sqlite>;

/// Digests as a JSON array for `json_each`.
fn digest_list(digests: &[Digest]) -> String {
    serde_json::Value::Array(
        digests
            .iter()
            .map(|d| serde_json::Value::String(d.to_string()))
            .collect(),
    )
    .to_string()
}

/// `refs` as JSON for `json_each`: `[{"d": digest, "s": size, "k": kind}]`.
fn refs_json(refs: &[ManifestRef]) -> String {
    let items: Vec<serde_json::Value> = refs
        .iter()
        .map(
            |r| serde_json::json!({ "d": r.digest.to_string(), "s": r.size, "k": r.kind.as_str() }),
        )
        .collect();
    serde_json::Value::Array(items).to_string()
}

/// Creates or refreshes the inventory row of a stored digest; fails with
/// `BlobGoing` when its removal is under way.
async fn keep_blob(tx: &mut WriteTx<'_>, digest: &str, size: u64, now: i64) -> Result<()> {
    let state: Option<String> = sqlx::query_scalar(
        "INSERT INTO blobs (digest, size, state, created_at, referenced_at)
         VALUES (?, ?, 'live', ?, ?)
         ON CONFLICT (digest) DO UPDATE SET referenced_at = excluded.referenced_at
           WHERE blobs.state = 'live'
         RETURNING state",
    )
    .bind(digest)
    .bind(size as i64)
    .bind(now)
    .bind(now)
    .fetch_optional(&mut **tx)
    .await?;
    match state {
        Some(_) => Ok(()),
        // The conflicting row was not updated: it is being removed.
        None => Err(MetaError::BlobGoing(parse_digest(digest)?)),
    }
}

/// What goes with a deleted manifest: its tags (their history entries
/// close), its references, and the repository if it is now empty.
async fn forget_manifest_rest(tx: &mut WriteTx<'_>, repo: &str, digest: &str) -> Result<()> {
    sqlx::query(
        "UPDATE tag_history SET replaced_at = ?
          WHERE repo = ? AND digest = ? AND replaced_at IS NULL;
         DELETE FROM tags WHERE repo = ? AND digest = ?;
         DELETE FROM manifest_refs WHERE repo = ? AND manifest = ?;",
    )
    .bind(now_unix())
    .bind(repo)
    .bind(digest)
    .bind(repo)
    .bind(digest)
    .bind(repo)
    .bind(digest)
    .execute(&mut **tx)
    .await?;
    drop_repo_if_empty(tx, repo).await
}

/// A condition that holds when adding a digest to a repository takes none
/// of the repository's quota scopes over its limit (a scope that already
/// counts the digest gains nothing). Binds, in order: the digest's size,
/// the repository, the digest. Read inside the write that adds the link or
/// manifest, so that it holds when that write commits (the schema of the
/// counters is in migrations/sqlite/0005_quotas.sql).
pub(super) const WITHIN_QUOTA: &str = "NOT EXISTS (
    SELECT 1 FROM quota_scopes s
     WHERE s.used + ? > s.max_size
       AND (SELECT MAX(p.exclude) FROM quota_patterns p
             WHERE p.scope = s.id AND ? GLOB p.glob) = 0
       AND NOT EXISTS (SELECT 1 FROM quota_digests d
                        WHERE d.scope = s.id AND d.digest = ?))";

/// A repository pattern as a GLOB pattern: `team-a/*` as is, an exact name
/// with GLOB's special characters escaped (names never hold them, but
/// patterns are the operator's text).
fn glob_of(pattern: &RepoPattern) -> String {
    let (text, star) = match pattern {
        RepoPattern::Exact(name) => (name.as_str(), ""),
        RepoPattern::Prefix(prefix) => (prefix.as_str(), "*"),
    };
    let mut glob = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        match c {
            '*' | '?' | '[' => {
                glob.push('[');
                glob.push(c);
                glob.push(']');
            }
            c => glob.push(c),
        }
    }
    glob.push_str(star);
    glob
}

/// The quota scopes' patterns as stored: (scope, glob, exclude).
fn scope_patterns(scopes: &[QuotaScope]) -> BTreeSet<(i64, String, i64)> {
    scopes
        .iter()
        .flat_map(|s| {
            let include = s
                .include
                .iter()
                .map(move |p| (i64::from(s.id), glob_of(p), 0));
            let exclude = s
                .exclude
                .iter()
                .map(move |p| (i64::from(s.id), glob_of(p), 1));
            include.chain(exclude)
        })
        .collect()
}

/// A repository leaves the catalog once it holds no manifest and no blob.
async fn drop_repo_if_empty(tx: &mut WriteTx<'_>, repo: &str) -> Result<()> {
    sqlx::query(
        "DELETE FROM repos WHERE name = ?
           AND NOT EXISTS (SELECT 1 FROM manifests WHERE repo = ?)
           AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE repo = ?)",
    )
    .bind(repo)
    .bind(repo)
    .bind(repo)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

fn upload_record((id, repo, updated_at): (String, String, i64)) -> UploadRecord {
    UploadRecord {
        id,
        repo,
        updated_at,
    }
}

fn parse_digest(s: &str) -> Result<Digest> {
    Digest::from_str(s).map_err(|e| MetaError::Corrupt(e.to_string()))
}

fn to_record(row: ManifestRow) -> Result<ManifestRecord> {
    let (digest, media_type, size, subject, artifact_type, annotations) = row;
    Ok(ManifestRecord {
        digest: parse_digest(&digest)?,
        media_type,
        size: u64::try_from(size)
            .map_err(|_| MetaError::Corrupt(format!("negative size {size}")))?,
        subject: subject.as_deref().map(parse_digest).transpose()?,
        artifact_type,
        annotations,
    })
}

/// Turns `n + 1` fetched rows into a page of at most `n`, noting whether
/// more follow (fetching one extra row answers that without a count query).
fn page(mut items: Vec<String>, n: u32) -> Page {
    let more = items.len() > n as usize;
    items.truncate(n as usize);
    Page { items, more }
}

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn lock_blob(&self, digest: &Digest, mode: LockMode) -> Result<BlobLock> {
        Ok(self.locks.lock(digest, mode).await)
    }

    async fn lock_blobs(&self, digests: &[Digest], mode: LockMode) -> Result<BlobLock> {
        Ok(self.locks.lock_many(digests, mode).await)
    }

    async fn commit_blob(&self, b: CommitBlob<'_>) -> Result<()> {
        let now = now_unix();
        // Through the group commit (`group_commit.rs`): the writer
        // connection runs the statements back to back, so no other write
        // comes between them; alone they commit one by one, in a group in
        // its transaction. Either is crash safe: a crash after the
        // inventory row and before the link leaves an unreferenced blob,
        // which is what it is until the link is recorded. A client's push of
        // a blob the cache also holds makes the link the client's, so that
        // eviction leaves it.
        // The link is recorded only within the repository's quotas: the
        // check is part of the insert, so two commits racing for the last
        // bytes of a quota cannot both pass it.
        let cached = i64::from(b.origin == LinkOrigin::Cache);
        let outcome = self
            .group
            .write(SmallWrite::CommitBlob {
                digest: b.digest.to_string(),
                size: b.size as i64,
                repo: b.repo.to_string(),
                upload: b.upload.map(str::to_string),
                cached,
                now,
                content: b.content.map(bytes::Bytes::copy_from_slice),
            })
            .await?;
        match outcome {
            (Some(state), true) if state == "live" => Ok(()),
            (Some(state), false) if state == "live" => {
                Err(self.over_quota(b.repo, b.digest, b.size).await)
            }
            _ => Err(MetaError::BlobGoing(b.digest.clone())),
        }
    }

    async fn blob_content(&self, digest: &Digest) -> Result<Option<bytes::Bytes>> {
        let bytes: Option<Vec<u8>> = sqlx::query_scalar(
            "SELECT c.bytes FROM blob_content c JOIN blobs b ON b.digest = c.digest
             WHERE c.digest = ? AND b.state = 'live'",
        )
        .bind(digest.to_string())
        .fetch_optional(&self.reader)
        .await?;
        Ok(bytes.map(bytes::Bytes::from))
    }

    async fn linked_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> =
            sqlx::query_scalar("SELECT size FROM repo_blobs WHERE repo = ? AND digest = ?")
                .bind(repo)
                .bind(digest.to_string())
                .fetch_optional(&self.reader)
                .await?;
        Ok(size.map(|s| s.max(0) as u64))
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM repo_blobs WHERE repo = ? AND digest = ?")
            .bind(repo)
            .bind(digest.to_string())
            .execute(&mut *tx)
            .await?;
        drop_repo_if_empty(&mut tx, repo).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn mount_blob(
        &self,
        repo: &str,
        digest: &Digest,
        from: Option<&str>,
    ) -> Result<Option<u64>> {
        let now = now_unix();
        let blob = digest;
        let digest = digest.to_string();
        let mut tx = self.writer.begin().await?;
        let size: Option<i64> = sqlx::query_scalar(
            "SELECT l.size FROM repo_blobs l JOIN blobs b ON b.digest = l.digest
             WHERE l.digest = ? AND (? IS NULL OR l.repo = ?) AND b.state = 'live'
             LIMIT 1",
        )
        .bind(&digest)
        .bind(from)
        .bind(from)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(size) = size.map(|s| s.max(0) as u64) else {
            return Ok(None);
        };
        keep_blob(&mut tx, &digest, size, now).await?;
        let linked = sqlx::query(&format!(
            "INSERT INTO repo_blobs (repo, digest, size, created_at, cached)
             SELECT ?, ?, ?, ?, 0 WHERE {WITHIN_QUOTA}
             ON CONFLICT (repo, digest) DO UPDATE SET cached = 0, created_at = excluded.created_at"
        ))
        .bind(repo)
        .bind(&digest)
        .bind(size as i64)
        .bind(now)
        .bind(size as i64)
        .bind(repo)
        .bind(&digest)
        .execute(&mut *tx)
        .await?;
        if linked.rows_affected() == 0 {
            // Dropping the transaction undoes the inventory refresh.
            drop(tx);
            return Err(self.over_quota(repo, blob, size).await);
        }
        tx.commit().await?;
        Ok(Some(size))
    }

    async fn put_manifest(&self, m: NewManifest<'_>) -> Result<()> {
        // Through the group commit (`group_commit.rs`): manifests pushed
        // together share one transaction, each behind its own savepoint, so
        // the reference check, the inserts and the quota check of one
        // manifest are still one unit that sees no other write between.
        let outcome = self
            .group
            .write(SmallWrite::PutManifest(Box::new(ManifestWrite {
                repo: m.repo.to_string(),
                digest: m.record.digest.to_string(),
                media_type: m.record.media_type.clone(),
                size: m.record.size as i64,
                subject: m.record.subject.as_ref().map(|d| d.to_string()),
                artifact_type: m.record.artifact_type.clone(),
                annotations: m.record.annotations.clone(),
                refs: refs_json(m.refs),
                check_refs: m.require_refs && !m.refs.is_empty(),
                tag: m.tag.map(str::to_string),
                content: m.content.map(bytes::Bytes::copy_from_slice),
                now: now_unix(),
            })))
            .await?;
        match outcome {
            (Some(state), true) if state == "live" => Ok(()),
            (Some(state), false) if state == "live" => Err(self
                .over_quota(m.repo, &m.record.digest, m.record.size)
                .await),
            _ => Err(MetaError::BlobGoing(m.record.digest.clone())),
        }
    }

    async fn manifest_by_digest(
        &self,
        repo: &str,
        digest: &Digest,
    ) -> Result<Option<ManifestRecord>> {
        let row: Option<ManifestRow> = sqlx::query_as(&format!(
            "SELECT {MANIFEST_COLUMNS} FROM manifests WHERE repo = ? AND digest = ?"
        ))
        .bind(repo)
        .bind(digest.to_string())
        .fetch_optional(&self.reader)
        .await?;
        row.map(to_record).transpose()
    }

    async fn manifest_by_tag(&self, repo: &str, tag: &str) -> Result<Option<ManifestRecord>> {
        let row: Option<ManifestRow> = sqlx::query_as(
            "SELECT m.digest, m.media_type, m.size, m.subject, m.artifact_type, m.annotations
             FROM tags t JOIN manifests m ON m.repo = t.repo AND m.digest = t.digest
             WHERE t.repo = ? AND t.tag = ?",
        )
        .bind(repo)
        .bind(tag)
        .fetch_optional(&self.reader)
        .await?;
        row.map(to_record).transpose()
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let digest = digest.to_string();
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM manifests WHERE repo = ? AND digest = ?")
            .bind(repo)
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
        forget_manifest_rest(&mut tx, repo, &digest).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        let mut tx = self.writer.begin().await?;
        let done = sqlx::query("DELETE FROM tags WHERE repo = ? AND tag = ?")
            .bind(repo)
            .bind(tag)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "UPDATE tag_history SET replaced_at = ? WHERE repo = ? AND tag = ? AND replaced_at IS NULL",
        )
        .bind(now_unix())
        .bind(repo)
        .bind(tag)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn referrers(
        &self,
        repo: &str,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ManifestRecord>> {
        let rows: Vec<ManifestRow> = sqlx::query_as(&format!(
            "SELECT {MANIFEST_COLUMNS} FROM manifests
             WHERE repo = ? AND subject = ? AND (? IS NULL OR artifact_type = ?)
             ORDER BY digest"
        ))
        .bind(repo)
        .bind(subject.to_string())
        .bind(artifact_type)
        .bind(artifact_type)
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter().map(to_record).collect()
    }

    async fn described_size(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> = sqlx::query_scalar(
            "SELECT size FROM manifest_refs WHERE repo = ? AND digest = ? LIMIT 1",
        )
        .bind(repo)
        .bind(digest.to_string())
        .fetch_optional(&self.reader)
        .await?;
        Ok(size.map(|s| s.max(0) as u64))
    }

    async fn unindexed_manifests(&self, limit: u32) -> Result<Vec<(String, Digest)>> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT repo, digest FROM manifests WHERE refs_indexed = 0 LIMIT ?")
                .bind(i64::from(limit))
                .fetch_all(&self.reader)
                .await?;
        rows.into_iter()
            .map(|(repo, d)| Ok((repo, parse_digest(&d)?)))
            .collect()
    }

    async fn index_manifest_refs(
        &self,
        repo: &str,
        digest: &Digest,
        refs: &[ManifestRef],
    ) -> Result<()> {
        let mut tx = self.writer.begin().await?;
        sqlx::query(
            "INSERT INTO manifest_refs (repo, manifest, digest, size, kind)
             SELECT ?, ?, json_extract(value, '$.d'), json_extract(value, '$.s'),
                    json_extract(value, '$.k')
               FROM json_each(?) WHERE true
             ON CONFLICT (repo, manifest, digest) DO NOTHING;
             UPDATE manifests SET refs_indexed = 1 WHERE repo = ? AND digest = ?;",
        )
        .bind(repo)
        .bind(digest.to_string())
        .bind(refs_json(refs))
        .bind(repo)
        .bind(digest.to_string())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_tags(&self, repo: &str, n: u32, last: Option<&str>) -> Result<Option<Page>> {
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM repos WHERE name = ?")
            .bind(repo)
            .fetch_optional(&self.reader)
            .await?;
        if known.is_none() {
            return Ok(None);
        }
        let tags: Vec<String> = sqlx::query_scalar(
            "SELECT tag FROM tags WHERE repo = ? AND tag > ? ORDER BY tag LIMIT ?",
        )
        .bind(repo)
        .bind(last.unwrap_or(""))
        .bind(i64::from(n) + 1)
        .fetch_all(&self.reader)
        .await?;
        Ok(Some(page(tags, n)))
    }

    async fn list_repos(&self, n: u32, last: Option<&str>) -> Result<Page> {
        let repos: Vec<String> =
            sqlx::query_scalar("SELECT name FROM repos WHERE name > ? ORDER BY name LIMIT ?")
                .bind(last.unwrap_or(""))
                .bind(i64::from(n) + 1)
                .fetch_all(&self.reader)
                .await?;
        Ok(page(repos, n))
    }

    async fn touch_cache_blob(&self, digest: &Digest, size: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO cache_blobs (digest, size, last_access) VALUES (?, ?, ?)
             ON CONFLICT (digest) DO UPDATE SET last_access = excluded.last_access",
        )
        .bind(digest.to_string())
        .bind(size as i64)
        .bind(now_unix())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn cache_usage(&self) -> Result<u64> {
        let used: Option<i64> = sqlx::query_scalar(
            "SELECT SUM(size) FROM cache_blobs WHERE digest NOT IN
               (SELECT digest FROM repo_blobs WHERE cached = 0)",
        )
        .fetch_one(&self.reader)
        .await?;
        Ok(used.unwrap_or(0).max(0) as u64)
    }

    async fn cache_lru(&self, limit: u32) -> Result<Vec<(Digest, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT digest, size FROM cache_blobs ORDER BY last_access, digest LIMIT ?",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(d, size)| Ok((parse_digest(&d)?, size.max(0) as u64)))
            .collect()
    }

    async fn condemn_blobs(
        &self,
        digests: &[Digest],
        rule: ReclaimRule,
    ) -> Result<Vec<(Digest, u64)>> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let list = digest_list(digests);
        let mut tx = self.writer.begin().await?;
        // The references the rule lets go of.
        let (dropped, referenced_before): (Vec<String>, Option<i64>) = match rule {
            ReclaimRule::CacheEviction => {
                let repos = sqlx::query_scalar(
                    "DELETE FROM repo_blobs
                      WHERE cached = 1 AND digest IN (SELECT value FROM json_each(?))
                     RETURNING repo;",
                )
                .bind(&list)
                .fetch_all(&mut *tx)
                .await?;
                sqlx::query(
                    "DELETE FROM cache_blobs WHERE digest IN (SELECT value FROM json_each(?))",
                )
                .bind(&list)
                .execute(&mut *tx)
                .await?;
                (repos, None)
            }
            ReclaimRule::Unreferenced { referenced_before } => {
                // Old links of a client's uploads that no manifest ever
                // referred to; a cache link or a recent one keeps them all.
                let repos = sqlx::query_scalar(
                    "DELETE FROM repo_blobs
                      WHERE digest IN (SELECT value FROM json_each(?))
                        AND NOT EXISTS (SELECT 1 FROM manifest_refs r
                                         WHERE r.digest = repo_blobs.digest)
                        AND NOT EXISTS (SELECT 1 FROM manifests m
                                         WHERE m.digest = repo_blobs.digest)
                        AND NOT EXISTS (SELECT 1 FROM repo_blobs l
                                         WHERE l.digest = repo_blobs.digest
                                           AND (l.cached = 1 OR l.created_at >= ?))
                     RETURNING repo;",
                )
                .bind(&list)
                .bind(referenced_before)
                .fetch_all(&mut *tx)
                .await?;
                (repos, Some(referenced_before))
            }
            ReclaimRule::Unlinked => (Vec::new(), None),
        };
        let mut dropped = dropped;
        dropped.sort();
        dropped.dedup();
        for repo in dropped {
            drop_repo_if_empty(&mut tx, &repo).await?;
        }
        // Anything left that needs the bytes: a link of any repository, or a
        // manifest stored under the digest (manifests share the namespace);
        // for the collector also a manifest referring to it, and a recent
        // push.
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "UPDATE blobs SET state = 'deleting'
             WHERE digest IN (SELECT value FROM json_each(?)) AND state = 'live'
               AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE digest = blobs.digest)
               AND NOT EXISTS (SELECT 1 FROM manifests WHERE digest = blobs.digest)
               AND (? IS NULL OR (referenced_at < ?
                    AND NOT EXISTS (SELECT 1 FROM manifest_refs WHERE digest = blobs.digest)))
             RETURNING digest, size",
        )
        .bind(&list)
        .bind(referenced_before)
        .bind(referenced_before)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.into_iter()
            .map(|(d, size)| Ok((parse_digest(&d)?, size.max(0) as u64)))
            .collect()
    }

    async fn forget_blobs(&self, digests: &[Digest]) -> Result<()> {
        sqlx::query(
            "DELETE FROM blobs WHERE state = 'deleting'
               AND digest IN (SELECT value FROM json_each(?))",
        )
        .bind(digest_list(digests))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn condemned_blobs(&self) -> Result<Vec<Digest>> {
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT digest FROM blobs WHERE state = 'deleting'")
                .fetch_all(&self.writer)
                .await?;
        rows.iter().map(|d| parse_digest(d)).collect()
    }

    async fn tags_with_times(&self, repo: &str) -> Result<Vec<TagInfo>> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT tag, digest, updated_at FROM tags WHERE repo = ? ORDER BY tag")
                .bind(repo)
                .fetch_all(&self.reader)
                .await?;
        rows.into_iter()
            .map(|(tag, digest, pushed_at)| {
                Ok(TagInfo {
                    tag,
                    digest: parse_digest(&digest)?,
                    pushed_at,
                })
            })
            .collect()
    }

    async fn delete_tags_as_seen(&self, repo: &str, tags: &[TagInfo]) -> Result<Vec<String>> {
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let seen = serde_json::Value::Array(
            tags.iter()
                .map(|t| serde_json::json!([t.tag, t.digest.to_string(), t.pushed_at]))
                .collect(),
        )
        .to_string();
        let mut tx = self.writer.begin().await?;
        let deleted: Vec<String> = sqlx::query_scalar(
            "DELETE FROM tags WHERE repo = ? AND EXISTS (
                SELECT 1 FROM json_each(?) j
                 WHERE json_extract(j.value, '$[0]') = tags.tag
                   AND json_extract(j.value, '$[1]') = tags.digest
                   AND json_extract(j.value, '$[2]') = tags.updated_at)
             RETURNING tag",
        )
        .bind(repo)
        .bind(&seen)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE tag_history SET replaced_at = ?
              WHERE repo = ? AND replaced_at IS NULL
                AND tag IN (SELECT value FROM json_each(?))",
        )
        .bind(now_unix())
        .bind(repo)
        .bind(serde_json::to_string(&deleted).unwrap_or_else(|_| "[]".into()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    async fn unreachable_manifests(&self, q: UnreachableQuery<'_>) -> Result<Vec<Digest>> {
        // What the repository's tags keep: tagged manifests, the children of
        // kept indexes, the referrers of kept subjects and the subjects of
        // kept referrers (a recursive query, so that nothing is held in
        // memory here).
        let rows: Vec<String> = sqlx::query_scalar(
            "WITH RECURSIVE kept(digest) AS (
                SELECT digest FROM tags
                 WHERE repo = ? AND tag NOT IN (SELECT value FROM json_each(?))
                UNION
                SELECT r.digest FROM manifest_refs r JOIN kept k ON r.manifest = k.digest
                 WHERE r.repo = ? AND r.kind = 'manifest'
                UNION
                SELECT m.digest FROM manifests m JOIN kept k ON m.subject = k.digest
                 WHERE m.repo = ?
                UNION
                SELECT m.subject FROM manifests m JOIN kept k ON m.digest = k.digest
                 WHERE m.repo = ? AND m.subject IS NOT NULL
             )
             SELECT m.digest FROM manifests m
              WHERE m.repo = ? AND m.digest > ?
                AND m.digest NOT IN (SELECT digest FROM kept)
                AND COALESCE((SELECT MAX(COALESCE(h.replaced_at, ?)) FROM tag_history h
                                WHERE h.repo = m.repo AND h.digest = m.digest),
                             m.created_at) <= ?
              ORDER BY m.digest LIMIT ?",
        )
        .bind(q.repo)
        .bind(serde_json::to_string(q.ignoring_tags).unwrap_or_else(|_| "[]".into()))
        .bind(q.repo)
        .bind(q.repo)
        .bind(q.repo)
        .bind(q.repo)
        .bind(q.after.map(|d| d.to_string()).unwrap_or_default())
        .bind(q.now)
        .bind(q.untagged_before)
        .bind(i64::from(q.limit))
        .fetch_all(&self.reader)
        .await?;
        rows.iter().map(|d| parse_digest(d)).collect()
    }

    async fn delete_unreachable_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        untagged_before: i64,
    ) -> Result<bool> {
        let digest = digest.to_string();
        let mut tx = self.writer.begin().await?;
        // The checks that make the deletion safe, on the writer: a tag, an
        // index listing it or a referrer pushed since the candidates were
        // chosen keeps it.
        let deleted: Option<i64> = sqlx::query_scalar(
            "DELETE FROM manifests WHERE repo = ? AND digest = ?
               AND NOT EXISTS (SELECT 1 FROM tags WHERE repo = ? AND digest = ?)
               AND NOT EXISTS (SELECT 1 FROM manifest_refs
                                WHERE repo = ? AND digest = ? AND kind = 'manifest')
               AND NOT EXISTS (SELECT 1 FROM manifests s WHERE s.repo = ? AND s.subject = ?)
               AND COALESCE((SELECT MAX(replaced_at) FROM tag_history
                              WHERE repo = ? AND digest = ?), created_at) <= ?
             RETURNING 1",
        )
        .bind(repo)
        .bind(&digest)
        .bind(repo)
        .bind(&digest)
        .bind(repo)
        .bind(&digest)
        .bind(repo)
        .bind(&digest)
        .bind(repo)
        .bind(&digest)
        .bind(untagged_before)
        .fetch_optional(&mut *tx)
        .await?;
        if deleted.is_none() {
            return Ok(false);
        }
        forget_manifest_rest(&mut tx, repo, &digest).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn set_quotas(&self, scopes: &[QuotaScope]) -> Result<bool> {
        let wanted = scope_patterns(scopes);
        let wanted_ids: BTreeSet<i64> = scopes.iter().map(|s| i64::from(s.id)).collect();
        let mut tx = self.writer.begin().await?;
        let stored: Vec<(i64, String, i64)> =
            sqlx::query_as("SELECT scope, glob, exclude FROM quota_patterns")
                .fetch_all(&mut *tx)
                .await?;
        let stored_ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM quota_scopes")
            .fetch_all(&mut *tx)
            .await?;
        let same = stored.into_iter().collect::<BTreeSet<_>>() == wanted
            && stored_ids.into_iter().collect::<BTreeSet<_>>() == wanted_ids;
        if same {
            // The counters do not depend on the limits.
            for s in scopes {
                sqlx::query("UPDATE quota_scopes SET max_size = ? WHERE id = ?")
                    .bind(s.max_size as i64)
                    .bind(i64::from(s.id))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            return Ok(false);
        }
        sqlx::query(
            "DELETE FROM quota_digests; DELETE FROM quota_patterns; DELETE FROM quota_scopes;",
        )
        .execute(&mut *tx)
        .await?;
        for s in scopes {
            sqlx::query("INSERT INTO quota_scopes (id, max_size, used) VALUES (?, ?, 0)")
                .bind(i64::from(s.id))
                .bind(s.max_size as i64)
                .execute(&mut *tx)
                .await?;
        }
        for (scope, glob, exclude) in &wanted {
            sqlx::query("INSERT INTO quota_patterns (scope, glob, exclude) VALUES (?, ?, ?)")
                .bind(scope)
                .bind(glob)
                .bind(exclude)
                .execute(&mut *tx)
                .await?;
        }
        // Every link and manifest of each scope's repositories, once per
        // digest: what the triggers would have counted had the scopes
        // always been there.
        sqlx::query(
            "INSERT INTO quota_digests (scope, digest, size, refs)
             SELECT s.id, x.digest, MAX(x.size), COUNT(*)
               FROM quota_scopes s
               JOIN (SELECT repo, digest, size FROM repo_blobs
                     UNION ALL
                     SELECT repo, digest, size FROM manifests) x
                 ON (SELECT MAX(p.exclude) FROM quota_patterns p
                      WHERE p.scope = s.id AND x.repo GLOB p.glob) = 0
              GROUP BY s.id, x.digest;
             UPDATE quota_scopes SET used = COALESCE(
               (SELECT SUM(d.size) FROM quota_digests d WHERE d.scope = quota_scopes.id), 0);",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn unreferenced_blobs(&self, q: UnreferencedQuery<'_>) -> Result<Vec<(Digest, u64)>> {
        let ignoring = serde_json::Value::Array(
            q.ignoring_manifests
                .iter()
                .map(|(repo, d)| serde_json::json!([repo, d.to_string()]))
                .collect(),
        )
        .to_string();
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT b.digest, b.size FROM blobs b
              WHERE b.digest > ? AND b.state = 'live' AND b.referenced_at < ?
                AND NOT EXISTS (
                    SELECT 1 FROM manifest_refs r WHERE r.digest = b.digest
                       AND NOT EXISTS (SELECT 1 FROM json_each(?) j
                                        WHERE json_extract(j.value, '$[0]') = r.repo
                                          AND json_extract(j.value, '$[1]') = r.manifest))
                AND NOT EXISTS (
                    SELECT 1 FROM manifests m WHERE m.digest = b.digest
                       AND NOT EXISTS (SELECT 1 FROM json_each(?) j
                                        WHERE json_extract(j.value, '$[0]') = m.repo
                                          AND json_extract(j.value, '$[1]') = m.digest))
                AND NOT EXISTS (SELECT 1 FROM repo_blobs l WHERE l.digest = b.digest
                                  AND (l.cached = 1 OR l.created_at >= ?))
              ORDER BY b.digest LIMIT ?",
        )
        .bind(q.after.map(|d| d.to_string()).unwrap_or_default())
        .bind(q.referenced_before)
        .bind(&ignoring)
        .bind(&ignoring)
        .bind(q.referenced_before)
        .bind(i64::from(q.limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(d, size)| Ok((parse_digest(&d)?, size.max(0) as u64)))
            .collect()
    }

    async fn tag_history(
        &self,
        repo: &str,
        tag: Option<&str>,
        at: Option<i64>,
        limit: u32,
    ) -> Result<Vec<TagEvent>> {
        let rows: Vec<(String, String, i64, Option<i64>)> = sqlx::query_as(
            "SELECT tag, digest, pushed_at, replaced_at FROM tag_history
              WHERE repo = ? AND (? IS NULL OR tag = ?)
                AND (? IS NULL OR (pushed_at <= ? AND (replaced_at IS NULL OR replaced_at > ?)))
              ORDER BY pushed_at DESC, rowid DESC LIMIT ?",
        )
        .bind(repo)
        .bind(tag)
        .bind(tag)
        .bind(at)
        .bind(at)
        .bind(at)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(tag, digest, pushed_at, replaced_at)| {
                Ok(TagEvent {
                    tag,
                    digest: parse_digest(&digest)?,
                    pushed_at,
                    replaced_at,
                })
            })
            .collect()
    }

    async fn quota_use(&self, repo: &str, digest: Option<&Digest>) -> Result<Vec<QuotaUse>> {
        let rows: Vec<(i64, i64, i64, bool)> = sqlx::query_as(
            "SELECT s.id, s.used, s.max_size,
                    EXISTS (SELECT 1 FROM quota_digests d WHERE d.scope = s.id AND d.digest = ?)
               FROM quota_scopes s
              WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
                      WHERE p.scope = s.id AND ? GLOB p.glob) = 0
              ORDER BY s.id",
        )
        .bind(digest.map(|d| d.to_string()))
        .bind(repo)
        .fetch_all(&self.reader)
        .await?;
        rows.into_iter()
            .map(|(scope, used, max_size, counted)| {
                Ok(QuotaUse {
                    scope: u32::try_from(scope)
                        .map_err(|_| MetaError::Corrupt(format!("quota scope id {scope}")))?,
                    used: used.max(0) as u64,
                    max_size: max_size.max(0) as u64,
                    counted,
                })
            })
            .collect()
    }

    async fn prune_tag_history(&self, before: i64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM tag_history WHERE replaced_at IS NOT NULL AND replaced_at < ?",
        )
        .bind(before)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected())
    }

    async fn create_upload(&self, id: &str, repo: &str, kind: UploadKind) -> Result<()> {
        self.group
            .write(SmallWrite::CreateUpload {
                id: id.to_string(),
                repo: repo.to_string(),
                kind: kind.as_str(),
                now: now_unix(),
            })
            .await?;
        Ok(())
    }

    async fn get_upload(&self, id: &str) -> Result<Option<UploadRecord>> {
        let row: Option<(String, String, i64)> =
            sqlx::query_as("SELECT id, repo, updated_at FROM uploads WHERE id = ?")
                .bind(id)
                .fetch_optional(&self.reader)
                .await?;
        Ok(row.map(upload_record))
    }

    async fn touch_upload(&self, id: &str, repo: &str) -> Result<bool> {
        let done = sqlx::query("UPDATE uploads SET updated_at = ? WHERE id = ? AND repo = ?")
            .bind(now_unix())
            .bind(id)
            .bind(repo)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn delete_upload(&self, id: &str) -> Result<()> {
        sqlx::query("DELETE FROM uploads WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    async fn stale_uploads(&self, before: i64, limit: u32) -> Result<Vec<UploadRecord>> {
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT id, repo, updated_at FROM uploads WHERE updated_at < ?
             ORDER BY updated_at, id LIMIT ?",
        )
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.reader)
        .await?;
        Ok(rows.into_iter().map(upload_record).collect())
    }

    async fn uploads_of_kind(&self, kind: UploadKind, limit: u32) -> Result<Vec<UploadRecord>> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT id, repo, updated_at FROM uploads WHERE kind = ? LIMIT ?")
                .bind(kind.as_str())
                .bind(i64::from(limit))
                .fetch_all(&self.reader)
                .await?;
        Ok(rows.into_iter().map(upload_record).collect())
    }

    async fn ping(&self) -> Result<()> {
        // A read of a real table, so the database file itself is read, not
        // only the connection.
        let _: Option<i64> = sqlx::query_scalar("SELECT 1 FROM repos LIMIT 1")
            .fetch_optional(&self.reader)
            .await?;
        Ok(())
    }

    async fn storage_totals(&self) -> Result<StorageTotals> {
        let (blobs, bytes, client, cache): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT COUNT(*) FROM blobs), (SELECT COALESCE(SUM(size), 0) FROM blobs),
                    (SELECT COUNT(*) FROM uploads WHERE kind = 'client'),
                    (SELECT COUNT(*) FROM uploads WHERE kind = 'cache')",
        )
        .fetch_one(&self.reader)
        .await?;
        let n = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(StorageTotals {
            bytes: n(bytes),
            blobs: n(blobs),
            client_uploads: n(client),
            cache_downloads: n(cache),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::{MetaStore, ReclaimRule, RefKind};

    async fn open() -> (SqliteMeta, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let meta = SqliteMeta::open(&dir.path().join("trow.db"), Durability::Normal)
            .await
            .unwrap();
        (meta, dir)
    }

    fn scope(id: u32, include: &[&str], max_size: u64) -> QuotaScope {
        QuotaScope {
            id,
            include: include
                .iter()
                .map(|p| RepoPattern::parse(p).unwrap())
                .collect(),
            exclude: vec![RepoPattern::Prefix("f/".into())],
            max_size,
        }
    }

    fn digest(n: u32) -> Digest {
        Digest::sha256_of(&n.to_le_bytes())
    }

    async fn link(meta: &SqliteMeta, repo: &str, d: &Digest, size: u64) -> Result<()> {
        meta.commit_blob(CommitBlob {
            repo,
            digest: d,
            size,
            origin: if repo.starts_with("f/") {
                LinkOrigin::Cache
            } else {
                LinkOrigin::Client
            },
            upload: None,
            content: None,
        })
        .await
    }

    fn manifest(repo: &str, d: &Digest, size: u64) -> NewManifest<'static> {
        NewManifest {
            repo: Box::leak(repo.to_string().into_boxed_str()),
            record: ManifestRecord {
                digest: d.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                size,
                subject: None,
                artifact_type: None,
                annotations: None,
            },
            tag: None,
            refs: &[],
            require_refs: false,
            content: None,
        }
    }

    async fn used(meta: &SqliteMeta, repo: &str) -> Vec<(u32, u64)> {
        meta.quota_use(repo, None)
            .await
            .unwrap()
            .iter()
            .map(|u| (u.scope, u.used))
            .collect()
    }

    /// The counters equal a count from scratch.
    async fn assert_consistent(meta: &SqliteMeta) {
        let kept: Vec<(i64, i64)> = sqlx::query_as("SELECT id, used FROM quota_scopes ORDER BY id")
            .fetch_all(&meta.writer)
            .await
            .unwrap();
        let fresh: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT s.id, COALESCE((SELECT SUM(size) FROM (
                 SELECT x.digest, MAX(x.size) AS size
                   FROM (SELECT repo, digest, size FROM repo_blobs
                         UNION ALL SELECT repo, digest, size FROM manifests) x
                  WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
                          WHERE p.scope = s.id AND x.repo GLOB p.glob) = 0
                  GROUP BY x.digest)), 0)
               FROM quota_scopes s ORDER BY s.id",
        )
        .fetch_all(&meta.writer)
        .await
        .unwrap();
        assert_eq!(kept, fresh);
    }

    /// The query plan of `sql`, one step per line.
    async fn plan(meta: &SqliteMeta, sql: &str) -> String {
        let steps: Vec<(i64, i64, i64, String)> =
            sqlx::query_as(&format!("EXPLAIN QUERY PLAN {sql}"))
                .fetch_all(&meta.writer)
                .await
                .unwrap();
        steps
            .into_iter()
            .map(|(.., step)| step)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// What a manifest push checks and what a pull of a described blob
    /// asks find their rows by key: nothing on these paths reads a whole
    /// repository's links, manifests or references, however large it is.
    #[tokio::test]
    async fn reference_lookups_search_keys_not_whole_repositories() {
        let (meta, _dir) = open().await;
        let missing = plan(&meta, super::super::group_commit::FIRST_MISSING_REF).await;
        assert!(!missing.contains("LIST SUBQUERY"), "{missing}");
        assert!(
            missing.contains("SEARCH repo_blobs USING PRIMARY KEY (repo=? AND digest=?)"),
            "{missing}"
        );
        assert!(
            missing.contains("SEARCH manifests USING PRIMARY KEY (repo=? AND digest=?)"),
            "{missing}"
        );
        for sql in [
            "SELECT size FROM manifest_refs WHERE repo = ? AND digest = ? LIMIT 1",
            "SELECT 1 FROM manifest_refs WHERE repo = ? AND digest = ? AND kind = 'manifest'",
        ] {
            let steps = plan(&meta, sql).await;
            assert!(steps.contains("(digest=? AND repo=?)"), "{sql}: {steps}");
        }
        let by_digest = plan(&meta, "SELECT 1 FROM manifest_refs WHERE digest = ?").await;
        assert!(
            by_digest.contains("INDEX manifest_refs_by_digest (digest=?)"),
            "{by_digest}"
        );
    }

    /// A chunk's check and touch are one statement: it refreshes the
    /// session of the repository that owns it, and nothing for another
    /// repository or an unknown id.
    #[tokio::test]
    async fn touching_an_upload_checks_its_repository() {
        let (meta, _dir) = open().await;
        meta.create_upload("u1", "team/app", UploadKind::Client)
            .await
            .unwrap();
        sqlx::query("UPDATE uploads SET updated_at = 5 WHERE id = 'u1'")
            .execute(&meta.writer)
            .await
            .unwrap();
        assert!(!meta.touch_upload("u1", "team/other").await.unwrap());
        assert!(!meta.touch_upload("u2", "team/app").await.unwrap());
        let stale = meta.stale_uploads(6, 10).await.unwrap();
        assert_eq!(stale.len(), 1, "refused touches change nothing");
        assert!(meta.touch_upload("u1", "team/app").await.unwrap());
        assert!(meta.stale_uploads(6, 10).await.unwrap().is_empty());
        let record = meta.get_upload("u1").await.unwrap().unwrap();
        assert_eq!(record.repo, "team/app");
    }

    /// Commits and new uploads arriving together share groups, and each
    /// still gets its own outcome: here a quota lets exactly six of ten
    /// links in, whatever group they land in.
    #[tokio::test]
    async fn writes_arriving_together_share_groups_and_keep_their_outcomes() {
        let (meta, _dir) = open().await;
        assert!(meta
            .set_quotas(&[scope(1, &["team-a/*"], 1000)])
            .await
            .unwrap());
        let groups_before = meta.group.groups();
        let meta = &meta;
        let free_digests: Vec<Digest> = (100..130).map(digest).collect();
        let capped_digests: Vec<Digest> = (200..210).map(digest).collect();
        let free = free_digests.iter().map(|d| link(meta, "free/x", d, 10));
        let capped = capped_digests
            .iter()
            .map(|d| link(meta, "team-a/x", d, 150));
        let uploads = (0..10).map(|i| async move {
            meta.create_upload(&format!("u{i}"), "free/x", UploadKind::Client)
                .await
        });
        let (free, capped, uploads) = tokio::join!(
            futures_util::future::join_all(free),
            futures_util::future::join_all(capped),
            futures_util::future::join_all(uploads)
        );
        assert!(free.iter().all(Result::is_ok), "{free:?}");
        assert!(uploads.iter().all(Result::is_ok), "{uploads:?}");
        let linked = capped.iter().filter(|r| r.is_ok()).count();
        let refused = capped
            .iter()
            .filter(|r| matches!(r, Err(MetaError::OverQuota { .. })))
            .count();
        assert_eq!((linked, refused), (6, 4), "{capped:?}");
        let groups = meta.group.groups() - groups_before;
        assert!(groups < 50, "50 writes ran in {groups} groups: none shared");
        for i in 0..10 {
            assert!(meta.get_upload(&format!("u{i}")).await.unwrap().is_some());
        }
        assert_consistent(meta).await;
    }

    /// Manifests pushed together share groups with the blob commits before
    /// them, and one that is refused (a missing reference, a quota) is
    /// undone alone: the others of its group, their bytes, tags and
    /// references are stored, its own are not.
    #[tokio::test]
    async fn manifests_arriving_together_share_groups_and_are_refused_alone() {
        let (meta, _dir) = open().await;
        assert!(meta
            .set_quotas(&[scope(1, &["team-a/*"], 1000)])
            .await
            .unwrap());
        let layer = digest(500);
        link(&meta, "free/x", &layer, 10).await.unwrap();
        let groups_before = meta.group.groups();
        let meta = &meta;
        let refs = [ManifestRef {
            digest: layer.clone(),
            size: 10,
            kind: RefKind::Blob,
        }];
        let missing = [ManifestRef {
            digest: digest(501),
            size: 10,
            kind: RefKind::Blob,
        }];
        let tags: Vec<String> = (0..20).map(|i| format!("t{i}")).collect();
        let bodies: Vec<Vec<u8>> = (0..20)
            .map(|i| format!("{{\"m\":{i}}}").into_bytes())
            .collect();
        let pushes = (0..20).map(|i| {
            let (tags, bodies, refs, missing) = (&tags, &bodies, &refs, &missing);
            async move {
                let d = Digest::sha256_of(&bodies[i]);
                let mut m = manifest("free/x", &d, bodies[i].len() as u64);
                m.tag = Some(&tags[i]);
                m.require_refs = true;
                m.content = Some(&bodies[i]);
                // Every fifth names a layer the repository does not hold.
                m.refs = if i % 5 == 4 { missing } else { refs };
                (d, meta.put_manifest(m).await)
            }
        });
        // Two manifests over the quota of team-a (1000 bytes, 600 each).
        let capped = (0..2).map(|i| async move {
            let d = digest(600 + i);
            (
                d.clone(),
                meta.put_manifest(manifest("team-a/x", &d, 600)).await,
            )
        });
        let (pushed, capped) = tokio::join!(
            futures_util::future::join_all(pushes),
            futures_util::future::join_all(capped)
        );
        for (i, (d, result)) in pushed.iter().enumerate() {
            let stored = meta.manifest_by_tag("free/x", &tags[i]).await.unwrap();
            let content = meta.blob_content(d).await.unwrap();
            if i % 5 == 4 {
                assert!(
                    matches!(result, Err(MetaError::MissingReference { digest, .. }) if *digest == digest_501()),
                    "{result:?}"
                );
                assert_eq!(stored, None);
                assert_eq!(content, None, "a refused manifest's bytes are undone");
            } else {
                assert!(result.is_ok(), "{result:?}");
                assert_eq!(stored.map(|r| r.digest), Some(d.clone()));
                assert_eq!(content.as_deref(), Some(&bodies[i][..]));
            }
        }
        let refused = capped
            .iter()
            .filter(|(_, r)| matches!(r, Err(MetaError::OverQuota { .. })))
            .count();
        assert_eq!(refused, 1, "{capped:?}");
        let groups = meta.group.groups() - groups_before;
        assert!(
            groups < 22,
            "22 manifests ran in {groups} groups: none shared"
        );
        assert_consistent(meta).await;
    }

    fn digest_501() -> Digest {
        digest(501)
    }

    #[tokio::test]
    async fn counters_follow_links_and_manifests() {
        let (meta, _dir) = open().await;
        assert!(meta
            .set_quotas(&[scope(1, &["team-a/*"], 1000), scope(2, &["*"], 5000)])
            .await
            .unwrap());
        let (d1, d2, d3) = (digest(1), digest(2), digest(3));
        link(&meta, "team-a/x", &d1, 100).await.unwrap();
        // The same layer in another repository of the scope counts once.
        link(&meta, "team-a/y", &d1, 100).await.unwrap();
        link(&meta, "team-b/x", &d1, 100).await.unwrap();
        link(&meta, "team-b/x", &d2, 200).await.unwrap();
        // The cache's repositories are never counted.
        link(&meta, "f/docker.io/library/x", &d3, 400)
            .await
            .unwrap();
        meta.put_manifest(manifest("team-a/x", &d3, 10))
            .await
            .unwrap();
        assert_eq!(used(&meta, "team-a/x").await, [(1, 110), (2, 310)]);
        assert_eq!(used(&meta, "team-b/x").await, [(2, 310)]);
        assert!(used(&meta, "f/docker.io/library/x").await.is_empty());
        assert_consistent(&meta).await;

        // A digest goes from a scope with its last holder.
        assert!(meta.unlink_blob("team-a/x", &d1).await.unwrap());
        assert_eq!(used(&meta, "team-a/x").await, [(1, 110), (2, 310)]);
        assert!(meta.unlink_blob("team-a/y", &d1).await.unwrap());
        assert_eq!(used(&meta, "team-a/x").await, [(1, 10), (2, 310)]);
        assert!(meta.delete_manifest("team-a/x", &d3).await.unwrap());
        assert_eq!(used(&meta, "team-a/x").await, [(1, 0), (2, 300)]);
        // Eviction drops the cache's links; the counters do not move.
        let _lock = meta.lock_blob(&d3, LockMode::Exclusive).await.unwrap();
        assert_eq!(
            meta.condemn_blobs(std::slice::from_ref(&d3), ReclaimRule::CacheEviction)
                .await
                .unwrap(),
            vec![(d3.clone(), 400)]
        );
        assert_consistent(&meta).await;
    }

    #[tokio::test]
    async fn writes_over_a_quota_are_refused_and_write_nothing() {
        let (meta, _dir) = open().await;
        meta.set_quotas(&[scope(1, &["team-a/*"], 1000)])
            .await
            .unwrap();
        let (d1, d2, d3) = (digest(1), digest(2), digest(3));
        link(&meta, "team-a/x", &d1, 900).await.unwrap();
        link(&meta, "team-b/x", &d2, 200).await.unwrap();
        let e = link(&meta, "team-a/x", &d2, 200).await.unwrap_err();
        match e {
            MetaError::OverQuota { usage, adding } => {
                assert_eq!((usage.scope, usage.used, usage.max_size), (1, 900, 1000));
                assert_eq!(adding, 200);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(meta.linked_blob("team-a/x", &d2).await.unwrap(), None);
        let e = meta.mount_blob("team-a/y", &d2, None).await.unwrap_err();
        assert!(matches!(e, MetaError::OverQuota { .. }), "{e:?}");
        assert_eq!(meta.linked_blob("team-a/y", &d2).await.unwrap(), None);
        let e = meta
            .put_manifest(manifest("team-a/x", &d3, 101))
            .await
            .unwrap_err();
        assert!(matches!(e, MetaError::OverQuota { .. }), "{e:?}");
        assert!(meta
            .manifest_by_digest("team-a/x", &d3)
            .await
            .unwrap()
            .is_none());
        // What fits still goes in, and a digest the scope holds adds nothing.
        meta.put_manifest(manifest("team-a/x", &d3, 100))
            .await
            .unwrap();
        assert_eq!(used(&meta, "team-a/x").await, [(1, 1000)]);
        link(&meta, "team-a/y", &d1, 900).await.unwrap();
        assert_eq!(
            meta.mount_blob("team-a/z", &d1, Some("team-a/x"))
                .await
                .unwrap(),
            Some(900)
        );
        meta.put_manifest(manifest("team-a/x", &d3, 100))
            .await
            .unwrap();
        // Elsewhere nothing is limited.
        link(&meta, "team-b/y", &d1, 900).await.unwrap();
        assert_consistent(&meta).await;
    }

    #[tokio::test]
    async fn scopes_are_recounted_only_when_their_patterns_change() {
        let (meta, _dir) = open().await;
        let (d1, d2) = (digest(1), digest(2));
        link(&meta, "team-a/x", &d1, 100).await.unwrap();
        link(&meta, "team-b/x", &d2, 200).await.unwrap();
        meta.put_manifest(manifest("team-b/x", &d1, 100))
            .await
            .unwrap();
        assert!(!meta.set_quotas(&[]).await.unwrap());
        // Existing content is counted when a quota appears.
        assert!(meta
            .set_quotas(&[scope(1, &["team-a/*", "team-b/x"], 1000)])
            .await
            .unwrap());
        assert_eq!(used(&meta, "team-a/q").await, [(1, 300)]);
        // A new limit alone keeps the counters.
        assert!(!meta
            .set_quotas(&[scope(1, &["team-b/x", "team-a/*"], 10)])
            .await
            .unwrap());
        let u = meta.quota_use("team-b/x", Some(&d2)).await.unwrap();
        assert_eq!((u[0].used, u[0].max_size, u[0].counted), (300, 10, true));
        assert!(meta
            .set_quotas(&[scope(1, &["team-b/*"], 1000)])
            .await
            .unwrap());
        assert_eq!(used(&meta, "team-b/x").await, [(1, 300)]);
        assert!(used(&meta, "team-a/x").await.is_empty());
        assert_consistent(&meta).await;
        assert!(meta.set_quotas(&[]).await.unwrap());
        assert!(used(&meta, "team-b/x").await.is_empty());
    }

    /// What quotas add to the metadata writes of a push on a large store:
    /// 100 000 links in 1 000 other repositories, all under a `*` scope.
    /// Run by hand: `cargo test --lib -- --ignored --nocapture
    /// quota_overhead`.
    #[tokio::test]
    #[ignore]
    async fn quota_overhead_with_100k_links() {
        let (meta, _dir) = open().await;
        sqlx::query(
            "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99999)
             INSERT INTO blobs (digest, size, state, created_at, referenced_at)
             SELECT printf('sha256:%064x', i), 1000000 + i, 'live', 0, 0 FROM n;
             WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99999)
             INSERT INTO repo_blobs (repo, digest, size, created_at, cached)
             SELECT printf('other/r%d', i / 100), printf('sha256:%064x', i), 1000000 + i, 0, 0
               FROM n;",
        )
        .execute(&meta.writer)
        .await
        .unwrap();
        let scopes = [scope(1, &["team-a/*"], 1 << 40), scope(2, &["*"], 1 << 50)];
        let mut report = Vec::new();
        for (round, with) in [(0u32, false), (1, true), (2, false), (3, true)] {
            let started = std::time::Instant::now();
            meta.set_quotas(if with { &scopes } else { &[] })
                .await
                .unwrap();
            let recount = started.elapsed();
            let mut commits = Vec::new();
            let mut unlinks = Vec::new();
            for i in 0..2000u32 {
                let d = digest(round * 10_000 + i);
                let started = std::time::Instant::now();
                link(&meta, "team-a/app", &d, 4096).await.unwrap();
                commits.push(started.elapsed());
                let started = std::time::Instant::now();
                meta.unlink_blob("team-a/app", &d).await.unwrap();
                unlinks.push(started.elapsed());
            }
            commits.sort();
            unlinks.sort();
            report.push(format!(
                "quotas {with}: set_quotas {recount:?}; commit_blob p50 {:?} p99 {:?}; unlink_blob p50 {:?} p99 {:?}",
                commits[1000], commits[1980], unlinks[1000], unlinks[1980]
            ));
        }
        assert_consistent(&meta).await;
        eprintln!("{}", report.join("\n"));
    }

    #[test]
    fn globs_escape_the_operators_text() {
        assert_eq!(glob_of(&RepoPattern::Prefix("team-a/".into())), "team-a/*");
        assert_eq!(glob_of(&RepoPattern::Prefix(String::new())), "*");
        assert_eq!(glob_of(&RepoPattern::Exact("a[b]?".into())), "a[[]b][?]");
    }
}
