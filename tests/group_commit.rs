//! Group commit under kill -9: 16 clients push small blobs and manifests
//! at once, so their commits (and the upload sessions they open) share
//! SQLite transactions (src/meta/group_commit.rs), with the bytes in the
//! database; the server is killed in the middle. Everything it
//! acknowledged must be served after the restart, byte for byte, manifests
//! by their tags, and every upload session it acknowledged must accept its
//! bytes.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::oci::{data, image_manifest, sha256, OCI_MANIFEST};
use common::{client, required_header, Trow};
use reqwest::{Client, StatusCode};
use tokio::task::JoinSet;

const CLIENTS: usize = 16;
const ROUNDS: u64 = 3;

/// A blob the server acknowledged (201 on its PUT).
#[derive(Clone)]
struct Acked {
    repo: String,
    digest: String,
    bytes: Vec<u8>,
}

/// A manifest the server acknowledged (201 on its PUT by tag).
#[derive(Clone)]
struct AckedManifest {
    repo: String,
    tag: String,
    digest: String,
    bytes: Vec<u8>,
}

/// Pushes 4 KiB blobs (POST, then PUT with the bytes), each second one
/// followed by a manifest that names it as its config, until `stop` or an
/// error; records what was acknowledged, and the upload sessions opened
/// (202 on the POST) in `opened`.
#[allow(clippy::too_many_arguments)]
async fn pusher(
    c: Client,
    base: String,
    worker: usize,
    round: u64,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    manifests: Arc<Mutex<Vec<AckedManifest>>>,
    opened: Arc<Mutex<Vec<String>>>,
) {
    let repo = format!("gc/w{worker}");
    for n in 0u64.. {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let bytes = data(round << 40 | (worker as u64) << 24 | n, 4096);
        let digest = sha256(&bytes);
        let Ok(r) = c
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
        else {
            return;
        };
        if r.status() != StatusCode::ACCEPTED {
            return;
        }
        let location = required_header(&r, "location");
        let location = if location.starts_with('/') {
            format!("{base}{location}")
        } else {
            location
        };
        // Every fourth session stays open: it must survive the kill too
        // (kept as a path: the restarted server listens on another port).
        if n % 4 == 3 {
            let path = location.trim_start_matches(&base).to_string();
            opened.lock().unwrap().push(path);
            continue;
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        let Ok(r) = c
            .put(format!("{location}{sep}digest={digest}"))
            .body(bytes.clone())
            .send()
            .await
        else {
            return;
        };
        if r.status() != StatusCode::CREATED {
            return;
        }
        acked.lock().unwrap().push(Acked {
            repo: repo.clone(),
            digest,
            bytes: bytes.clone(),
        });
        if n % 2 == 0 {
            let manifest = image_manifest(&bytes, &[]);
            let tag = format!("r{round}-n{n}");
            let Ok(r) = c
                .put(format!("{base}/v2/{repo}/manifests/{tag}"))
                .header("Content-Type", OCI_MANIFEST)
                .body(manifest.clone())
                .send()
                .await
            else {
                return;
            };
            if r.status() != StatusCode::CREATED {
                return;
            }
            manifests.lock().unwrap().push(AckedManifest {
                repo: repo.clone(),
                tag,
                digest: sha256(&manifest),
                bytes: manifest,
            });
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_small_pushes_survive_kill_9() {
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let c = client();
    let acked = Arc::new(Mutex::new(Vec::new()));
    let manifests = Arc::new(Mutex::new(Vec::new()));
    for round in 0..ROUNDS {
        let mut t = Trow::start_in(&data_dir, &[]);
        let stop = Arc::new(AtomicBool::new(false));
        let opened = Arc::new(Mutex::new(Vec::new()));
        let acked_before = acked.lock().unwrap().len();
        let mut workers = JoinSet::new();
        for w in 0..CLIENTS {
            workers.spawn(pusher(
                c.clone(),
                t.url.clone(),
                w,
                round,
                stop.clone(),
                acked.clone(),
                manifests.clone(),
                opened.clone(),
            ));
        }
        // Let the pushes run, then kill the server in the middle of them.
        tokio::time::sleep(Duration::from_millis(700 + 400 * round)).await;
        t.kill();
        stop.store(true, Ordering::Relaxed);
        while workers.join_next().await.is_some() {}
        let acked_now = acked.lock().unwrap().len();
        assert!(
            acked_now - acked_before >= CLIENTS,
            "round {round}: only {} pushes acknowledged before the kill; the test proves nothing",
            acked_now - acked_before
        );

        let t = Trow::start_in(&data_dir, &[]);
        let all: Vec<Acked> = acked.lock().unwrap().clone();
        for a in &all {
            let url = format!("{}/v2/{}/blobs/{}", t.url, a.repo, a.digest);
            let r = c.get(&url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK, "round {round}: {url} lost");
            let body = r.bytes().await.unwrap();
            assert!(body == a.bytes, "round {round}: {url} differs");
        }
        let all: Vec<AckedManifest> = manifests.lock().unwrap().clone();
        assert!(
            !all.is_empty(),
            "round {round}: no manifest was acknowledged; the test proves nothing"
        );
        for m in &all {
            let url = format!("{}/v2/{}/manifests/{}", t.url, m.repo, m.tag);
            let r = c
                .get(&url)
                .header("Accept", OCI_MANIFEST)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "round {round}: {url} lost");
            assert_eq!(
                required_header(&r, "docker-content-digest"),
                m.digest,
                "round {round}: {url}"
            );
            let body = r.bytes().await.unwrap();
            assert!(body == m.bytes, "round {round}: {url} differs");
        }
        let sessions: Vec<String> = opened.lock().unwrap().clone();
        for (i, path) in sessions.iter().enumerate() {
            let location = format!("{}{path}", t.url);
            let bytes = data(round << 40 | 1 << 39 | i as u64, 4096);
            let sep = if location.contains('?') { '&' } else { '?' };
            let r = c
                .put(format!("{location}{sep}digest={}", sha256(&bytes)))
                .body(bytes)
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status(),
                StatusCode::CREATED,
                "round {round}: acknowledged upload session {location} was lost: {}",
                r.text().await.unwrap()
            );
        }
    }
}
