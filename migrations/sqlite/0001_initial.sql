-- Trow metadata, version 1. Blob and manifest bytes live in the blob store;
-- this schema records what each repository holds. Text digests are
-- "<algorithm>:<hex>"; times are unix seconds.

CREATE TABLE repos (
    name       TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

-- Blobs a repository may serve: pushed or mounted into it.
CREATE TABLE repo_blobs (
    repo       TEXT NOT NULL,
    digest     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (repo, digest)
) WITHOUT ROWID;
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);

CREATE TABLE manifests (
    repo          TEXT NOT NULL,
    digest        TEXT NOT NULL,
    media_type    TEXT NOT NULL,
    size          INTEGER NOT NULL,
    subject       TEXT,
    artifact_type TEXT,
    annotations   TEXT,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (repo, digest)
) WITHOUT ROWID;
CREATE INDEX manifests_by_subject ON manifests (repo, subject) WHERE subject IS NOT NULL;

CREATE TABLE tags (
    repo       TEXT NOT NULL,
    tag        TEXT NOT NULL,
    digest     TEXT NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (repo, tag)
) WITHOUT ROWID;
CREATE INDEX tags_by_digest ON tags (repo, digest);

CREATE TABLE uploads (
    id         TEXT PRIMARY KEY,
    repo       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
