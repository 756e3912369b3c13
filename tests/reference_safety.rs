//! Removing bytes never loses what was acknowledged: cache eviction (the one
//! removal path today) against pushes, mounts and manifest pushes of the same
//! digests, checked after a restart so that nothing is served from memory.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake_upstream::FakeUpstream;
use common::oci::*;
use common::{client, Trow};
use parking_lot::Mutex;
use reqwest::StatusCode;

/// Starts Trow on `data` with the fake upstream as a cache of `max_size`.
fn trow_caching(up: &FakeUpstream, data: &Path, max_size: &str) -> Trow {
    let config = common::write_config(
        data.parent().expect("the data directory has a parent"),
        &format!(
            "registry_proxies:\n  max_size: {max_size}\n  registries:\n{}",
            common::insecure_upstream(&up.host, "fake")
        ),
    );
    Trow::start_in(data, &["--config-file", config.to_str().unwrap()])
}

async fn get(url: String) -> (StatusCode, Bytes) {
    let r = client().get(url).send().await.unwrap();
    (r.status(), r.bytes().await.unwrap_or_default())
}

/// Waits (bounded) until the log names `digest` as evicted.
async fn wait_for_eviction(t: &Trow, digest: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !t
        .log()
        .lines()
        .any(|l| l.contains("evicted from the pull-through cache") && l.contains(digest))
    {
        assert!(
            Instant::now() < deadline,
            "{digest} was never evicted:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Manifests and blobs share one namespace of digests: a manifest pushed
/// to a repository whose bytes were also fetched as a blob by the cache
/// must keep its bytes when the cache evicts that blob.
#[tokio::test]
async fn a_manifest_whose_digest_is_a_cached_blob_survives_eviction() {
    let up = FakeUpstream::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let c = client();

    let config = Bytes::from_static(br#"{"architecture":"amd64","os":"linux"}"#);
    let layer = Bytes::from(data(1, 4096));
    let manifest = Bytes::from(image_manifest(&config, &[&layer]));
    // The same bytes, offered upstream as a blob.
    let shared = up.add_blob(manifest.clone());
    let filler: Vec<String> = (0..3)
        .map(|i| up.add_blob(Bytes::from(data(10 + i, 400 * 1024))))
        .collect();

    let mut t = trow_caching(&up, &dir, "1MiB");
    let (status, body) = get(t.at(&format!("/v2/f/fake/any/blobs/{shared}"))).await;
    assert_eq!(status, StatusCode::OK, "{}", t.log());
    assert_eq!(body, manifest);

    push_blob(&c, &t.url, "app", &config).await;
    push_blob(&c, &t.url, "app", &layer).await;
    let pushed = put_manifest(&c, &t.url, "app", "v1", OCI_MANIFEST, &manifest).await;
    assert_eq!(pushed, shared, "the manifest's digest is the cached blob's");

    // Pull times are kept in whole seconds: make the shared blob the oldest,
    // then overflow the cache so that eviction picks it.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for d in &filler {
        let (status, _) = get(t.at(&format!("/v2/f/fake/any/blobs/{d}"))).await;
        assert_eq!(status, StatusCode::OK);
    }
    wait_for_eviction(&t, &shared).await;

    // Restart, so the manifest is read from storage and not from memory.
    t.terminate();
    let t = trow_caching(&up, &dir, "1MiB");
    let got = get_manifest(&c, &t.url, "app", "v1").await;
    assert_eq!(got.status, StatusCode::OK, "{}", t.log());
    assert_eq!(got.body, manifest.to_vec());
    let got = get_blob(&c, &t.url, "app", &shared).await;
    assert_eq!(
        got.status,
        StatusCode::NOT_FOUND,
        "a manifest is not a blob of app"
    );
}

/// Many rounds of pushes, mounts from the cache and manifest pushes of the
/// very digests the cache keeps fetching and evicting. Every acknowledged
/// blob and manifest must afterwards be readable and hash to its digest.
///
/// A digest is at risk only while the cache alone holds it (a client's link
/// keeps it), so each round uses a fresh blob: the cache fetches it, then
/// pushers push the same bytes and mounters mount it from the cache
/// repository while a fresh filler is fetched, whose arrival makes the cache
/// evict either the filler or the fresh blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_and_mounts_racing_eviction_never_lose_acknowledged_bytes() {
    const ROUNDS: usize = 500;
    const WORKERS: usize = 12;
    const SIZE: usize = 16 * 1024;
    let up = FakeUpstream::start().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let fresh: Arc<Vec<(String, Bytes)>> = Arc::new(
        (0..ROUNDS as u64)
            .map(|i| {
                let b = Bytes::from(data(1000 + i, SIZE));
                (up.add_blob(b.clone()), b)
            })
            .collect(),
    );
    let fillers: Arc<Vec<String>> = Arc::new(
        (0..ROUNDS as u64)
            .map(|i| up.add_blob(Bytes::from(data(5000 + i, SIZE))))
            .collect(),
    );
    // Room for one blob: the filler's fetch evicts the fresh blob or itself.
    let mut t = trow_caching(&up, &dir, "20KiB");
    let base: Arc<str> = t.url.clone().into();
    // (repository, digest) of every blob a client was told is stored, and
    // (repository, tag, manifest bytes) of every acknowledged manifest.
    let acked_blobs = Arc::new(Mutex::new(BTreeSet::<(String, String)>::new()));
    let acked_manifests = Arc::new(Mutex::new(Vec::<(String, String, Bytes)>::new()));
    let barrier = Arc::new(tokio::sync::Barrier::new(WORKERS));

    // Writers that keep the metadata store's write queue busy, as a busy
    // registry does: commits then wait in it, which widens any window
    // between "the file exists" and "the link is recorded".
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut noise = Vec::new();
    {
        let c = client();
        let config = Bytes::from_static(b"{}");
        push_blob(&c, &base, "noise", &config).await;
        let manifest = Bytes::from(image_manifest(&config, &[]));
        for n in 0..6 {
            let (c, base, stop, manifest) =
                (c.clone(), base.clone(), stop.clone(), manifest.clone());
            noise.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let tag = format!("n{n}-{}", i % 50);
                    put_manifest(&c, &base, "noise", &tag, OCI_MANIFEST, &manifest).await;
                    i += 1;
                }
            }));
        }
    }
    let mut tasks = Vec::new();
    for worker in 0..WORKERS {
        let (fresh, fillers, base, barrier) = (
            fresh.clone(),
            fillers.clone(),
            base.clone(),
            barrier.clone(),
        );
        let (acked_blobs, acked_manifests) = (acked_blobs.clone(), acked_manifests.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for round in 0..ROUNDS {
                let (digest, bytes) = &fresh[round];
                // First the cache fetches the fresh blob; then everyone works
                // on it at once while the fillers make the cache evict.
                if worker == 0 {
                    let got = get_blob(&c, &base, "f/fake/src", digest).await;
                    assert_eq!(got.status, StatusCode::OK);
                    assert_eq!(sha256(&got.body), *digest);
                }
                barrier.wait().await;
                if worker % 3 != 0 {
                    // Spread the first link over the moment eviction runs.
                    tokio::time::sleep(Duration::from_micros((round % 16) as u64 * 250)).await;
                }
                match worker % 3 {
                    0 if worker == 0 => {
                        let got = get_blob(&c, &base, "f/fake/src", &fillers[round]).await;
                        assert_eq!(got.status, StatusCode::OK);
                    }
                    0 => {}
                    1 => {
                        let repo = format!("pushed/w{worker}");
                        let r = c
                            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
                            .body(bytes.clone())
                            .send()
                            .await
                            .unwrap();
                        if r.status() == StatusCode::CREATED {
                            acked_blobs.lock().insert((repo.clone(), digest.clone()));
                        }
                        if round % 10 == 0 {
                            // An image over it.
                            let config =
                                Bytes::from(format!("{{\"round\":{round},\"w\":{worker}}}"));
                            push_blob(&c, &base, &repo, &config).await;
                            acked_blobs.lock().insert((repo.clone(), sha256(&config)));
                            let manifest = Bytes::from(image_manifest(&config, &[bytes.as_ref()]));
                            let tag = format!("r{round}");
                            put_manifest(&c, &base, &repo, &tag, OCI_MANIFEST, &manifest).await;
                            acked_manifests.lock().push((repo, tag, manifest));
                        }
                    }
                    _ => {
                        let repo = format!("mounted/w{worker}");
                        let r = c
                            .post(format!(
                                "{base}/v2/{repo}/blobs/uploads/?mount={digest}&from=f/fake/src"
                            ))
                            .send()
                            .await
                            .unwrap();
                        if r.status() == StatusCode::CREATED {
                            acked_blobs.lock().insert((repo, digest.clone()));
                        }
                    }
                }
            }
        }));
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(300), task)
            .await
            .expect("workers finish in time")
            .expect("worker");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in noise {
        task.await.expect("noise writer");
    }
    let acked_blobs = acked_blobs.lock().clone();
    let acked_manifests = acked_manifests.lock().clone();
    assert!(
        acked_blobs.iter().any(|(r, _)| r.starts_with("mounted/")),
        "some mounts succeeded (else the race was not exercised)"
    );
    t.expect_log("evicted from the pull-through cache").await;
    // Restart: nothing may come from memory, and recovery must keep it all.
    t.terminate();
    let t = trow_caching(&up, &dir, "100KiB");
    let c = client();
    let mut lost = Vec::new();
    for (repo, digest) in &acked_blobs {
        let got = get_blob(&c, &t.url, repo, digest).await;
        if got.status != StatusCode::OK || sha256(&got.body) != *digest {
            lost.push(format!("blob {repo}@{digest}: {}", got.status));
        }
    }
    for (repo, tag, manifest) in &acked_manifests {
        let got = get_manifest(&c, &t.url, repo, tag).await;
        if got.status != StatusCode::OK || got.body != manifest.to_vec() {
            lost.push(format!("manifest {repo}:{tag}: {}", got.status));
        }
    }
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged objects were lost:\n{}",
        lost.len(),
        acked_blobs.len() + acked_manifests.len(),
        lost.join("\n")
    );
}

/// A repository leaves the catalog with its last manifest and blob.
#[tokio::test]
async fn an_emptied_repository_leaves_the_catalog() {
    let t = Trow::start();
    let c = client();
    let (manifest, digest) = push_image(&c, &t.url, "gone/app", "v1", 3).await;
    push_image(&c, &t.url, "kept", "v1", 4).await;
    let m: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let catalog = || async {
        let v: serde_json::Value = client()
            .get(t.at("/v2/_catalog"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["repositories"].clone()
    };
    assert_eq!(catalog().await, serde_json::json!(["gone/app", "kept"]));
    let r = c
        .delete(t.at(&format!("/v2/gone/app/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Its blobs are still there: still listed.
    assert_eq!(catalog().await, serde_json::json!(["gone/app", "kept"]));
    let mut blobs = vec![m["config"]["digest"].as_str().unwrap().to_string()];
    for l in m["layers"].as_array().unwrap() {
        blobs.push(l["digest"].as_str().unwrap().to_string());
    }
    for b in blobs {
        let r = c
            .delete(t.at(&format!("/v2/gone/app/blobs/{b}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    assert_eq!(catalog().await, serde_json::json!(["kept"]));
    let r = c.get(t.at("/v2/gone/app/tags/list")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}
