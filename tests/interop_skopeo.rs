//! Interoperability with skopeo, a real containers/image client: images,
//! multi-platform indexes and artifacts go in from an OCI layout and come
//! back out byte for byte.

mod common;

use common::layout::{Artifact, Image, Index, OciLayout};
use common::oci::{self, sha256};
use common::tools::skopeo;
use common::*;
use reqwest::StatusCode;
use serde_json::Value;

/// `skopeo copy` with the flags every copy here uses: plain HTTP to Trow
/// and no re-encoding, so digests must survive unchanged.
async fn copy(extra: &[&str], src: &str, dest: &str) {
    let mut args = vec!["copy", "--quiet", "--preserve-digests"];
    if src.starts_with("docker://") {
        args.push("--src-tls-verify=false");
    }
    if dest.starts_with("docker://") {
        args.push("--dest-tls-verify=false");
    }
    args.extend_from_slice(extra);
    args.push(src);
    args.push(dest);
    skopeo(&args).await;
}

/// Asserts that `repo` on the registry at `base` serves `manifest` under
/// `reference`, with matching digest and media type headers.
async fn assert_manifest_served(
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    manifest: &[u8],
) {
    let got = oci::get_manifest(&client(), base, repo, reference).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "GET {repo}:{reference}: {}",
        String::from_utf8_lossy(&got.body)
    );
    assert!(
        got.body == manifest,
        "{repo}:{reference}: served manifest bytes differ from the pushed ones"
    );
    assert_eq!(
        got.header("docker-content-digest"),
        sha256(manifest),
        "{repo}:{reference}"
    );
    assert_eq!(got.header("content-type"), media_type, "{repo}:{reference}");
}

/// Asserts that `repo` serves each blob with exactly these bytes.
async fn assert_blobs_served(base: &str, repo: &str, blobs: &[&[u8]]) {
    for b in blobs {
        let d = sha256(b);
        let got = oci::get_blob(&client(), base, repo, &d).await;
        assert_eq!(got.status, StatusCode::OK, "GET blob {d} from {repo}");
        assert!(
            got.body == *b,
            "blob {d} in {repo}: served bytes differ ({} vs {} bytes)",
            got.body.len(),
            b.len()
        );
    }
}

/// Asserts that a layout skopeo wrote holds every blob of `original`
/// byte for byte (and nothing that is not in `original`).
fn assert_same_blobs(original: &OciLayout, copied: &OciLayout) {
    let want = original.blobs();
    let got = copied.blobs();
    for (digest, bytes) in &want {
        let copy = got
            .get(digest)
            .unwrap_or_else(|| panic!("blob {digest} is missing from the layout copied back out"));
        assert!(copy == bytes, "blob {digest} differs after the round trip");
        assert_eq!(
            sha256(copy),
            *digest,
            "blob file {digest} does not hash to its name"
        );
    }
    let extra: Vec<_> = got.keys().filter(|d| !want.contains_key(*d)).collect();
    assert!(
        extra.is_empty(),
        "blobs in the copied layout that were never pushed: {extra:?}"
    );
}

fn raw_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

