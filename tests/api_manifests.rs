//! Manifest and referrers endpoints over real HTTP, including every error path.

mod common;

use common::oci::*;
use common::{client, expect_error, header, Trow};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn push_and_pull_by_tag_and_digest_byte_for_byte() {
    let t = Trow::start();
    let c = client();
    let config = br#"{"architecture":"amd64","os":"linux"}"#;
    let layer = data(7, 4096);
    push_blob(&c, &t.url, "web/app", config).await;
    push_blob(&c, &t.url, "web/app", &layer).await;
    // Unusual formatting must survive: the digest is of the exact bytes.
    let manifest = format!(
        "{{\n  \"schemaVersion\" : 2,\n  \"mediaType\": \"{OCI_MANIFEST}\",\n  \"config\": {},\n  \"layers\": [ {} ]\n}}\n",
        descriptor(OCI_CONFIG, config),
        descriptor(OCI_LAYER, &layer)
    )
    .into_bytes();
    let digest = sha256(&manifest);
    let r = c
        .put(t.at("/v2/web/app/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "docker-content-digest").as_deref(),
        Some(digest.as_str())
    );
    assert_eq!(
        header(&r, "location"),
        Some(format!("/v2/web/app/manifests/{digest}"))
    );
    assert_eq!(header(&r, "oci-subject"), None);

    for reference in ["v1", digest.as_str()] {
        let r = c
            .get(t.at(&format!("/v2/web/app/manifests/{reference}")))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_MANIFEST));
        assert_eq!(
            header(&r, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
        assert_eq!(r.bytes().await.unwrap().as_ref(), manifest.as_slice());

        let r = c
            .head(t.at(&format!("/v2/web/app/manifests/{reference}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(
            header(&r, "content-length"),
            Some(manifest.len().to_string())
        );
        assert_eq!(
            header(&r, "docker-content-digest").as_deref(),
            Some(digest.as_str())
        );
    }

    // Pushing by digest works and must match the body.
    let r = c
        .put(t.at(&format!("/v2/web/app/manifests/{digest}")))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let other = sha256(b"other");
    let r = c
        .put(t.at(&format!("/v2/web/app/manifests/{other}")))
        .header("Content-Type", OCI_MANIFEST)
        .body(manifest.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
}

#[tokio::test]
async fn unknown_manifests_and_bad_references() {
    let t = Trow::start();
    let c = client();
    push_image(&c, &t.url, "known", "v1", 1).await;
    let r = c
        .get(t.at("/v2/known/manifests/nope"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let r = c
        .head(t.at("/v2/known/manifests/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c
        .get(t.at("/v2/unknown-repo/manifests/v1"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let r = c
        .get(t.at("/v2/known/manifests/sha256:zzz"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;
    let r = c
        .get(t.at("/v2/known/manifests/.bad-tag"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let r = c
        .put(t.at("/v2/known/manifests/.bad-tag"))
        .header("Content-Type", OCI_MANIFEST)
        .body("{}")
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await;
    let r = c
        .get(t.at("/v2/Bad_Name/manifests/v1"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "NAME_INVALID").await;
}

#[tokio::test]
async fn invalid_manifests_are_refused() {
    let t = Trow::start();
    let c = client();
    let config = b"{}".to_vec();
    let layer = data(9, 100);
    push_blob(&c, &t.url, "strict", &config).await;
    let good = image_manifest(&config, &[&layer]);

    // The layer was never pushed.
    let r = c
        .put(t.at("/v2/strict/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(good.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await;

    // A blob of another repository does not count.
    push_blob(&c, &t.url, "elsewhere", &layer).await;
    let r = c
        .put(t.at("/v2/strict/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(good.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await;

    push_blob(&c, &t.url, "strict", &layer).await;
    let bad_bodies: Vec<(&str, Vec<u8>)> = vec![
        (OCI_MANIFEST, b"not json".to_vec()),
        (OCI_MANIFEST, b"[1,2]".to_vec()),
        (
            OCI_MANIFEST,
            br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#
                .to_vec(),
        ),
        (
            OCI_MANIFEST,
            br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[]}"#.to_vec(),
        ),
        // Content-Type disagrees with the body's mediaType.
        (
            "application/vnd.docker.distribution.manifest.v2+json",
            good.clone(),
        ),
        (
            "application/x-unknown-manifest",
            br#"{"schemaVersion":2,"mediaType":"application/x-unknown-manifest"}"#.to_vec(),
        ),
    ];
    for (content_type, body) in bad_bodies {
        let r = c
            .put(t.at("/v2/strict/manifests/v1"))
            .header("Content-Type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(&body)
        );
        expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_INVALID").await;
    }
    // Nothing was tagged by the failures.
    let r = c.get(t.at("/v2/strict/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    put_manifest(&c, &t.url, "strict", "v1", OCI_MANIFEST, &good).await;
}

#[tokio::test]
async fn oversized_manifest_is_413() {
    let t = Trow::start_with(&["--max-manifest-size", "1KiB"]);
    let c = client();
    let mut big = image_manifest(b"{}", &[]);
    big.truncate(big.len() - 1);
    big.extend_from_slice(
        format!(",\"annotations\":{{\"x\":\"{}\"}}}}", "a".repeat(2000)).as_bytes(),
    );
    let r = c
        .put(t.at("/v2/big/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(big.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID").await;
    // Also when streamed without a Content-Length.
    let r = c
        .put(t.at("/v2/big/manifests/v1"))
        .header("Content-Type", OCI_MANIFEST)
        .body(streamed_body(&big, 100))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::PAYLOAD_TOO_LARGE, "SIZE_INVALID").await;
}

#[tokio::test]
async fn indexes_docker_types_and_children() {
    let t = Trow::start();
    let c = client();
    let (amd, amd_digest) = push_image(&c, &t.url, "multi", "amd64", 1).await;
    let (arm, arm_digest) = push_image(&c, &t.url, "multi", "arm64", 2).await;
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            { "mediaType": OCI_MANIFEST, "digest": amd_digest, "size": amd.len(), "platform": {"architecture":"amd64","os":"linux"} },
            { "mediaType": OCI_MANIFEST, "digest": arm_digest, "size": arm.len(), "platform": {"architecture":"arm64","os":"linux"} }
        ]
    }))
    .unwrap();
    put_manifest(&c, &t.url, "multi", "latest", OCI_INDEX, &index).await;
    let r = c
        .get(t.at("/v2/multi/manifests/latest"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(r.bytes().await.unwrap().as_ref(), index.as_slice());

    // An index whose child is not in the repository is refused.
    let r = c
        .put(t.at("/v2/other/manifests/latest"))
        .header("Content-Type", OCI_INDEX)
        .body(index.clone())
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "MANIFEST_BLOB_UNKNOWN").await;

    // Docker schema 2 manifest and manifest list.
    let docker_manifest_type = "application/vnd.docker.distribution.manifest.v2+json";
    let docker_list_type = "application/vnd.docker.distribution.manifest.list.v2+json";
    let config = br#"{"docker":true}"#;
    let layer = data(3, 500);
    push_blob(&c, &t.url, "dock", config).await;
    push_blob(&c, &t.url, "dock", &layer).await;
    let dm = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": docker_manifest_type,
        "config": descriptor("application/vnd.docker.container.image.v1+json", config),
        "layers": [descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", &layer)]
    }))
    .unwrap();
    let dm_digest = put_manifest(&c, &t.url, "dock", "v1", docker_manifest_type, &dm).await;
    let dl = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": docker_list_type,
        "manifests": [{ "mediaType": docker_manifest_type, "digest": dm_digest, "size": dm.len(), "platform": {"architecture":"amd64","os":"linux"} }]
    }))
    .unwrap();
    put_manifest(&c, &t.url, "dock", "list", docker_list_type, &dl).await;
    let r = c.get(t.at("/v2/dock/manifests/list")).send().await.unwrap();
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some(docker_list_type)
    );
    let r = c.get(t.at("/v2/dock/manifests/v1")).send().await.unwrap();
    assert_eq!(
        header(&r, "content-type").as_deref(),
        Some(docker_manifest_type)
    );
    assert_eq!(r.bytes().await.unwrap().as_ref(), dm.as_slice());
}

/// An artifact manifest with `artifactType` and a `subject`.
fn artifact(
    subject_digest: &str,
    subject_size: usize,
    artifact_type: &str,
    layer: &[u8],
    note: &str,
) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": sha256(b"{}"), "size": 2 },
        "layers": [descriptor("application/octet-stream", layer)],
        "subject": { "mediaType": OCI_MANIFEST, "digest": subject_digest, "size": subject_size },
        "annotations": { "note": note }
    }))
    .unwrap()
}

#[tokio::test]
async fn referrers_and_artifacts() {
    let t = Trow::start();
    let c = client();
    let (image, image_digest) = push_image(&c, &t.url, "signed", "v1", 4).await;
    push_blob(&c, &t.url, "signed", b"{}").await;
    let sig_layer = b"signature bytes";
    let sbom_layer = b"sbom bytes";
    push_blob(&c, &t.url, "signed", sig_layer).await;
    push_blob(&c, &t.url, "signed", sbom_layer).await;

    let sig = artifact(
        &image_digest,
        image.len(),
        "application/vnd.example.sig",
        sig_layer,
        "sig",
    );
    let r = c
        .put(t.at(&format!("/v2/signed/manifests/{}", sha256(&sig))))
        .header("Content-Type", OCI_MANIFEST)
        .body(sig.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "oci-subject"), Some(image_digest.clone()));
    let sbom = artifact(
        &image_digest,
        image.len(),
        "application/vnd.example.sbom",
        sbom_layer,
        "sbom",
    );
    put_manifest(&c, &t.url, "signed", "sbom", OCI_MANIFEST, &sbom).await;

    let r = c
        .get(t.at(&format!("/v2/signed/referrers/{image_digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type").as_deref(), Some(OCI_INDEX));
    assert_eq!(header(&r, "oci-filters-applied"), None);
    let index: Value = r.json().await.unwrap();
    assert_eq!(index["mediaType"], OCI_INDEX);
    assert_eq!(index["schemaVersion"], 2);
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 2);
    let sig_entry = manifests
        .iter()
        .find(|m| m["digest"] == sha256(&sig))
        .expect("sig listed");
    assert_eq!(sig_entry["artifactType"], "application/vnd.example.sig");
    assert_eq!(sig_entry["size"], sig.len());
    assert_eq!(sig_entry["mediaType"], OCI_MANIFEST);
    assert_eq!(sig_entry["annotations"]["note"], "sig");

    let r = c
        .get(t.at(&format!(
            "/v2/signed/referrers/{image_digest}?artifactType=application/vnd.example.sbom"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(
        header(&r, "oci-filters-applied").as_deref(),
        Some("artifactType")
    );
    let index: Value = r.json().await.unwrap();
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1);
    assert_eq!(manifests[0]["digest"], sha256(&sbom));

    // An unknown subject has an empty list, not 404.
    let r = c
        .get(t.at(&format!("/v2/signed/referrers/{}", sha256(b"x"))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let index: Value = r.json().await.unwrap();
    assert_eq!(index["manifests"], json!([]));
    let r = c
        .get(t.at("/v2/signed/referrers/sha256:nothex"))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID").await;

    // Deleting a referrer by digest removes it from the list.
    let r = c
        .delete(t.at(&format!("/v2/signed/manifests/{}", sha256(&sbom))))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .get(t.at(&format!("/v2/signed/referrers/{image_digest}")))
        .send()
        .await
        .unwrap();
    let index: Value = r.json().await.unwrap();
    assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn deleting_by_tag_and_by_digest() {
    let t = Trow::start();
    let c = client();
    let (_, digest) = push_image(&c, &t.url, "del", "v1", 5).await;
    c.put(t.at("/v2/del/manifests/v2"))
        .header("Content-Type", OCI_MANIFEST)
        .body(
            c.get(t.at("/v2/del/manifests/v1"))
                .send()
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap(),
        )
        .send()
        .await
        .unwrap();

    // By tag: only the tag goes.
    let r = c.delete(t.at("/v2/del/manifests/v1")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c.get(t.at("/v2/del/manifests/v1")).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let r = c
        .get(t.at(&format!("/v2/del/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c.delete(t.at("/v2/del/manifests/v1")).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;

    // By digest: the manifest and its remaining tags go.
    let r = c
        .delete(t.at(&format!("/v2/del/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let r = c
        .get(t.at(&format!("/v2/del/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let r = c.get(t.at("/v2/del/manifests/v2")).send().await.unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
    let tags: Value = c
        .get(t.at("/v2/del/tags/list"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tags["tags"], json!([]));
    let r = c
        .delete(t.at(&format!("/v2/del/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN").await;
}
