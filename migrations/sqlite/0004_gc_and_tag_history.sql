-- Garbage collection and retention.
--
-- Tag history: every digest a tag pointed to, from when until when
-- (replaced_at is NULL while the tag still points there), so that an
-- operator can answer "what was app:prod yesterday?" and the garbage
-- collector can tell how long a manifest has been untagged.
CREATE TABLE tag_history (
    repo        TEXT NOT NULL,
    tag         TEXT NOT NULL,
    digest      TEXT NOT NULL,
    pushed_at   INTEGER NOT NULL,
    replaced_at INTEGER
);
CREATE INDEX tag_history_by_tag ON tag_history (repo, tag, pushed_at);
CREATE INDEX tag_history_by_digest ON tag_history (repo, digest);
CREATE INDEX tag_history_closed ON tag_history (replaced_at) WHERE replaced_at IS NOT NULL;
-- At most one open entry per tag.
CREATE UNIQUE INDEX tag_history_open ON tag_history (repo, tag) WHERE replaced_at IS NULL;
INSERT INTO tag_history (repo, tag, digest, pushed_at, replaced_at)
SELECT repo, tag, digest, updated_at, NULL FROM tags;

-- A digest stored as a manifest in any repository keeps its bytes: the
-- removal checks look manifests up by digest.
CREATE INDEX manifests_by_digest ON manifests (digest);
-- The collector walks the inventory by digest among old enough rows.
CREATE INDEX blobs_live_by_referenced ON blobs (referenced_at) WHERE state = 'live';
