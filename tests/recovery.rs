//! What a crash or a stuck client leaves behind is cleaned up: interrupted
//! cache downloads, interrupted removals, abandoned uploads held by a
//! client that stopped sending; and a second process cannot share the data
//! directory.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake_upstream::FakeUpstream;
use common::oci::*;
use common::{client, Trow};
use reqwest::StatusCode;
use tokio::io::AsyncWriteExt;

fn upload_files(data: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(data.join("uploads"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A pull-through download cut off by `kill -9` leaves no file behind once
/// Trow is back (before, its upload file stayed forever: it had no session
/// that expiry could find).
#[tokio::test]
async fn a_download_cut_off_by_a_crash_leaves_nothing_behind() {
    let up = FakeUpstream::start().await;
    let layer = Bytes::from(data(7, 2 << 20));
    let digest = up.add_blob(layer.clone());
    up.behaviour.lock().hold_after = Some(1 << 20);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = common::write_config(
        tmp.path(),
        &format!(
            "registry_proxies:\n  registries:\n{}",
            common::insecure_upstream(&up.host, "fake")
        ),
    );
    let args = ["--config-file", config.to_str().unwrap()];
    let mut t = Trow::start_in(&dir, &args);

    // Start the pull; the upstream holds the blob half-sent.
    let url = t.at(&format!("/v2/f/fake/team/app/blobs/{digest}"));
    let pull = tokio::spawn(async move {
        let _ = client().get(url).send().await.map(|r| r.bytes());
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while upload_files(&dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the download never started:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.kill();
    pull.abort();
    assert_eq!(upload_files(&dir).len(), 1, "the cut-off download's file");

    let t = Trow::start_in(&dir, &args);
    assert!(
        upload_files(&dir).is_empty(),
        "left behind: {:?}\n{}",
        upload_files(&dir),
        t.log()
    );
    // And the blob is fetched afresh and served whole.
    up.behaviour.lock().hold_after = None;
    let got = get_blob(&client(), &t.url, "f/fake/team/app", &digest).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(sha256(&got.body), digest);
}

/// A client that opens a chunk and stops sending holds its upload; the
/// expiry pass skips that upload and still removes the abandoned ones
/// (before, it waited on the held upload and never got to the others).
#[tokio::test]
async fn a_stalled_upload_does_not_stop_expiry() {
    let t = Trow::start_with(&["--upload-expiry", "2s"]);
    let c = client();
    let start = |c: reqwest::Client, url: String| async move {
        let r = c.post(url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        r.headers()["location"].to_str().unwrap().to_string()
    };
    let stalled = start(c.clone(), t.at("/v2/app/blobs/uploads/")).await;
    let mut idle = Vec::new();
    for _ in 0..10 {
        idle.push(start(c.clone(), t.at("/v2/app/blobs/uploads/")).await);
    }
    // A PATCH that promises 1 MiB and sends 1 KiB, then nothing.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", t.port))
        .await
        .unwrap();
    let head = format!(
        "PATCH {stalled} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1048576\r\n\r\n",
        t.host
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&[0u8; 1024]).await.unwrap();

    // Every idle upload expires (at most ~1 s after 2 s idle), while the
    // stalled one is held.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut alive = 0;
        for location in &idle {
            let r = c.get(t.at(location)).send().await.unwrap();
            if r.status() != StatusCode::NOT_FOUND {
                alive += 1;
            }
        }
        if alive == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{alive} abandoned uploads were not expired:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(conn);
}

/// An interrupted removal (the row marked, the file still there) is
/// finished at start-up, before anything is served.
#[tokio::test]
async fn an_interrupted_removal_is_finished_at_start_up() {
    use trow::meta::sqlite::{Durability, SqliteMeta};
    use trow::meta::{CommitBlob, LinkOrigin, LockMode, MetaStore, ReclaimRule};
    use trow::oci::{Digest, RepoName};
    use trow::registry::{Limits, Registry};
    use trow::storage::fs::FsBlobStore;
    use trow::storage::BlobStore;

    let tmp = tempfile::tempdir().unwrap();
    let open = || async {
        let blobs: Arc<dyn BlobStore> = Arc::new(FsBlobStore::open(tmp.path(), true).unwrap());
        let meta: Arc<dyn MetaStore> = Arc::new(
            SqliteMeta::open(&tmp.path().join("trow.db"), Durability::Normal)
                .await
                .unwrap(),
        );
        (blobs, meta)
    };
    let bytes = Bytes::from(data(3, 5000));
    let digest: Digest = sha256(&bytes).parse().unwrap();
    let cache_repo = RepoName::parse("f/up/app").unwrap();
    {
        let (blobs, meta) = open().await;
        blobs.put(&digest, bytes.clone()).await.unwrap();
        meta.commit_blob(CommitBlob {
            repo: cache_repo.as_str(),
            digest: &digest,
            size: 5000,
            origin: LinkOrigin::Cache,
            upload: None,
            content: None,
        })
        .await
        .unwrap();
        // The removal's first step, as a crash would leave it.
        let _lock = meta.lock_blob(&digest, LockMode::Exclusive).await.unwrap();
        let condemned = meta
            .condemn_blobs(std::slice::from_ref(&digest), ReclaimRule::CacheEviction)
            .await
            .unwrap();
        assert_eq!(condemned, vec![(digest.clone(), 5000)]);
        assert_eq!(blobs.stat(&digest).await.unwrap(), Some(5000));
        // While it is condemned, nothing may link it again.
        let relink = meta
            .commit_blob(CommitBlob {
                repo: "app",
                digest: &digest,
                size: 5000,
                origin: LinkOrigin::Client,
                upload: None,
                content: None,
            })
            .await;
        assert!(relink.is_err(), "a condemned digest cannot be linked");
    }
    let (blobs, meta) = open().await;
    let registry = Registry::new(
        blobs.clone(),
        meta.clone(),
        Limits {
            max_manifest_size: 1 << 20,
            upload_expiry: Duration::from_secs(3600),
        },
    );
    let recovered = registry.recover().await.unwrap();
    assert_eq!(recovered.removals_finished, 1);
    assert_eq!(blobs.stat(&digest).await.unwrap(), None);
    assert!(meta.condemned_blobs().await.unwrap().is_empty());
    // The digest can be pushed again.
    blobs.put(&digest, bytes).await.unwrap();
    meta.commit_blob(CommitBlob {
        repo: "app",
        digest: &digest,
        size: 5000,
        origin: LinkOrigin::Client,
        upload: None,
        content: None,
    })
    .await
    .unwrap();
    assert_eq!(meta.linked_blob("app", &digest).await.unwrap(), Some(5000));
}

/// Two processes on one data directory would break the store's locks: the
/// second refuses to start, naming the directory.
#[test]
fn a_second_process_cannot_share_the_data_directory() {
    let t = Trow::start();
    let log = t.data_dir.with_extension("second.log");
    let mut second = std::process::Command::new(common::trow_bin())
        .args(["--bind", "127.0.0.1:0", "--data-dir"])
        .arg(&t.data_dir)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "a second trow runs on the same directory:\n{err}"
    );
    assert!(err.contains("another trow process is using"), "{err}");
}

/// Finished, failed and cancelled uploads leave no session behind (a
/// leftover row would only go at the next expiry, 24 h later by default).
#[tokio::test]
async fn finished_uploads_leave_no_session_behind() {
    use trow::meta::sqlite::{Durability, SqliteMeta};
    use trow::meta::MetaStore;

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut t = Trow::start_in(&dir, &[]);
    let c = client();
    // Monolithic, two-step and chunked pushes.
    push_image(&c, &t.url, "sessions", "v1", 9).await;
    let bytes = data(10, 3000);
    let digest = sha256(&bytes);
    let r = c
        .post(t.at("/v2/sessions/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let r = c
        .patch(t.at(&location))
        .body(bytes[..1000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .put(t.at(&format!("{location}?digest={digest}")))
        .body(bytes[1000..].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    // A wrong digest, and a cancelled upload.
    let r = c
        .post(t.at(&format!(
            "/v2/sessions/blobs/uploads/?digest={}",
            sha256(b"other")
        )))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .post(t.at("/v2/sessions/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.delete(t.at(&location)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    t.terminate();

    let meta = SqliteMeta::open(&dir.join("trow.db"), Durability::Normal)
        .await
        .unwrap();
    let left = meta.stale_uploads(i64::MAX, 100).await.unwrap();
    assert!(left.is_empty(), "sessions left behind: {left:?}");
    assert!(upload_files(&dir).is_empty());
}
