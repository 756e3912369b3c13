//! The embedded metadata store: one SQLite file in WAL mode.
//!
//! Writes go through a pool of exactly one connection, so they queue in our
//! process instead of failing with `SQLITE_BUSY`; reads use a separate pool
//! and never wait for writers (WAL). `synchronous=NORMAL` (the default)
//! keeps every committed transaction across a process crash (`kill -9`); a
//! power loss or OS crash can lose the last few, which only ever name blobs
//! that were fsynced first. `synchronous=FULL` (`--sync full`) syncs the WAL
//! at every commit, so an acknowledged write survives a power loss too.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::locks::BlobLocks;
use super::{
    now_unix, BlobLock, CommitBlob, LinkOrigin, LockMode, ManifestRecord, ManifestRef, MetaError,
    MetaStore, NewManifest, Page, ReclaimRule, RefKind, Result, TagEvent, TagInfo,
    UnreachableQuery, UnreferencedQuery, UploadKind, UploadRecord,
};
use crate::oci::Digest;

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
                    .pragma("wal_autocheckpoint", "0"),
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
        Ok(SqliteMeta {
            reader,
            writer,
            locks: BlobLocks::default(),
            checkpoints: spawn_checkpointer(checkpointer),
        })
    }
}

impl Drop for SqliteMeta {
    fn drop(&mut self) {
        self.checkpoints.abort();
    }
}

/// How often the WAL is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Copies the WAL into the database file now and then, beside the writer:
/// a `PASSIVE` checkpoint never waits for writers or readers, so writes go
/// on meanwhile (they append to the WAL), and SQLite starts the WAL over
/// once it has all been copied and no reader needs it.
fn spawn_checkpointer(pool: SqlitePool) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&pool)
                .await
            {
                tracing::warn!(error = %e, "could not checkpoint the metadata database; will retry");
            }
        }
    })
}

/// Read-only connections (reads run in parallel in WAL mode).
const READERS: u32 = 4;
/// SQLite page cache of the writer and of each reader, as `cache_size`
/// (negative: KiB).
const WRITER_CACHE_KIB: &str = "-2048";
const READER_CACHE_KIB: &str = "-1024";

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

