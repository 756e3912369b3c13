//! The embedded metadata store: one SQLite file in WAL mode.
//!
//! Writes go through a pool of exactly one connection, so they queue in our
//! process instead of failing with `SQLITE_BUSY`; reads use a separate pool
//! and never wait for writers (WAL). `synchronous=NORMAL` keeps every
//! committed transaction across a process crash (`kill -9`); only an OS crash
//! can lose the last few, and those refer to blobs that were fsynced first.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;

use super::{
    now_unix, ManifestRecord, MetaError, MetaStore, NewManifest, Page, Result, UploadRecord,
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
    pub async fn open(path: &Path) -> Result<Self> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
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
        Ok(SqliteMeta { reader, writer })
    }
}

/// Read-only connections (reads run in parallel in WAL mode).
const READERS: u32 = 4;
/// SQLite page cache of the writer and of each reader, as `cache_size`
/// (negative: KiB).
const WRITER_CACHE_KIB: &str = "-2048";
const READER_CACHE_KIB: &str = "-1024";

impl SqliteMeta {
    /// Of `digests`, those without a row for `repo` in `table` (a table with
    /// `repo` and `digest` columns), in one query whatever their number.
    async fn missing_in(
        &self,
        table: &'static str,
        repo: &str,
        digests: &[Digest],
    ) -> Result<Vec<Digest>> {
        if digests.is_empty() {
            return Ok(Vec::new());
        }
        let missing: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT value FROM json_each(?) WHERE value NOT IN
               (SELECT digest FROM {table} WHERE repo = ?)"
        ))
        .bind(digests_json(digests))
        .bind(repo)
        .fetch_all(&self.reader)
        .await?;
        missing.iter().map(|d| parse_digest(d)).collect()
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

fn digests_json(digests: &[Digest]) -> String {
    serde_json::to_string(&digests.iter().map(|d| d.to_string()).collect::<Vec<_>>())
        .unwrap_or_else(|_| "[]".to_string())
}

#[async_trait]
impl MetaStore for SqliteMeta {
    async fn link_blob(&self, repo: &str, digest: &Digest, size: u64) -> Result<()> {
        sqlx::query(
            "INSERT INTO repo_blobs (repo, digest, size, created_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (repo, digest) DO NOTHING",
        )
        .bind(repo)
        .bind(digest.to_string())
        .bind(size as i64)
        .bind(now_unix())
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn linked_blob(&self, repo: &str, digest: &Digest) -> Result<Option<u64>> {
        let size: Option<i64> =
            sqlx::query_scalar("SELECT size FROM repo_blobs WHERE repo = ? AND digest = ?")
                .bind(repo)
                .bind(digest.to_string())
                .fetch_optional(&self.reader)
                .await?;
        Ok(size.map(|s| s as u64))
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> Result<bool> {
        let done = sqlx::query("DELETE FROM repo_blobs WHERE repo = ? AND digest = ?")
            .bind(repo)
            .bind(digest.to_string())
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn repos_with_blob(&self, digest: &Digest) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT repo FROM repo_blobs WHERE digest = ? ORDER BY repo LIMIT 100",
        )
        .bind(digest.to_string())
        .fetch_all(&self.reader)
        .await?)
    }

    async fn missing_blobs(&self, repo: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.missing_in("repo_blobs", repo, digests).await
    }

    async fn missing_manifests(&self, repo: &str, digests: &[Digest]) -> Result<Vec<Digest>> {
        self.missing_in("manifests", repo, digests).await
    }

    async fn put_manifest(&self, m: NewManifest<'_>) -> Result<()> {
        const REPO_AND_MANIFEST: &str =
            "INSERT INTO repos (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING;
             INSERT INTO manifests (repo, digest, media_type, size, subject, artifact_type, annotations, created_at)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)
             ON CONFLICT (repo, digest) DO NOTHING;";
        const TAG: &str = "INSERT INTO tags (repo, tag, digest, updated_at) VALUES (?, ?, ?, ?)
             ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest, updated_at = excluded.updated_at";
        let now = now_unix();
        let digest = m.record.digest.to_string();
        // The statements go to the connection as one query (one round trip
        // to its thread), inside one transaction.
        let sql = match m.tag {
            Some(_) => format!("{REPO_AND_MANIFEST}\n{TAG}"),
            None => REPO_AND_MANIFEST.to_string(),
        };
        let mut query = sqlx::query(&sql)
            .bind(m.repo)
            .bind(now)
            .bind(m.repo)
            .bind(&digest)
            .bind(&m.record.media_type)
            .bind(m.record.size as i64)
            .bind(m.record.subject.as_ref().map(|d| d.to_string()))
            .bind(&m.record.artifact_type)
            .bind(&m.record.annotations)
            .bind(now);
        if let Some(tag) = m.tag {
            query = query.bind(m.repo).bind(tag).bind(&digest).bind(now);
        }
        let mut tx = self.writer.begin().await?;
        query.execute(&mut *tx).await?;
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
        sqlx::query("DELETE FROM tags WHERE repo = ? AND digest = ?")
            .bind(repo)
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
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
               (SELECT digest FROM repo_blobs WHERE repo NOT LIKE 'f/%')",
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

    async fn evict_cache_blob(&self, digest: &Digest) -> Result<bool> {
        let digest = digest.to_string();
        let mut tx = self.writer.begin().await?;
        sqlx::query("DELETE FROM repo_blobs WHERE digest = ? AND repo LIKE 'f/%'")
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM cache_blobs WHERE digest = ?")
            .bind(&digest)
            .execute(&mut *tx)
            .await?;
        let still_used: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM repo_blobs WHERE digest = ? LIMIT 1")
                .bind(&digest)
                .fetch_optional(&mut *tx)
                .await?;
        tx.commit().await?;
        Ok(still_used.is_some())
    }

    async fn create_upload(&self, id: &str, repo: &str) -> Result<()> {
        let now = now_unix();
        sqlx::query("INSERT INTO uploads (id, repo, created_at, updated_at) VALUES (?, ?, ?, ?)")
            .bind(id)
            .bind(repo)
            .bind(now)
            .bind(now)
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
        Ok(row.map(|(id, repo, updated_at)| UploadRecord {
            id,
            repo,
            updated_at,
        }))
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

    async fn stale_uploads(&self, before: i64) -> Result<Vec<UploadRecord>> {
        let rows: Vec<(String, String, i64)> =
            sqlx::query_as("SELECT id, repo, updated_at FROM uploads WHERE updated_at < ?")
                .bind(before)
                .fetch_all(&self.reader)
                .await?;
        Ok(rows
            .into_iter()
            .map(|(id, repo, updated_at)| UploadRecord {
                id,
                repo,
                updated_at,
            })
            .collect())
    }
}