#[tokio::test]
async fn image_round_trips_byte_for_byte() {
    if !have_tool("skopeo") {
        return;
    }
    let t = Trow::start();
    let tmp = tempfile::tempdir().unwrap();
    let img = Image::build(11, "amd64", 3);
    let src = OciLayout::create(&tmp.path().join("src"));
    src.add_image(&img);
    src.tag(oci::OCI_MANIFEST, &img.manifest, "v1");
    let remote = format!("docker://{}/interop/image", t.host);

    copy(&[], &src.reference("v1"), &format!("{remote}:v1")).await;
    copy(&[], &src.reference("v1"), &format!("{remote}:v2")).await;
    assert_manifest_served(
        &t.url,
        "interop/image",
        "v1",
        oci::OCI_MANIFEST,
        &img.manifest,
    )
    .await;
    assert_manifest_served(
        &t.url,
        "interop/image",
        &img.digest,
        oci::OCI_MANIFEST,
        &img.manifest,
    )
    .await;
    assert_blobs_served(&t.url, "interop/image", &img.blobs()).await;

    // inspect --raw: exactly the bytes pushed.
    let raw = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("{remote}:v1"),
    ])
    .await;
    assert!(
        raw == img.manifest,
        "skopeo inspect --raw: {}",
        String::from_utf8_lossy(&raw)
    );
    let raw_config = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        "--config",
        &format!("{remote}:v1"),
    ])
    .await;
    assert!(
        raw_config == img.config,
        "skopeo inspect --raw --config: {}",
        String::from_utf8_lossy(&raw_config)
    );

    // inspect: skopeo's own reading of manifest, config and tags.
    let info = raw_json(&skopeo(&["inspect", "--tls-verify=false", &format!("{remote}:v1")]).await);
    assert_eq!(info["Digest"], img.digest.as_str(), "{info:#}");
    assert_eq!(info["Architecture"], "amd64", "{info:#}");
    assert_eq!(info["Os"], "linux", "{info:#}");
    let layers: Vec<String> = img.layers.iter().map(|l| sha256(l)).collect();
    assert_eq!(info["Layers"], serde_json::json!(layers), "{info:#}");
    assert_eq!(
        info["RepoTags"],
        serde_json::json!(["v1", "v2"]),
        "{info:#}"
    );
    assert_eq!(
        info["Env"],
        serde_json::json!(["IMAGE_SEED=11"]),
        "{info:#}"
    );

    let tags = raw_json(&skopeo(&["list-tags", "--tls-verify=false", &remote]).await);
    assert_eq!(tags["Tags"], serde_json::json!(["v1", "v2"]), "{tags:#}");

    // Back out into a fresh layout: same manifest digest, same bytes.
    let back = OciLayout::create(&tmp.path().join("back"));
    copy(&[], &format!("{remote}:v1"), &back.reference("v1")).await;
    let (media_type, digest, size) = back.resolve("v1").expect("skopeo tagged v1 in the layout");
    assert_eq!(
        (media_type.as_str(), digest.as_str()),
        (oci::OCI_MANIFEST, img.digest.as_str())
    );
    assert_eq!(size, img.manifest.len() as u64);
    assert_same_blobs(&src, &back);

    // Registry to registry: a second Trow gets the same image.
    let t2 = Trow::start();
    copy(
        &[],
        &format!("{remote}:v1"),
        &format!("docker://{}/mirror/image:v1", t2.host),
    )
    .await;
    assert_manifest_served(
        &t2.url,
        "mirror/image",
        "v1",
        oci::OCI_MANIFEST,
        &img.manifest,
    )
    .await;
    assert_blobs_served(&t2.url, "mirror/image", &img.blobs()).await;
    let raw2 = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{}/mirror/image:v1", t2.host),
    ])
    .await;
    assert_eq!(sha256(&raw2), img.digest);

    // skopeo delete resolves the tag and deletes the manifest by digest.
    skopeo(&["delete", "--tls-verify=false", &format!("{remote}:v1")]).await;
    for reference in [img.digest.as_str(), "v1", "v2"] {
        let got = oci::get_manifest(&client(), &t.url, "interop/image", reference).await;
        assert_eq!(
            got.status,
            StatusCode::NOT_FOUND,
            "GET {reference} after delete\nlog:\n{}",
            t.log()
        );
        assert_eq!(
            got.error_code(),
            "MANIFEST_UNKNOWN",
            "GET {reference} after delete"
        );
    }
    let gone = run_skopeo_status(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("{remote}:v1"),
    ])
    .await;
    assert!(!gone, "skopeo still finds the deleted image");
    // The mirror is independent.
    assert_manifest_served(
        &t2.url,
        "mirror/image",
        "v1",
        oci::OCI_MANIFEST,
        &img.manifest,
    )
    .await;
}

async fn run_skopeo_status(args: &[&str]) -> bool {
    common::tools::run("skopeo", args).await.status.success()
}

