-- Small objects kept in the database instead of a file each: every
-- manifest, and blobs of at most 64 KiB pushed in one request. Creating a
-- file per small object (an inode, two fsyncs) cost more than everything
-- else a small push does; a row here is written in the same transaction as
-- the object's inventory row and link, so it is visible exactly when they
-- are, and it survives a crash exactly as they do.
--
-- Objects stored before this version stay files in blobs/; readers look
-- here first and fall back to the file. A digest can have both (pushed
-- once each way); its removal drops both.
CREATE TABLE blob_content (
    digest TEXT PRIMARY KEY,
    bytes  BLOB NOT NULL
);

-- The content goes with its inventory row, whatever removes the row
-- (MetaStore::forget_blobs after a removal, start-up recovery).
CREATE TRIGGER blob_content_goes_with_blob AFTER DELETE ON blobs
BEGIN
    DELETE FROM blob_content WHERE digest = OLD.digest;
END;
