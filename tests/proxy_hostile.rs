//! The pull-through cache against a hostile or careless upstream: it
//! contacts only listed upstreams, follows redirects and token realms only
//! under the rules, and bounds every read, wait and fetch count. All
//! traffic stays on loopback or inside a network namespace the test makes.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::fake_upstream::{FakeUpstream, Flood, TokenAuth, TokenBody, GOOD_TOKEN};
use common::netns::NetNs;
use common::oci::*;
use common::secure::Pki;
use common::{client, expect_error, insecure_upstream, trow_with_config, Trow};
use reqwest::StatusCode;

const MIB: usize = 1024 * 1024;

async fn get(url: String) -> reqwest::Response {
    client().get(url).send().await.unwrap()
}

/// Waits up to 10 s for `cond`.
async fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// Reads a response body to its end: the bytes, or `None` if it broke off.
async fn body(r: reqwest::Response) -> Option<Bytes> {
    r.bytes().await.ok()
}

#[tokio::test]
async fn unlisted_upstreams_are_never_contacted() {
    let up = FakeUpstream::start().await;
    let (digest, layer_digest) = {
        let layer = Bytes::from(data(1, 1000));
        let config = Bytes::from_static(b"{}");
        let ld = up.add_blob(layer.clone());
        up.add_blob(config.clone());
        let m = Bytes::from(image_manifest(&config, &[&layer]));
        (up.add_manifest("team/app", Some("v1"), OCI_MANIFEST, m), ld)
    };
    let other = FakeUpstream::start().await;
    // Without a configuration file, and with one that lists another host.
    let none = Trow::start();
    let (listed, _cfg) = trow_with_config(
        &format!(
            "registry_proxies:\n  registries:\n{}",
            insecure_upstream(&other.host, "other")
        ),
        &[],
    );
    for t in [&none, &listed] {
        for path in [
            "/v2/team/app/manifests/v1".to_string(),
            format!("/v2/team/app/manifests/{digest}"),
            format!("/v2/team/app/blobs/{layer_digest}"),
        ] {
            let r = get(t.at(&format!("{path}?ns={}", up.host))).await;
            let message = expect_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await;
            assert!(
                message.contains(&format!(
                    "add `- host: {}` under registry_proxies.registries",
                    up.host
                )),
                "{message}"
            );
            let r = client()
                .head(t.at(&format!("{path}?ns={}", up.host)))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::NOT_FOUND);
        }
        // The path form, by host name (what would be localhost:443).
        let r = get(t.at("/v2/f/localhost/team/app/manifests/v1")).await;
        let message = expect_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await;
        assert!(
            message.contains("add `- host: localhost` under registry_proxies.registries"),
            "{message}"
        );
        let r = get(t.at("/v2/f/quay.io/team/app/manifests/v1")).await;
        let message = expect_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await;
        assert!(message.contains("`- host: quay.io`"), "{message}");
    }
    assert_eq!(up.connections(), 0, "an unlisted upstream was contacted");
    assert_eq!(other.connections(), 0);

    // allow_any_public: unlisted hosts only at public addresses. A literal
    // loopback address is refused before connecting, a name that resolves
    // to loopback when resolved.
    let (open, _cfg2) = trow_with_config("registry_proxies:\n  allow_any_public: true\n", &[]);
    let r = get(open.at(&format!("/v2/team/app/manifests/v1?ns={}", up.host))).await;
    let message = expect_error(r, StatusCode::NOT_FOUND, "NAME_UNKNOWN").await;
    assert!(message.contains("loopback"), "{message}");
    let port = up.host.rsplit_once(':').unwrap().1;
    let r = get(open.at(&format!("/v2/team/app/manifests/v1?ns=localhost:{port}"))).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("loopback"), "{message}");
    assert!(message.contains("public addresses"), "{message}");
    assert_eq!(up.connections(), 0, "an unlisted upstream was contacted");

    // Listed, the same upstream is served (by its namespace form too).
    let (t, _cfg3) = trow_with_config(
        &format!(
            "registry_proxies:\n  registries:\n    - host: \"{}\"\n      insecure: true\n",
            up.host
        ),
        &[],
    );
    let r = get(t.at(&format!("/v2/team/app/manifests/v1?ns={}", up.host))).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    let ns = up.host.replace(':', "-");
    let r = get(t.at(&format!("/v2/f/{ns}/team/app/blobs/{layer_digest}"))).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(sha256(&r.bytes().await.unwrap()), layer_digest);
}

