//! Group commit for the small writes every push makes: a blob's commit
//! (inventory row, repository link, end of its upload session, and the
//! bytes of a small blob), the creation of an upload session, and a
//! manifest (its bytes, record, references and tag).
//!
//! All writes go through SQLite's one writer connection, one after another.
//! When many pushes finish at once, each used to be its own round trip to
//! the connection's thread and its own write transactions (a WAL append and
//! lock cycle per statement). Here the writes that arrive while the writer
//! is busy wait in a queue, and the next turn runs all of them (up to
//! [`MAX_BATCH`]) inside one transaction, as a few multi-statement queries
//! (see [`run`]): a round trip per query instead of per write, and one
//! commit for the group. A write is answered only after
//! the transaction holding it committed, so an acknowledgement means what
//! it meant before. Nothing waits on purpose: a lone write runs at once, as
//! before, and groups form only from writes that would have queued anyway.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::sync::LazyLock;

use sqlx::sqlite::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::sqlite::WITHIN_QUOTA;
use super::{MetaError, RefKind, Result};

/// Writes run together at most.
const MAX_BATCH: usize = 64;
/// Writes waiting for their turn at most; callers wait beyond that.
const QUEUE: usize = 1024;

/// One write of the group.
pub(super) enum SmallWrite {
    /// A blob's bytes are committed: see `SqliteMeta::commit_blob`.
    CommitBlob {
        digest: String,
        size: i64,
        repo: String,
        upload: Option<String>,
        cached: i64,
        now: i64,
        /// A small blob's bytes, kept in the database (`None`: in a file).
        content: Option<bytes::Bytes>,
    },
    /// A new upload session.
    CreateUpload {
        id: String,
        repo: String,
        kind: &'static str,
        now: i64,
    },
    /// A manifest: see `SqliteMeta::put_manifest`.
    PutManifest(Box<ManifestWrite>),
}

/// A manifest's record, references, tag and bytes, as the statements of
/// [`manifest_sql`] bind them.
pub(super) struct ManifestWrite {
    pub repo: String,
    pub digest: String,
    pub media_type: String,
    pub size: i64,
    pub subject: Option<String>,
    pub artifact_type: Option<String>,
    pub annotations: Option<String>,
    /// The references as `refs_json` gives them.
    pub refs: String,
    /// Check, in the manifest's own transaction, that every reference is
    /// in the repository; a manifest naming one that is not is undone.
    pub check_refs: bool,
    pub tag: Option<String>,
    pub content: Option<bytes::Bytes>,
    pub now: i64,
}

/// What a write found: for a blob commit, the blob's state (`None` when its
/// row is gone) and whether the repository now links it; for a manifest,
/// the state of its bytes' row and whether the manifest is now stored.
pub(super) type Outcome = (Option<String>, bool);

struct Queued {
    write: SmallWrite,
    answer: oneshot::Sender<Result<Outcome>>,
}

/// The queue in front of the writer connection.
pub(super) struct GroupCommit {
    queue: mpsc::Sender<Queued>,
    /// Groups run so far (tests check that writes arriving together share).
    #[cfg_attr(not(test), allow(dead_code))]
    groups: Arc<AtomicU64>,
}

impl GroupCommit {
    /// Starts the task that runs the groups on `writer`; it ends when the
    /// `GroupCommit` is dropped and the queue is empty.
    pub(super) fn start(writer: SqlitePool) -> Self {
        let (queue, mut rx) = mpsc::channel::<Queued>(QUEUE);
        let groups = Arc::new(AtomicU64::new(0));
        let counted = groups.clone();
        tokio::spawn(async move {
            let mut group = Vec::with_capacity(MAX_BATCH);
            while rx.recv_many(&mut group, MAX_BATCH).await > 0 {
                counted.fetch_add(1, Ordering::Relaxed);
                let (writes, answers): (Vec<_>, Vec<_>) =
                    group.drain(..).map(|q| (q.write, q.answer)).unzip();
                match run(&writer, &writes).await {
                    Ok(outcomes) => {
                        for (answer, outcome) in answers.into_iter().zip(outcomes) {
                            let _ = answer.send(outcome);
                        }
                    }
                    Err(e) => {
                        // Nothing of the group committed: every write in it
                        // fails with the same cause.
                        let cause = e.to_string();
                        for answer in answers {
                            let _ = answer.send(Err(MetaError::Database(cause.clone().into())));
                        }
                    }
                }
            }
        });
        GroupCommit { queue, groups }
    }

