//! Manifests and small blobs are kept in the metadata database instead of a
//! file each. Checked over real HTTP: what is stored where, that it is
//! served byte for byte (whole, by range, through a mount), that a wrong
//! digest stores nothing, that the bytes survive `kill -9` and go with a
//! delete and garbage collection, and that manifests older versions stored
//! as files are still served and collected.

mod common;

use common::oci::*;
use common::stored::{blob_file, in_database, is_stored, stored};
use common::{basic_client, client, expect_error, Trow};
use reqwest::StatusCode;

/// The largest blob kept in the database (`registry::INLINE_BLOB_MAX`).
const INLINE_MAX: usize = 64 << 10;

/// A login for garbage collection on demand (`POST /admin/gc`).
const GC_ARGS: &[&str] = &[
    "--user",
    "admin",
    "--password",
    "collect-it",
    "--gc-interval",
    "0",
    "--gc-grace",
    "0s",
];

fn admin() -> reqwest::Client {
    basic_client("admin", "collect-it")
}

fn uploads_left(t: &Trow) -> usize {
    std::fs::read_dir(t.data_dir.join("uploads")).map_or(0, |d| d.count())
}

#[tokio::test]
async fn small_objects_are_kept_in_the_database_and_served_byte_for_byte() {
    let t = Trow::start();
    let c = client();
    // POST then PUT (containerd), a single POST (`?digest=`), the largest
    // inline size, and one byte more; and an empty blob, whose body reqwest
    // sends without a length (so it is streamed to a file, as any body of
    // unknown length is).
    let small = data(1, 4096);
    let small_digest = push_blob(&c, &t.url, "app", &small).await;
    let single = data(2, 3000);
    let single_digest = sha256(&single);
    let r = c
        .post(t.at(&format!("/v2/app/blobs/uploads/?digest={single_digest}")))
        .body(single.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let empty_digest = push_blob(&c, &t.url, "app", b"").await;
    let largest = data(3, INLINE_MAX);
    let largest_digest = push_blob(&c, &t.url, "app", &largest).await;
    let over = data(4, INLINE_MAX + 1);
    let over_digest = push_blob(&c, &t.url, "app", &over).await;
    let manifest = image_manifest(&small, &[&single, &largest, &over]);
    let manifest_digest = put_manifest(&c, &t.url, "app", "v1", OCI_MANIFEST, &manifest).await;

    for (bytes, digest) in [
        (&small[..], &small_digest),
        (&single[..], &single_digest),
        (&largest[..], &largest_digest),
        (&manifest[..], &manifest_digest),
    ] {
        assert_eq!(
            in_database(&t.data_dir, digest).await.as_deref(),
            Some(bytes),
            "{digest} is kept in the database"
        );
        assert!(
            !blob_file(&t.data_dir, digest).exists(),
            "{digest} has no file"
        );
    }
    assert!(
        blob_file(&t.data_dir, &over_digest).exists(),
        "over 64 KiB: a file"
    );
    assert_eq!(in_database(&t.data_dir, &over_digest).await, None);
    assert_eq!(uploads_left(&t), 0, "no upload file was left behind");

    // Served whole, with the headers clients check.
    for (bytes, digest) in [
        (&small[..], &small_digest),
        (&single[..], &single_digest),
        (&b""[..], &empty_digest),
        (&largest[..], &largest_digest),
        (&over[..], &over_digest),
    ] {
        let got = get_blob(&c, &t.url, "app", digest).await;
        assert_eq!(got.status, StatusCode::OK, "{digest}");
        assert_eq!(got.body, bytes, "{digest}");
        assert_eq!(got.header("docker-content-digest"), digest.as_str());
        assert_eq!(got.header("content-length"), bytes.len().to_string());
        let head = c
            .head(t.at(&format!("/v2/app/blobs/{digest}")))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(
            head.headers()["content-length"].to_str().unwrap(),
            bytes.len().to_string()
        );
    }
    let got = get_manifest(&c, &t.url, "app", "v1").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, manifest);
    assert_eq!(
        got.header("docker-content-digest"),
        manifest_digest.as_str()
    );

    // Ranges over bytes kept in the database.
    let part = fetch(
        c.get(t.at(&format!("/v2/app/blobs/{small_digest}")))
            .header("Range", "bytes=100-199"),
    )
    .await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, &small[100..200]);
    assert_eq!(part.header("content-range"), "bytes 100-199/4096");
    let tail = fetch(
        c.get(t.at(&format!("/v2/app/blobs/{small_digest}")))
            .header("Range", "bytes=-10"),
    )
    .await;
    assert_eq!(tail.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(tail.body, &small[4086..]);
    let r = c
        .get(t.at(&format!("/v2/app/blobs/{small_digest}")))
        .header("Range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.headers()["content-range"], "bytes */4096");

    // Bytes served from the database count as copied in the read metrics:
    // the three blobs kept there whole, and 100 + 10 bytes of ranges.
    let text = client()
        .get(t.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let copied = common::metric_sample(&text, r#"trow_blob_read_bytes_total{path="copied"}"#)
        .unwrap_or_default();
    assert!(
        copied >= (4096 + 3000 + INLINE_MAX + 110) as f64,
        "copied bytes {copied}:\n{text}"
    );

    // A mount of a blob kept in the database.
    let r = c
        .post(t.at(&format!(
            "/v2/other/blobs/uploads/?mount={small_digest}&from=app"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let got = get_blob(&c, &t.url, "other", &small_digest).await;
    assert_eq!(got.body, small);
    // Still only where it was: the mount is a link, not a copy.
    assert!(!blob_file(&t.data_dir, &small_digest).exists());
}

#[tokio::test]
async fn a_small_blob_with_the_wrong_digest_stores_nothing() {
    let t = Trow::start();
    let c = client();
    let bytes = data(5, 2000);
    let wrong = sha256(b"something else");
    let r = c
        .post(t.at(&format!("/v2/app/blobs/uploads/?digest={wrong}")))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    let message = expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    assert!(message.contains("push the blob again"), "{message}");

    // POST then PUT: the session ends with the refusal.
    let r = c.post(t.at("/v2/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let upload = if location.starts_with("http") {
        location.clone()
    } else {
        t.at(&location)
    };
    let r = c
        .put(format!("{upload}?digest={wrong}"))
        .body(bytes.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    let r = c.get(&upload).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;

    // A body longer than the Content-Range it states is refused.
    let r = c.post(t.at("/v2/app/blobs/uploads/")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let upload = if location.starts_with("http") {
        location
    } else {
        t.at(&location)
    };
    let r = c
        .put(format!("{upload}?digest={}", sha256(&bytes)))
        .header("Content-Range", "0-99")
        .body(streamed_body(&bytes, 512))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "BLOB_UPLOAD_INVALID").await;

    assert!(stored(&t.data_dir).await.is_empty(), "nothing was stored");
    assert_eq!(
        get_blob(&c, &t.url, "app", &sha256(&bytes)).await.status,
        StatusCode::NOT_FOUND
    );
    // The same bytes with the right digest are then accepted.
    let digest = push_blob(&c, &t.url, "app", &bytes).await;
    assert_eq!(get_blob(&c, &t.url, "app", &digest).await.body, bytes);
}

/// What was acknowledged is there after `kill -9`, read back from the
/// database's write-ahead log.
#[tokio::test]
async fn small_objects_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut t = Trow::start_in(&dir, &[]);
    let c = client();
    let mut pushed = Vec::new();
    for i in 0..20u64 {
        let config = data(100 + i, 300);
        let layer = data(200 + i, 10_000);
        let (manifest, digest) = {
            push_blob(&c, &t.url, "crash", &config).await;
            push_blob(&c, &t.url, "crash", &layer).await;
            let manifest = image_manifest(&config, &[&layer]);
            let digest = put_manifest(
                &c,
                &t.url,
                "crash",
                &format!("t{i}"),
                OCI_MANIFEST,
                &manifest,
            )
            .await;
            (manifest, digest)
        };
        pushed.push((i, config, layer, manifest, digest));
    }
    t.kill();
    let t = Trow::start_in(&dir, &[]);
    for (i, config, layer, manifest, digest) in &pushed {
        let got = get_manifest(&c, &t.url, "crash", &format!("t{i}")).await;
        assert_eq!(got.status, StatusCode::OK, "t{i}");
        assert_eq!(&got.body, manifest);
        assert_eq!(got.header("docker-content-digest"), digest.as_str());
        assert_eq!(
            &get_blob(&c, &t.url, "crash", &sha256(config)).await.body,
            config
        );
        assert_eq!(
            &get_blob(&c, &t.url, "crash", &sha256(layer)).await.body,
            layer
        );
    }
}

/// A delete and a garbage collection pass remove bytes kept in the
/// database exactly as they remove files.
#[tokio::test]
async fn collected_objects_leave_the_database() {
    let t = Trow::start_with(GC_ARGS);
    let c = admin();
    let config = data(6, 500);
    let layer = data(7, 20_000);
    push_blob(&c, &t.url, "app", &config).await;
    push_blob(&c, &t.url, "app", &layer).await;
    let manifest = image_manifest(&config, &[&layer]);
    let digest = put_manifest(&c, &t.url, "app", "v1", OCI_MANIFEST, &manifest).await;
    for d in [&digest, &sha256(&config), &sha256(&layer)] {
        assert!(in_database(&t.data_dir, d).await.is_some(), "{d}");
    }
    let r = c
        .delete(t.at(&format!("/v2/app/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = c.post(t.at("/admin/gc")).send().await.unwrap();
    let status = r.status();
    let report: serde_json::Value = r.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["blobs_deleted"], 3, "{report}");
    assert_eq!(
        report["bytes_freed"].as_u64(),
        Some((manifest.len() + config.len() + layer.len()) as u64),
        "{report}"
    );
    for d in [&digest, &sha256(&config), &sha256(&layer)] {
        assert!(!is_stored(&t.data_dir, d).await, "{d} is still stored");
    }
}

/// Versions before this one kept every manifest as a file in blobs/: such
/// a data directory is still served, and its manifests are still collected.
#[tokio::test]
async fn manifests_stored_as_files_are_still_served() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut t = Trow::start_in(&dir, GC_ARGS);
    let c = admin();
    let config = data(8, 400);
    push_blob(&c, &t.url, "old", &config).await;
    let manifest = image_manifest(&config, &[]);
    let digest = put_manifest(&c, &t.url, "old", "v1", OCI_MANIFEST, &manifest).await;
    t.terminate();
    // Make it what an older version left: the bytes as a file, no row.
    let file = blob_file(&t.data_dir, &digest);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, &manifest).unwrap();
    {
        let db = sqlx::SqlitePool::connect(&format!(
            "sqlite://{}",
            t.data_dir.join("trow.db").display()
        ))
        .await
        .unwrap();
        sqlx::query("DELETE FROM blob_content WHERE digest = ?")
            .bind(&digest)
            .execute(&db)
            .await
            .unwrap();
        db.close().await;
    }
    let t = Trow::start_in(&dir, GC_ARGS);
    assert_eq!(in_database(&t.data_dir, &digest).await, None);
    let got = get_manifest(&c, &t.url, "old", "v1").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, manifest);
    let got = get_manifest(&c, &t.url, "old", &digest).await;
    assert_eq!(got.body, manifest);

    let r = c
        .delete(t.at(&format!("/v2/old/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = c.post(t.at("/admin/gc")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(!file.exists(), "the old manifest file was collected");
}
