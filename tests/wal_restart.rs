//! The checkpointer starts the metadata WAL over (`wal_checkpoint(RESTART)`)
//! once it grows past a threshold. Here the threshold is tiny, so that it
//! happens every second while clients push blobs and manifests at once:
//! no push may fail for it. (Run from a connection other than the writer,
//! the restart made SQLite refuse, with SQLITE_BUSY, write transactions
//! that had begun by reading: 500s on manifest pushes.)

mod common;

use bytes::Bytes;
use common::oci::{image_manifest, push_blob, OCI_MANIFEST};
use common::{client, Trow};
use reqwest::StatusCode;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pushes_never_fail_while_the_wal_starts_over() {
    // This test binary has this one test: the variable reaches only the
    // Trow it starts.
    std::env::set_var("TROW_WAL_RESTART_FRAMES", "32");
    let t = Trow::start();
    let until = Instant::now() + Duration::from_secs(4);
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let base = t.url.clone();
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut pushed = 0u64;
            while Instant::now() < until {
                let config = Bytes::from(format!("{{\"w\":{w},\"i\":{pushed}}}"));
                push_blob(&c, &base, "app", &config).await;
                let manifest = image_manifest(&config, &[]);
                let r = c
                    .put(format!("{base}/v2/app/manifests/w{w}-{}", pushed % 20))
                    .header("Content-Type", OCI_MANIFEST)
                    .body(manifest)
                    .send()
                    .await
                    .expect("put manifest");
                let status = r.status();
                let body = r.text().await.unwrap_or_default();
                assert_eq!(
                    status,
                    StatusCode::CREATED,
                    "manifest push {pushed} of worker {w}: {body}"
                );
                pushed += 1;
            }
            pushed
        }));
    }
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("worker");
    }
    assert!(
        total > 100,
        "only {total} pushes: the WAL was not exercised"
    );
    assert!(
        !t.log().contains("could not start the metadata WAL over"),
        "{}",
        t.log()
    );
}
