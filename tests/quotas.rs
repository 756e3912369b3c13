//! Storage quotas and blob size limits over real HTTP: refusals before the
//! body is read where the size is known, at the commit where it is not,
//! nothing left behind either way, counting across a pattern's
//! repositories, and no overshoot under concurrent pushes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::oci::{
    data, descriptor, image_manifest, push_blob, sha256, streamed_body, OCI_CONFIG, OCI_LAYER,
    OCI_MANIFEST,
};
use common::{client, expect_error, required_header as header, trow_with_config, Trow};
use reqwest::StatusCode;
use serde_json::Value;

/// Starts Trow with these `quotas` rules (YAML list items) and flags.
fn with_quotas(rules: &str, args: &[&str]) -> (Trow, tempfile::TempDir) {
    trow_with_config(&format!("quotas:\n{rules}"), args)
}

/// Upload files left in the data directory.
fn uploads_left(t: &Trow) -> usize {
    std::fs::read_dir(t.data_dir.join("uploads"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Where the blob store keeps `digest`.
fn blob_file(data_dir: &Path, digest: &str) -> PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Blob files in the store.
fn blob_files(t: &Trow) -> usize {
    let Ok(dirs) = std::fs::read_dir(t.data_dir.join("blobs/sha256")) else {
        return 0;
    };
    dirs.flatten()
        .map(|d| std::fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0))
        .sum()
}

/// Starts an upload; returns its path.
async fn start_upload(c: &reqwest::Client, t: &Trow, repo: &str) -> String {
    let r = c
        .post(t.at(&format!("/v2/{repo}/blobs/uploads/")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    header(&r, "location")
}

/// A monolithic push (`POST ?digest=` with the body); the response.
async fn post_blob(c: &reqwest::Client, t: &Trow, repo: &str, bytes: &[u8]) -> reqwest::Response {
    c.post(t.at(&format!(
        "/v2/{repo}/blobs/uploads/?digest={}",
        sha256(bytes)
    )))
    .body(bytes.to_vec())
    .send()
    .await
    .unwrap()
}

/// Expects a 403 `DENIED` and returns its message and detail.
async fn denied(r: reqwest::Response) -> (String, Value) {
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body: Value = r.json().await.unwrap();
    let e = &body["errors"][0];
    assert_eq!(e["code"], "DENIED", "{body}");
    (
        e["message"].as_str().unwrap().to_string(),
        e["detail"].clone(),
    )
}

/// Sends a request head (and `body`, possibly less than announced) on a
/// plain TCP connection and reads the answer without sending more; returns
/// the status, the body and how long the answer took.
fn raw(t: &Trow, head: &str, body: &[u8]) -> (u16, String, Duration) {
    let mut s = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = Instant::now();
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if let Some(end) = find(&got, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                break;
            }
        }
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "reading the answer: {e}; got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    let elapsed = started.elapsed();
    let text = String::from_utf8_lossy(&got).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body, elapsed)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn a_push_with_a_length_over_the_quota_is_refused_before_its_body() {
    let (t, _cfg) = with_quotas("  - repos: q/*\n    max_size: 64KiB\n", &[]);
    let c = client();
    push_blob(&c, &t.url, "q/app", &data(1, 40_000)).await;
    let files = blob_files(&t);

    // 100 MiB announced, not a byte sent: the answer comes at once.
    let digest = sha256(b"never sent");
    let (status, body, took) = raw(
        &t,
        &format!(
            "POST /v2/q/app/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n"
        ),
        b"",
    );
    assert_eq!(status, 403, "{body}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let v: Value = serde_json::from_str(&body).unwrap();
    let e = &v["errors"][0];
    assert_eq!(e["code"], "DENIED");
    let message = e["message"].as_str().unwrap();
    assert!(
        message.contains("storage quota exceeded")
            && message.contains("`q/*` may hold 64 KiB together and hold 39.1 KiB now")
            && message.contains("100 MiB")
            && message.contains("Delete images or blobs"),
        "{message}"
    );
    assert_eq!(e["detail"]["max_size"], 65536);
    assert_eq!(e["detail"]["used"], 40_000);
    assert_eq!(e["detail"]["size"], 104_857_600);
    assert_eq!(e["detail"]["repos"], "q/*");
    assert_eq!(uploads_left(&t), 0, "no upload was started");
    assert_eq!(blob_files(&t), files, "nothing was stored");

    // The same for the PUT of a two-step monolithic upload: the upload is
    // discarded, as after a digest mismatch.
    let location = start_upload(&c, &t, "q/app").await;
    let (status, body, _) = raw(
        &t,
        &format!(
            "PUT {}?digest={digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 30000\r\n\r\n",
            location
        ),
        b"",
    );
    assert_eq!(status, 403, "{body}");
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(uploads_left(&t), 0);
    assert_eq!(blob_files(&t), files);

    // What fits is stored.
    let r = post_blob(&c, &t, "q/app", &data(2, 25_000)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn a_chunked_push_crossing_the_quota_leaves_nothing() {
    let (t, _cfg) = with_quotas("  - repos: team/*\n    max_size: 100000\n", &[]);
    let c = client();
    push_blob(&c, &t.url, "team/base", &data(1, 30_000)).await;
    let files = blob_files(&t);

    // Crossing in the last PATCH (Content-Range and Content-Length).
    let blob = data(2, 80_000);
    let location = start_upload(&c, &t, "team/app").await;
    let r = c
        .patch(t.at(&location))
        .header("Content-Range", "0-49999")
        .body(blob[..50_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = header(&r, "location");
    let r = c
        .patch(t.at(&location))
        .header("Content-Range", "50000-79999")
        .body(blob[50_000..].to_vec())
        .send()
        .await
        .unwrap();
    let (message, detail) = denied(r).await;
    assert!(message.contains("`team/*`"), "{message}");
    assert_eq!(detail["used"], 30_000);
    assert_eq!(detail["size"], 80_000);
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(uploads_left(&t), 0);
    assert_eq!(blob_files(&t), files);

    // Crossing with the final PUT's chunk.
    let location = start_upload(&c, &t, "team/app").await;
    let r = c
        .patch(t.at(&location))
        .body(blob[..60_000].to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = header(&r, "location");
    let r = c
        .put(t.at(&format!("{location}?digest={}", sha256(&blob))))
        .header("Content-Range", "60000-79999")
        .body(blob[60_000..].to_vec())
        .send()
        .await
        .unwrap();
    let (_, detail) = denied(r).await;
    assert_eq!(detail["size"], 80_000);
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(uploads_left(&t), 0);
    assert_eq!(blob_files(&t), files);
    assert!(!blob_file(&t.data_dir, &sha256(&blob)).exists());
}

/// A body without a length is checked when the push commits: here the
/// quota was taken by another push while the upload was open.
#[tokio::test]
async fn a_streamed_push_is_refused_at_the_end_and_leaves_nothing() {
    let (t, _cfg) = with_quotas("  - repos: s/*\n    max_size: 100000\n", &[]);
    let c = client();
    let blob = data(3, 60_000);
    let location = start_upload(&c, &t, "s/app").await;
    let r = c
        .patch(t.at(&location))
        .body(streamed_body(&blob, 8192))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = header(&r, "location");
    // Meanwhile another push takes half of the quota.
    push_blob(&c, &t.url, "s/other", &data(4, 50_000)).await;
    let files = blob_files(&t);
    let r = c
        .put(t.at(&format!("{location}?digest={}", sha256(&blob))))
        .header("Content-Length", "0")
        .send()
        .await
        .unwrap();
    let (message, detail) = denied(r).await;
    assert!(message.contains("hold 48.8 KiB now"), "{message}");
    assert_eq!(detail["size"], 60_000);
    assert_eq!(detail["size_at_least"], false);
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(uploads_left(&t), 0);
    assert_eq!(blob_files(&t), files);
    assert!(!blob_file(&t.data_dir, &sha256(&blob)).exists());
}

/// A streamed body is cut off where it would cross the limit: what is
/// stored never exceeds it, and the upload is dropped.
#[tokio::test]
async fn a_streamed_body_is_cut_off_at_the_limit() {
    let (t, _cfg) = with_quotas("  - repos: s/*\n    max_size: 100000\n", &[]);
    let c = client();
    let location = start_upload(&c, &t, "s/app").await;
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.extend_from_slice(format!("{:x}\r\n", 40_000).as_bytes());
        sent.extend_from_slice(&data(5, 40_000));
        sent.extend_from_slice(b"\r\n");
    }
    // Three chunks of 40 000 bytes and no end: the third crosses 100 000.
    let (status, body, _) = raw(
        &t,
        &format!(
            "PATCH {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
            location
        ),
        &sent,
    );
    assert_eq!(status, 403, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["errors"][0]["detail"]["size_at_least"], true);
    let message = v["errors"][0]["message"].as_str().unwrap();
    assert!(message.contains("or more"), "{message}");
    let r = c.get(t.at(&location)).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(uploads_left(&t), 0);
    assert_eq!(blob_files(&t), 0);
}

#[tokio::test]
async fn a_quota_counts_its_repositories_together_each_digest_once() {
    let (t, _cfg) = with_quotas(
        "  - repos: [team-a/*, shared/base]\n    max_size: 10KiB\n",
        &[],
    );
    let c = client();
    let a = data(1, 6_000);
    let b = data(2, 5_000);
    let r = post_blob(&c, &t, "team-a/one", &a).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // The same layer in another repository of the quota costs nothing more.
    let r = post_blob(&c, &t, "team-a/two", &a).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = post_blob(&c, &t, "shared/base", &b).await;
    let (message, detail) = denied(r).await;
    assert!(
        message.contains("`team-a/*, shared/base` may hold 10 KiB together and hold 5.9 KiB now")
            && message.contains("this push of 4.9 KiB would take them to 10.7 KiB"),
        "{message}"
    );
    assert_eq!(detail["used"], 6_000);
    // Outside the patterns nothing is limited.
    let r = post_blob(&c, &t, "team-b/x", &b).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    // A mount counts too.
    let r = c
        .post(t.at(&format!(
            "/v2/team-a/three/blobs/uploads/?mount={}&from=team-b/x",
            sha256(&b)
        )))
        .send()
        .await
        .unwrap();
    denied(r).await;
    let r = c
        .head(t.at(&format!("/v2/team-a/three/blobs/{}", sha256(&b))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Mounting what the quota already counts is free.
    let r = c
        .post(t.at(&format!(
            "/v2/team-a/three/blobs/uploads/?mount={}&from=team-a/one",
            sha256(&a)
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn deleting_content_frees_quota() {
    let (t, _cfg) = with_quotas("  - repos: d/*\n    max_size: 10KiB\n", &[]);
    let c = client();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = data(1, 6_000);
    push_blob(&c, &t.url, "d/app", &config).await;
    push_blob(&c, &t.url, "d/app", &layer).await;
    let manifest = image_manifest(&config, &[&layer]);
    let r = c
        .put(t.at("/v2/d/app/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let next = data(2, 5_000);
    let r = post_blob(&c, &t, "d/app", &next).await;
    let (_, detail) = denied(r).await;
    let used = 6_000 + config.len() + manifest.len();
    assert_eq!(detail["used"], used);

    // The manifest's own bytes go with it; the layer's with its link.
    let r = c
        .delete(t.at(&format!("/v2/d/app/manifests/{}", sha256(&manifest))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = post_blob(&c, &t, "d/app", &next).await;
    let (_, detail) = denied(r).await;
    assert_eq!(detail["used"], used - manifest.len());
    let r = c
        .delete(t.at(&format!("/v2/d/app/blobs/{}", sha256(&layer))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = post_blob(&c, &t, "d/app", &next).await;
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// The garbage collector deletes rows like any delete: what it collects
/// leaves the quota at once.
#[tokio::test]
async fn garbage_collection_frees_quota() {
    let (t, _cfg) = trow_with_config(
        "quotas:\n  - repos: d/*\n    max_size: 10KiB\n",
        &[
            "--user",
            "u",
            "--password",
            "p",
            "--gc-interval",
            "0",
            "--gc-grace",
            "1s",
        ],
    );
    let c = common::basic_client("u", "p");
    // An upload no manifest ever refers to takes most of the quota.
    let orphan = data(1, 8_000);
    push_blob(&c, &t.url, "d/app", &orphan).await;
    let next = data(2, 5_000);
    let (_, detail) = denied(post_blob(&c, &t, "d/app", &next).await).await;
    assert_eq!(detail["used"], 8_000);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = c.post(t.at("/admin/gc")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["blobs_deleted"], 1, "{report}");
    let r = post_blob(&c, &t, "d/app", &next).await;
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "the collected bytes no longer count"
    );
    let third = data(3, 6_000);
    let (_, detail) = denied(post_blob(&c, &t, "d/app", &third).await).await;
    assert_eq!(
        detail["used"], 5_000,
        "the counter holds exactly what is stored"
    );
}

#[tokio::test]
async fn a_manifest_over_the_quota_is_refused_and_not_stored() {
    let (t, _cfg) = with_quotas("  - repos: m/*\n    max_size: 3000\n", &[]);
    let c = client();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = data(1, 2_700);
    push_blob(&c, &t.url, "m/app", &config).await;
    push_blob(&c, &t.url, "m/app", &layer).await;
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [descriptor(OCI_LAYER, &layer)],
    }))
    .unwrap();
    assert!(config.len() + layer.len() + manifest.len() > 3000);
    let files = blob_files(&t);
    let r = c
        .put(t.at("/v2/m/app/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    let (message, detail) = denied(r).await;
    assert!(message.contains("`m/*` may hold 2.9 KiB"), "{message}");
    assert_eq!(detail["size"], manifest.len());
    let r = c.get(t.at("/v2/m/app/manifests/v1")).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    assert_eq!(blob_files(&t), files, "the manifest's bytes were not kept");
    assert!(!blob_file(&t.data_dir, &sha256(&manifest)).exists());
}

#[tokio::test]
async fn blob_size_limits_from_the_flag_and_from_rules() {
    let (t, _cfg) = with_quotas(
        "  - repos: small/*\n    max_blob_size: 10KiB\n",
        &["--max-blob-size", "64KiB"],
    );
    let c = client();
    let mid = data(1, 20_000);
    let r = post_blob(&c, &t, "big/x", &mid).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = post_blob(&c, &t, "small/x", &mid).await;
    let (message, detail) = denied(r).await;
    assert!(
        message.contains("blob too large: it is 19.5 KiB")
            && message.contains("at most 10 KiB (max_blob_size of the quota for `small/*`)"),
        "{message}"
    );
    assert_eq!(detail["limit"], "max_blob_size");
    assert_eq!(detail["max_blob_size"], 10_240);
    let r = post_blob(&c, &t, "big/x", &data(2, 70_000)).await;
    let (message, _) = denied(r).await;
    assert!(message.contains("(--max-blob-size)"), "{message}");
    // A streamed upload is cut off at the limit.
    let location = start_upload(&c, &t, "small/y").await;
    let (status, body, _) = raw(
        &t,
        &format!(
            "PATCH {} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
            location, 12_000
        ),
        &data(3, 12_000),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(uploads_left(&t), 0);
    // Mounts store nothing new: the limit is on what is uploaded.
    let r = c
        .post(t.at(&format!(
            "/v2/small/z/blobs/uploads/?mount={}&from=big/x",
            sha256(&mid)
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

/// 16 clients push distinct blobs at once into a quota that takes 3 of
/// them: the quota's check is part of the metadata write, so exactly 3
/// succeed, and the refused ones leave no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_pushes_never_exceed_the_quota() {
    let (t, _cfg) = with_quotas("  - repos: burst/*\n    max_size: 100000\n", &[]);
    let c = client();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(16));
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let c = c.clone();
        let url = t.url.clone();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let blob = data(100 + i, 30_000);
            let repo = format!("burst/r{i}");
            // POST, PATCH, PUT: all of them are under way before any commits.
            let r = c
                .post(format!("{url}/v2/{repo}/blobs/uploads/"))
                .send()
                .await
                .unwrap();
            let location = r.headers()["location"].to_str().unwrap().to_string();
            let r = c
                .patch(format!("{url}{location}"))
                .body(blob.clone())
                .send()
                .await
                .unwrap();
            // Every upload holds its bytes before any of them commits.
            barrier.wait().await;
            if r.status() != StatusCode::ACCEPTED {
                return r.status();
            }
            let location = r.headers()["location"].to_str().unwrap().to_string();
            let r = c
                .put(format!("{url}{location}?digest={}", sha256(&blob)))
                .header("Content-Length", "0")
                .send()
                .await
                .unwrap();
            r.status()
        }));
    }
    let mut created = 0;
    for task in tasks {
        match task.await.unwrap() {
            StatusCode::CREATED => created += 1,
            StatusCode::FORBIDDEN => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(created, 3, "3 × 30 000 bytes fit in 100 000");
    assert_eq!(blob_files(&t), 3, "refused blobs left no file");
    assert_eq!(uploads_left(&t), 0);
    let r = post_blob(&c, &t, "burst/last", &data(1, 10_001)).await;
    let (_, detail) = denied(r).await;
    assert_eq!(detail["used"], 90_000);
    eprintln!(
        "refused at the commit itself (after the first check passed): {}",
        t.log()
            .matches("a quota refused a blob at its commit")
            .count()
    );
}

/// Content pushed before a quota existed counts once the quota appears; a
/// changed limit takes effect at the next start.
#[tokio::test]
async fn quotas_count_what_was_there_before() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let c = client();
    {
        let t = Trow::start_in(&data_dir, &[]);
        push_blob(&c, &t.url, "old/app", &data(1, 8_000)).await;
    }
    let config = common::write_config(
        tmp.path(),
        "quotas:\n  - repos: old/*\n    max_size: 10KiB\n",
    );
    let args = ["--config-file", config.to_str().unwrap()];
    {
        let t = Trow::start_in(&data_dir, &args);
        let r = post_blob(&c, &t, "old/app", &data(2, 3_000)).await;
        let (_, detail) = denied(r).await;
        assert_eq!(detail["used"], 8_000);
        assert!(t.log().contains("usage recounted"), "{}", t.log());
    }
    common::write_config(
        tmp.path(),
        "quotas:\n  - repos: old/*\n    max_size: 20KiB\n",
    );
    let t = Trow::start_in(&data_dir, &args);
    let r = post_blob(&c, &t, "old/app", &data(2, 3_000)).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(!t.log().contains("usage recounted"), "{}", t.log());
}

#[test]
fn bad_quota_rules_stop_the_start() {
    let tmp = tempfile::tempdir().unwrap();
    for (yaml, expected) in [
        (
            "quotas:\n  - repos: f/docker.io/*\n    max_size: 1GiB\n",
            "registry_proxies.max_size",
        ),
        ("quotas:\n  - repos: a/*\n", "give `max_size`"),
        ("quotas:\n  - repos: a/*\n    max_sise: 1GiB\n", "max_sise"),
        (
            "quotas:\n  - repos: a/*\n    max_size: 1XB\n",
            "unknown size unit",
        ),
    ] {
        let path = common::write_config(tmp.path(), yaml);
        let out = std::process::Command::new(common::trow_bin())
            .args(["--dry-run", "--config-file"])
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{yaml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{yaml}: {err}");
    }
}

/// The cost of quotas on a large registry: 100 000 blobs in 1 000 other
/// repositories, all under a registry-wide `*` quota (so its counter covers
/// 100 000 digests), and a project `team-a/*` with its own quota. Two
/// servers on copies of the same data, one with the quotas and one
/// without, take turns: pushes of fresh 4 KiB blobs (POST with the body),
/// mounts of one of the 100 000 (metadata only) and blob deletes. Prints
/// the start-up recount and the latencies. Run by hand:
/// `cargo test --test quotas -- --ignored --nocapture push_latency`.
#[tokio::test]
#[ignore]
async fn push_latency_with_100k_blobs_elsewhere() {
    let tmp = tempfile::tempdir().unwrap();
    let with_dir = tmp.path().join("with");
    let without_dir = tmp.path().join("without");
    drop(Trow::start_in(&with_dir, &[])); // creates and migrates the database
    let db = with_dir.join("trow.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99999)
         INSERT INTO blobs (digest, size, state, created_at, referenced_at)
         SELECT printf('sha256:%064x', i), 1000000 + i, 'live', 0, 0 FROM n;
         WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 99999)
         INSERT INTO repo_blobs (repo, digest, size, created_at, cached)
         SELECT printf('other/r%d', i / 100), printf('sha256:%064x', i), 1000000 + i, 0, 0
           FROM n;",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    const ROUNDS: u64 = 400;
    // Mounts check that the file is there (its content does not matter here).
    for i in 0..ROUNDS {
        let path = blob_file(&with_dir, &format!("sha256:{:064x}", i * 97));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&with_dir)
        .arg(&without_dir)
        .status()
        .unwrap();
    assert!(copied.success());

    let config = common::write_config(
        tmp.path(),
        "quotas:\n  - repos: team-a/*\n    max_size: 10GiB\n  - repos: '*'\n    max_size: 10TiB\n",
    );
    let with = Trow::start_in(&with_dir, &["--config-file", config.to_str().unwrap()]);
    let without = Trow::start_in(&without_dir, &[]);
    let line = with
        .log()
        .lines()
        .find(|l| l.contains("usage recounted"))
        .unwrap_or_default()
        .to_string();
    eprintln!("start-up with 100 000 blobs: {line}");

    let c = client();
    let mut took: [[Vec<Duration>; 3]; 2] = Default::default();
    for i in 0..ROUNDS {
        // Alternate which server goes first.
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for s in order {
            let t = if s == 0 { &with } else { &without };
            let blob = data(1_000_000 + i, 4096);
            let started = Instant::now();
            let r = post_blob(&c, t, "team-a/app", &blob).await;
            assert_eq!(r.status(), StatusCode::CREATED);
            let pushed = started.elapsed();
            let mounted = format!("sha256:{:064x}", i * 97);
            let started = Instant::now();
            let r = c
                .post(t.at(&format!(
                    "/v2/team-a/m{i}/blobs/uploads/?mount={mounted}&from=other/r{}",
                    i * 97 / 100
                )))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            let mount = started.elapsed();
            let started = Instant::now();
            let r = c
                .delete(t.at(&format!("/v2/team-a/app/blobs/{}", sha256(&blob))))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::ACCEPTED);
            let deleted = started.elapsed();
            if i >= 50 {
                // The first rounds warm up.
                took[s][0].push(pushed);
                took[s][1].push(mount);
                took[s][2].push(deleted);
            }
        }
    }
    for (s, label) in [(1, "no quotas"), (0, "team-a/* and * quotas")] {
        for (k, what) in ["4 KiB push", "mount", "blob delete"].iter().enumerate() {
            let v = &mut took[s][k];
            v.sort();
            let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
            eprintln!(
                "{what:>12}, {label:>22}: p50 {:>5.2} ms, p90 {:>5.2} ms, p99 {:>5.2} ms",
                at(0.5).as_secs_f64() * 1e3,
                at(0.9).as_secs_f64() * 1e3,
                at(0.99).as_secs_f64() * 1e3,
            );
        }
    }
}
