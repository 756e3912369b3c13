-- Reference safety: one inventory row per stored digest (blob or manifest
-- bytes) with a lifecycle state, the descriptors each manifest refers to,
-- links marked by who made them, and upload sessions marked by kind.
--
-- A blob file is removed only after its row has been marked 'deleting' in
-- the same transaction that found it unreferenced; the row goes once the
-- file is gone. A row still 'deleting' at start-up names a file whose
-- removal was interrupted: it is finished before serving.
CREATE TABLE blobs (
    digest        TEXT PRIMARY KEY,
    size          INTEGER NOT NULL,
    state         TEXT NOT NULL DEFAULT 'live' CHECK (state IN ('live', 'deleting')),
    created_at    INTEGER NOT NULL,
    -- Last push, mount or link of this digest: the garbage collector's
    -- grace period runs from here.
    referenced_at INTEGER NOT NULL
) WITHOUT ROWID;

INSERT INTO blobs (digest, size, state, created_at, referenced_at)
SELECT digest, MAX(size), 'live', MIN(created_at), MAX(created_at)
FROM (SELECT digest, size, created_at FROM repo_blobs
      UNION ALL
      SELECT digest, size, created_at FROM manifests)
GROUP BY digest;

-- Links made by the pull-through cache (cached = 1) are the cache's own:
-- eviction drops them. Data written before this version named cache
-- repositories only by their `f/` prefix; this converts it once.
ALTER TABLE repo_blobs ADD COLUMN cached INTEGER NOT NULL DEFAULT 0;
UPDATE repo_blobs SET cached = 1 WHERE repo LIKE 'f/%';

-- What each manifest refers to: its config and layers (kind 'blob') or,
-- for an index, its child manifests (kind 'manifest'), with the sizes its
-- descriptors state.
CREATE TABLE manifest_refs (
    repo     TEXT NOT NULL,
    manifest TEXT NOT NULL,
    digest   TEXT NOT NULL,
    size     INTEGER NOT NULL,
    kind     TEXT NOT NULL CHECK (kind IN ('blob', 'manifest')),
    PRIMARY KEY (repo, manifest, digest)
) WITHOUT ROWID;
CREATE INDEX manifest_refs_by_digest ON manifest_refs (digest);
CREATE INDEX manifest_refs_by_repo_digest ON manifest_refs (repo, digest);

-- Manifests stored before this version have no manifest_refs rows yet;
-- they are indexed from their bytes at start-up.
ALTER TABLE manifests ADD COLUMN refs_indexed INTEGER NOT NULL DEFAULT 0;
CREATE INDEX manifests_unindexed ON manifests (refs_indexed) WHERE refs_indexed = 0;

-- 'client' uploads come from the API; 'cache' ones are the pull-through
-- cache's downloads, which cannot resume after a restart.
ALTER TABLE uploads ADD COLUMN kind TEXT NOT NULL DEFAULT 'client';
CREATE INDEX uploads_by_updated ON uploads (updated_at);

-- A repository leaves the catalog once it holds no manifest and no blob.
DELETE FROM repos
WHERE NOT EXISTS (SELECT 1 FROM manifests m WHERE m.repo = repos.name)
  AND NOT EXISTS (SELECT 1 FROM repo_blobs b WHERE b.repo = repos.name);
