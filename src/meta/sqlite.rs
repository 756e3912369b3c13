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
    MetaStore, NewManifest, Page, ReclaimRule, RefKind, Result, StorageTotals, UploadKind,
    UploadRecord,
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
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone().pragma("cache_size", WRITER_CACHE_KIB))
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&writer).await?;
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
        })
    }
}

/// Read-only connections (reads run in parallel in WAL mode).
const READERS: u32 = 4;
/// SQLite page cache of the writer and of each reader, as `cache_size`
/// (negative: KiB).
const WRITER_CACHE_KIB: &str = "-2048";
const READER_CACHE_KIB: &str = "-1024";

/// A write transaction on the writer connection.
type WriteTx<'c> = sqlx::Transaction<'c, sqlx::Sqlite>;

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
             ON CONFLICT (repo, digest) DO UPDATE SET cached = MIN(cached, excluded.cached);
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
             ON CONFLICT (repo, digest) DO UPDATE SET cached = 0",
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
        const TAG: &str = "
            INSERT INTO tags (repo, tag, digest, updated_at) VALUES (?, ?, ?, ?)
            ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,
                                                  updated_at = excluded.updated_at;";
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
            query = query.bind(m.repo).bind(tag).bind(&digest).bind(now);
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
        for sql in [
            "DELETE FROM tags WHERE repo = ? AND digest = ?",
            "DELETE FROM manifest_refs WHERE repo = ? AND manifest = ?",
        ] {
            sqlx::query(sql)
                .bind(repo)
                .bind(&digest)
                .execute(&mut *tx)
                .await?;
        }
        drop_repo_if_empty(&mut tx, repo).await?;
        tx.commit().await?;
        Ok(done.rows_affected() > 0)
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM tags WHERE repo = ? AND tag = ?")
            .bind(repo)
            .bind(tag)
            .execute(&self.writer)
            .await?;
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

    async fn condemn_blob(&self, digest: &Digest, rule: ReclaimRule) -> Result<Option<u64>> {
        let digest = digest.to_string();
        let mut tx = self.writer.begin().await?;
        match rule {
            ReclaimRule::CacheEviction => {
                let repos: Vec<String> = sqlx::query_scalar(
                    "DELETE FROM repo_blobs WHERE digest = ? AND cached = 1 RETURNING repo",
                )
                .bind(&digest)
                .fetch_all(&mut *tx)
                .await?;
                for repo in repos {
                    drop_repo_if_empty(&mut tx, &repo).await?;
                }
                sqlx::query("DELETE FROM cache_blobs WHERE digest = ?")
                    .bind(&digest)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        // Anything left that needs the bytes: a link of any repository, or a
        // manifest stored under this digest (manifests share the namespace).
        let size: Option<i64> = sqlx::query_scalar(
            "UPDATE blobs SET state = 'deleting'
             WHERE digest = ? AND state = 'live'
               AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE digest = blobs.digest)
               AND NOT EXISTS (SELECT 1 FROM manifests WHERE digest = blobs.digest)
             RETURNING size",
        )
        .bind(&digest)
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(size.map(|s| s.max(0) as u64))
    }

    async fn forget_blob(&self, digest: &Digest) -> Result<()> {
        sqlx::query("DELETE FROM blobs WHERE digest = ? AND state = 'deleting'")
            .bind(digest.to_string())
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
