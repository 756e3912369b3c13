//! Many clients racing on the same objects: the same blob pushed 32 times at
//! once, 32 manifests pushed to one tag at once, 32 repositories created at
//! once. Requests are lined up with barriers so they really overlap.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::oci::{self, sha256};
use common::*;
use reqwest::StatusCode;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

const CLIENTS: usize = 32;
/// Bound on each whole test: a deadlock fails instead of hanging.
const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// An absolute URL for a `Location` header that may be relative.
fn absolute(t: &Trow, location: &str) -> String {
    if location.starts_with('/') {
        t.at(location)
    } else {
        location.to_string()
    }
}

/// Files (not directories) under `dir`, recursively, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

/// Awaits every task, failing on the first panic with its message.
async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(v) => out.push(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("task failed: {e}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn same_blob_pushed_by_32_clients_at_once() {
    tokio::time::timeout(TEST_TIMEOUT, same_blob_race())
        .await
        .expect("test timed out");
}

async fn same_blob_race() {
    let t = Arc::new(Trow::start());
    let repo = "race/blob";
    let blob = Arc::new(oci::data(7, (3 << 20) + 12_345));
    let digest = sha256(&blob);
    // Everyone sends the request that commits the blob at the same moment.
    let commit = Arc::new(Barrier::new(CLIENTS));
    let mut set = JoinSet::new();
    for i in 0..CLIENTS {
        let (t, blob, digest, commit) = (t.clone(), blob.clone(), digest.clone(), commit.clone());
        set.spawn(async move {
            let c = client(); // a connection of its own
            let (response, upload_url) = if i % 2 == 0 {
                commit.wait().await;
                let r = c
                    .post(t.at(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
                    .body(blob.to_vec())
                    .send()
                    .await
                    .expect("monolithic push");
                (r, None)
            } else {
                let r = c
                    .post(t.at(&format!("/v2/{repo}/blobs/uploads/")))
                    .send()
                    .await
                    .expect("start upload");
                assert_eq!(r.status(), StatusCode::ACCEPTED, "client {i}: start upload");
                let mut url = absolute(&t, r.headers()["location"].to_str().unwrap());
                let chunk = 1 << 20;
                for start in (0..blob.len()).step_by(chunk) {
                    let end = (start + chunk).min(blob.len());
                    let r = c
                        .patch(&url)
                        .header("Content-Type", "application/octet-stream")
                        .header("Content-Range", format!("{start}-{}", end - 1))
                        .body(blob[start..end].to_vec())
                        .send()
                        .await
                        .expect("patch");
                    assert_eq!(
                        r.status(),
                        StatusCode::ACCEPTED,
                        "client {i}: PATCH {start}-{}",
                        end - 1
                    );
                    assert_eq!(
                        r.headers()["range"],
                        format!("0-{}", end - 1).as_str(),
                        "client {i}"
                    );
                    url = absolute(&t, r.headers()["location"].to_str().unwrap());
                }
                commit.wait().await;
                let sep = if url.contains('?') { '&' } else { '?' };
                let r = c
                    .put(format!("{url}{sep}digest={digest}"))
                    .header("Content-Length", "0")
                    .send()
                    .await
                    .expect("finish upload");
                (r, Some(url))
            };
            let status = response.status();
            let got_digest = response
                .headers()
                .get("docker-content-digest")
                .map(|v| v.to_str().unwrap().to_string());
            let location = response
                .headers()
                .get("location")
                .map(|v| v.to_str().unwrap().to_string());
            let body = response.text().await.unwrap_or_default();
            assert_eq!(status, StatusCode::CREATED, "client {i}: {body}");
            assert_eq!(got_digest.as_deref(), Some(digest.as_str()), "client {i}");
            assert_eq!(
                location,
                Some(format!("/v2/{repo}/blobs/{digest}")),
                "client {i}"
            );
            upload_url
        });
    }
    let upload_urls: Vec<String> = join_all(set).await.into_iter().flatten().collect();
    assert_eq!(upload_urls.len(), CLIENTS / 2);

    let c = client();
    let got = oci::get_blob(&c, &t.url, repo, &digest).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body.len(), blob.len());
    assert!(
        got.body == *blob,
        "served bytes differ from the pushed blob"
    );
    assert_eq!(got.header("docker-content-digest"), digest);

    // Finished uploads are gone.
    for url in &upload_urls {
        let r = oci::fetch(c.get(url)).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{url} after it was finished"
        );
        assert_eq!(r.error_code(), "BLOB_UPLOAD_UNKNOWN");
    }
    // On disk: one blob file, no upload or scratch leftovers.
    let hex = digest.strip_prefix("sha256:").unwrap();
    assert_eq!(
        files_under(&t.data_dir.join("blobs")),
        vec![format!("sha256/{}/{hex}", &hex[..2])],
        "blob files after 32 concurrent pushes of one blob"
    );
    let on_disk = std::fs::read(t.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)).unwrap();
    assert!(on_disk == *blob, "the stored file differs from the blob");
    assert_eq!(
        files_under(&t.data_dir.join("uploads")),
        Vec::<String>::new(),
        "leftover uploads"
    );
    assert_eq!(
        files_under(&t.data_dir.join("tmp")),
        Vec::<String>::new(),
        "leftover scratch files"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manifests_pushed_to_one_tag_at_once() {
    tokio::time::timeout(TEST_TIMEOUT, same_tag_race())
        .await
        .expect("test timed out");
}

async fn same_tag_race() {
    let t = Arc::new(Trow::start());
    let repo = "race/tag";
    let c = client();
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = oci::data(9, 50_000);
    oci::push_blob(&c, &t.url, repo, &config).await;
    oci::push_blob(&c, &t.url, repo, &layer).await;
    let manifests: Vec<Vec<u8>> = (0..CLIENTS)
        .map(|i| {
            serde_json::to_vec(&serde_json::json!({
                "schemaVersion": 2,
                "mediaType": oci::OCI_MANIFEST,
                "config": oci::descriptor(oci::OCI_CONFIG, &config),
                "layers": [oci::descriptor(oci::OCI_LAYER, &layer)],
                "annotations": { "org.example.writer": i.to_string() },
            }))
            .unwrap()
        })
        .collect();
    let digests: BTreeSet<String> = manifests.iter().map(|m| sha256(m)).collect();
    assert_eq!(digests.len(), CLIENTS);

    // Readers poll the tag throughout: they must only ever see a complete
    // manifest whose bytes match the digest they are told.
    let writing = Arc::new(AtomicBool::new(true));
    let mut readers = JoinSet::new();
    for _ in 0..4 {
        let (t, writing, digests) = (t.clone(), writing.clone(), digests.clone());
        readers.spawn(async move {
            let c = client();
            let mut seen = 0;
            loop {
                let done = !writing.load(Ordering::SeqCst);
                let r = oci::get_manifest(&c, &t.url, repo, "latest").await;
                match r.status {
                    StatusCode::NOT_FOUND => assert_eq!(r.error_code(), "MANIFEST_UNKNOWN"),
                    StatusCode::OK => {
                        let d = r.header("docker-content-digest").to_string();
                        assert!(
                            digests.contains(&d),
                            "tag resolved to a digest nobody pushed: {d}"
                        );
                        assert_eq!(
                            sha256(&r.body),
                            d,
                            "GET by tag: body does not match its digest header"
                        );
                        seen += 1;
                    }
                    other => panic!("GET by tag during the race: {other}"),
                }
                if done {
                    // After every writer had its 201, the tag must resolve.
                    assert_eq!(r.status, StatusCode::OK, "GET by tag after the race");
                    return seen;
                }
            }
        });
    }

    let start = Arc::new(Barrier::new(CLIENTS));
    let mut writers = JoinSet::new();
    for (i, m) in manifests.iter().cloned().enumerate() {
        let (t, start) = (t.clone(), start.clone());
        writers.spawn(async move {
            let c = client();
            start.wait().await;
            let r = oci::fetch(
                c.put(t.at(&format!("/v2/{repo}/manifests/latest")))
                    .header("Content-Type", oci::OCI_MANIFEST)
                    .body(m.clone()),
            )
            .await;
            assert_eq!(
                r.status,
                StatusCode::CREATED,
                "writer {i}: {}",
                String::from_utf8_lossy(&r.body)
            );
            assert_eq!(r.header("docker-content-digest"), sha256(&m), "writer {i}");
        });
    }
    join_all(writers).await;
    writing.store(false, Ordering::SeqCst);
    let seen: usize = join_all(readers).await.into_iter().sum();
    eprintln!("readers saw the tag resolve {seen} times during and after the race");

    // The tag names one of the 32, and by-tag answers agree with each other.
    let by_tag = oci::get_manifest(&c, &t.url, repo, "latest").await;
    assert_eq!(by_tag.status, StatusCode::OK);
    let winner = by_tag.header("docker-content-digest").to_string();
    assert!(
        digests.contains(&winner),
        "tag resolves to {winner}, which nobody pushed"
    );
    assert_eq!(sha256(&by_tag.body), winner);
    let head = oci::fetch(c.head(t.at(&format!("/v2/{repo}/manifests/latest")))).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("docker-content-digest"), winner);
    assert_eq!(head.header("content-length"), by_tag.body.len().to_string());

    // Every one of the 32 is still there by digest.
    for m in &manifests {
        let d = sha256(m);
        let got = oci::get_manifest(&c, &t.url, repo, &d).await;
        assert_eq!(got.status, StatusCode::OK, "GET {d}");
        assert!(got.body == *m, "manifest {d}: bytes differ");
    }
    // The tag is listed exactly once.
    let tags = oci::fetch(c.get(t.at(&format!("/v2/{repo}/tags/list")))).await;
    assert_eq!(tags.status, StatusCode::OK);
    assert_eq!(
        tags.json(),
        serde_json::json!({ "name": repo, "tags": ["latest"] })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repositories_created_at_once_are_all_listed() {
    tokio::time::timeout(TEST_TIMEOUT, many_repos_race())
        .await
        .expect("test timed out");
}

async fn many_repos_race() {
    let t = Arc::new(Trow::start());
    let start = Arc::new(Barrier::new(CLIENTS));
    let mut set = JoinSet::new();
    for i in 0..CLIENTS {
        let (t, start) = (t.clone(), start.clone());
        set.spawn(async move {
            let c = client();
            let repo = format!("fleet/app-{i:02}");
            let config = format!(r#"{{"architecture":"amd64","os":"linux","n":{i}}}"#).into_bytes();
            let layer = oci::data(1000 + i as u64, 20_000 + i * 1000);
            start.wait().await;
            oci::push_blob(&c, &t.url, &repo, &config).await;
            oci::push_blob(&c, &t.url, &repo, &layer).await;
            let manifest = oci::image_manifest(&config, &[&layer]);
            oci::put_manifest(&c, &t.url, &repo, "v1", oci::OCI_MANIFEST, &manifest).await;
            (repo, manifest, layer)
        });
    }
    let pushed = join_all(set).await;
    let want: Vec<String> = {
        let mut v: Vec<String> = pushed.iter().map(|(r, _, _)| r.clone()).collect();
        v.sort();
        v
    };

    let c = client();
    let catalog = oci::fetch(c.get(t.at("/v2/_catalog"))).await;
    assert_eq!(catalog.status, StatusCode::OK);
    assert_eq!(catalog.json(), serde_json::json!({ "repositories": want }));

    // The same list, a page of 10 at a time.
    let mut paged = Vec::new();
    let mut url = t.at("/v2/_catalog?n=10");
    for _ in 0..10 {
        let page = oci::fetch(c.get(&url)).await;
        assert_eq!(page.status, StatusCode::OK);
        for r in page.json()["repositories"].as_array().unwrap() {
            paged.push(r.as_str().unwrap().to_string());
        }
        let link = page.header("link").to_string();
        if link.is_empty() {
            break;
        }
        let next = link.trim_start_matches('<').split('>').next().unwrap();
        url = absolute(&t, next);
    }
    assert_eq!(paged, want, "catalog pages");

    for (repo, manifest, layer) in &pushed {
        let got = oci::get_manifest(&c, &t.url, repo, "v1").await;
        assert_eq!(got.status, StatusCode::OK, "{repo}:v1");
        assert!(got.body == *manifest, "{repo}:v1 bytes differ");
        let blob = oci::get_blob(&c, &t.url, repo, &sha256(layer)).await;
        assert!(
            blob.status == StatusCode::OK && blob.body == *layer,
            "{repo}: layer"
        );
        let tags = oci::fetch(c.get(t.at(&format!("/v2/{repo}/tags/list"))))
            .await
            .json();
        assert_eq!(tags, serde_json::json!({ "name": repo, "tags": ["v1"] }));
    }
}
