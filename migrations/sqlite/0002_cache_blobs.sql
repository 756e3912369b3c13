-- Blobs fetched by the pull-through cache, with when they were last pulled,
-- so that the least recently pulled can be evicted under registry_proxies.max_size.
CREATE TABLE cache_blobs (
    digest      TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    last_access INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX cache_blobs_by_access ON cache_blobs (last_access);