    /// Groups run so far.
    #[cfg_attr(not(test), allow(dead_code))]
    pub(super) fn groups(&self) -> u64 {
        self.groups.load(Ordering::Relaxed)
    }

    /// Runs `write` in the next group and returns once that group committed.
    pub(super) async fn write(&self, write: SmallWrite) -> Result<Outcome> {
        let (answer, answered) = oneshot::channel();
        let stopped = || MetaError::Database("the metadata writer has stopped".into());
        self.queue
            .send(Queued { write, answer })
            .await
            .map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

/// The digest's inventory row, created or refreshed unless its removal is
/// under way, and its bytes when the database keeps them: the start of a
/// blob commit and of a manifest. Binds: digest, size, now, now, digest,
/// bytes (an empty slice binds as NULL), whether there are bytes.
const KEEP_BYTES: &str = "INSERT INTO blobs (digest, size, state, created_at, referenced_at)
         VALUES (?, ?, 'live', ?, ?)
         ON CONFLICT (digest) DO UPDATE SET referenced_at = excluded.referenced_at
           WHERE blobs.state = 'live';
         INSERT INTO blob_content (digest, bytes)
         SELECT d, coalesce(c, x'') FROM (SELECT ? AS d, ? AS c, ? AS keep)
           WHERE keep AND EXISTS (SELECT 1 FROM blobs WHERE digest = d AND state = 'live')
         ON CONFLICT (digest) DO NOTHING;";

/// A blob commit's statements (see `SqliteMeta::commit_blob`), made once.
static COMMIT_BLOB: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{KEEP_BYTES}
         INSERT INTO repo_blobs (repo, digest, size, created_at, cached)
         SELECT ?, ?, ?, ?, ?
           WHERE EXISTS (SELECT 1 FROM blobs WHERE digest = ? AND state = 'live')
             AND {WITHIN_QUOTA}
         ON CONFLICT (repo, digest) DO UPDATE SET cached = MIN(cached, excluded.cached),
                                                  created_at = excluded.created_at;
         DELETE FROM uploads WHERE id = ?;
         SELECT (SELECT state FROM blobs WHERE digest = ?),
                EXISTS (SELECT 1 FROM repo_blobs WHERE repo = ? AND digest = ?);"
    )
});

const CREATE_UPLOAD: &str =
    "INSERT INTO uploads (id, repo, created_at, updated_at, kind) VALUES (?, ?, ?, ?, ?);
     SELECT NULL, 1;";

/// The statements of one blob commit or upload creation; each ends in a
/// `SELECT` giving exactly one row, so that the rows of a group line up
/// with its writes. (Manifests run one by one: see [`put_manifest`].)
fn statements(write: &SmallWrite) -> &'static str {
    match write {
        SmallWrite::CommitBlob { .. } => &COMMIT_BLOB,
        SmallWrite::CreateUpload { .. } | SmallWrite::PutManifest(_) => CREATE_UPLOAD,
    }
}

/// Binds a write's parameters, in the order of [`statements`].
/// (sqlx binds `?NNN` wrongly across the statements of one query, so these
/// are plain `?`, bound in order.)
fn bind<'q>(query: OutcomeQuery<'q>, write: &'q SmallWrite) -> OutcomeQuery<'q> {
    match write {
        SmallWrite::CommitBlob {
            digest,
            size,
            repo,
            upload,
            cached,
            now,
            content,
        } => query
            .bind(digest)
            .bind(size)
            .bind(now)
            .bind(now)
            .bind(digest)
            // An empty blob's bytes bind as NULL: `keep` says there are bytes.
            .bind(content.as_deref())
            .bind(content.is_some())
            .bind(repo)
            .bind(digest)
            .bind(size)
            .bind(now)
            .bind(cached)
            .bind(digest)
            .bind(size)
            .bind(repo)
            .bind(digest)
            .bind(upload)
            .bind(digest)
            .bind(repo)
            .bind(digest),
        SmallWrite::CreateUpload {
            id,
            repo,
            kind,
            now,
        } => query.bind(id).bind(repo).bind(now).bind(now).bind(*kind),
        SmallWrite::PutManifest(_) => query,
    }
}

