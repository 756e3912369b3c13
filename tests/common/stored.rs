//! What a data directory holds, wherever Trow keeps it: blob files under
//! `blobs/sha256/` and the database's `blob_content` table (every manifest
//! and blobs of at most 64 KiB pushed in one request).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool};

/// The file a blob would have under `data`.
pub fn blob_file(data: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data.join("blobs/sha256").join(&hex[..2]).join(hex)
}

async fn database(data: &Path) -> SqlitePool {
    let options = SqliteConnectOptions::new().filename(data.join("trow.db"));
    SqlitePool::connect_with(options).await.unwrap()
}

/// The bytes of `digest` kept in the database, if any.
pub async fn in_database(data: &Path, digest: &str) -> Option<Vec<u8>> {
    let db = database(data).await;
    let bytes = sqlx::query_scalar("SELECT bytes FROM blob_content WHERE digest = ?")
        .bind(digest)
        .fetch_optional(&db)
        .await
        .unwrap();
    db.close().await;
    bytes
}

/// Every digest kept in the database, with its bytes.
pub async fn database_content(data: &Path) -> Vec<(String, Vec<u8>)> {
    let db = database(data).await;
    let rows = sqlx::query_as("SELECT digest, bytes FROM blob_content")
        .fetch_all(&db)
        .await
        .unwrap();
    db.close().await;
    rows
}

/// Whether the bytes of `digest` are stored, as a file or in the database.
pub async fn is_stored(data: &Path, digest: &str) -> bool {
    blob_file(data, digest).exists() || in_database(data, digest).await.is_some()
}

/// Every stored digest with its size, from both places (a digest stored
/// both ways counts once, at its file's size).
pub async fn stored(data: &Path) -> BTreeMap<String, u64> {
    let db = database(data).await;
    let rows: Vec<(String, i64)> = sqlx::query_as("SELECT digest, length(bytes) FROM blob_content")
        .fetch_all(&db)
        .await
        .unwrap();
    db.close().await;
    let mut all: BTreeMap<String, u64> = rows.into_iter().map(|(d, n)| (d, n as u64)).collect();
    let Ok(fan_outs) = std::fs::read_dir(data.join("blobs/sha256")) else {
        return all;
    };
    for fan_out in fan_outs.filter_map(Result::ok) {
        for file in std::fs::read_dir(fan_out.path())
            .unwrap()
            .filter_map(Result::ok)
        {
            let name = file.file_name().to_string_lossy().into_owned();
            let size = file.metadata().unwrap().len();
            all.insert(format!("sha256:{name}"), size);
        }
    }
    all
}

/// How many digests are stored.
pub async fn stored_count(data: &Path) -> usize {
    stored(data).await.len()
}

/// The bytes of all stored digests.
pub async fn stored_bytes(data: &Path) -> u64 {
    stored(data).await.values().sum()
}
