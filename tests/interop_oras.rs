//! Interoperability with oras-py (the `oras` package on PyPI, ORAS's Python
//! SDK; CI pins the version in .ci/run), driven through
//! tests/oras_client.py: artifacts of several files with a custom config
//! media type and annotations go in (monolithic and chunked uploads) and
//! come back out byte for byte; artifacts pushed with a `subject` are
//! listed by the referrers API; tags are listed and deleted; oras-py logs
//! in with Basic credentials and with the Docker token flow.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::oci::{self, sha256};
use common::tools;
use common::*;
use reqwest::StatusCode;
use serde_json::{json, Value};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/oras_client.py");
const LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const LAYER_TAR_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const TITLE: &str = "org.opencontainers.image.title";
const THING_CONFIG: &str = "application/vnd.example.thing.config.v1+json";
const SIGNATURE: &str = "application/vnd.example.signature.v1+json";
const SBOM: &str = "application/vnd.example.sbom.v1+json";

/// Whether oras-py is importable; prints the version these tests ran with.
async fn have_oras() -> bool {
    if !have_python_module("oras") {
        return false;
    }
    let out = tools::run_ok("python3", &[SCRIPT, "version"]).await;
    eprintln!("oras-py: {}", String::from_utf8_lossy(&out).trim());
    true
}

/// Files to push: `(name relative to the directory, bytes)`.
fn write_files(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
}

