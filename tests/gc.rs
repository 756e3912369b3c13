//! Garbage collection and retention: online passes through `POST /admin/gc`,
//! offline passes with `trow gc`, retention policies, tag history, and a
//! stress test of pushes, deletes and passes running together.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::oci::*;
use common::stored::{is_stored, stored_bytes};
use common::{basic_client, client, write_config, Trow};
use parking_lot::Mutex;
use reqwest::{Client, StatusCode};
use serde_json::Value;

const USER: &str = "admin";
const PASSWORD: &str = "gc-test-password";

/// Trow with one user (who, without a `permissions` section, may do
/// everything, `admin` included), no schedule, and `extra` flags.
fn trow(data: &Path, extra: &[&str]) -> Trow {
    let mut args = vec!["--user", USER, "--password", PASSWORD, "--gc-interval", "0"];
    args.extend_from_slice(extra);
    Trow::start_in(data, &args)
}

fn admin() -> Client {
    basic_client(USER, PASSWORD)
}

async fn gc(t: &Trow, dry_run: bool) -> Value {
    let r = admin()
        .post(t.at(&format!("/admin/gc?dry_run={dry_run}")))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn listed(report: &Value, kind: &str) -> Vec<String> {
    report["deleted"][kind]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// Pushes an image of `config` and `layers` under `tag`; returns the
/// manifest bytes and digest.
async fn push(
    c: &Client,
    t: &Trow,
    repo: &str,
    tag: &str,
    config: &[u8],
    layers: &[&[u8]],
) -> (Vec<u8>, String) {
    push_blob(c, &t.url, repo, config).await;
    for l in layers {
        push_blob(c, &t.url, repo, l).await;
    }
    let manifest = image_manifest(config, layers);
    let digest = put_manifest(c, &t.url, repo, tag, OCI_MANIFEST, &manifest).await;
    (manifest, digest)
}

/// Unreferenced blobs go once their grace period is over, whatever made
/// them unreferenced; what a manifest refers to stays; a dry run deletes
/// nothing; the space comes back on disk.
#[tokio::test]
async fn unreferenced_blobs_are_collected_and_the_space_returns() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let t = trow(&dir, &["--gc-grace", "1s"]);
    let c = admin();
    let shared = data(1, 50_000);
    let only_a = data(2, 60_000);
    let only_b = data(3, 70_000);
    let (manifest_a, _) = push(&c, &t, "app", "a", b"{\"a\":1}", &[&shared, &only_a]).await;
    let (_, digest_b) = push(&c, &t, "app", "b", b"{\"b\":1}", &[&shared, &only_b]).await;
    // An upload that never got a manifest.
    let orphan = data(4, 80_000);
    let orphan_digest = push_blob(&c, &t.url, "other", &orphan).await;
    // Image b goes (with its tag).
    let r = c
        .delete(t.at(&format!("/v2/app/manifests/{digest_b}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // Pushed just now: inside its grace period.
    let young = data(5, 1000);
    let young_digest = push_blob(&c, &t.url, "other", &young).await;

    let before = stored_bytes(&dir).await;
    let dry = gc(&t, true).await;
    assert_eq!(dry["dry_run"], true);
    let mut would: Vec<String> = listed(&dry, "blobs");
    would.sort();
    let mut expected = vec![
        sha256(&only_b),
        sha256(b"{\"b\":1}"),
        digest_b.clone(),
        orphan_digest.clone(),
    ];
    expected.sort();
    assert_eq!(would, expected, "{dry}");
    assert_eq!(
        stored_bytes(&dir).await,
        before,
        "a dry run deletes nothing"
    );
    assert!(is_stored(&dir, &orphan_digest).await);

    let report = gc(&t, false).await;
    assert_eq!(report["blobs_deleted"], 4, "{report}");
    let freed = report["bytes_freed"].as_u64().unwrap();
    assert_eq!(
        before - stored_bytes(&dir).await,
        freed,
        "the space is returned on disk"
    );
    for d in &expected {
        assert!(!is_stored(&dir, d).await, "{d} is still stored");
    }
    assert!(is_stored(&dir, &young_digest).await);
    // What image a refers to is intact, byte for byte.
    let got = get_manifest(&c, &t.url, "app", "a").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, manifest_a);
    for (bytes, digest) in [(&shared, sha256(&shared)), (&only_a, sha256(&only_a))] {
        let got = get_blob(&c, &t.url, "app", &digest).await;
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(&got.body, bytes);
    }
    // The orphan's repository had nothing else but the young blob: it stays
    // listed because of it; the orphan itself is gone.
    let got = get_blob(&c, &t.url, "other", &orphan_digest).await;
    assert_eq!(got.status, StatusCode::NOT_FOUND);
    // A second pass finds nothing more.
    let again = gc(&t, false).await;
    assert_eq!(again["blobs_deleted"], 0, "{again}");
}

/// Retention: the newest tags and the patterns stay, the rest go with
/// their manifests and layers; what a kept image's index lists and the
/// signatures of a kept image stay; the tag history says what was where.
#[tokio::test]
async fn retention_policies_delete_old_tags_and_what_only_they_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = write_config(
        tmp.path(),
        "retention:\n  - repos: app\n    keep_newest: 2\n    keep_tags: ['v*']\n    delete_untagged_after: 0s\n",
    );
    let t = trow(
        &dir,
        &[
            "--gc-grace",
            "1s",
            "--config-file",
            config.to_str().unwrap(),
        ],
    );
    let c = admin();
    let mut images = BTreeMap::new();
    // Push times are kept in seconds: one tag per second, oldest first.
    for (i, tag) in ["old-1", "old-2", "v1.0", "new-1", "new-2"]
        .iter()
        .enumerate()
    {
        let layer = data(100 + i as u64, 3000);
        let config = format!("{{\"tag\":\"{tag}\"}}").into_bytes();
        let (manifest, digest) = push(&c, &t, "app", tag, &config, &[&layer]).await;
        images.insert(tag.to_string(), (manifest, digest, sha256(&layer)));
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // A signature of the newest image (untagged, subject = new-2): it stays
    // while new-2 does. One of old-1's: it goes with old-1.
    let sign = |subject: &str, seed: u64| {
        let config = b"{}".to_vec();
        let mut m: Value = serde_json::from_slice(&image_manifest(&config, &[])).unwrap();
        m["artifactType"] = "application/vnd.dev.cosign.artifact.sig.v1+json".into();
        m["subject"] = serde_json::json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": 1});
        m["annotations"] = serde_json::json!({"seed": seed.to_string()});
        serde_json::to_vec(&m).unwrap()
    };
    push_blob(&c, &t.url, "app", b"{}").await;
    let sig_new = sign(&images["new-2"].1, 1);
    let sig_new_digest = sha256(&sig_new);
    put_manifest(&c, &t.url, "app", &sig_new_digest, OCI_MANIFEST, &sig_new).await;
    let sig_old = sign(&images["old-1"].1, 2);
    let sig_old_digest = sha256(&sig_old);
    put_manifest(&c, &t.url, "app", &sig_old_digest, OCI_MANIFEST, &sig_old).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let dry = gc(&t, true).await;
    let mut tags = listed(&dry, "tags");
    tags.sort();
    assert_eq!(tags, ["app:old-1", "app:old-2"], "{dry}");
    let mut manifests = listed(&dry, "manifests");
    manifests.sort();
    let mut expected = vec![
        format!("app@{}", images["old-1"].1),
        format!("app@{}", images["old-2"].1),
        format!("app@{sig_old_digest}"),
    ];
    expected.sort();
    assert_eq!(manifests, expected, "{dry}");
    assert!(listed(&dry, "blobs").contains(&images["old-1"].2), "{dry}");
    assert_eq!(
        get_manifest(&c, &t.url, "app", "old-1").await.status,
        StatusCode::OK,
        "a dry run deletes nothing"
    );

    let report = gc(&t, false).await;
    assert_eq!(report["tags_deleted"], 2, "{report}");
    assert_eq!(report["manifests_deleted"], 3, "{report}");
    for gone in ["old-1", "old-2"] {
        let (_, digest, layer) = &images[gone];
        assert_eq!(
            get_manifest(&c, &t.url, "app", gone).await.status,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get_manifest(&c, &t.url, "app", digest).await.status,
            StatusCode::NOT_FOUND
        );
        assert!(
            !is_stored(&dir, layer).await,
            "{gone}'s layer is still on disk"
        );
    }
    for kept in ["v1.0", "new-1", "new-2"] {
        let (manifest, _, layer) = &images[kept];
        let got = get_manifest(&c, &t.url, "app", kept).await;
        assert_eq!(got.status, StatusCode::OK, "{kept}");
        assert_eq!(&got.body, manifest);
        assert_eq!(
            get_blob(&c, &t.url, "app", layer).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get_manifest(&c, &t.url, "app", &sig_new_digest)
            .await
            .status,
        StatusCode::OK,
        "the signature of a kept image stays"
    );
    assert_eq!(
        get_manifest(&c, &t.url, "app", &sig_old_digest)
            .await
            .status,
        StatusCode::NOT_FOUND
    );

    // What was app:old-1? Its history says, with when it went.
    let h: Value = client()
        .get(t.at("/admin/history/app?tag=old-1"))
        .basic_auth(USER, Some(PASSWORD))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = &h["history"][0];
    assert_eq!(entry["digest"], images["old-1"].1, "{h}");
    assert!(entry["replaced_at"].is_string(), "{h}");
}

/// An index keeps its children; a tag moved away leaves its old manifest
/// untagged, which goes after `delete_untagged_after`; "what was the tag
/// at that time" is answered from the history.
#[tokio::test]
async fn indexes_keep_their_children_and_history_answers_what_a_tag_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = write_config(
        tmp.path(),
        "retention:\n  - repos: '*'\n    delete_untagged_after: 0s\n",
    );
    let t = trow(
        &dir,
        &[
            "--gc-grace",
            "1s",
            "--config-file",
            config.to_str().unwrap(),
        ],
    );
    let c = admin();
    let (_, child_a) = push(&c, &t, "multi", "tmp-a", b"{\"p\":\"a\"}", &[&data(7, 500)]).await;
    let (_, child_b) = push(&c, &t, "multi", "tmp-b", b"{\"p\":\"b\"}", &[&data(8, 500)]).await;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": child_a, "size": 1},
            {"mediaType": OCI_MANIFEST, "digest": child_b, "size": 1},
        ],
    }))
    .unwrap();
    put_manifest(&c, &t.url, "multi", "latest", OCI_INDEX, &index).await;
    // The children lose their own tags: only the index keeps them now.
    for tag in ["tmp-a", "tmp-b"] {
        let r = c
            .delete(t.at(&format!("/v2/multi/manifests/{tag}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let (_, first) = push(&c, &t, "moving", "prod", b"{\"v\":1}", &[&data(9, 500)]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let between = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_, second) = push(&c, &t, "moving", "prod", b"{\"v\":2}", &[&data(10, 500)]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let report = gc(&t, false).await;
    assert_eq!(
        listed(&report, "manifests"),
        [format!("moving@{first}")],
        "{report}"
    );
    for child in [&child_a, &child_b] {
        assert_eq!(
            get_manifest(&c, &t.url, "multi", child).await.status,
            StatusCode::OK
        );
    }
    assert_eq!(
        get_manifest(&c, &t.url, "moving", "prod").await.status,
        StatusCode::OK
    );

    let at = |time: String| {
        let url = t.at(&format!("/admin/history/moving?tag=prod&at={time}"));
        async move {
            let v: Value = client()
                .get(url)
                .basic_auth(USER, Some(PASSWORD))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["history"].as_array().unwrap().clone()
        }
    };
    let then = at(between).await;
    assert_eq!(then.len(), 1);
    assert_eq!(then[0]["digest"], first);
    let now = at(humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()).await;
    assert_eq!(now[0]["digest"], second);
}

/// Only a user with `admin` may start a pass; anonymous never; with logins
/// off nobody may (trow gc runs offline instead).
#[tokio::test]
async fn only_admins_collect() {
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(
        tmp.path(),
        "permissions:\n  alice:\n    - repos: '*'\n      actions: ['*']\n  boss:\n    - repos: '*'\n      actions: [admin]\n  anonymous:\n    - repos: '*'\n      actions: [pull]\n",
    );
    let htpasswd = tmp.path().join("htpasswd");
    let hash = |pw: &str| bcrypt::hash(pw, 4).unwrap();
    std::fs::write(
        &htpasswd,
        format!("alice:{}\nboss:{}\n", hash("a-pw"), hash("b-pw")),
    )
    .unwrap();
    let t = Trow::start_with(&[
        "--gc-interval",
        "0",
        "--config-file",
        config.to_str().unwrap(),
        "--htpasswd",
        htpasswd.to_str().unwrap(),
    ]);
    let r = client().post(t.at("/admin/gc")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = basic_client("alice", "a-pw")
        .post(t.at("/admin/gc"))
        .send()
        .await
        .unwrap();
    let message = common::expect_error(r, StatusCode::FORBIDDEN, "DENIED").await;
    assert!(message.contains("admin"), "{message}");
    let r = basic_client("boss", "b-pw")
        .post(t.at("/admin/gc"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let open = Trow::start_with(&["--gc-interval", "0"]);
    let r = client().post(open.at("/admin/gc")).send().await.unwrap();
    let message = common::expect_error(r, StatusCode::FORBIDDEN, "DENIED").await;
    assert!(message.contains("trow gc"), "{message}");
}

/// `trow gc` refuses while a server holds the data directory, and collects
/// when it does not.
#[tokio::test]
async fn trow_gc_runs_offline_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let mut t = trow(&dir, &[]);
    let orphan = data(11, 5000);
    let digest = push_blob(&admin(), &t.url, "r", &orphan).await;
    let run = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(common::trow_bin());
        cmd.args(["gc", "--data-dir"]).arg(&dir).args(extra);
        cmd.output().unwrap()
    };
    let busy = run(&["--gc-grace", "0s"]);
    assert!(!busy.status.success());
    let err = String::from_utf8_lossy(&busy.stderr);
    assert!(
        err.contains("another trow process") && err.contains("/admin/gc"),
        "{err}"
    );
    t.terminate();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let dry = run(&["--gc-grace", "0s", "--dry-run"]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let report: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(listed(&report, "blobs"), std::slice::from_ref(&digest));
    assert!(is_stored(&dir, &digest).await);
    let real = run(&["--gc-grace", "0s"]);
    assert!(
        real.status.success(),
        "{}",
        String::from_utf8_lossy(&real.stderr)
    );
    assert!(!is_stored(&dir, &digest).await);
}

/// Pushes (of images sharing layers), deletes, tag moves and passes with a
/// zero grace period, all at once, for many rounds; then every tag points
/// to the manifest last acknowledged for it, byte for byte, with every
/// layer readable and digest-correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_deletes_and_passes_together_never_lose_acknowledged_content() {
    const PUSHERS: usize = 4;
    const ROUNDS: usize = 40;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let config = write_config(
        tmp.path(),
        "retention:\n  - repos: '*'\n    delete_untagged_after: 0s\n",
    );
    let t = trow(
        &dir,
        &[
            "--gc-grace",
            "0s",
            "--config-file",
            config.to_str().unwrap(),
        ],
    );
    let base: Arc<str> = t.url.clone().into();
    // Layers every image shares, so that one image's deletion makes them
    // candidates while others are being pushed.
    let shared: Arc<Vec<Vec<u8>>> = Arc::new((0..3).map(|i| data(200 + i, 20_000)).collect());
    // tag → (manifest bytes, layers) last acknowledged.
    type Acked = BTreeMap<String, (Vec<u8>, Vec<Vec<u8>>)>;
    let acked: Arc<Mutex<Acked>> = Arc::default();
    // Manifest pushes refused because a pass took their layers first.
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(180);

    // Passes, back to back.
    let collector = {
        let (base, stop) = (base.clone(), stop.clone());
        tokio::spawn(async move {
            let c = admin();
            let mut passes = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c.post(format!("{base}/admin/gc")).send().await.unwrap();
                assert!(
                    r.status() == StatusCode::OK || r.status() == StatusCode::SERVICE_UNAVAILABLE,
                    "{}",
                    r.text().await.unwrap_or_default()
                );
                passes += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            passes
        })
    };
    let mut workers = Vec::new();
    for w in 0..PUSHERS {
        let (base, shared, acked, refused) =
            (base.clone(), shared.clone(), acked.clone(), refused.clone());
        workers.push(tokio::spawn(async move {
            let c = admin();
            let repo = format!("stress/{}", w % 2);
            for round in 0..ROUNDS {
                if Instant::now() > deadline {
                    break;
                }
                let tag = format!("w{w}-t{}", round % 3);
                let own = data(1000 + (w * ROUNDS + round) as u64, 4000);
                let layers = vec![shared[round % 3].clone(), own];
                let config = format!("{{\"w\":{w},\"r\":{round}}}").into_bytes();
                let manifest = image_manifest(&config, &[&layers[0], &layers[1]]);
                // A client pushes layers, then the manifest; a pass between
                // the two may take the layers (zero grace): then the
                // manifest is refused and the client pushes again.
                let mut acknowledged = false;
                for attempt in 0..5 {
                    push_blob(&c, &base, &repo, &config).await;
                    for l in &layers {
                        push_blob(&c, &base, &repo, l).await;
                    }
                    if round % 4 == 0 && attempt == 0 {
                        // A slow client: the layers' second passes (grace is
                        // counted in seconds) before the manifest comes.
                        tokio::time::sleep(Duration::from_millis(1100)).await;
                    }
                    let r = c
                        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
                        .header("Content-Type", OCI_MANIFEST)
                        .body(manifest.clone())
                        .send()
                        .await
                        .unwrap();
                    match r.status() {
                        StatusCode::CREATED => {
                            acknowledged = true;
                            break;
                        }
                        StatusCode::BAD_REQUEST | StatusCode::SERVICE_UNAVAILABLE => {
                            refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            continue;
                        }
                        s => panic!("manifest push: {s} {}", r.text().await.unwrap_or_default()),
                    }
                }
                if acknowledged {
                    acked
                        .lock()
                        .insert(format!("{repo}:{tag}"), (manifest, layers.clone()));
                }
                // Now and then, delete an image by digest (tag and all).
                if round % 7 == 3 {
                    let victim = format!("w{w}-t{}", (round + 1) % 3);
                    let key = format!("{repo}:{victim}");
                    let known = acked.lock().get(&key).map(|(m, _)| sha256(m));
                    if let Some(digest) = known {
                        let r = c
                            .delete(format!("{base}/v2/{repo}/manifests/{digest}"))
                            .send()
                            .await
                            .unwrap();
                        if r.status() == StatusCode::ACCEPTED {
                            acked.lock().remove(&key);
                        }
                    }
                }
            }
        }));
    }
    for w in workers {
        tokio::time::timeout(Duration::from_secs(300), w)
            .await
            .expect("pushers finish")
            .expect("pusher");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let passes = collector.await.expect("collector");
    assert!(passes > 5, "only {passes} passes ran");
    eprintln!(
        "{passes} passes; {} manifest pushes refused and retried",
        refused.load(std::sync::atomic::Ordering::Relaxed)
    );
    // One more pass with nothing else going on, then check everything.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    gc(&t, false).await;
    let c = admin();
    let acked = acked.lock().clone();
    assert!(
        acked.len() >= PUSHERS,
        "too little was acknowledged: {}",
        acked.len()
    );
    let mut lost = Vec::new();
    for (key, (manifest, layers)) in &acked {
        let (repo, tag) = key.split_once(':').unwrap();
        let got = get_manifest(&c, &t.url, repo, tag).await;
        if got.status != StatusCode::OK || got.body != *manifest {
            lost.push(format!("{key}: manifest {}", got.status));
            continue;
        }
        for l in layers {
            let got = get_blob(&c, &t.url, repo, &sha256(l)).await;
            if got.status != StatusCode::OK || got.body != *l {
                lost.push(format!("{key}: layer {} {}", sha256(l), got.status));
            }
        }
    }
    assert!(lost.is_empty(), "lost:\n{}", lost.join("\n"));
}

/// Measurement, not a check (`--ignored`; figures in docs/PERFORMANCE.md):
/// a pass over `TROW_GC_BLOBS` (default 100 000) stored blobs, once when
/// all of them are kept and once when all of them go, with a client
/// pushing small blobs throughout; prints the pass times, the pushes'
/// latency during each pass and before, and the server's peak RSS. Use
/// `TROW_TEST_BIN` for a release binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn measure_a_pass_over_many_blobs() {
    use trow::meta::sqlite::{Durability, SqliteMeta};
    use trow::meta::{CommitBlob, LinkOrigin, MetaStore};
    use trow::storage::fs::FsBlobStore;
    use trow::storage::BlobStore;

    let count: u64 = std::env::var("TROW_GC_BLOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let seeded = Instant::now();
    {
        // Seed through the library (no fsync): what an upload commits.
        let blobs = FsBlobStore::open(&dir, false).unwrap();
        let meta = SqliteMeta::open(&dir.join("trow.db"), Durability::Normal)
            .await
            .unwrap();
        for i in 0..count {
            let bytes = bytes::Bytes::from(format!("blob {i}").repeat(8));
            let digest: trow::oci::Digest = sha256(&bytes).parse().unwrap();
            blobs.put(&digest, bytes.clone()).await.unwrap();
            meta.commit_blob(CommitBlob {
                repo: &format!("seed/{}", i % 100),
                digest: &digest,
                size: bytes.len() as u64,
                origin: LinkOrigin::Client,
                upload: None,
                content: None,
            })
            .await
            .unwrap();
        }
    }
    eprintln!("seeded {count} blobs in {:?}", seeded.elapsed());

    async fn push_latencies(base: &str, until: impl Fn() -> bool, seed: u64) -> Vec<f64> {
        let c = admin();
        let mut ms = Vec::new();
        let mut i = 0;
        while !until() {
            let bytes = data(seed + i, 4096);
            let start = Instant::now();
            push_blob(&c, base, "live", &bytes).await;
            ms.push(start.elapsed().as_secs_f64() * 1000.0);
            i += 1;
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        ms
    }
    fn pct(v: &[f64], p: f64) -> f64 {
        v.get(((v.len() as f64 - 1.0) * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    }
    let hwm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .map(str::to_string)
            .unwrap()
    };

    for (label, grace) in [
        ("all kept (grace 1h)", "1h"),
        ("all deleted (grace 0s)", "0s"),
    ] {
        let t = trow(&dir, &["--gc-grace", grace]);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        let base = t.url.clone();
        let quiet_until = Instant::now() + Duration::from_secs(3);
        let quiet = push_latencies(&base, || Instant::now() > quiet_until, 1_000_000).await;
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pushing = {
            let (base, done) = (base.clone(), done.clone());
            tokio::spawn(async move {
                push_latencies(
                    &base,
                    || done.load(std::sync::atomic::Ordering::Relaxed),
                    2_000_000,
                )
                .await
            })
        };
        let report = gc(&t, false).await;
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let during = pushing.await.unwrap();
        eprintln!(
            "{label}: pass {} ms, {} blobs deleted; pushes before p50 {:.1} p99 {:.1} ms ({} pushes), during p50 {:.1} p99 {:.1} max {:.1} ms ({} pushes); {}; WAL {} KiB",
            report["duration_ms"],
            report["blobs_deleted"],
            pct(&quiet, 0.5),
            pct(&quiet, 0.99),
            quiet.len(),
            pct(&during, 0.5),
            pct(&during, 0.99),
            during.last().copied().unwrap_or(f64::NAN),
            during.len(),
            hwm(t.pid()),
            std::fs::metadata(dir.join("trow.db-wal")).map_or(0, |m| m.len() / 1024),
        );
    }
}