#[tokio::test]
async fn redirects_are_followed_only_under_the_rules() {
    let pki = Pki::new();
    let cert = pki.issue(1);
    let secure = FakeUpstream::start_tls(&cert.cert_pem, &cert.key_pem).await;
    let plain = FakeUpstream::start().await;
    // A CDN on another loopback port, holding every blob.
    let cdn = FakeUpstream::start().await;
    let blobs: Vec<(String, Bytes)> = (0..5u64)
        .map(|i| {
            let b = Bytes::from(data(200 + i, 100_000));
            secure.add_blob(b.clone());
            plain.add_blob(b.clone());
            (cdn.add_blob(b.clone()), b)
        })
        .collect();
    let yaml = format!(
        "registry_proxies:\n  registries:\n    - host: \"{}\"\n      alias: secure\n      ca: {}\n{}",
        secure.host,
        pki.ca_path().display(),
        insecure_upstream(&plain.host, "plain")
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let cdn_gets = |d: &str| cdn.count("GET", &format!("/v2/r/blobs/{d}"));

    // An https upstream redirecting to plain http: refused, never visited.
    secure.behaviour.lock().redirect_blobs = Some((cdn.url.clone(), 1));
    let (d, _) = &blobs[0];
    let r = get(t.at(&format!("/v2/f/secure/r/blobs/{d}"))).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("https://"), "{message}");
    assert_eq!(cdn_gets(d), 0, "the http redirect was followed");
    assert_eq!(secure.count("GET", &format!("/v2/r/blobs/{d}")), 1);

    // An insecure upstream on loopback may send Trow to another loopback
    // port over http (a CDN-like redirect).
    plain.behaviour.lock().redirect_blobs = Some((cdn.url.clone(), 1));
    let (d, bytes) = &blobs[1];
    let r = get(t.at(&format!("/v2/f/plain/r/blobs/{d}"))).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(&r.bytes().await.unwrap(), bytes);
    assert_eq!(cdn_gets(d), 1);

    // Five hops are followed, six are not.
    plain.behaviour.lock().redirect_blobs = Some((cdn.url.clone(), 5));
    let (d, bytes) = &blobs[2];
    let r = get(t.at(&format!("/v2/f/plain/r/blobs/{d}"))).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(&r.bytes().await.unwrap(), bytes);
    plain.behaviour.lock().redirect_blobs = Some((cdn.url.clone(), 6));
    let (d, _) = &blobs[3];
    let r = get(t.at(&format!("/v2/f/plain/r/blobs/{d}"))).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("redirects"), "{message}");
    assert_eq!(cdn_gets(d), 0, "a sixth redirect was followed");

    // Redirects to addresses outside both kinds the upstream is at.
    plain.behaviour.lock().redirect_blobs = Some(("http://[::ffff:10.1.2.3]:9".into(), 1));
    let (d, _) = &blobs[4];
    let r = get(t.at(&format!("/v2/f/plain/r/blobs/{d}"))).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("private-network"), "{message}");
}

