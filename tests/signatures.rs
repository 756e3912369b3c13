//! Signature verification (issue 12) end to end: the real `trow` binary, a
//! `signatures` policy, images signed by an independent cosign-format
//! signer (tests/cosign_sign.py: Python `cryptography`, never Trow's code),
//! and `GET /admin/verify`, the entry point the admission webhook shares.

mod common;

use std::path::Path;

use common::cosign::{self, can_sign, keygen};
use common::distribution::Distribution;
use common::oci::push_image;
use common::{basic_client, expect_error, trow_with_config};
use reqwest::StatusCode;
use serde_json::Value;

const ADMIN: (&str, &str) = ("admin", "admin-password");

/// Signs `digest` into `repo` at `base` with `key`, logged in as `login`.
async fn sign(base: &str, repo: &str, digest: &str, key: &Path, mode: &str, login: (&str, &str)) {
    cosign::sign(base, repo, digest, key, mode, Some(login), None).await;
}

/// `GET /admin/verify` as the admin.
async fn verify(base: &str, image: &str, repo: &str, reference: &str) -> reqwest::Response {
    basic_client(ADMIN.0, ADMIN.1)
        .get(format!("{base}/admin/verify"))
        .query(&[("image", image), ("repo", repo), ("reference", reference)])
        .send()
        .await
        .expect("verify request")
}

async fn verified(base: &str, image: &str, repo: &str, reference: &str) -> String {
    let r = verify(base, image, repo, reference).await;
    let status = r.status();
    let body: Value = r.json().await.expect("JSON");
    assert_eq!(status, StatusCode::OK, "{image} {repo}:{reference}: {body}");
    body["verified"]
        .as_str()
        .expect("verified digest")
        .to_string()
}

async fn denied(base: &str, image: &str, repo: &str, reference: &str) -> String {
    let r = verify(base, image, repo, reference).await;
    expect_error(r, StatusCode::FORBIDDEN, "DENIED").await
}

fn login_args() -> Vec<&'static str> {
    vec!["--user", ADMIN.0, "--password", ADMIN.1]
}