#[tokio::test]
async fn multi_platform_index_round_trips() {
    if !have_tool("skopeo") {
        return;
    }
    let t = Trow::start();
    let tmp = tempfile::tempdir().unwrap();
    let index = Index::build(vec![
        Image::build(21, "amd64", 2),
        Image::build(22, "arm64", 2),
    ]);
    let src = OciLayout::create(&tmp.path().join("src"));
    src.add_index(&index);
    src.tag(oci::OCI_INDEX, &index.manifest, "multi");
    let remote = format!("docker://{}/interop/multi", t.host);

    copy(
        &["--all"],
        &src.reference("multi"),
        &format!("{remote}:multi"),
    )
    .await;
    assert_manifest_served(
        &t.url,
        "interop/multi",
        "multi",
        oci::OCI_INDEX,
        &index.manifest,
    )
    .await;
    for img in &index.images {
        assert_manifest_served(
            &t.url,
            "interop/multi",
            &img.digest,
            oci::OCI_MANIFEST,
            &img.manifest,
        )
        .await;
        assert_blobs_served(&t.url, "interop/multi", &img.blobs()).await;
    }
    let raw = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("{remote}:multi"),
    ])
    .await;
    assert!(
        raw == index.manifest,
        "skopeo inspect --raw: {}",
        String::from_utf8_lossy(&raw)
    );
    // Non-raw inspect picks the platform; ask for each one.
    for img in &index.images {
        let info = raw_json(
            &skopeo(&[
                "inspect",
                "--tls-verify=false",
                "--override-os=linux",
                &format!("--override-arch={}", img.arch),
                &format!("{remote}:multi"),
            ])
            .await,
        );
        // skopeo reports the digest of what the tag names: the index.
        assert_eq!(info["Digest"], index.digest.as_str(), "{info:#}");
        assert_eq!(info["Architecture"], img.arch.as_str(), "{info:#}");
        let layers: Vec<String> = img.layers.iter().map(|l| sha256(l)).collect();
        assert_eq!(info["Layers"], serde_json::json!(layers), "{info:#}");
    }

    let back = OciLayout::create(&tmp.path().join("back"));
    copy(
        &["--all"],
        &format!("{remote}:multi"),
        &back.reference("multi"),
    )
    .await;
    let (media_type, digest, _) = back
        .resolve("multi")
        .expect("skopeo tagged multi in the layout");
    assert_eq!(
        (media_type.as_str(), digest.as_str()),
        (oci::OCI_INDEX, index.digest.as_str())
    );
    assert_same_blobs(&src, &back);

    // Registry to registry, the whole index.
    let t2 = Trow::start();
    let mirror = format!("docker://{}/mirror/multi:multi", t2.host);
    copy(&["--all"], &format!("{remote}:multi"), &mirror).await;
    assert_manifest_served(
        &t2.url,
        "mirror/multi",
        "multi",
        oci::OCI_INDEX,
        &index.manifest,
    )
    .await;
    for img in &index.images {
        assert_manifest_served(
            &t2.url,
            "mirror/multi",
            &img.digest,
            oci::OCI_MANIFEST,
            &img.manifest,
        )
        .await;
        assert_blobs_served(&t2.url, "mirror/multi", &img.blobs()).await;
    }

    // Deleting the index by digest leaves its children.
    skopeo(&[
        "delete",
        "--tls-verify=false",
        &format!("{remote}@{}", index.digest),
    ])
    .await;
    let got = oci::get_manifest(&client(), &t.url, "interop/multi", &index.digest).await;
    assert_eq!(
        (got.status, got.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    let got = oci::get_manifest(&client(), &t.url, "interop/multi", "multi").await;
    assert_eq!(
        (got.status, got.error_code().as_str()),
        (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN")
    );
    for img in &index.images {
        assert_manifest_served(
            &t.url,
            "interop/multi",
            &img.digest,
            oci::OCI_MANIFEST,
            &img.manifest,
        )
        .await;
    }
}

const SBOM: &str = "application/vnd.example.sbom";
const SIGNATURE: &str = "application/vnd.example.signature";

#[tokio::test]
async fn artifact_with_subject_is_listed_as_referrer() {
    if !have_tool("skopeo") {
        return;
    }
    let t = Trow::start();
    let c = client();
    let tmp = tempfile::tempdir().unwrap();
    let img = Image::build(31, "amd64", 3);
    let sbom = Artifact::build(
        SBOM,
        "application/spdx+json",
        br#"{"spdxVersion":"SPDX-2.3"}"#.to_vec(),
        &img,
    );
    let src = OciLayout::create(&tmp.path().join("src"));
    src.add_image(&img);
    src.tag(oci::OCI_MANIFEST, &img.manifest, "v1");
    src.add_artifact(&sbom);
    src.tag(oci::OCI_MANIFEST, &sbom.manifest, "sbom");
    let repo = "interop/artifact";
    let remote = format!("docker://{}/{repo}", t.host);

    copy(&[], &src.reference("v1"), &format!("{remote}:v1")).await;
    // skopeo 1.9 copies artifacts with a non-image config as-is.
    copy(&[], &src.reference("sbom"), &format!("{remote}:sbom")).await;
    assert_manifest_served(
        &t.url,
        repo,
        &sbom.digest,
        oci::OCI_MANIFEST,
        &sbom.manifest,
    )
    .await;
    assert_blobs_served(&t.url, repo, &[&sbom.config, &sbom.layer]).await;
    let raw = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("{remote}:sbom"),
    ])
    .await;
    assert!(
        raw == sbom.manifest,
        "skopeo inspect --raw: {}",
        String::from_utf8_lossy(&raw)
    );

    // And back out, byte for byte.
    let back = OciLayout::create(&tmp.path().join("back"));
    copy(
        &[],
        &format!("{remote}@{}", sbom.digest),
        &back.reference("sbom"),
    )
    .await;
    let (_, digest, _) = back
        .resolve("sbom")
        .expect("skopeo tagged sbom in the layout");
    assert_eq!(digest, sbom.digest);
    for b in [&sbom.config, &sbom.layer, &sbom.manifest] {
        assert_eq!(
            back.blob(&sha256(b)).as_ref(),
            Some(b),
            "artifact blob {} after the round trip",
            sha256(b)
        );
    }

    // Referrers of the image: the SBOM.
    let url = t.at(&format!("/v2/{repo}/referrers/{}", img.digest));
    let r = oci::fetch(c.get(&url)).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), oci::OCI_INDEX);
    assert_eq!(
        r.header("oci-filters-applied"),
        "",
        "no filter was asked for"
    );
    let listed = r.json();
    assert_eq!(listed["schemaVersion"], 2);
    assert_eq!(listed["mediaType"], oci::OCI_INDEX);
    let want_sbom = serde_json::json!({
        "mediaType": oci::OCI_MANIFEST,
        "digest": sbom.digest,
        "size": sbom.manifest.len(),
        "artifactType": SBOM,
        "annotations": { "org.opencontainers.image.created": "2024-01-01T00:00:00Z" },
    });
    assert_eq!(
        listed["manifests"],
        serde_json::json!([want_sbom]),
        "{listed:#}"
    );

    // A second referrer pushed over HTTP: PUT answers with OCI-Subject.
    let sig = Artifact::build(
        SIGNATURE,
        "application/vnd.example.sig.v1",
        b"signature bytes".to_vec(),
        &img,
    );
    oci::push_blob(&c, &t.url, repo, &sig.config).await;
    oci::push_blob(&c, &t.url, repo, &sig.layer).await;
    let put = oci::fetch(
        c.put(t.at(&format!("/v2/{repo}/manifests/{}", sig.digest)))
            .header("Content-Type", oci::OCI_MANIFEST)
            .body(sig.manifest.clone()),
    )
    .await;
    assert_eq!(
        put.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&put.body)
    );
    assert_eq!(put.header("oci-subject"), img.digest);
    assert_eq!(put.header("docker-content-digest"), sig.digest);
    // Pushing the SBOM again (by digest) also names its subject.
    let again = oci::fetch(
        c.put(t.at(&format!("/v2/{repo}/manifests/{}", sbom.digest)))
            .header("Content-Type", oci::OCI_MANIFEST)
            .body(sbom.manifest.clone()),
    )
    .await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert_eq!(again.header("oci-subject"), img.digest);
    // A manifest without subject gets no OCI-Subject header.
    let plain = oci::fetch(
        c.put(t.at(&format!("/v2/{repo}/manifests/plain")))
            .header("Content-Type", oci::OCI_MANIFEST)
            .body(img.manifest.clone()),
    )
    .await;
    assert_eq!(plain.status, StatusCode::CREATED);
    assert!(
        plain.headers.get("oci-subject").is_none(),
        "OCI-Subject on a manifest without subject"
    );

    let all = oci::fetch(c.get(&url)).await.json();
    let mut digests: Vec<&str> = all["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    digests.sort();
    let mut want = vec![sbom.digest.as_str(), sig.digest.as_str()];
    want.sort();
    assert_eq!(digests, want, "{all:#}");

    // The artifactType filter.
    for (filter, expect) in [
        (SBOM, vec![&sbom]),
        (SIGNATURE, vec![&sig]),
        ("application/vnd.example.none", vec![]),
    ] {
        let r = oci::fetch(c.get(&url).query(&[("artifactType", filter)])).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(
            r.header("oci-filters-applied"),
            "artifactType",
            "filter {filter}"
        );
        let listed = r.json();
        let got: Vec<(&str, &str, u64)> = listed["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["digest"].as_str().unwrap(),
                    d["artifactType"].as_str().unwrap(),
                    d["size"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(&str, &str, u64)> = expect
            .iter()
            .map(|a| {
                (
                    a.digest.as_str(),
                    a.artifact_type.as_str(),
                    a.manifest.len() as u64,
                )
            })
            .collect();
        assert_eq!(
            got, want,
            "referrers with artifactType={filter}: {listed:#}"
        );
    }

    // The empty config (application/vnd.oci.empty.v1+json) is the two bytes `{}`.
    let cfg = oci::get_blob(&c, &t.url, repo, &sha256(b"{}")).await;
    assert_eq!(
        (cfg.status, cfg.body.as_slice()),
        (StatusCode::OK, b"{}".as_slice())
    );

    // Deleting the SBOM removes it from the referrers.
    skopeo(&[
        "delete",
        "--tls-verify=false",
        &format!("{remote}@{}", sbom.digest),
    ])
    .await;
    let after = oci::fetch(c.get(&url)).await.json();
    let digests: Vec<&str> = after["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    assert_eq!(
        digests,
        vec![sig.digest.as_str()],
        "{after:#}\nlog:\n{}",
        t.log()
    );
}