#[tokio::test]
async fn a_private_upstream_cannot_redirect_to_loopback() {
    let Some(ns) = NetNs::create() else {
        return;
    };
    // The upstream and a CDN inside the namespace, at a private address;
    // another CDN on loopback, which must never be visited.
    let up = FakeUpstream::start_on(ns.listen(), None);
    let ns_cdn = FakeUpstream::start_on(ns.listen(), None);
    let lo_cdn = FakeUpstream::start().await;
    let blobs: Vec<(String, Bytes)> = (0..3u64)
        .map(|i| {
            let b = Bytes::from(data(300 + i, 50_000));
            up.add_blob(b.clone());
            ns_cdn.add_blob(b.clone());
            (lo_cdn.add_blob(b.clone()), b)
        })
        .collect();
    let (t, _cfg) = trow_with_config(
        &format!(
            "registry_proxies:\n  registries:\n{}",
            insecure_upstream(&up.host, "corp")
        ),
        &[],
    );

    // Private to private: followed.
    up.behaviour.lock().redirect_blobs = Some((ns_cdn.url.clone(), 1));
    let (d, bytes) = &blobs[0];
    let r = get(t.at(&format!("/v2/f/corp/r/blobs/{d}"))).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(&r.bytes().await.unwrap(), bytes);
    assert_eq!(ns_cdn.count("GET", &format!("/v2/r/blobs/{d}")), 1);

    // Private to loopback, by address and by name: refused.
    let port = lo_cdn.host.rsplit_once(':').unwrap().1;
    for (base, (d, _)) in [
        (lo_cdn.url.clone(), &blobs[1]),
        (format!("http://localhost:{port}"), &blobs[2]),
    ] {
        up.behaviour.lock().redirect_blobs = Some((base, 1));
        let r = get(t.at(&format!("/v2/f/corp/r/blobs/{d}"))).await;
        let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
        assert!(message.contains("loopback"), "{message}");
        assert_eq!(up.count("GET", &format!("/v2/r/blobs/{d}")), 1);
    }
    assert_eq!(lo_cdn.connections(), 0, "Trow was sent to loopback");
}