/// Signed images (by `.sig` tag and by referrer) are verified and their
/// digest returned; unsigned images, images signed by a key the policy does
/// not name and a tag moved to an unsigned digest after signing are denied
/// with a message naming the image and what to do.
#[tokio::test]
async fn signed_images_pass_and_the_rest_are_denied() {
    if !can_sign() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (team_pub, team_key) = keygen(&keys.path().join("team")).await;
    let (_, other_key) = keygen(&keys.path().join("other")).await;
    let yaml = format!(
        "signatures:\n  policies:\n    - images: ['trow.test/team/']\n      keys: ['{}']\n  negative_ttl: 1s\n  cache_ttl: 3s\n",
        team_pub.display()
    );
    let (t, _cfg) = trow_with_config(&yaml, &login_args());
    let c = basic_client(ADMIN.0, ADMIN.1);

    // Signed with a .sig tag: verified by tag and by digest.
    let (_, d1) = push_image(&c, &t.url, "team/app", "v1", 1).await;
    sign(&t.url, "team/app", &d1, &team_key, "tag", ADMIN).await;
    assert_eq!(
        verified(&t.url, "trow.test/team/app", "team/app", "v1").await,
        d1
    );
    assert_eq!(
        verified(&t.url, "trow.test/team/app", "team/app", &d1).await,
        d1
    );

    // Signed as a referrer (cosign's OCI 1.1 form).
    let (_, d2) = push_image(&c, &t.url, "team/app", "v2", 2).await;
    sign(&t.url, "team/app", &d2, &team_key, "referrer", ADMIN).await;
    assert_eq!(
        verified(&t.url, "trow.test/team/app", "team/app", "v2").await,
        d2
    );

    // Unsigned.
    let (_, d3) = push_image(&c, &t.url, "team/app", "v3", 3).await;
    let m = denied(&t.url, "trow.test/team/app", "team/app", "v3").await;
    assert!(
        m.contains("trow.test/team/app") && m.contains("no cosign signature"),
        "{m}"
    );
    assert!(m.contains(&format!("sha256-{}.sig", &d3[7..])), "{m}");
    assert!(m.contains("sign it with one of the public keys"), "{m}");

    // Signed by a key the policy does not name (both forms).
    let (_, d4) = push_image(&c, &t.url, "team/app", "v4", 4).await;
    sign(&t.url, "team/app", &d4, &other_key, "tag", ADMIN).await;
    sign(&t.url, "team/app", &d4, &other_key, "referrer", ADMIN).await;
    let m = denied(&t.url, "trow.test/team/app", "team/app", "v4").await;
    assert!(m.contains("none of its 2 signature(s) verifies"), "{m}");
    assert!(
        m.contains("does not verify with any of the policy's keys"),
        "{m}"
    );

    // A signature for another digest, pushed under this digest's .sig tag
    // (a copied signature) does not count.
    let (_, d5) = push_image(&c, &t.url, "team/app", "v5", 5).await;
    copy_signature(&c, &t.url, "team/app", &d1, &d5).await;
    let m = denied(&t.url, "trow.test/team/app", "team/app", "v5").await;
    assert!(
        m.contains(&format!("signature is for {d1}, not for {d5}")),
        "{m}"
    );

    // The tag v1 moved to an unsigned digest after signing: denied, even
    // though the old digest's verdict is cached.
    let (_, d6) = push_image(&c, &t.url, "team/app", "v1", 6).await;
    assert_ne!(d6, d1);
    let m = denied(&t.url, "trow.test/team/app", "team/app", "v1").await;
    assert!(m.contains("no cosign signature"), "{m}");
    // Signing it later is seen once the denial's short memory ends.
    sign(&t.url, "team/app", &d6, &team_key, "referrer", ADMIN).await;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    assert_eq!(
        verified(&t.url, "trow.test/team/app", "team/app", "v1").await,
        d6
    );

    // A verdict is remembered for cache_ttl: a signature deleted just
    // after a success still counts until then, not after.
    let (_, d7) = push_image(&c, &t.url, "team/app", "v7", 7).await;
    sign(&t.url, "team/app", &d7, &team_key, "tag", ADMIN).await;
    assert_eq!(
        verified(&t.url, "trow.test/team/app", "team/app", "v7").await,
        d7
    );
    let sig = format!("sha256-{}.sig", &d7[7..]);
    let r = c
        .delete(t.at(&format!("/v2/team/app/manifests/{sig}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        verified(&t.url, "trow.test/team/app", "team/app", "v7").await,
        d7
    );
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let m = denied(&t.url, "trow.test/team/app", "team/app", "v7").await;
    assert!(m.contains("no cosign signature"), "{m}");

    // An image no policy covers, a missing image, and a caller without
    // the admin login.
    let m = denied(&t.url, "trow.test/elsewhere/app", "team/app", "v1").await;
    assert!(m.contains("no signature policy covers"), "{m}");
    let m = denied(&t.url, "trow.test/team/app", "team/app", "nope").await;
    assert!(m.contains("not in this registry"), "{m}");
    let r = common::client()
        .get(t.at("/admin/verify?image=trow.test/team/app&repo=team/app&reference=v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // A query without its parameters.
    let r = c.get(t.at("/admin/verify?image=x")).send().await.unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "QUERY_INVALID").await;
}

/// Copies the `.sig` manifest of `from` under the `.sig` tag of `to` (its
/// blobs are already in the repository).
async fn copy_signature(c: &reqwest::Client, base: &str, repo: &str, from: &str, to: &str) {
    let tag = |d: &str| format!("sha256-{}.sig", &d[7..]);
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{}", tag(from)))
        .header("Accept", common::oci::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let bytes = r.bytes().await.unwrap();
    common::oci::put_manifest(c, base, repo, &tag(to), common::oci::OCI_MANIFEST, &bytes).await;
}

/// An image signed in a real upstream (CNCF Distribution) is verified
/// through Trow's pull-through cache, which fetches the image, its `.sig`
/// manifest and the payload on demand; unsigned and foreign-signed
/// upstream images are denied.
#[tokio::test]
async fn upstream_signed_image_is_verified_through_the_cache() {
    if !can_sign() {
        return;
    }
    let Some(up) = Distribution::start() else {
        return;
    };
    let keys = tempfile::tempdir().unwrap();
    let (team_pub, team_key) = keygen(&keys.path().join("team")).await;
    let (_, other_key) = keygen(&keys.path().join("other")).await;
    let uc = up.client();
    let login = (up.user.as_str(), up.password.as_str());
    let (_, signed) = push_image(&uc, &up.url, "lib/web", "v1", 11).await;
    sign(&up.url, "lib/web", &signed, &team_key, "tag", login).await;
    let (_, unsigned) = push_image(&uc, &up.url, "lib/web", "v2", 12).await;
    let (_, foreign) = push_image(&uc, &up.url, "lib/web", "v3", 13).await;
    sign(&up.url, "lib/web", &foreign, &other_key, "tag", login).await;

    let yaml = format!(
        "registry_proxies:\n  registries:\n    - host: \"{}\"\n      alias: up\n      insecure: true\n      username: {}\n      password: {}\n\
         signatures:\n  policies:\n    - images: ['upstream.test/lib/']\n      keys: ['{}']\n",
        up.host,
        up.user,
        up.password,
        team_pub.display()
    );
    let (t, _cfg) = trow_with_config(&yaml, &login_args());
    let image = "upstream.test/lib/web";
    assert_eq!(
        verified(&t.url, image, "f/up/lib/web", "v1").await,
        signed,
        "{}",
        t.log()
    );
    // Now cached: the payload blob is in the cache repository.
    let m = denied(&t.url, image, "f/up/lib/web", "v2").await;
    assert!(m.contains("no cosign signature"), "{m}");
    assert!(!unsigned.is_empty());
    let m = denied(&t.url, image, "f/up/lib/web", "v3").await;
    assert!(
        m.contains("does not verify with any of the policy's keys"),
        "{m}"
    );
    // The cache serves what was verified.
    let r = basic_client(ADMIN.0, ADMIN.1)
        .get(t.at(&format!(
            "/v2/f/up/lib/web/manifests/sha256-{}.sig",
            &signed[7..]
        )))
        .header("Accept", common::oci::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// A key file that cannot be read or is not a PEM P-256 public key stops
/// Trow at start-up with a message naming the entry.
#[test]
fn bad_keys_are_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("not.pub");
    std::fs::write(&not_pem, "hello\n").unwrap();
    let cases = [
        (
            dir.path().join("missing.pub"),
            "cannot read the public key file",
        ),
        (not_pem, "not a PEM ECDSA P-256 public key"),
    ];
    for (key, expect) in cases {
        let yaml = format!(
            "signatures:\n  policies:\n    - images: ['a/']\n      keys: ['{}']\n",
            key.display()
        );
        let cfg = common::write_config(dir.path(), &yaml);
        let out = std::process::Command::new(common::trow_bin())
            .arg("--dry-run")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--config-file={}", cfg.display()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains(expect) && err.contains("signatures.policies[0].keys[0]"),
            "{err}"
        );
    }
}

/// Verification answers within `signatures.timeout` whatever an upstream
/// does: here the upstream serves the image and its `.sig` manifest, then
/// holds the payload blob's body for ever.
#[tokio::test]
async fn a_stalling_upstream_is_denied_within_the_timeout() {
    use bytes::Bytes;
    use common::fake_upstream::FakeUpstream;
    use common::oci::{image_manifest, OCI_MANIFEST};

    let up = FakeUpstream::start().await;
    let config = b"{}".to_vec();
    let layer = common::oci::data(7, 100);
    up.add_blob(Bytes::from(config.clone()));
    up.add_blob(Bytes::from(layer.clone()));
    let image = up.add_manifest(
        "lib/slow",
        Some("v1"),
        OCI_MANIFEST,
        Bytes::from(image_manifest(&config, &[&layer])),
    );
    let payload = common::oci::data(8, 300);
    let payload_digest = up.add_blob(Bytes::from(payload.clone()));
    let sig = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": common::oci::descriptor("application/vnd.oci.image.config.v1+json", &config),
        "layers": [{
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": payload_digest,
            "size": payload.len(),
            "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ=="},
        }],
    });
    up.add_manifest(
        "lib/slow",
        Some(&format!("sha256-{}.sig", &image[7..])),
        OCI_MANIFEST,
        Bytes::from(serde_json::to_vec(&sig).unwrap()),
    );
    up.behaviour.lock().hold_after = Some(0);

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pub");
    std::fs::write(
        &key,
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGRzsF+C1fKLKJhgNBa6V5NPesn92\niU0yAyzKy8EAX/jkZlypmuDzZx/K1bprps6vT3WTtSQ6P4kGBDLN8yIWEA==\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}signatures:\n  timeout: 1s\n  policies:\n    - images: ['slow.test/']\n      keys: ['{}']\n",
        common::insecure_upstream(&up.host, "slow"),
        key.display()
    );
    let (t, _cfg) = trow_with_config(&yaml, &login_args());
    let started = std::time::Instant::now();
    let m = denied(&t.url, "slow.test/lib/slow", "f/slow/lib/slow", "v1").await;
    let took = started.elapsed();
    assert!(m.contains("did not finish within 1s"), "{m}");
    assert!(
        took < std::time::Duration::from_secs(4),
        "answered after {took:?}"
    );
    up.release();
}

