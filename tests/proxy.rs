//! The pull-through cache, against CNCF Distribution (a real registry with
//! basic auth) and a scriptable fake upstream.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::distribution::Distribution;
use common::fake_upstream::FakeUpstream;
use common::oci::*;
use common::{basic_client, client, have_tool, header, insecure_upstream, trow_with_config, Trow};
use reqwest::StatusCode;
use serde_json::Value;

fn upstream_entry(host: &str, alias: &str, creds: Option<(&str, &str)>) -> String {
    let mut s = insecure_upstream(host, alias);
    if let Some((u, p)) = creds {
        s.push_str(&format!("      username: {u}\n      password: {p}\n"));
    }
    s
}

async fn get_bytes(url: String) -> (StatusCode, Option<String>, Bytes) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status();
    let digest = header(&r, "docker-content-digest");
    (status, digest, r.bytes().await.unwrap_or_default())
}

/// Waits until the request log holds `n` lines containing all of `parts`.
async fn wait_for_log(t: &Trow, parts: &[&str], n: usize) -> bool {
    for _ in 0..100 {
        let count = t
            .log()
            .lines()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .count();
        if count >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn path_and_mirror_forms_share_one_cache_of_a_real_registry() {
    let Some(up) = Distribution::start() else {
        return;
    };
    let uc = up.client();
    let (manifest, digest) = push_image(&uc, &up.url, "team/app", "v1", 11).await;
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    let layer_digest = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let config_digest = m["config"]["digest"].as_str().unwrap().to_string();

    let yaml = format!(
        "registry_proxies:\n  tag_ttl: 1h\n  registries:\n{}",
        upstream_entry(&up.host, "up", Some((&up.user, &up.password)))
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);

    // Path form.
    let (status, got_digest, body) = get_bytes(t.at("/v2/f/up/team/app/manifests/v1")).await;
    assert_eq!(status, StatusCode::OK, "{}", t.log());
    assert_eq!(got_digest.as_deref(), Some(digest.as_str()));
    assert_eq!(body.as_ref(), manifest.as_slice());
    let (status, _, layer) =
        get_bytes(t.at(&format!("/v2/f/up/team/app/blobs/{layer_digest}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256(&layer), layer_digest);
    assert!(
        wait_for_log(&t, &["/v2/f/up/team/app/manifests/v1", "cache=\"miss\""], 1).await,
        "{}",
        t.log()
    );

    // Mirror form, as containerd sends it: served from the same cache.
    let r = client()
        .get(t.at(&format!("/v2/team/app/manifests/v1?ns={}", up.host)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "oci-namespace").as_deref(),
        Some(up.host.as_str())
    );
    assert_eq!(
        header(&r, "docker-content-digest").as_deref(),
        Some(digest.as_str())
    );
    assert!(
        wait_for_log(&t, &["/v2/team/app/manifests/v1", "cache=\"hit\""], 1).await,
        "{}",
        t.log()
    );
    let r = client()
        .get(t.at(&format!(
            "/v2/team/app/blobs/{config_digest}?ns={}",
            up.host
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(sha256(&r.bytes().await.unwrap()), config_digest);

    // HEAD of a blob through the cache.
    let r = client()
        .head(t.at(&format!("/v2/f/up/team/app/blobs/{layer_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), Some(layer.len().to_string()));

    // Cached content is listed under f/<alias>/<repo>.
    let catalog: Value = client()
        .get(t.at("/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        catalog["repositories"],
        serde_json::json!(["f/up/team/app"])
    );

    // A real client through the cache.
    if have_tool("skopeo") {
        let out = std::process::Command::new("skopeo")
            .args(["inspect", "--tls-verify=false", "--raw"])
            .arg(format!("docker://{}/f/up/team/app:v1", t.host))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, manifest);
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("skopeo")
            .args(["copy", "--src-tls-verify=false"])
            .arg(format!("docker://{}/f/up/team/app:v1", t.host))
            .arg(format!("oci:{}:v1", dir.path().join("layout").display()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // skopeo may recompress our synthetic (not really gzip) layer, but
        // the config it copied must be the upstream's, byte for byte.
        let hex = config_digest.trim_start_matches("sha256:");
        let copied = std::fs::read(dir.path().join("layout/blobs/sha256").join(hex)).unwrap();
        assert_eq!(sha256(&copied), config_digest);
    }

    // The cache is read-only to clients.
    let c = client();
    let r = c
        .post(t.at("/v2/f/up/team/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNSUPPORTED");
    assert!(body["errors"][0]["message"]
        .as_str()
        .unwrap()
        .contains("read-only"));
    let r = c
        .put(t.at("/v2/f/up/team/app/manifests/v2"))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = c
        .delete(t.at(&format!("/v2/f/up/team/app/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    let r = c
        .post(t.at(&format!(
            "/v2/f/up/team/x/blobs/uploads/?mount={layer_digest}&from=f/up/team/app"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn stale_cache_serves_when_upstream_is_down_and_moved_tags_are_seen() {
    let Some(mut up) = Distribution::start() else {
        return;
    };
    let uc = up.client();
    let (first, first_digest) = push_image(&uc, &up.url, "lib/web", "stable", 21).await;
    let yaml = format!(
        "registry_proxies:\n  tag_ttl: 1s\n  stale_timeout: 2s\n  registries:\n{}",
        upstream_entry(&up.host, "dist", Some((&up.user, &up.password)))
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let url = t.at("/v2/f/dist/lib/web/manifests/stable");
    let (status, digest, _) = get_bytes(url.clone()).await;
    assert_eq!(status, StatusCode::OK, "{}", t.log());
    assert_eq!(digest.as_deref(), Some(first_digest.as_str()));
    let m: Value = serde_json::from_slice(&first).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap().to_string();
    let (status, _, _) = get_bytes(t.at(&format!("/v2/f/dist/lib/web/blobs/{layer}"))).await;
    assert_eq!(status, StatusCode::OK);

    // Move the tag upstream; after the freshness window Trow sees it.
    let (_, second_digest) = push_image(&uc, &up.url, "lib/web", "stable", 22).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let (_, digest, _) = get_bytes(url.clone()).await;
    assert_eq!(digest.as_deref(), Some(second_digest.as_str()));

    // Upstream goes away: the cached tag and blobs are still served.
    up.stop();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = std::time::Instant::now();
    let (status, digest, _) = get_bytes(url.clone()).await;
    assert_eq!(status, StatusCode::OK, "{}", t.log());
    assert_eq!(digest.as_deref(), Some(second_digest.as_str()));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "bounded wait for a dead upstream"
    );
    assert!(
        wait_for_log(
            &t,
            &["/v2/f/dist/lib/web/manifests/stable", "cache=\"stale\""],
            1
        )
        .await,
        "{}",
        t.log()
    );
    let (status, _, bytes) = get_bytes(t.at(&format!("/v2/f/dist/lib/web/blobs/{layer}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256(&bytes), layer);
    // By digest too, and the old digest is still cached.
    let (status, _, _) =
        get_bytes(t.at(&format!("/v2/f/dist/lib/web/manifests/{first_digest}"))).await;
    assert_eq!(status, StatusCode::OK);
    // Something never cached: a clear upstream error.
    let r = client()
        .get(t.at("/v2/f/dist/lib/other/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY, "{}", t.log());
    let body: Value = r.json().await.unwrap();
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("not cached"),
        "{body}"
    );
}

/// An image on the fake upstream with one layer of `layer_len` bytes.
fn fake_image(
    up: &FakeUpstream,
    repo: &str,
    tag: &str,
    layer_len: usize,
    seed: u64,
) -> (String, String, Bytes) {
    let layer = Bytes::from(data(seed, layer_len));
    let config = Bytes::from(format!("{{\"seed\":{seed}}}"));
    let layer_digest = up.add_blob(layer.clone());
    up.add_blob(config.clone());
    let manifest = Bytes::from(image_manifest(&config, &[&layer]));
    let digest = up.add_manifest(repo, Some(tag), OCI_MANIFEST, manifest);
    (digest, layer_digest, layer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_layer_is_fetched_once_and_streamed_to_every_client() {
    let up = FakeUpstream::start().await;
    const SIZE: usize = 200 * 1024 * 1024;
    let (_, layer_digest, layer) = fake_image(&up, "big/image", "v1", SIZE, 31);
    up.behaviour.lock().hold_after = Some(4 * 1024 * 1024);
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}",
        upstream_entry(&up.host, "fake", None)
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let url = t.at(&format!("/v2/f/fake/big/image/blobs/{layer_digest}"));

    // The first client gets its first bytes while upstream is still holding
    // back the rest of the layer: Trow streams, it does not wait.
    let first = client().get(url.clone()).send().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(header(&first, "content-length"), Some(SIZE.to_string()));
    let mut first_stream = first.bytes_stream();
    use futures_util::StreamExt;
    let first_chunk = tokio::time::timeout(Duration::from_secs(30), first_stream.next())
        .await
        .expect("first byte must arrive before upstream sends the rest")
        .unwrap()
        .unwrap();
    assert!(!first_chunk.is_empty());
    assert!(
        up.stats
            .blob_bytes_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            < SIZE
    );

    // 19 more clients join the same in-flight fetch.
    let mut clients = Vec::new();
    for _ in 0..19 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let r = client().get(url).send().await.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
            let mut n = 0;
            let mut s = r.bytes_stream();
            while let Some(chunk) = s.next().await {
                let chunk = chunk.unwrap();
                n += chunk.len();
                sha2::Digest::update(&mut hasher, &chunk);
            }
            (
                n,
                format!("sha256:{}", hex::encode(sha2::Digest::finalize(hasher))),
            )
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    up.release();

    let mut first_hasher = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut first_hasher, &first_chunk);
    let mut n = first_chunk.len();
    while let Some(chunk) = first_stream.next().await {
        let chunk = chunk.unwrap();
        n += chunk.len();
        sha2::Digest::update(&mut first_hasher, &chunk);
    }
    assert_eq!(n, SIZE);
    assert_eq!(
        format!(
            "sha256:{}",
            hex::encode(sha2::Digest::finalize(first_hasher))
        ),
        layer_digest
    );
    for c in clients {
        let (n, digest) = c.await.unwrap();
        assert_eq!(n, SIZE);
        assert_eq!(digest, layer_digest);
    }
    let path = format!("/v2/big/image/blobs/{layer_digest}");
    assert_eq!(up.count("GET", &path), 1, "upstream served the layer once");
    drop(layer);

    // Now cached: served without upstream, with ranges.
    up.stop();
    let r = client()
        .get(url.clone())
        .header("Range", "bytes=0-9")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
    assert!(
        wait_for_log(&t, &["cache=\"shared\""], 19).await,
        "{}",
        t.log()
    );
}

#[tokio::test]
async fn concurrent_cold_manifest_pulls_fetch_once() {
    let up = FakeUpstream::start().await;
    let (digest, _, _) = fake_image(&up, "m/one", "v1", 1000, 41);
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}",
        upstream_entry(&up.host, "fake", None)
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let url = t.at(&format!("/v2/f/fake/m/one/manifests/{digest}"));
        tasks.push(tokio::spawn(async move { get_bytes(url).await }));
    }
    for task in tasks {
        let (status, d, _) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(d.as_deref(), Some(digest.as_str()));
    }
    assert_eq!(up.count("GET", &format!("/v2/m/one/manifests/{digest}")), 1);
}

#[tokio::test]
async fn corrupt_upstream_content_is_never_cached() {
    let up = FakeUpstream::start().await;
    let (_, layer_digest, layer) = fake_image(&up, "bad/image", "v1", 3 * 1024 * 1024, 51);
    up.behaviour.lock().corrupt = true;
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}",
        upstream_entry(&up.host, "fake", None)
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let url = t.at(&format!("/v2/f/fake/bad/image/blobs/{layer_digest}"));

    // The client sees its response cut short, never a complete wrong blob.
    let r = client().get(url.clone()).send().await.unwrap();
    let body = r.bytes().await;
    match body {
        Err(_) => {}
        Ok(b) => assert!(
            b.len() < layer.len(),
            "a corrupt blob must not be delivered whole"
        ),
    }
    let hex = layer_digest.trim_start_matches("sha256:");
    assert!(!t
        .data_dir
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());

    // Once upstream is fixed, the next request fetches again and succeeds.
    up.behaviour.lock().corrupt = false;
    let (status, _, bytes) = get_bytes(url).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(bytes, layer);
    assert_eq!(
        up.count("GET", &format!("/v2/bad/image/blobs/{layer_digest}")),
        2
    );
    assert!(common::wait_for_file(
        &t.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
    ));

    // A manifest that does not match its digest is refused too.
    let real = Bytes::from(image_manifest(b"{}", &[]));
    let fake_digest = sha256(b"some other manifest");
    up.content.lock().manifests.insert(
        ("bad/image".into(), fake_digest.clone()),
        (OCI_MANIFEST.into(), real),
    );
    let r = client()
        .get(t.at(&format!("/v2/f/fake/bad/image/manifests/{fake_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test]
async fn rate_limits_and_missing_content_are_passed_on() {
    let up = FakeUpstream::start().await;
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}",
        upstream_entry(&up.host, "fake", None)
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let r = client()
        .get(t.at("/v2/f/fake/none/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN");
    let r = client()
        .get(t.at(&format!("/v2/f/fake/none/blobs/{}", sha256(b"x"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    up.behaviour.lock().rate_limit = Some("42".into());
    let r = client()
        .get(t.at("/v2/f/fake/none/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after").as_deref(), Some("42"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "TOOMANYREQUESTS");
}

#[tokio::test]
async fn offline_mode_serves_only_the_cache() {
    let up = FakeUpstream::start().await;
    let (digest, _, _) = fake_image(&up, "off/line", "v1", 1000, 61);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let online = dir.path().join("online.yaml");
    std::fs::write(
        &online,
        format!(
            "registry_proxies:\n  registries:\n{}",
            upstream_entry(&up.host, "fake", None)
        ),
    )
    .unwrap();
    let offline = dir.path().join("offline.yaml");
    std::fs::write(
        &offline,
        format!(
            "registry_proxies:\n  offline: true\n  registries:\n{}",
            upstream_entry(&up.host, "fake", None)
        ),
    )
    .unwrap();
    {
        let t = Trow::start_in(&data, &["--config-file", online.to_str().unwrap()]);
        let (status, _, _) = get_bytes(t.at("/v2/f/fake/off/line/manifests/v1")).await;
        assert_eq!(status, StatusCode::OK);
    }
    let before = up.counts.lock().values().sum::<usize>();
    let t = Trow::start_in(&data, &["--config-file", offline.to_str().unwrap()]);
    let (status, d, _) = get_bytes(t.at("/v2/f/fake/off/line/manifests/v1")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(d.as_deref(), Some(digest.as_str()));
    let r = client()
        .get(t.at("/v2/f/fake/off/other/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        up.counts.lock().values().sum::<usize>(),
        before,
        "offline never contacts upstream"
    );
}

#[tokio::test]
async fn least_recently_pulled_blobs_are_evicted_beyond_max_size() {
    let up = FakeUpstream::start().await;
    const MIB: usize = 1024 * 1024;
    let blobs: Vec<(String, Bytes)> = (0..3u64)
        .map(|i| {
            let b = Bytes::from(data(70 + i, 2 * MIB));
            (up.add_blob(b.clone()), b)
        })
        .collect();
    // A blob pushed to Trow directly that is also pulled through the cache.
    let pushed = Bytes::from(data(80, MIB));
    let pushed_digest = up.add_blob(pushed.clone());
    let yaml = format!(
        "registry_proxies:\n  max_size: 5MiB\n  registries:\n{}",
        upstream_entry(&up.host, "fake", None)
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    push_blob(&client(), &t.url, "local/repo", &pushed).await;
    let (status, _, _) = get_bytes(t.at(&format!("/v2/f/fake/lru/blobs/{pushed_digest}"))).await;
    assert_eq!(status, StatusCode::OK);

    let file = |digest: &str| {
        let hex = digest.trim_start_matches("sha256:");
        t.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
    };
    for (digest, bytes) in &blobs {
        let (status, _, got) = get_bytes(t.at(&format!("/v2/f/fake/lru/blobs/{digest}"))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(&got, bytes);
        // Pull times are recorded in whole seconds.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    // 6 MiB cached > 5 MiB: the oldest goes, down to below 4.5 MiB.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while file(&blobs[0].0).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was evicted:\n{}",
            t.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(file(&blobs[1].0).exists() && file(&blobs[2].0).exists());
    // The eviction logs just after removing the file.
    t.expect_log("evicted from the pull-through cache").await;
    // Pushed content is never evicted.
    assert!(file(&pushed_digest).exists());
    let (status, _, got) = get_bytes(t.at(&format!("/v2/local/repo/blobs/{pushed_digest}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, pushed);
    // An evicted blob is fetched again on the next pull.
    let (status, _, got) = get_bytes(t.at(&format!("/v2/f/fake/lru/blobs/{}", blobs[0].0))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(got, blobs[0].1);
    assert_eq!(up.count("GET", &format!("/v2/lru/blobs/{}", blobs[0].0)), 2);
}

#[tokio::test]
async fn a_trow_upstream_with_token_auth() {
    // The upstream is another Trow that requires a login (Bearer token flow).
    let upstream = Trow::start_with(&["--user", "mirror", "--password", "s3cret"]);
    let (manifest, digest) = push_image(
        &basic_client("mirror", "s3cret"),
        &upstream.url,
        "private/app",
        "v1",
        101,
    )
    .await;
    let r = client()
        .get(upstream.at("/v2/private/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::UNAUTHORIZED,
        "the upstream really requires a login"
    );

    let entry = format!(
        "    - host: \"{}\"\n      alias: tokened\n      insecure: true\n      username: mirror\n      password: s3cret\n",
        upstream.host
    );
    let (t, _cfg) = trow_with_config(&format!("registry_proxies:\n  registries:\n{entry}"), &[]);
    let (status, got, body) = get_bytes(t.at("/v2/f/tokened/private/app/manifests/v1")).await;
    assert_eq!(status, StatusCode::OK, "{}", t.log());
    assert_eq!(got.as_deref(), Some(digest.as_str()));
    assert_eq!(body.as_ref(), manifest.as_slice());
    let m: Value = serde_json::from_slice(&manifest).unwrap();
    let layer = m["layers"][0]["digest"].as_str().unwrap();
    let (status, _, bytes) =
        get_bytes(t.at(&format!("/v2/f/tokened/private/app/blobs/{layer}"))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(sha256(&bytes), layer);

    // Wrong credentials: a clear upstream error, not an internal one.
    let bad = format!(
        "    - host: \"{}\"\n      alias: tokened\n      insecure: true\n      username: mirror\n      password: wrong\n",
        upstream.host
    );
    let (t2, _cfg2) = trow_with_config(&format!("registry_proxies:\n  registries:\n{bad}"), &[]);
    let r = client()
        .get(t2.at("/v2/f/tokened/private/app/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    let body: Value = r.json().await.unwrap();
    let message = body["errors"][0]["message"].as_str().unwrap();
    assert!(
        message.contains("credentials") || message.contains("token"),
        "{message}"
    );
}