/// Every regular file under `dir`, by path relative to it.
fn read_tree(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                out.insert(rel, std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `GET` of a manifest that must be served, checked against the digest
/// oras-py reported for its push; returns the manifest.
async fn served_manifest(t: &Trow, repo: &str, reference: &str, digest: &str) -> Value {
    let got = oci::get_manifest(&client(), &t.url, repo, reference).await;
    assert_eq!(
        got.status,
        StatusCode::OK,
        "GET {repo}:{reference}: {}",
        String::from_utf8_lossy(&got.body)
    );
    assert_eq!(sha256(&got.body), digest, "{repo}:{reference}");
    assert_eq!(got.header("docker-content-digest"), digest);
    assert_eq!(got.header("content-type"), oci::OCI_MANIFEST);
    got.json()
}

/// Asserts that every blob `manifest` names is served with the bytes of
/// `expected` (by digest).
async fn assert_blobs(
    t: &Trow,
    repo: &str,
    manifest: &Value,
    expected: &BTreeMap<String, Vec<u8>>,
) {
    let c = client();
    let mut descriptors = vec![manifest["config"].clone()];
    descriptors.extend(manifest["layers"].as_array().unwrap().iter().cloned());
    for d in descriptors {
        let digest = d["digest"].as_str().unwrap();
        let blob = oci::get_blob(&c, &t.url, repo, digest).await;
        assert_eq!(blob.status, StatusCode::OK, "GET blob {digest} of {repo}");
        assert_eq!(sha256(&blob.body), digest);
        assert_eq!(d["size"].as_u64(), Some(blob.body.len() as u64), "{d}");
        if let Some(want) = expected.get(digest) {
            assert!(&blob.body == want, "blob {digest} of {repo} differs");
        }
    }
}

fn by_digest(files: &[(&str, Vec<u8>)]) -> BTreeMap<String, Vec<u8>> {
    files.iter().map(|(_, b)| (sha256(b), b.clone())).collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A temporary directory with the files to push (`src`), room for what is
/// pulled, and the TMPDIR oras-py runs with: it leaves the temporary
/// directories of its tar+gzip layers behind, and they go with this one.
struct Workspace {
    _tmp: tempfile::TempDir,
    src: PathBuf,
    root: PathBuf,
    tmpdir: String,
}

impl Workspace {
    fn new(files: &[(&str, Vec<u8>)]) -> Workspace {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        write_files(&src, files);
        let root = tmp.path().to_path_buf();
        let tmpdir = root.join("tmp");
        std::fs::create_dir(&tmpdir).unwrap();
        Workspace {
            _tmp: tmp,
            src,
            root,
            tmpdir: path_str(&tmpdir).to_string(),
        }
    }

    fn out(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Runs tests/oras_client.py with `env`; returns its output.
    async fn run(&self, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
        let mut all = vec![SCRIPT];
        all.extend_from_slice(args);
        let mut env = env.to_vec();
        env.push(("TMPDIR", &self.tmpdir));
        tools::run_env("python3", &all, &env).await
    }

    /// Runs tests/oras_client.py with `env`; it must succeed. Returns the
    /// JSON object it prints.
    async fn oras_env(&self, args: &[&str], env: &[(&str, &str)]) -> Value {
        let out = self.run(args, env).await;
        assert!(
            out.status.success(),
            "oras_client.py {args:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "oras_client.py {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    async fn oras(&self, args: &[&str]) -> Value {
        self.oras_env(args, &[]).await
    }
}

#[tokio::test]
async fn oras_pushes_and_pulls_files_byte_for_byte() {
    if !have_oras().await {
        return;
    }
    let t = Trow::start();
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("model.bin", oci::data(7, 300_000)),
        (
            "sbom.json",
            br#"{"spdxVersion":"SPDX-2.3","name":"thing"}"#.to_vec(),
        ),
        ("config.json", br#"{"kind":"thing","version":3}"#.to_vec()),
        ("docs/README.md", b"# thing\n\nhow to use it\n".to_vec()),
        ("docs/deep/licence.txt", oci::data(8, 5_000)),
    ];
    let ws = Workspace::new(&files);
    let reference = format!("{}/artifacts/thing:v1", t.host);
    let pushed = ws
        .oras(&[
            "push",
            &reference,
            "--dir",
            path_str(&ws.src),
            "--file",
            "model.bin",
            "--file",
            "sbom.json:application/spdx+json",
            "--file",
            "docs",
            "--config",
            &format!("config.json:{THING_CONFIG}"),
            "--annotation",
            "org.opencontainers.image.description=a thing",
            "--annotation",
            "org.example.build=42",
        ])
        .await;
    assert_eq!(pushed["status"], 201, "{pushed}");
    let thing = pushed["digest"].as_str().expect("digest").to_string();
    assert_eq!(
        pushed["location"],
        format!("/v2/artifacts/thing/manifests/{thing}").as_str()
    );

    // What Trow stores is what oras-py built: the custom config media type,
    // the annotations, one layer per file, a directory as tar+gzip.
    let m = served_manifest(&t, "artifacts/thing", "v1", &thing).await;
    let same = served_manifest(&t, "artifacts/thing", &thing, &thing).await;
    assert_eq!(m, same);
    assert_eq!(m["mediaType"], oci::OCI_MANIFEST, "{m:#}");
    assert_eq!(m["config"]["mediaType"], THING_CONFIG, "{m:#}");
    assert_eq!(m["config"]["digest"], sha256(&files[2].1).as_str(), "{m:#}");
    assert_eq!(
        m["annotations"],
        json!({"org.opencontainers.image.description": "a thing", "org.example.build": "42"}),
        "{m:#}"
    );
    let layers = m["layers"].as_array().unwrap();
    let summary: Vec<(&str, &str)> = layers
        .iter()
        .map(|l| {
            (
                l["annotations"][TITLE].as_str().unwrap(),
                l["mediaType"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("model.bin", LAYER_TAR),
            ("sbom.json", "application/spdx+json"),
            ("docs", LAYER_TAR_GZIP),
        ],
        "{m:#}"
    );
    assert_eq!(layers[0]["digest"], sha256(&files[0].1).as_str());
    assert_eq!(layers[1]["digest"], sha256(&files[1].1).as_str());
    assert_blobs(&t, "artifacts/thing", &m, &by_digest(&files)).await;

    // Pulled back, every file (the directory unpacked) is byte for byte
    // what was pushed.
    let out = ws.out("pulled");
    let pulled = ws.oras(&["pull", &reference, path_str(&out)]).await;
    assert_eq!(
        pulled["files"].as_array().map(Vec::len),
        Some(3),
        "{pulled}"
    );
    let mut want: BTreeMap<String, Vec<u8>> = files
        .iter()
        .map(|(n, b)| (n.to_string(), b.clone()))
        .collect();
    want.remove("config.json"); // the config is not a file of the artifact
    let got = read_tree(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    assert!(got == want, "pulled files differ from the pushed ones");

    // A chunked upload (POST, PATCH of 64 KiB chunks with Content-Range,
    // PUT) into another repository, where none of the blobs are.
    let chunked = format!("{}/artifacts/chunked:v1", t.host);
    let pushed = ws
        .oras(&[
            "push",
            &chunked,
            "--dir",
            path_str(&ws.src),
            "--file",
            "model.bin",
            "--file",
            "sbom.json:application/spdx+json",
            "--chunked",
            "65536",
        ])
        .await;
    assert_eq!(pushed["status"], 201, "{pushed}");
    let chunked_digest = pushed["digest"].as_str().unwrap().to_string();
    let m = served_manifest(&t, "artifacts/chunked", "v1", &chunked_digest).await;
    // Without --config oras-py pushes the empty config `{}`.
    assert_eq!(
        m["config"],
        json!({"mediaType": "application/vnd.unknown.config.v1+json", "digest": sha256(b"{}"), "size": 2}),
        "{m:#}"
    );
    assert_blobs(&t, "artifacts/chunked", &m, &by_digest(&files)).await;
    let out = ws.out("pulled-chunked");
    ws.oras(&["pull", &chunked, path_str(&out)]).await;
    let got = read_tree(&out);
    assert_eq!(got.len(), 2);
    assert!(got["model.bin"] == files[0].1, "model.bin differs");
    assert!(got["sbom.json"] == files[1].1, "sbom.json differs");

    // Tags, listed and deleted with oras-py.
    let v2 = format!("{}/artifacts/thing:v2", t.host);
    ws.oras(&[
        "push",
        &v2,
        "--dir",
        path_str(&ws.src),
        "--file",
        "sbom.json",
    ])
    .await;
    let repo_ref = format!("{}/artifacts/thing", t.host);
    let tags = ws.oras(&["tags", &repo_ref]).await;
    assert_eq!(tags, json!({"tags": ["v1", "v2"]}));
    let v2_digest = oci::get_manifest(&client(), &t.url, "artifacts/thing", "v2")
        .await
        .header("docker-content-digest")
        .to_string();
    let deleted = ws.oras(&["delete", &repo_ref, "v2"]).await;
    assert_eq!(deleted, json!({"deleted": ["v2"]}));
    assert_eq!(ws.oras(&["tags", &repo_ref]).await, json!({"tags": ["v1"]}));
    let gone = oci::get_manifest(&client(), &t.url, "artifacts/thing", &v2_digest).await;
    assert_eq!(gone.status, StatusCode::NOT_FOUND);
    // v1 is untouched.
    served_manifest(&t, "artifacts/thing", "v1", &thing).await;
}

#[tokio::test]
async fn oras_artifacts_with_a_subject_are_listed_as_referrers() {
    if !have_oras().await {
        return;
    }
    let t = Trow::start();
    let c = client();
    // The subject: an image pushed over HTTP, its manifest compact JSON.
    let (image, image_digest) = oci::push_image(&c, &t.url, "app/web", "v1", 3).await;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("web.sig", oci::data(11, 512)),
        ("sig.json", br#"{"signer":"ci"}"#.to_vec()),
        (
            "sbom.spdx.json",
            br#"{"spdxVersion":"SPDX-2.3","name":"web"}"#.to_vec(),
        ),
        ("sbom-config.json", br#"{"generator":"test"}"#.to_vec()),
    ];
    let ws = Workspace::new(&files);
    let subject = format!("{}/app/web:v1", t.host);
    let sig = ws
        .oras(&[
            "push",
            &format!("{}/app/web:sig", t.host),
            "--dir",
            path_str(&ws.src),
            "--file",
            "web.sig:application/vnd.example.signature.blob",
            "--config",
            &format!("sig.json:{SIGNATURE}"),
            "--annotation",
            "org.example.signer=ci",
            "--subject",
            &subject,
        ])
        .await;
    // oras-py sent the subject's descriptor as Trow serves it, and Trow
    // named the subject in its answer.
    let want_subject = json!({
        "mediaType": oci::OCI_MANIFEST,
        "digest": image_digest,
        "size": image.len(),
    });
    assert_eq!(sig["subject"], want_subject, "{sig}");
    assert_eq!(sig["status"], 201, "{sig}");
    assert_eq!(sig["oci_subject"], image_digest.as_str(), "{sig}");
    let sig_digest = sig["digest"].as_str().unwrap().to_string();
    let sig_manifest = served_manifest(&t, "app/web", "sig", &sig_digest).await;
    assert_eq!(sig_manifest["subject"], want_subject, "{sig_manifest:#}");

    // A second referrer, pushed by digest only (no tag).
    let sbom = ws
        .oras(&[
            "push",
            &format!("{}/app/web:sbom", t.host),
            "--dir",
            path_str(&ws.src),
            "--file",
            "sbom.spdx.json:application/spdx+json",
            "--config",
            &format!("sbom-config.json:{SBOM}"),
            "--subject",
            &format!("{}/app/web@{image_digest}", t.host),
        ])
        .await;
    assert_eq!(sbom["subject"], want_subject, "{sbom}");
    let sbom_digest = sbom["digest"].as_str().unwrap().to_string();
    let sbom_size = oci::get_manifest(&c, &t.url, "app/web", &sbom_digest)
        .await
        .body
        .len();
    let sig_size = oci::get_manifest(&c, &t.url, "app/web", &sig_digest)
        .await
        .body
        .len();

    // oras-py 0.2 writes no `artifactType`: the referrers API reports the
    // config media type in its place, as the spec says.
    let url = t.at(&format!("/v2/app/web/referrers/{image_digest}"));
    let r = oci::fetch(c.get(&url)).await;
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(r.header("content-type"), oci::OCI_INDEX);
    let listed = r.json();
    assert_eq!(listed["mediaType"], oci::OCI_INDEX, "{listed:#}");
    let mut manifests = listed["manifests"].as_array().unwrap().clone();
    manifests.sort_by_key(|d| d["artifactType"].as_str().unwrap_or_default().to_string());
    let sbom_listed = &manifests[0];
    let sig_listed = &manifests[1];
    assert_eq!(manifests.len(), 2, "{listed:#}");
    assert_eq!(sig_listed["mediaType"], oci::OCI_MANIFEST, "{listed:#}");
    assert_eq!(sig_listed["digest"], sig_digest.as_str(), "{listed:#}");
    assert_eq!(sig_listed["size"], sig_size, "{listed:#}");
    assert_eq!(sig_listed["artifactType"], SIGNATURE, "{listed:#}");
    assert_eq!(
        sig_listed["annotations"],
        json!({"org.example.signer": "ci"}),
        "{listed:#}"
    );
    assert_eq!(sbom_listed["digest"], sbom_digest.as_str(), "{listed:#}");
    assert_eq!(sbom_listed["size"], sbom_size, "{listed:#}");
    assert_eq!(sbom_listed["artifactType"], SBOM, "{listed:#}");

    // Filtered by artifact type.
    let r = oci::fetch(c.get(&url).query(&[("artifactType", SIGNATURE)])).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("oci-filters-applied"), "artifactType");
    let only = r.json();
    let digests: Vec<&str> = only["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    assert_eq!(digests, [sig_digest.as_str()], "{only:#}");

    // The signature pulls back byte for byte; the subject is untouched.
    let out = ws.out("sig");
    ws.oras(&["pull", &format!("{}/app/web:sig", t.host), path_str(&out)])
        .await;
    let got = read_tree(&out);
    assert_eq!(got.len(), 1);
    assert!(got["web.sig"] == files[0].1, "web.sig differs");
    let img = oci::get_manifest(&c, &t.url, "app/web", "v1").await;
    assert!(img.body == image, "the subject manifest changed");
}

#[tokio::test]
async fn oras_logs_in_with_basic_credentials_and_the_token_flow() {
    if !have_oras().await {
        return;
    }
    let t = Trow::start_with(&["--user", "ci", "--password", "oras-secret-7"]);
    let files: Vec<(&str, Vec<u8>)> = vec![("payload.bin", oci::data(21, 70_000))];
    let ws = Workspace::new(&files);
    let reference = format!("{}/private/thing:v1", t.host);
    let src = path_str(&ws.src).to_string();
    let push = |reference: String, password: &'static str, chunked: &'static str| {
        let src = src.clone();
        let ws = &ws;
        async move {
            let env = [
                ("TROW_ORAS_AUTH", "basic"),
                ("TROW_ORAS_USER", "ci"),
                ("TROW_ORAS_PASSWORD", password),
            ];
            let args = [
                "push",
                &reference,
                "--dir",
                &src,
                "--file",
                "payload.bin",
                "--chunked",
                chunked,
            ];
            ws.run(&args, &env).await
        }
    };

    // oras-py's basic backend answers each 401 with Basic credentials,
    // which Trow accepts on every endpoint.
    let out = push(reference.clone(), "oras-secret-7", "16384").await;
    assert!(
        out.status.success(),
        "authenticated push failed:\n{}\ntrow log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        t.log()
    );
    let pushed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let digest = pushed["digest"].as_str().unwrap().to_string();
    let anonymous = oci::get_manifest(&client(), &t.url, "private/thing", "v1").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let admin = basic_client("ci", "oras-secret-7");
    let got = oci::get_manifest(&admin, &t.url, "private/thing", "v1").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(sha256(&got.body), digest);

    // oras-py's default token backend: the Docker token flow (401 with a
    // Bearer challenge, a token from the realm with Basic credentials).
    let out_dir = ws.out("pulled");
    let pulled = ws
        .oras_env(
            &["pull", &reference, path_str(&out_dir)],
            &[
                ("TROW_ORAS_USER", "ci"),
                ("TROW_ORAS_PASSWORD", "oras-secret-7"),
            ],
        )
        .await;
    assert_eq!(
        pulled["files"].as_array().map(Vec::len),
        Some(1),
        "{pulled}"
    );
    let got = read_tree(&out_dir);
    assert!(got["payload.bin"] == files[0].1, "payload.bin differs");
    assert!(
        t.log().contains("path=/login status=200"),
        "no token was issued: {}",
        t.log()
    );

    // A wrong password, or none, is refused.
    let out = push(format!("{}/private/thing:wrong", t.host), "wrong", "0").await;
    assert!(
        !out.status.success(),
        "push with a wrong password succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let r = oci::get_manifest(&admin, &t.url, "private/thing", "wrong").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let refused = ws.out("refused");
    for env in [
        vec![("TROW_ORAS_USER", "ci"), ("TROW_ORAS_PASSWORD", "wrong")],
        vec![],
    ] {
        let out = ws
            .run(&["pull", &reference, path_str(&refused)], &env)
            .await;
        assert!(
            !out.status.success(),
            "pull with {env:?} succeeded: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    assert!(!ws.out("refused").join("payload.bin").exists());
}