/// A signature attached upstream as a referrer (cosign's OCI 1.1 form) is
/// found through the upstream's referrers API and verified through the
/// cache. The upstream is another Trow (CNCF Distribution 2.8 has no
/// referrers API).
#[tokio::test]
async fn upstream_referrer_signature_is_verified_through_the_cache() {
    if !can_sign() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (team_pub, team_key) = keygen(&keys.path().join("team")).await;
    let (up, _up_cfg) = trow_with_config("", &login_args());
    let uc = basic_client(ADMIN.0, ADMIN.1);
    let (_, signed) = push_image(&uc, &up.url, "lib/api", "v1", 21).await;
    sign(&up.url, "lib/api", &signed, &team_key, "referrer", ADMIN).await;
    let (_, unsigned) = push_image(&uc, &up.url, "lib/api", "v2", 22).await;

    let yaml = format!(
        "registry_proxies:\n  registries:\n    - host: \"{}\"\n      alias: up\n      insecure: true\n      username: {}\n      password: {}\n\
         signatures:\n  policies:\n    - images: ['upstream.test/lib/']\n      keys: ['{}']\n",
        up.host,
        ADMIN.0,
        ADMIN.1,
        team_pub.display()
    );
    let (t, _cfg) = trow_with_config(&yaml, &login_args());
    let image = "upstream.test/lib/api";
    assert_eq!(
        verified(&t.url, image, "f/up/lib/api", "v1").await,
        signed,
        "{}",
        t.log()
    );
    let m = denied(&t.url, image, "f/up/lib/api", "v2").await;
    assert!(
        m.contains("no cosign signature") && m.contains(&unsigned[7..]),
        "{m}"
    );
}

