//! Interoperability with buildah: an image built from scratch (no network)
//! is pushed to Trow as OCI and as Docker schema 2, and what Trow serves is
//! checked against what buildah reports: the manifest digest it wrote,
//! the config bytes and the layers' diff_ids from its own storage. skopeo
//! copies the image back out byte for byte, and buildah pulls it into fresh
//! storage, where the files it copied in are found intact.

mod common;

use std::path::{Path, PathBuf};

use common::oci::{self, sha256};
use common::tools::{self, gunzip, skopeo};
use common::*;
use reqwest::StatusCode;
use serde_json::Value;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

/// buildah with private storage (`--root`, `--runroot`, vfs) in a
/// temporary directory, so tests neither see nor touch the machine's
/// images or each other's.
struct Buildah {
    root: PathBuf,
    runroot: PathBuf,
}

impl Buildah {
    fn new(dir: &Path) -> Buildah {
        Buildah {
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
        ];
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    async fn run(&self, args: &[&str]) -> std::process::Output {
        let all = self.args(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        tools::run("buildah", &refs).await
    }

    /// Runs buildah; it must succeed. Returns stdout, trimmed.
    async fn ok(&self, args: &[&str]) -> String {
        let all = self.args(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let out = tools::run_ok("buildah", &refs).await;
        String::from_utf8(out)
            .expect("buildah prints UTF-8")
            .trim()
            .to_string()
    }

    /// `buildah inspect --type image` of one image.
    async fn inspect(&self, reference: &str) -> Value {
        let out = self.ok(&["inspect", "--type", "image", reference]).await;
        serde_json::from_str(&out).expect("buildah inspect JSON")
    }

    /// `buildah push` to Trow; returns the manifest digest buildah reports
    /// (`--digestfile`).
    async fn push(&self, image: &str, format: &str, dest: &str) -> String {
        let digest_file = self.root.with_extension(format!("digest.{format}"));
        let digest_arg = digest_file.display().to_string();
        self.ok(&[
            "push",
            "--quiet",
            "--tls-verify=false",
            "--format",
            format,
            "--digestfile",
            &digest_arg,
            image,
            &format!("docker://{dest}"),
        ])
        .await;
        let digest = std::fs::read_to_string(&digest_file).expect("buildah wrote --digestfile");
        let digest = digest.trim().to_string();
        assert!(digest.starts_with("sha256:"), "--digestfile: {digest:?}");
        digest
    }

    /// Mounts a working container made from `image` and reads `files`
    /// (paths inside the image) from its root file system.
    async fn read_files(&self, image: &str, files: &[&str]) -> Vec<Vec<u8>> {
        let name = format!("read-{}", files.len());
        self.ok(&["from", "--pull-never", "--name", &name, image])
            .await;
        let mount = PathBuf::from(self.ok(&["mount", &name]).await);
        let contents = files
            .iter()
            .map(|f| {
                let path = mount.join(f.trim_start_matches('/'));
                std::fs::read(&path)
                    .unwrap_or_else(|e| panic!("{} in {image}: {e}", path.display()))
            })
            .collect();
        self.ok(&["umount", &name]).await;
        self.ok(&["rm", &name]).await;
        contents
    }
}

/// Whether buildah can work here at all (`buildah info`): it needs no
/// daemon, but may lack what it needs in a restricted sandbox or without
/// root; that is a skip on a developer machine and a failure in CI.
async fn buildah_usable(b: &Buildah) -> bool {
    let out = b.run(&["info"]).await;
    if out.status.success() {
        return true;
    }
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(
        !strict(),
        "buildah is installed but cannot run here (TROW_TEST_STRICT is set): {why}"
    );
    eprintln!("SKIPPED: buildah is installed but cannot run here: {why}");
    false
}

/// What buildah built, as its own storage records it.
struct Built {
    /// `localhost/built:v2`
    reference: String,
    /// The image config, byte for byte; its digest is the image id.
    config: Vec<u8>,
    diff_ids: Vec<String>,
    /// (path in the image, contents)
    files: Vec<(&'static str, Vec<u8>)>,
}

/// Builds a two-layer image from scratch: a base layer with a binary
/// payload, committed, then a second layer with a text file on top.
async fn build(b: &Buildah, dir: &Path, seed: u64) -> Built {
    std::fs::create_dir_all(dir).unwrap();
    let files: Vec<(&'static str, Vec<u8>)> = vec![
        ("/data/payload.bin", oci::data(seed, 256 * 1024 + 3)),
        (
            "/etc/hello.txt",
            format!("hello from buildah, seed {seed}\n").into_bytes(),
        ),
    ];
    let host_file = |i: usize| {
        let p = dir.join(format!("file{i}"));
        std::fs::write(&p, &files[i].1).unwrap();
        p.display().to_string()
    };

    b.ok(&["from", "--name", "base", "scratch"]).await;
    b.ok(&["copy", "base", &host_file(0), files[0].0]).await;
    b.ok(&[
        "config",
        "--os",
        "linux",
        "--arch",
        "amd64",
        "--entrypoint",
        r#"["/data/payload.bin"]"#,
        "--label",
        "org.example.built-by=trow-tests",
        "base",
    ])
    .await;
    b.ok(&["commit", "--quiet", "base", "localhost/built:base"])
        .await;
    b.ok(&[
        "from",
        "--pull-never",
        "--name",
        "top",
        "localhost/built:base",
    ])
    .await;
    b.ok(&["copy", "top", &host_file(1), files[1].0]).await;
    let id = b
        .ok(&["commit", "--quiet", "top", "localhost/built:v2"])
        .await;

    let reference = "localhost/built:v2".to_string();
    let info = b.inspect(&reference).await;
    let config = info["Config"]
        .as_str()
        .expect("inspect: Config")
        .as_bytes()
        .to_vec();
    assert_eq!(
        sha256(&config),
        format!("sha256:{id}"),
        "the image id is the config digest: {info:#}"
    );
    let diff_ids: Vec<String> = info["OCIv1"]["rootfs"]["diff_ids"]
        .as_array()
        .expect("inspect: diff_ids")
        .iter()
        .map(|d| d.as_str().unwrap().to_string())
        .collect();
    assert_eq!(diff_ids.len(), 2, "{info:#}");
    Built {
        reference,
        config,
        diff_ids,
        files,
    }
}

/// Checks what buildah pushed to `repo:tag`: Trow serves a manifest whose
/// digest is the one buildah reported, with the expected media types, the
/// config byte for byte, and layers that hash to their digests and
/// decompress to the diff_ids of buildah's storage. Returns the manifest
/// bytes.
async fn assert_pushed(
    t: &Trow,
    repo: &str,
    tag: &str,
    digest: &str,
    built: &Built,
    manifest_type: &str,
    layer_type: &str,
) -> Vec<u8> {
    let c = client();
    let got = oci::get_manifest(&c, &t.url, repo, tag).await;
    assert_eq!(got.status, StatusCode::OK, "GET {repo}:{tag}");
    assert_eq!(
        sha256(&got.body),
        digest,
        "Trow serves another manifest than buildah pushed"
    );
    assert_eq!(got.header("docker-content-digest"), digest);
    assert_eq!(got.header("content-type"), manifest_type);
    let by_digest = oci::get_manifest(&c, &t.url, repo, digest).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    assert!(by_digest.body == got.body, "GET by digest differs");
    let m = got.json();
    assert_eq!(m["mediaType"], manifest_type, "{m:#}");

    // containers/image converts only the manifest between formats: the
    // config is the one in buildah's storage, byte for byte.
    let config_digest = m["config"]["digest"].as_str().expect("config digest");
    assert_eq!(config_digest, sha256(&built.config), "{m:#}");
    let config = oci::get_blob(&c, &t.url, repo, config_digest).await;
    assert_eq!(config.status, StatusCode::OK);
    assert!(config.body == built.config, "config bytes differ");

    let layers = m["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), built.diff_ids.len(), "{m:#}");
    for (i, layer) in layers.iter().enumerate() {
        assert_eq!(layer["mediaType"], layer_type, "{m:#}");
        let digest = layer["digest"].as_str().expect("layer digest");
        let blob = oci::get_blob(&c, &t.url, repo, digest).await;
        assert_eq!(blob.status, StatusCode::OK, "GET layer {digest}");
        assert_eq!(sha256(&blob.body), digest, "layer {i} hashes to its digest");
        assert_eq!(layer["size"].as_u64(), Some(blob.body.len() as u64));
        assert_eq!(
            sha256(&gunzip(&blob.body).await),
            built.diff_ids[i],
            "layer {i} of {repo}:{tag}: content changed"
        );
    }

    // skopeo, another client, reads the same manifest and copies every
    // blob out unchanged.
    let remote = format!("docker://{}/{repo}", t.host);
    let raw = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--raw",
        &format!("{remote}:{tag}"),
    ])
    .await;
    assert!(raw == got.body, "skopeo inspect --raw differs from GET");
    let out = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-tls-verify=false",
        &format!("{remote}@{digest}"),
        &format!("dir:{}", out.path().display()),
    ])
    .await;
    let copied = std::fs::read(out.path().join("manifest.json")).unwrap();
    assert!(copied == got.body, "skopeo copied another manifest");
    let mut blobs = vec![config_digest];
    blobs.extend(layers.iter().map(|l| l["digest"].as_str().unwrap()));
    for d in blobs {
        let file = out.path().join(d.strip_prefix("sha256:").unwrap());
        let bytes = std::fs::read(&file).unwrap_or_else(|e| panic!("skopeo copied no {d}: {e}"));
        assert_eq!(sha256(&bytes), d, "skopeo's copy of {d}");
    }
    got.body
}

/// Pulls `reference` with buildah into fresh storage and checks it against
/// what was built and pushed.
async fn assert_buildah_pulls(dir: &Path, reference: &str, manifest: &[u8], built: &Built) {
    let fresh = Buildah::new(dir);
    let id = fresh
        .ok(&[
            "pull",
            "--quiet",
            "--tls-verify=false",
            &format!("docker://{reference}"),
        ])
        .await;
    assert_eq!(
        format!("sha256:{id}"),
        sha256(&built.config),
        "pulled image id"
    );
    let info = fresh.inspect(reference).await;
    assert_eq!(
        info["FromImageDigest"],
        sha256(manifest).as_str(),
        "{info:#}"
    );
    assert!(
        info["Manifest"].as_str().map(str::as_bytes) == Some(manifest),
        "buildah recorded another manifest: {info:#}"
    );
    assert!(
        info["Config"].as_str().map(str::as_bytes) == Some(&built.config[..]),
        "buildah recorded another config: {info:#}"
    );
    let paths: Vec<&str> = built.files.iter().map(|(p, _)| *p).collect();
    let contents = fresh.read_files(reference, &paths).await;
    for ((path, want), got) in built.files.iter().zip(&contents) {
        assert!(got == want, "{path} in the pulled image differs");
    }
}

#[tokio::test]
async fn buildah_builds_pushes_oci_and_pulls_back() {
    if !have_tool("buildah") || !have_tool("skopeo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = Buildah::new(&tmp.path().join("build"));
    if !buildah_usable(&b).await {
        return;
    }
    let built = build(&b, &tmp.path().join("files"), 51).await;
    let t = Trow::start();

    // The one-layer base first, then the image on top of it: buildah finds
    // the base layer already there (HEAD) and uploads only the new one.
    let base = b
        .push(
            "localhost/built:base",
            "oci",
            &format!("{}/built/app:base", t.host),
        )
        .await;
    let digest = b
        .push(
            &built.reference,
            "oci",
            &format!("{}/built/app:oci", t.host),
        )
        .await;
    assert_ne!(base, digest);
    let manifest = assert_pushed(
        &t,
        "built/app",
        "oci",
        &digest,
        &built,
        oci::OCI_MANIFEST,
        oci::OCI_LAYER,
    )
    .await;
    let base_manifest = oci::get_manifest(&client(), &t.url, "built/app", "base").await;
    assert_eq!(sha256(&base_manifest.body), base);
    let base_layer = &base_manifest.json()["layers"][0]["digest"];
    let top_layer = &serde_json::from_slice::<Value>(&manifest).unwrap()["layers"][0]["digest"];
    assert_eq!(base_layer, top_layer, "the base layer is shared");

    assert_buildah_pulls(
        &tmp.path().join("pull"),
        &format!("{}/built/app:oci", t.host),
        &manifest,
        &built,
    )
    .await;
}

#[tokio::test]
async fn buildah_pushes_docker_schema_2_and_pulls_back() {
    if !have_tool("buildah") || !have_tool("skopeo") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let b = Buildah::new(&tmp.path().join("build"));
    if !buildah_usable(&b).await {
        return;
    }
    let built = build(&b, &tmp.path().join("files"), 52).await;
    let t = Trow::start();
    let digest = b
        .push(
            &built.reference,
            "docker",
            &format!("{}/built/app:docker", t.host),
        )
        .await;
    let manifest = assert_pushed(
        &t,
        "built/app",
        "docker",
        &digest,
        &built,
        DOCKER_MANIFEST,
        DOCKER_LAYER,
    )
    .await;
    // The same image under a second tag of another repository (a
    // cross-repository mount or a fresh upload: either way, same bytes).
    let again = b
        .push(
            &built.reference,
            "docker",
            &format!("{}/other/app:docker", t.host),
        )
        .await;
    assert_eq!(again, digest, "the same image pushed twice has one digest");
    assert_pushed(
        &t,
        "other/app",
        "docker",
        &digest,
        &built,
        DOCKER_MANIFEST,
        DOCKER_LAYER,
    )
    .await;

    assert_buildah_pulls(
        &tmp.path().join("pull"),
        &format!("{}/built/app:docker", t.host),
        &manifest,
        &built,
    )
    .await;
}