#[tokio::test]
async fn upstream_bodies_are_bounded() {
    let up = FakeUpstream::start().await;
    let yaml = format!(
        "registry_proxies:\n  max_blob_size: 8MiB\n  registries:\n{}",
        insecure_upstream(&up.host, "fake")
    );
    let (t, _cfg) = trow_with_config(&yaml, &["--max-manifest-size", "1MiB"]);
    let reset = || {
        up.stats.flood_sent.store(0, Ordering::SeqCst);
        up.stats.flood_cut.store(false, Ordering::SeqCst);
    };
    let cut_early = |limit: usize| {
        up.stats.flood_cut.load(Ordering::SeqCst)
            && up.stats.flood_sent.load(Ordering::SeqCst) < limit
    };

    // A manifest without Content-Length, far over --max-manifest-size:
    // refused, and Trow stopped reading long before the end.
    up.behaviour.lock().manifest_flood = Some(Flood {
        total: 64 * MIB,
        announce: None,
    });
    let digest = sha256(b"no such manifest");
    let r = get(t.at(&format!("/v2/f/fake/r/manifests/{digest}"))).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("max-manifest-size"), "{message}");
    assert!(
        eventually(|| cut_early(32 * MIB)).await,
        "Trow read {} bytes of a 64 MiB manifest",
        up.stats.flood_sent.load(Ordering::SeqCst)
    );

    // A blob without Content-Length: bounded by max_blob_size. The client
    // never receives a complete body.
    reset();
    up.behaviour.lock().blob_flood = Some(Flood {
        total: 256 * MIB,
        announce: None,
    });
    let d = sha256(b"endless");
    let r = get(t.at(&format!("/v2/f/fake/r/blobs/{d}"))).await;
    if r.status() == StatusCode::OK {
        assert!(body(r).await.is_none_or(|b| b.len() <= 8 * MIB));
    } else {
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    }
    assert!(
        eventually(|| cut_early(64 * MIB)).await,
        "Trow read {} bytes of an endless blob",
        up.stats.flood_sent.load(Ordering::SeqCst)
    );

    // An endless blob announcing more than max_blob_size: refused before
    // reading it.
    reset();
    up.behaviour.lock().blob_flood = Some(Flood {
        total: 256 * MIB,
        announce: Some(1 << 40),
    });
    let d = sha256(b"a terabyte");
    let r = get(t.at(&format!("/v2/f/fake/r/blobs/{d}"))).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("max_blob_size"), "{message}");
    assert!(eventually(|| cut_early(64 * MIB)).await);

    // An endless blob with a (small) Content-Length: read up to it only,
    // and not passed on as complete since it does not match the digest.
    reset();
    up.behaviour.lock().blob_flood = Some(Flood {
        total: 256 * MIB,
        announce: Some(MIB as u64),
    });
    let d = sha256(b"one mebibyte");
    let r = get(t.at(&format!("/v2/f/fake/r/blobs/{d}"))).await;
    if r.status() == StatusCode::OK {
        assert!(body(r).await.is_none_or(|b| b.len() < MIB));
    }
    assert!(
        eventually(|| up.stats.flood_sent.load(Ordering::SeqCst) < 64 * MIB).await,
        "{}",
        up.stats.flood_sent.load(Ordering::SeqCst)
    );
    let hex = d.trim_start_matches("sha256:");
    assert!(!t
        .data_dir
        .join("blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .exists());
}

/// A layer of a cached manifest is bounded by the size its descriptor
/// states: an upstream sending more (without a Content-Length) is cut off
/// there, and one announcing another length is refused.
#[tokio::test]
async fn a_layer_is_bounded_by_its_descriptor_size() {
    let up = FakeUpstream::start().await;
    let config = br#"{"os":"linux"}"#.to_vec();
    let layer = data(5, 1000);
    let layer_digest = sha256(&layer);
    up.add_blob(Bytes::from(config.clone()));
    let manifest = image_manifest(&config, &[&layer]);
    up.add_manifest("r", Some("v1"), OCI_MANIFEST, Bytes::from(manifest));
    let yaml = format!(
        "registry_proxies:\n  max_blob_size: 64MiB\n  registries:\n{}",
        insecure_upstream(&up.host, "fake")
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let r = get(t.at("/v2/f/fake/r/manifests/v1")).await;
    assert_eq!(r.status(), StatusCode::OK);

    up.behaviour.lock().blob_flood = Some(Flood {
        total: 32 * MIB,
        announce: None,
    });
    let r = get(t.at(&format!("/v2/f/fake/r/blobs/{layer_digest}"))).await;
    if r.status() == StatusCode::OK {
        assert!(body(r).await.is_none_or(|b| b.len() < 1000));
    } else {
        assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
    }
    // Bounded by 1000 bytes, Trow stops reading at once; what the fake sent
    // meanwhile is what the sockets buffered (a few MiB on loopback), far
    // from the 32 MiB a reader bounded only by max_blob_size would take.
    assert!(
        eventually(|| up.stats.flood_cut.load(Ordering::SeqCst)
            && up.stats.flood_sent.load(Ordering::SeqCst) < 16 * MIB)
        .await,
        "Trow read {} bytes of a layer its manifest says is 1000 bytes",
        up.stats.flood_sent.load(Ordering::SeqCst)
    );

    up.behaviour.lock().blob_flood = Some(Flood {
        total: 5000,
        announce: Some(5000),
    });
    let r = get(t.at(&format!("/v2/f/fake/r/blobs/{layer_digest}"))).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("manifest says 1000"), "{message}");
}

/// An upstream whose token endpoint is the fake itself, answering `body`.
async fn tokened(body: TokenBody) -> FakeUpstream {
    let up = FakeUpstream::start().await;
    up.behaviour.lock().token = Some(TokenAuth {
        realm: format!("{}/token", up.url),
        body,
    });
    up
}

#[tokio::test]
async fn a_token_endpoint_flood_is_bounded() {
    let up = tokened(TokenBody::Flood(64 * MIB)).await;
    let (t, _cfg) = trow_with_config(
        &format!(
            "registry_proxies:\n  registries:\n{}",
            insecure_upstream(&up.host, "fake")
        ),
        &[],
    );
    let r = get(t.at("/v2/f/fake/r/manifests/v1")).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("token"), "{message}");
    assert!(
        eventually(|| up.stats.flood_cut.load(Ordering::SeqCst)
            && up.stats.flood_sent.load(Ordering::SeqCst) < 32 * MIB)
        .await,
        "Trow read {} bytes of a token response",
        up.stats.flood_sent.load(Ordering::SeqCst)
    );
}