/// What a hostile upstream sends is bounded: a signature manifest over
/// 64 KiB is refused after the read, and a payload stated larger than
/// 64 KiB is refused without being downloaded.
#[tokio::test]
async fn oversized_signature_manifests_and_payloads_are_refused() {
    use bytes::Bytes;
    use common::fake_upstream::FakeUpstream;
    use common::oci::{descriptor, image_manifest, OCI_CONFIG, OCI_MANIFEST};

    let up = FakeUpstream::start().await;
    let config = b"{}".to_vec();
    up.add_blob(Bytes::from(config.clone()));
    let big_payload = common::oci::data(9, 200 << 10);
    let big_payload_digest = up.add_blob(Bytes::from(big_payload.clone()));
    let sig_layer = |digest: &str, size: usize| {
        serde_json::json!({
            "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {"dev.cosignproject.cosign/signature": "MEUCIQ=="},
        })
    };
    let mut images = Vec::new();
    for (tag, seed) in [("padded", 31u64), ("bigpayload", 32)] {
        let layer = common::oci::data(seed, 100);
        up.add_blob(Bytes::from(layer.clone()));
        let digest = up.add_manifest(
            "lib/x",
            Some(tag),
            OCI_MANIFEST,
            Bytes::from(image_manifest(&config, &[&layer])),
        );
        images.push(digest);
    }
    // A 100 KiB signature manifest (under --max-manifest-size, over 64 KiB).
    let padded = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [sig_layer(&big_payload_digest, 300)],
        "annotations": {"padding": "x".repeat(100 << 10)},
    });
    up.add_manifest(
        "lib/x",
        Some(&format!("sha256-{}.sig", &images[0][7..])),
        OCI_MANIFEST,
        Bytes::from(serde_json::to_vec(&padded).unwrap()),
    );
    let big = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &config),
        "layers": [sig_layer(&big_payload_digest, big_payload.len())],
    });
    up.add_manifest(
        "lib/x",
        Some(&format!("sha256-{}.sig", &images[1][7..])),
        OCI_MANIFEST,
        Bytes::from(serde_json::to_vec(&big).unwrap()),
    );

    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pub");
    std::fs::write(
        &key,
        "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGRzsF+C1fKLKJhgNBa6V5NPesn92\niU0yAyzKy8EAX/jkZlypmuDzZx/K1bprps6vT3WTtSQ6P4kGBDLN8yIWEA==\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}signatures:\n  policies:\n    - images: ['x.test/']\n      keys: ['{}']\n",
        common::insecure_upstream(&up.host, "x"),
        key.display()
    );
    let (t, _cfg) = trow_with_config(&yaml, &login_args());
    let m = denied(&t.url, "x.test/lib/x", "f/x/lib/x", "padded").await;
    assert!(m.contains("more than the 65536 accepted"), "{m}");
    let m = denied(&t.url, "x.test/lib/x", "f/x/lib/x", "bigpayload").await;
    assert!(m.contains("is larger than 65536 bytes"), "{m}");
    // The signature manifest was looked up (HEAD by tag, then GET by
    // digest), its payload never asked for.
    let sig_tag = format!("/v2/lib/x/manifests/sha256-{}.sig", &images[1][7..]);
    assert!(
        up.count("HEAD", &sig_tag) >= 1,
        "the .sig manifest was not fetched: {:?}",
        up.counts.lock()
    );
    assert_eq!(
        up.count("GET", &format!("/v2/lib/x/blobs/{big_payload_digest}")),
        0,
        "the oversized payload was downloaded"
    );
}