/// Runs a group: a lone blob commit or upload creation as one query (its
/// statements commit as they go, as they always did), anything else in one
/// transaction. Returns each write's own result; an error for the whole
/// group means none of it committed.
///
/// Inside the transaction, upload creations, then blob commits run in
/// queries of 1, 2, 4, 8, … writes of one kind (largest first), so that
/// only a handful of distinct queries exist: sqlx keeps each prepared, and
/// a query text per group size would mean preparing hundreds of statements
/// or keeping them all. Manifests come last (they may refer to the blobs
/// committed before them), one by one, each behind a savepoint so that one
/// refused by its references, a quota or a removal under way is undone
/// alone.
async fn run(pool: &SqlitePool, writes: &[SmallWrite]) -> Result<Vec<Result<Outcome>>> {
    if let [write] = writes {
        if !matches!(write, SmallWrite::PutManifest(_)) {
            let rows = query(statements(write), &[write]).fetch_all(pool).await;
            return Ok(lined_up(1, rows?)?.into_iter().map(Ok).collect());
        }
    }
    let mut outcomes: Vec<Option<Result<Outcome>>> = (0..writes.len()).map(|_| None).collect();
    let mut tx = pool.begin().await?;
    for creates in [true, false] {
        let of_kind: Vec<usize> = (0..writes.len())
            .filter(|&i| match writes[i] {
                SmallWrite::CreateUpload { .. } => creates,
                SmallWrite::CommitBlob { .. } => !creates,
                SmallWrite::PutManifest(_) => false,
            })
            .collect();
        let mut rest = &of_kind[..];
        while !rest.is_empty() {
            let n = 1 << rest.len().ilog2();
            let (chunk, tail) = rest.split_at(n);
            let chunk_writes: Vec<&SmallWrite> = chunk.iter().map(|&i| &writes[i]).collect();
            // One kind per query, so the text is one write's, n times.
            let sql = statements(chunk_writes[0]).repeat(n);
            let rows = query(&sql, &chunk_writes).fetch_all(&mut *tx).await?;
            for (&i, row) in chunk.iter().zip(lined_up(n, rows)?) {
                outcomes[i] = Some(Ok(row));
            }
            rest = tail;
        }
    }
    let mut first = true;
    for (i, write) in writes.iter().enumerate() {
        if let SmallWrite::PutManifest(m) = write {
            outcomes[i] = Some(put_manifest(&mut tx, m, !first).await?);
            first = false;
        }
    }
    tx.commit().await?;
    outcomes
        .into_iter()
        .map(|o| o.ok_or_else(|| MetaError::Corrupt("a write of a group gave no result".into())))
        .collect()
}

type OutcomeQuery<'q> =
    sqlx::query::QueryAs<'q, sqlx::Sqlite, Outcome, sqlx::sqlite::SqliteArguments<'q>>;

