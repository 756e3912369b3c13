//! Group commit for the small writes every push makes: a blob's commit
//! (inventory row, repository link, end of its upload session) and the
//! creation of an upload session.
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
use super::{MetaError, Result};

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
}

/// What a write found: for a blob commit, the blob's state (`None` when its
/// row is gone) and whether the repository now links it.
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
                            let _ = answer.send(Ok(outcome));
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

/// A blob commit's statements (see `SqliteMeta::commit_blob`), made once.
static COMMIT_BLOB: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO blobs (digest, size, state, created_at, referenced_at)
         VALUES (?, ?, 'live', ?, ?)
         ON CONFLICT (digest) DO UPDATE SET referenced_at = excluded.referenced_at
           WHERE blobs.state = 'live';
         INSERT INTO blob_content (digest, bytes)
         SELECT d, coalesce(c, x'') FROM (SELECT ? AS d, ? AS c, ? AS keep)
           WHERE keep AND EXISTS (SELECT 1 FROM blobs WHERE digest = d AND state = 'live')
         ON CONFLICT (digest) DO NOTHING;
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

/// The statements of one write; each ends in a `SELECT` giving exactly one
/// row, so that the rows of a group line up with its writes.
fn statements(write: &SmallWrite) -> &'static str {
    match write {
        SmallWrite::CommitBlob { .. } => &COMMIT_BLOB,
        SmallWrite::CreateUpload { .. } => CREATE_UPLOAD,
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
    }
}

/// Runs a group: a lone write as one query (its statements commit as they
/// go, as they always did), several in one transaction.
///
/// Inside the transaction, writes of one kind run in queries of 1, 2, 4, 8,
/// … writes (largest first), so that only a handful of distinct queries
/// exist: sqlx keeps each prepared, and a query text per group size would
/// mean preparing hundreds of statements or keeping them all.
async fn run(pool: &SqlitePool, writes: &[SmallWrite]) -> Result<Vec<Outcome>> {
    if let [write] = writes {
        let rows = query(statements(write), &[write]).fetch_all(pool).await;
        return lined_up(1, rows?);
    }
    let mut outcomes: Vec<Option<Outcome>> = vec![None; writes.len()];
    let mut tx = pool.begin().await?;
    for creates in [true, false] {
        let of_kind: Vec<usize> = (0..writes.len())
            .filter(|&i| matches!(writes[i], SmallWrite::CreateUpload { .. }) == creates)
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
                outcomes[i] = Some(row);
            }
            rest = tail;
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