#[tokio::test]
async fn a_huge_token_lifetime_is_clamped() {
    let up = tokened(TokenBody::Json(format!(
        "{{\"token\":\"{GOOD_TOKEN}\",\"expires_in\":18446744073709551615}}"
    )))
    .await;
    let layer = Bytes::from(data(400, 10_000));
    let config = Bytes::from_static(b"{}");
    let layer_digest = up.add_blob(layer.clone());
    up.add_blob(config.clone());
    let m = Bytes::from(image_manifest(&config, &[&layer]));
    let digest = up.add_manifest("r", Some("v1"), OCI_MANIFEST, m);
    let (t, _cfg) = trow_with_config(
        &format!(
            "registry_proxies:\n  registries:\n{}",
            insecure_upstream(&up.host, "fake")
        ),
        &[],
    );
    let r = get(t.at("/v2/f/fake/r/manifests/v1")).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(
        r.headers()["docker-content-digest"].to_str().unwrap(),
        digest
    );
    // The process is alive and the cached token works for the next pull.
    let r = get(t.at(&format!("/v2/f/fake/r/blobs/{layer_digest}"))).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(r.bytes().await.unwrap(), layer);
    assert_eq!(up.count("GET", "/token"), 1, "the token was cached");
    assert!(!t.log().contains("panicked"), "{}", t.log());
}