/// `sql` (the writes' [`statements`], back to back) with their parameters.
fn query<'q>(sql: &'q str, writes: &[&'q SmallWrite]) -> OutcomeQuery<'q> {
    let mut query = sqlx::query_as::<_, Outcome>(sql);
    for write in writes {
        query = bind(query, write);
    }
    query
}

/// Checks that a query gave one row per write.
fn lined_up(writes: usize, rows: Vec<Outcome>) -> Result<Vec<Outcome>> {
    if rows.len() != writes {
        return Err(MetaError::Corrupt(format!(
            "a group of {writes} writes gave {} results",
            rows.len()
        )));
    }
    Ok(rows)
}

/// A manifest's statements, each variant made once: indexed by
/// [`manifest_sql_variant`] (whether the savepoint of the manifest before it
/// is released first, and whether there is a tag).
static MANIFEST_SQL: LazyLock<[String; 4]> = LazyLock::new(|| {
    // The digest's inventory row and bytes, the repository, the manifest
    // (within the repository's quotas) and its references.
    // (sqlx binds `?NNN` wrongly when a statement of a multi-statement
    // query skips a number, so these use plain `?`, bound in order.)
    let manifest = format!(
        "{KEEP_BYTES}
         INSERT INTO repos (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING;
         INSERT INTO manifests (repo, digest, media_type, size, subject, artifact_type,
                                annotations, created_at, refs_indexed)
         SELECT ?, ?, ?, ?, ?, ?, ?, ?, 1 WHERE {WITHIN_QUOTA}
         ON CONFLICT (repo, digest) DO UPDATE SET refs_indexed = 1;
         INSERT INTO manifest_refs (repo, manifest, digest, size, kind)
         SELECT ?, ?, json_extract(value, '$.d'), json_extract(value, '$.s'),
                json_extract(value, '$.k')
           FROM json_each(?) WHERE true
         ON CONFLICT (repo, manifest, digest) DO NOTHING;"
    );
    // The tag, and its history: the entry of the digest it pointed to
    // before (if another) closes, and one for this digest opens unless it
    // is already the open one.
    const TAG: &str = "
         INSERT INTO tags (repo, tag, digest, updated_at) VALUES (?, ?, ?, ?)
         ON CONFLICT (repo, tag) DO UPDATE SET digest = excluded.digest,
                                               updated_at = excluded.updated_at;
         UPDATE tag_history SET replaced_at = ?
          WHERE repo = ? AND tag = ? AND replaced_at IS NULL AND digest <> ?;
         INSERT INTO tag_history (repo, tag, digest, pushed_at, replaced_at)
         VALUES (?, ?, ?, ?, NULL) ON CONFLICT DO NOTHING;";
    // Whether the bytes may be kept, whether the manifest is there (a quota
    // may have refused it), and the first reference the repository does
    // not hold (read after the inserts, which add no link or manifest a
    // reference could name, so the answer is the one before them; a
    // manifest naming one is then undone). Folded into the manifest's
    // query so that a manifest kept costs one round trip to the writer,
    // not two; throughput did not change measurably (docs/PERFORMANCE.md).
    let state = format!(
        "
         SELECT b.state, EXISTS (SELECT 1 FROM manifests WHERE repo = ? AND digest = ?),
                missing.d, missing.k
           FROM blobs b LEFT JOIN ({FIRST_MISSING_REF}) missing ON true
          WHERE b.digest = ?;"
    );
    let variant = |release_previous: bool, tag: &str| {
        format!("{}{manifest}{tag}{state}", savepoint(release_previous))
    };
    [
        variant(false, ""),
        variant(false, TAG),
        variant(true, ""),
        variant(true, TAG),
    ]
});

/// Which of [`MANIFEST_SQL`] a manifest runs.
fn manifest_sql_variant(release_previous: bool, tagged: bool) -> usize {
    usize::from(release_previous) * 2 + usize::from(tagged)
}

/// The statements that start a manifest's savepoint, releasing the one of
/// the manifest before it in the group first: releasing the outermost
/// savepoint lets SQLite drop its sub-journal (the pages' contents before
/// the savepoint, kept in memory: `temp_store=MEMORY`), so it holds one
/// manifest's pages, never a whole group's.
fn savepoint(release_previous: bool) -> &'static str {
    if release_previous {
        "RELEASE manifest; SAVEPOINT manifest;"
    } else {
        "SAVEPOINT manifest;"
    }
}

/// The first of a manifest's references the repository does not hold (a
/// blob not linked, a child manifest not stored), read inside the writer's
/// transaction so that the answer holds until it commits (a subquery of the
/// manifest's statements, which end with it). Each reference
/// is one primary-key lookup (`NOT EXISTS`): a `NOT IN (SELECT ...)` list
/// would be built from every link or manifest of the repository, on every
/// push.
pub(super) const FIRST_MISSING_REF: &str = "
    SELECT d, k FROM (SELECT json_extract(value, '$.d') AS d, json_extract(value, '$.k') AS k
                        FROM json_each(?))
     WHERE (k = 'blob'
            AND NOT EXISTS (SELECT 1 FROM repo_blobs WHERE repo = ? AND digest = d))
        OR (k = 'manifest'
            AND NOT EXISTS (SELECT 1 FROM manifests WHERE repo = ? AND digest = d))
     LIMIT 1";

/// Records one manifest of a group inside its transaction, behind a
/// savepoint: a manifest that names something the repository does not
/// hold, or whose bytes are being removed, or that a quota refuses, is
/// undone (`ROLLBACK TO`) and the rest of the group goes on. A manifest
/// kept is one query: its savepoint is released by the next manifest's
/// query, or by the commit.
async fn put_manifest(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    m: &ManifestWrite,
    release_previous: bool,
) -> Result<Result<Outcome>> {
    let sql = &MANIFEST_SQL[manifest_sql_variant(release_previous, m.tag.is_some())];
    let mut query = sqlx::query_as::<_, ManifestOutcome>(sql)
        // blobs
        .bind(&m.digest)
        .bind(m.size)
        .bind(m.now)
        .bind(m.now)
        // blob_content (an empty slice binds as NULL: `keep` says there are bytes)
        .bind(&m.digest)
        .bind(m.content.as_deref())
        .bind(m.content.is_some())
        // repos
        .bind(&m.repo)
        .bind(m.now)
        // manifests
        .bind(&m.repo)
        .bind(&m.digest)
        .bind(&m.media_type)
        .bind(m.size)
        .bind(&m.subject)
        .bind(&m.artifact_type)
        .bind(&m.annotations)
        .bind(m.now)
        .bind(m.size)
        .bind(&m.repo)
        .bind(&m.digest)
        // manifest_refs
        .bind(&m.repo)
        .bind(&m.digest)
        .bind(&m.refs);
    if let Some(tag) = &m.tag {
        query = query
            .bind(&m.repo)
            .bind(tag)
            .bind(&m.digest)
            .bind(m.now)
            // history: close the previous entry, open this one
            .bind(m.now)
            .bind(&m.repo)
            .bind(tag)
            .bind(&m.digest)
            .bind(&m.repo)
            .bind(tag)
            .bind(&m.digest)
            .bind(m.now);
    }
    // A cached manifest's references need not be there: none is looked up.
    let refs_to_check = if m.check_refs { m.refs.as_str() } else { "[]" };
    query = query
        .bind(&m.repo)
        .bind(&m.digest)
        .bind(refs_to_check)
        .bind(&m.repo)
        .bind(&m.repo)
        .bind(&m.digest);
    let outcome = query.fetch_optional(&mut **tx).await?;
    let missing = match &outcome {
        Some((_, _, Some(digest), Some(kind))) => Some(missing_reference(digest, kind)?),
        _ => None,
    };
    let kept = missing.is_none() && matches!(&outcome, Some((state, true, ..)) if state == "live");
    if !kept {
        sqlx::query("ROLLBACK TO manifest")
            .execute(&mut **tx)
            .await?;
    }
    if let Some(missing) = missing {
        return Ok(Err(missing));
    }
    Ok(Ok(match outcome {
        Some((state, stored, ..)) => (Some(state), stored),
        None => (None, false),
    }))
}

/// A manifest's statements give the digest's state, whether the manifest
/// row is there, and the digest and kind of the first reference missing.
type ManifestOutcome = (String, bool, Option<String>, Option<String>);

/// The error for a reference the repository does not hold.
fn missing_reference(digest: &str, kind: &str) -> Result<MetaError> {
    let digest = digest
        .parse()
        .map_err(|e| MetaError::Corrupt(format!("reference `{digest}`: {e}")))?;
    let kind = if kind == RefKind::Manifest.as_str() {
        RefKind::Manifest
    } else {
        RefKind::Blob
    };
    Ok(MetaError::MissingReference { digest, kind })
}
