-- Storage quotas (the `quotas` section of the configuration file).
--
-- Each quota rule with a `max_size` is a scope: the repositories matching
-- one of its include patterns and none of its exclude patterns (the
-- registry excludes the pull-through cache's `f/` repositories). A scope's
-- usage is the size of every distinct digest linked into (repo_blobs) or
-- stored as a manifest in (manifests) one of its repositories: a layer
-- shared by two repositories of one scope counts once, a layer in two
-- scopes counts in each.
--
-- The counters are kept by the triggers below, in the same transaction as
-- the insert or delete of a link or manifest, whatever code runs it (a
-- push, a delete, cache eviction, the garbage collector). The scopes
-- themselves come from the configuration: the registry writes them at
-- start-up and, when their patterns changed, recomputes the counters from
-- repo_blobs and manifests (MetaStore::set_quotas). Without scopes the
-- triggers do nothing.
--
-- Invariant: for every scope s,
--   quota_digests(s) = the distinct digests of the links and manifests of
--                      s's repositories, refs = how many links and
--                      manifests hold each one there;
--   quota_scopes.used = SUM(quota_digests.size) over s.
CREATE TABLE quota_scopes (
    id       INTEGER PRIMARY KEY,
    max_size INTEGER NOT NULL,
    used     INTEGER NOT NULL DEFAULT 0
);

-- Patterns as GLOB patterns (`team-a/*`; an exact name with `[`, `*` and
-- `?` escaped). A repository is in a scope when it matches a pattern with
-- exclude = 0 and none with exclude = 1, i.e. when
--   (SELECT MAX(exclude) FROM quota_patterns WHERE scope = s AND repo GLOB glob) = 0
CREATE TABLE quota_patterns (
    scope   INTEGER NOT NULL,
    glob    TEXT NOT NULL,
    exclude INTEGER NOT NULL CHECK (exclude IN (0, 1)),
    PRIMARY KEY (scope, glob, exclude)
) WITHOUT ROWID;

CREATE TABLE quota_digests (
    scope  INTEGER NOT NULL,
    digest TEXT NOT NULL,
    size   INTEGER NOT NULL,
    refs   INTEGER NOT NULL,
    PRIMARY KEY (scope, digest)
) WITHOUT ROWID;

-- A link or manifest arrives: the scopes of its repository that did not
-- hold the digest grow by its size; each counts one more holder.
CREATE TRIGGER quota_link_added AFTER INSERT ON repo_blobs
WHEN EXISTS (SELECT 1 FROM quota_scopes)
BEGIN
    UPDATE quota_scopes SET used = used + NEW.size
     WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
             WHERE p.scope = quota_scopes.id AND NEW.repo GLOB p.glob) = 0
       AND NOT EXISTS (SELECT 1 FROM quota_digests d
                        WHERE d.scope = quota_scopes.id AND d.digest = NEW.digest);
    INSERT INTO quota_digests (scope, digest, size, refs)
    SELECT s.id, NEW.digest, NEW.size, 1 FROM quota_scopes s
     WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
             WHERE p.scope = s.id AND NEW.repo GLOB p.glob) = 0
    ON CONFLICT (scope, digest) DO UPDATE SET refs = refs + 1;
END;

CREATE TRIGGER quota_manifest_added AFTER INSERT ON manifests
WHEN EXISTS (SELECT 1 FROM quota_scopes)
BEGIN
    UPDATE quota_scopes SET used = used + NEW.size
     WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
             WHERE p.scope = quota_scopes.id AND NEW.repo GLOB p.glob) = 0
       AND NOT EXISTS (SELECT 1 FROM quota_digests d
                        WHERE d.scope = quota_scopes.id AND d.digest = NEW.digest);
    INSERT INTO quota_digests (scope, digest, size, refs)
    SELECT s.id, NEW.digest, NEW.size, 1 FROM quota_scopes s
     WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
             WHERE p.scope = s.id AND NEW.repo GLOB p.glob) = 0
    ON CONFLICT (scope, digest) DO UPDATE SET refs = refs + 1;
END;

-- A link or manifest goes: its scopes count one holder less; a scope left
-- with none shrinks by the digest's size.
CREATE TRIGGER quota_link_removed AFTER DELETE ON repo_blobs
WHEN EXISTS (SELECT 1 FROM quota_scopes)
BEGIN
    UPDATE quota_digests SET refs = refs - 1
     WHERE digest = OLD.digest
       AND scope IN (SELECT s.id FROM quota_scopes s
                      WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
                              WHERE p.scope = s.id AND OLD.repo GLOB p.glob) = 0);
    UPDATE quota_scopes
       SET used = used - (SELECT d.size FROM quota_digests d
                           WHERE d.scope = quota_scopes.id AND d.digest = OLD.digest)
     WHERE EXISTS (SELECT 1 FROM quota_digests d
                    WHERE d.scope = quota_scopes.id AND d.digest = OLD.digest AND d.refs <= 0);
    DELETE FROM quota_digests
     WHERE scope IN (SELECT id FROM quota_scopes) AND digest = OLD.digest AND refs <= 0;
END;

CREATE TRIGGER quota_manifest_removed AFTER DELETE ON manifests
WHEN EXISTS (SELECT 1 FROM quota_scopes)
BEGIN
    UPDATE quota_digests SET refs = refs - 1
     WHERE digest = OLD.digest
       AND scope IN (SELECT s.id FROM quota_scopes s
                      WHERE (SELECT MAX(p.exclude) FROM quota_patterns p
                              WHERE p.scope = s.id AND OLD.repo GLOB p.glob) = 0);
    UPDATE quota_scopes
       SET used = used - (SELECT d.size FROM quota_digests d
                           WHERE d.scope = quota_scopes.id AND d.digest = OLD.digest)
     WHERE EXISTS (SELECT 1 FROM quota_digests d
                    WHERE d.scope = quota_scopes.id AND d.digest = OLD.digest AND d.refs <= 0);
    DELETE FROM quota_digests
     WHERE scope IN (SELECT id FROM quota_scopes) AND digest = OLD.digest AND refs <= 0;
END;

-- The triggers see inserts and deletes only, so what they count is never
-- changed in place (upserts change `cached` and `refs_indexed` only).
CREATE TRIGGER repo_blobs_fixed BEFORE UPDATE OF repo, digest, size ON repo_blobs
BEGIN
    SELECT RAISE(ABORT, 'a link''s repo, digest and size never change: delete it and insert another (quota counters)');
END;

CREATE TRIGGER manifests_fixed BEFORE UPDATE OF repo, digest, size ON manifests
BEGIN
    SELECT RAISE(ABORT, 'a manifest''s repo, digest and size never change: delete it and insert another (quota counters)');
END;