#[tokio::test]
async fn token_realms_follow_the_redirect_rule_and_credentials_stay_home() {
    let token_json = TokenBody::Json(format!("{{\"token\":\"{GOOD_TOKEN}\"}}"));
    // An issuer on another loopback port, over plain http.
    let issuer = tokened(token_json.clone()).await;
    let image = |up: &FakeUpstream, seed: u64| {
        let config = Bytes::from(format!("{{\"seed\":{seed}}}"));
        up.add_blob(config.clone());
        let m = Bytes::from(image_manifest(&config, &[]));
        up.add_manifest("r", Some("v1"), OCI_MANIFEST, m)
    };
    // Realm elsewhere over http: used, but without the credentials.
    let away = FakeUpstream::start().await;
    away.behaviour.lock().token = Some(TokenAuth {
        realm: format!("{}/token", issuer.url),
        body: token_json.clone(),
    });
    let away_digest = image(&away, 1);
    // Realm on the upstream itself: gets the credentials.
    let home = tokened(token_json.clone()).await;
    let home_digest = image(&home, 2);
    // An https upstream whose realm is plain http: refused.
    let pki = Pki::new();
    let cert = pki.issue(1);
    let secure = FakeUpstream::start_tls(&cert.cert_pem, &cert.key_pem).await;
    secure.behaviour.lock().token = Some(TokenAuth {
        realm: format!("{}/token", issuer.url),
        body: token_json,
    });
    image(&secure, 3);
    let creds = "      username: mirror\n      password: s3cret\n";
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}{creds}{}{creds}    - host: \"{}\"\n      alias: secure\n      ca: {}\n{creds}",
        insecure_upstream(&away.host, "away"),
        insecure_upstream(&home.host, "home"),
        secure.host,
        pki.ca_path().display(),
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);

    let r = get(t.at("/v2/f/away/r/manifests/v1")).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(
        r.headers()["docker-content-digest"].to_str().unwrap(),
        away_digest
    );
    assert_eq!(issuer.stats.token_without_auth.load(Ordering::SeqCst), 1);
    assert_eq!(
        issuer.stats.token_with_auth.load(Ordering::SeqCst),
        0,
        "credentials went to a plain-http realm on another host"
    );

    let r = get(t.at("/v2/f/home/r/manifests/v1")).await;
    assert_eq!(r.status(), StatusCode::OK, "{}", t.log());
    assert_eq!(
        r.headers()["docker-content-digest"].to_str().unwrap(),
        home_digest
    );
    assert_eq!(home.stats.token_with_auth.load(Ordering::SeqCst), 1);

    let r = get(t.at("/v2/f/secure/r/manifests/v1")).await;
    let message = expect_error(r, StatusCode::BAD_GATEWAY, "UNKNOWN").await;
    assert!(message.contains("token realm"), "{message}");
    assert!(message.contains("https://"), "{message}");
    assert_eq!(
        issuer.stats.token_with_auth.load(Ordering::SeqCst)
            + issuer.stats.token_without_auth.load(Ordering::SeqCst),
        1,
        "the http realm of an https upstream was contacted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_upstream_fetches_are_capped() {
    let up = FakeUpstream::start().await;
    let blobs: Vec<(String, Bytes)> = (0..6u64)
        .map(|i| {
            let b = Bytes::from(data(500 + i, 200_000));
            (up.add_blob(b.clone()), b)
        })
        .collect();
    up.behaviour.lock().hold_after = Some(1024);
    let yaml = format!(
        "registry_proxies:\n  max_concurrent_fetches: 2\n  registries:\n{}",
        insecure_upstream(&up.host, "fake")
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let mut tasks = Vec::new();
    for (d, _) in &blobs {
        let url = t.at(&format!("/v2/f/fake/r/blobs/{d}"));
        tasks.push(tokio::spawn(async move {
            let r = get(url).await;
            (r.status(), r.bytes().await.unwrap_or_default())
        }));
    }
    let now = || up.stats.blob_gets_now.load(Ordering::SeqCst);
    assert!(eventually(|| now() >= 2).await, "{}", t.log());
    // The other four wait for a slot instead of reaching the upstream.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.stats.blob_gets_max.load(Ordering::SeqCst), 2);
    let gets: usize = blobs
        .iter()
        .map(|(d, _)| up.count("GET", &format!("/v2/r/blobs/{d}")))
        .sum();
    assert_eq!(gets, 2);

    up.release();
    for (task, (d, bytes)) in tasks.into_iter().zip(&blobs) {
        let (status, got) = task.await.unwrap();
        assert_eq!(status, StatusCode::OK, "{d}");
        assert_eq!(&got, bytes);
    }
    assert_eq!(up.stats.blob_gets_max.load(Ordering::SeqCst), 2);
}

/// Not a test: a harness that measures Trow's peak resident memory
/// (VmHWM) while a hostile upstream tries to make it buffer. Run with
/// `cargo test --test proxy_hostile -- --ignored --nocapture peak_rss`
/// (`TROW_RSS_KINDS=m` for manifest floods only, `b` blobs, `t` tokens;
/// `TROW_RSS_FETCHES` sets `max_concurrent_fetches`, default 32).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn peak_rss_under_a_hostile_upstream() {
    let manifests = FakeUpstream::start().await;
    manifests.behaviour.lock().manifest_flood = Some(Flood {
        total: 512 * MIB,
        announce: None,
    });
    let blobs = FakeUpstream::start().await;
    blobs.behaviour.lock().blob_flood = Some(Flood {
        total: 1024 * MIB,
        announce: None,
    });
    let tokens = tokened(TokenBody::Flood(512 * MIB)).await;
    let fetches = std::env::var("TROW_RSS_FETCHES").unwrap_or_else(|_| "32".into());
    let yaml = format!(
        "registry_proxies:\n  max_blob_size: 256MiB\n  max_concurrent_fetches: {fetches}\n  registries:\n{}{}{}",
        insecure_upstream(&manifests.host, "m"),
        insecure_upstream(&blobs.host, "b"),
        insecure_upstream(&tokens.host, "t"),
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let hwm = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find(|l| l.starts_with("VmHWM"))
            .map(str::to_string)
            .unwrap()
    };
    println!("idle: {}", hwm(t.pid()));
    // TROW_RSS_KINDS picks the floods: m(anifests), b(lobs), t(okens).
    let kinds: Vec<char> = std::env::var("TROW_RSS_KINDS")
        .unwrap_or_else(|_| "mbt".into())
        .chars()
        .collect();
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let path = match kinds[i as usize % kinds.len()] {
            'm' => format!("/v2/f/m/r/manifests/{}", sha256(&i.to_be_bytes())),
            'b' => format!("/v2/f/b/r/blobs/{}", sha256(&i.to_be_bytes())),
            _ => format!("/v2/f/t/r{i}/manifests/v1"),
        };
        let url = t.at(&path);
        tasks.push(tokio::spawn(async move {
            let r = get(url).await;
            let status = r.status();
            let _ = r.bytes().await;
            status
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    println!("after 64 hostile fetches: {}", hwm(t.pid()));
    println!(
        "flood bytes sent: manifests {} MiB, blobs {} MiB, tokens {} MiB",
        manifests.stats.flood_sent.load(Ordering::SeqCst) / MIB,
        blobs.stats.flood_sent.load(Ordering::SeqCst) / MIB,
        tokens.stats.flood_sent.load(Ordering::SeqCst) / MIB
    );
}