/// Of `refs` (as [`refs_json`]), the first that `repo` does not hold (a
/// blob not linked, a child manifest not stored), read inside the writer's
/// transaction so that the answer holds until it commits.
async fn first_missing_ref(
    tx: &mut WriteTx<'_>,
    repo: &str,
    refs: &str,
) -> Result<Option<(Digest, RefKind)>> {
    let missing: Option<(String, String)> = sqlx::query_as(
        "SELECT json_extract(value, '$.d'), json_extract(value, '$.k') FROM json_each(?1)
         WHERE (json_extract(value, '$.k') = 'blob' AND json_extract(value, '$.d') NOT IN
                  (SELECT digest FROM repo_blobs WHERE repo = ?2))
            OR (json_extract(value, '$.k') = 'manifest' AND json_extract(value, '$.d') NOT IN
                  (SELECT digest FROM manifests WHERE repo = ?2))
         LIMIT 1",
    )
    .bind(refs)
    .bind(repo)
    .fetch_optional(&mut **tx)
    .await?;
    missing
        .map(|(digest, kind)| {
            let kind = if kind == RefKind::Manifest.as_str() {
                RefKind::Manifest
            } else {
                RefKind::Blob
            };
            Ok((parse_digest(&digest)?, kind))
        })
        .transpose()
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
        let digest = b.digest.to_string();
        // One round trip to the writer: the writer connection runs the
        // statements back to back, so no other write comes between them.
        // No transaction is needed for crash safety: a crash after the
        // inventory row and before the link leaves an unreferenced blob,
        // which is what it is until the link is recorded. A client's push of
        // a blob the cache also holds makes the link the client's, so that
        // eviction leaves it.
        // (sqlx binds `?NNN` wrongly when a statement of a multi-statement
        // query skips a number, so these use plain `?`, bound in order.)
        let cached = i64::from(b.origin == LinkOrigin::Cache);
        let state: Option<String> = sqlx::query_scalar(
            "INSERT INTO blobs (digest, size, state, created_at, referenced_at)
             VALUES (?, ?, 'live', ?, ?)
             ON CONFLICT (digest) DO UPDATE SET referenced_at = excluded.referenced_at
               WHERE blobs.state = 'live';
             INSERT INTO repo_blobs (repo, digest, size, created_at, cached)
             SELECT ?, ?, ?, ?, ?
               WHERE EXISTS (SELECT 1 FROM blobs WHERE digest = ? AND state = 'live')
             ON CONFLICT (repo, digest) DO UPDATE SET cached = MIN(cached, excluded.cached),
                                                      created_at = excluded.created_at;
             DELETE FROM uploads WHERE id = ?;
             SELECT state FROM blobs WHERE digest = ?;",
        )
        .bind(&digest)
        .bind(b.size as i64)
        .bind(now)
        .bind(now)
        .bind(b.repo)
        .bind(&digest)
        .bind(b.size as i64)
        .bind(now)
        .bind(cached)
        .bind(&digest)
        .bind(b.upload)
        .bind(&digest)
        .fetch_optional(&self.writer)
        .await?;
        match state.as_deref() {
            Some("live") => Ok(()),
            _ => Err(MetaError::BlobGoing(b.digest.clone())),
        }
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
        sqlx::query(
            "INSERT INTO repo_blobs (repo, digest, size, created_at, cached) VALUES (?, ?, ?, ?, 0)
             ON CONFLICT (repo, digest) DO UPDATE SET cached = 0, created_at = excluded.created_at",
        )
        .bind(repo)
        .bind(&digest)
        .bind(size as i64)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(size))
    }

    async fn put_manifest(&self, m: NewManifest<'_>) -> Result<()> {
        let now = now_unix();
        let digest = m.record.digest.to_string();
        let refs = refs_json(m.refs);
        let mut tx = self.writer.begin().await?;
        if m.require_refs && !m.refs.is_empty() {
            if let Some((digest, kind)) = first_missing_ref(&mut tx, m.repo, &refs).await? {
                return Err(MetaError::MissingReference { digest, kind });
            }
        }
        // Everything else goes to the connection as one query (one round
        // trip to its thread), inside the transaction; the blob's state,
        // read last, says whether it may be kept.
        // (sqlx binds `?NNN` wrongly when a statement of a multi-statement
        // query skips a number, so these use plain `?`, bound in order.)
        const MANIFEST: &str = "
            INSERT INTO blobs (digest, size, state, created_at, referenced_at)
            VALUES (?, ?, 'live', ?, ?)
            ON CONFLICT (digest) DO UPDATE SET referenced_at = excluded.referenced_at
              WHERE blobs.state = 'live';
            INSERT INTO repos (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING;
            INSERT INTO manifests (repo, digest, media_type, size, subject, artifact_type,
                                   annotations, created_at, refs_indexed)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)
            ON CONFLICT (repo, digest) DO UPDATE SET refs_indexed = 1;
            INSERT INTO manifest_refs (repo, manifest, digest, size, kind)
            SELECT ?, ?, json_extract(value, '$.d'), json_extract(value, '$.s'),
                   json_extract(value, '$.k')
              FROM json_each(?) WHERE true
            ON CONFLICT (repo, manifest, digest) DO NOTHING;";
        // The tag, and its history: the entry of the digest it pointed to
        // before (if another) closes, and one for this digest opens unless
        // it is already the open one.
        const TAG: &str = "
            INSERT INTO tags (repo, tag, digest, updated_at) VALUES (?, ?, ?, ?)
            ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,
                                                  updated_at = excluded.updated_at;
            UPDATE tag_history SET replaced_at = ?
             WHERE repo = ? AND tag = ? AND replaced_at IS NULL AND digest <> ?;
            INSERT INTO tag_history (repo, tag, digest, pushed_at, replaced_at)
            VALUES (?, ?, ?, ?, NULL) ON CONFLICT DO NOTHING;";
        const STATE: &str = "SELECT state FROM blobs WHERE digest = ?;";
        let sql = match m.tag {
            Some(_) => format!("{MANIFEST}{TAG}{STATE}"),
            None => format!("{MANIFEST}{STATE}"),
        };
        let size = m.record.size as i64;
        let mut query = sqlx::query_scalar::<_, String>(&sql)
            // blobs
            .bind(&digest)
            .bind(size)
            .bind(now)
            .bind(now)
            // repos
            .bind(m.repo)
            .bind(now)
            // manifests
            .bind(m.repo)
            .bind(&digest)
            .bind(&m.record.media_type)
            .bind(size)
            .bind(m.record.subject.as_ref().map(|d| d.to_string()))
            .bind(&m.record.artifact_type)
            .bind(&m.record.annotations)
            .bind(now)
            // manifest_refs
            .bind(m.repo)
            .bind(&digest)
            .bind(&refs);
        if let Some(tag) = m.tag {
            query = query
                .bind(m.repo)
                .bind(tag)
                .bind(&digest)
                .bind(now)
                // history: close the previous entry, open this one
                .bind(now)
                .bind(m.repo)
                .bind(tag)
                .bind(&digest)
                .bind(m.repo)
                .bind(tag)
                .bind(&digest)
                .bind(now);
        }
        query = query.bind(&digest);
        let state = query.fetch_optional(&mut *tx).await?;
        if state.as_deref() != Some("live") {
            // Dropping the transaction undoes the inserts.
            return Err(MetaError::BlobGoing(m.record.digest.clone()));
        }
        tx.commit().await?;
        Ok(())
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
        let now = now_unix();
        sqlx::query(
            "INSERT INTO uploads (id, repo, created_at, updated_at, kind) VALUES (?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(repo)
        .bind(now)
        .bind(now)
        .bind(kind.as_str())
        .execute(&self.writer)
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

    async fn touch_upload(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE uploads SET updated_at = ? WHERE id = ?")
            .bind(now_unix())
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(())
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
}
