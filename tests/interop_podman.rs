//! Interoperability with podman: pull an image from Trow into container
//! storage, push it back (to another repository, and to a second registry,
//! where podman compresses the layers and uploads them itself), and check
//! that what podman pushed is intact.

mod common;

use std::path::{Path, PathBuf};

use common::layout::{Image, OciLayout};
use common::oci::{self, sha256};
use common::tools::{self, gunzip, skopeo};
use common::*;
use reqwest::StatusCode;
use serde_json::Value;

/// podman with private storage in a temporary directory, so tests neither
/// see nor touch the machine's images.
struct Podman {
    root: PathBuf,
    runroot: PathBuf,
}

impl Podman {
    fn new(dir: &Path) -> Podman {
        Podman {
            root: dir.join("root"),
            runroot: dir.join("runroot"),
        }
    }

    fn args(&self, args: &[&str]) -> Vec<String> {
        let mut all = vec![
            "--root".to_string(),
            self.root.display().to_string(),
            "--runroot".to_string(),
            self.runroot.display().to_string(),
            "--storage-driver".to_string(),
            "vfs".to_string(),
            "--cgroup-manager".to_string(),
            "cgroupfs".to_string(),
            "--events-backend".to_string(),
            "file".to_string(),
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    async fn run(&self, args: &[&str]) -> std::process::Output {
        let all = self.args(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        tools::run("podman", &refs).await
    }

    /// Runs podman; it must succeed. Returns stdout.
    async fn ok(&self, args: &[&str]) -> Vec<u8> {
        let all = self.args(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        tools::run_ok("podman", &refs).await
    }

    /// `podman image inspect` of one image.
    async fn inspect(&self, reference: &str) -> Value {
        let out = self
            .ok(&["image", "inspect", "--format", "json", reference])
            .await;
        let v: Value = serde_json::from_slice(&out).expect("podman image inspect JSON");
        v[0].clone()
    }
}

/// Whether podman can work here at all (`podman info`). It needs no
/// daemon, but may lack what it needs in a restricted sandbox; that is a
/// skip on a developer machine and a failure in CI.
async fn podman_usable(p: &Podman) -> bool {
    let out = p.run(&["info", "--format", "json"]).await;
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !strict(),
        "podman is installed but cannot run here (TROW_TEST_STRICT is set): {why}"
    );
    eprintln!("SKIPPED: podman is installed but cannot run here: {why}");
    false
}

/// Checks an image podman pushed: its config is the original config byte
/// for byte, and every layer is served, hashes to its digest, has the size
/// the manifest says and, uncompressed, hashes to the original diff_id.
async fn assert_pushed_image_intact(base: &str, repo: &str, tag: &str, original: &Image) -> Value {
    let c = client();
    let got = oci::get_manifest(&c, base, repo, tag).await;
    assert_eq!(got.status, StatusCode::OK, "GET {repo}:{tag}");
    assert_eq!(got.header("docker-content-digest"), sha256(&got.body));
    let manifest = got.json();
    assert_eq!(
        manifest["mediaType"].as_str(),
        Some(got.header("content-type")),
        "{manifest:#}"
    );

    // skopeo sees the same bytes.
    let host = base.strip_prefix("http://").unwrap();
    let raw = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{host}/{repo}:{tag}"),
    ])
    .await;
    assert!(
        raw == got.body,
        "skopeo inspect --raw differs from GET for {repo}:{tag}"
    );

    let config_digest = manifest["config"]["digest"]
        .as_str()
        .expect("config digest");
    assert_eq!(
        config_digest,
        sha256(&original.config),
        "podman changed the config: {manifest:#}"
    );
    assert_eq!(
        manifest["config"]["size"].as_u64(),
        Some(original.config.len() as u64)
    );
    let config = oci::get_blob(&c, base, repo, config_digest).await;
    assert_eq!(config.status, StatusCode::OK);
    assert!(
        config.body == original.config,
        "config bytes differ in {repo}"
    );

    let layers = manifest["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), original.layers.len(), "{manifest:#}");
    for (i, layer) in layers.iter().enumerate() {
        let digest = layer["digest"].as_str().expect("layer digest");
        let media_type = layer["mediaType"].as_str().expect("layer mediaType");
        let blob = oci::get_blob(&c, base, repo, digest).await;
        assert_eq!(
            blob.status,
            StatusCode::OK,
            "GET layer {digest} of {repo}:{tag}"
        );
        assert_eq!(
            sha256(&blob.body),
            digest,
            "layer {i} of {repo}:{tag} does not hash to its digest"
        );
        assert_eq!(
            layer["size"].as_u64(),
            Some(blob.body.len() as u64),
            "layer {i} size"
        );
        let uncompressed = if media_type.ends_with("gzip") {
            gunzip(&blob.body).await
        } else {
            assert!(
                media_type.ends_with(".tar"),
                "unexpected layer media type {media_type}"
            );
            blob.body.clone()
        };
        assert_eq!(
            sha256(&uncompressed),
            original.diff_ids[i],
            "layer {i} of {repo}:{tag}: content changed"
        );
        assert!(
            uncompressed == original.layers[i],
            "layer {i} of {repo}:{tag}: tar bytes changed"
        );
    }
    manifest
}

#[tokio::test]
async fn podman_pulls_and_pushes() {
    if !have_tool("podman") || !have_tool("skopeo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let podman = Podman::new(&tmp.path().join("podman"));
    if !podman_usable(&podman).await {
        return;
    }
    let t = Trow::start();
    let img = Image::build(41, "amd64", 3);
    let layout = OciLayout::create(&tmp.path().join("layout"));
    layout.add_image(&img);
    layout.tag(oci::OCI_MANIFEST, &img.manifest, "v1");
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
        &layout.reference("v1"),
        &format!("docker://{}/src/app:v1", t.host),
    ])
    .await;

    // Pull: podman verifies every layer against the config's diff_ids.
    let source = format!("{}/src/app:v1", t.host);
    podman
        .ok(&["pull", "--quiet", "--tls-verify=false", &source])
        .await;
    let info = podman.inspect(&source).await;
    let config_hex = sha256(&img.config)
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    assert_eq!(
        info["Id"],
        config_hex.as_str(),
        "image id is the config digest: {info:#}"
    );
    assert_eq!(info["Digest"], img.digest.as_str(), "{info:#}");
    assert_eq!(info["Architecture"], "amd64");
    assert_eq!(info["Os"], "linux");
    assert_eq!(
        info["RootFS"]["Layers"],
        serde_json::json!(img.diff_ids),
        "{info:#}"
    );

    // Push to another repository of the same registry.
    let same_registry = format!("{}/dst/app:pushed", t.host);
    podman
        .ok(&[
            "push",
            "--quiet",
            "--tls-verify=false",
            &source,
            &same_registry,
        ])
        .await;
    assert_pushed_image_intact(&t.url, "dst/app", "pushed", &img).await;
    // The original is untouched.
    let raw = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("docker://{source}"),
    ])
    .await;
    assert!(raw == img.manifest, "source manifest changed");

    // Push to a second registry, which has none of the blobs: podman
    // compresses and uploads every layer itself.
    let t2 = Trow::start();
    let other = format!("{}/pushed/app:oci", t2.host);
    podman
        .ok(&["push", "--quiet", "--tls-verify=false", &source, &other])
        .await;
    let m = assert_pushed_image_intact(&t2.url, "pushed/app", "oci", &img).await;
    assert_eq!(m["mediaType"], oci::OCI_MANIFEST, "{m:#}");
    eprintln!(
        "layers podman pushed to a fresh registry: {:#}",
        m["layers"]
    );
    // ... and as a Docker schema 2 manifest.
    let docker = format!("{}/pushed/app:docker", t2.host);
    podman
        .ok(&[
            "push",
            "--quiet",
            "--tls-verify=false",
            "--format",
            "v2s2",
            &source,
            &docker,
        ])
        .await;
    let m = assert_pushed_image_intact(&t2.url, "pushed/app", "docker", &img).await;
    assert_eq!(
        m["mediaType"], "application/vnd.docker.distribution.manifest.v2+json",
        "{m:#}"
    );
    let tags = oci::fetch(client().get(t2.at("/v2/pushed/app/tags/list")))
        .await
        .json();
    assert_eq!(
        tags["tags"],
        serde_json::json!(["docker", "oci"]),
        "{tags:#}"
    );

    // What podman pushed, podman can pull again into fresh storage.
    let fresh = Podman::new(&tmp.path().join("podman2"));
    for reference in [&other, &docker, &same_registry] {
        fresh
            .ok(&["pull", "--quiet", "--tls-verify=false", reference])
            .await;
        let info = fresh.inspect(reference).await;
        assert_eq!(info["Id"], config_hex.as_str(), "{reference}: {info:#}");
        assert_eq!(
            info["RootFS"]["Layers"],
            serde_json::json!(img.diff_ids),
            "{reference}: {info:#}"
        );
    }
}
