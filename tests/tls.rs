//! HTTPS with `--tls`: certificates from a private CA generated in the test,
//! checked by curl, reqwest (HTTP/1.1 and HTTP/2) and skopeo; certificate
//! rotation on disk while a client keeps pulling; bad certificate files.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::layout::{Image, OciLayout};
use common::oci::{self, sha256};
use common::secure::{https_builder, https_client, served_cert, Pki};
use common::tools::{self, skopeo};
use common::*;
use reqwest::StatusCode;

/// Starts Trow serving HTTPS with a fresh certificate from `pki`.
fn start_tls(pki: &Pki, extra: &[&str]) -> (Trow, String, Vec<u8>) {
    let (cert, flag) = pki.write_cert(1, &pki.dir.path().join("server"));
    let mut args = vec![flag.as_str()];
    args.extend_from_slice(extra);
    let trow = Trow::start_with(&args);
    let base = format!("https://127.0.0.1:{}", trow.port);
    (trow, base, cert.der)
}

#[tokio::test]
async fn curl_trusts_the_ca_and_refuses_without_it() {
    if !have_tool("curl") {
        return;
    }
    let pki = Pki::new();
    let (trow, base, _) = start_tls(&pki, &[]);
    let ca = pki.ca_path().display().to_string();
    let url = format!("{base}/v2/");

    // As docs/USER_GUIDE.md says: with the CA, `{}`.
    let out = tools::run_ok("curl", &["-sS", "--cacert", &ca, &url]).await;
    assert_eq!(String::from_utf8_lossy(&out), "{}");

    // Without it, curl refuses the certificate (exit 60: peer certificate
    // cannot be authenticated with known CA certificates).
    let out = tools::run("curl", &["-sS", &url]).await;
    assert_eq!(
        out.status.code(),
        Some(60),
        "curl without --cacert must refuse: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The certificate also names localhost.
    let local = format!("https://localhost:{}/v2/", trow.port);
    let out = tools::run_ok("curl", &["-sS", "--cacert", &ca, &local]).await;
    assert_eq!(String::from_utf8_lossy(&out), "{}");

    // HTTP/2 and HTTP/1.1 are both negotiated by ALPN.
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = tools::run_ok(
            "curl",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_version}",
                flag,
                "--cacert",
                &ca,
                &url,
            ],
        )
        .await;
        assert_eq!(String::from_utf8_lossy(&out), want, "curl {flag}");
    }

    // Plain HTTP to the TLS port gets no HTTP answer.
    let out = tools::run("curl", &["-sS", "--max-time", "5", &trow.at("/v2/")]).await;
    assert!(
        !out.status.success(),
        "plain HTTP to the TLS port succeeded"
    );

    // Health endpoints are served over TLS too.
    let out = tools::run_ok(
        "curl",
        &["-sS", "--cacert", &ca, &format!("{base}/healthz")],
    )
    .await;
    assert!(String::from_utf8_lossy(&out).contains("ok"));
}

#[tokio::test]
async fn the_api_works_over_http1_and_http2() {
    let pki = Pki::new();
    let (trow, base, der) = start_tls(&pki, &["--hostname", "127.0.0.1:1"]);
    let _ = &trow;
    let h2 = https_client(&pki.ca_pem);
    let h1 = https_builder(&pki.ca_pem).http1_only().build().unwrap();

    let r = h2.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let r = h1.get(format!("{base}/v2/")).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);

    // A push and a pull over each; with --hostname and TLS, Location is
    // an https URL.
    for (c, seed) in [(&h1, 1u64), (&h2, 2)] {
        let r = c
            .post(format!("{base}/v2/tls/app/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        let location = r.headers()["location"].to_str().unwrap().to_string();
        assert!(
            location.starts_with("https://127.0.0.1:1/v2/tls/app/blobs/uploads/"),
            "{location}"
        );
        let blob = oci::data(seed, 300_000);
        let path = location.strip_prefix("https://127.0.0.1:1").unwrap();
        let r = c
            .put(format!("{base}{path}?digest={}", sha256(&blob)))
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        let got = oci::get_blob(c, &base, "tls/app", &sha256(&blob)).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.body == blob);
    }
    assert_eq!(served_cert(trow.port, &pki.ca_pem).await.unwrap(), der);

    // A client trusting another CA refuses the server.
    let other = Pki::new();
    let err = https_client(&other.ca_pem)
        .get(format!("{base}/v2/"))
        .send()
        .await
        .unwrap_err();
    assert!(err.is_connect() || err.is_request(), "{err:?}");
}

#[tokio::test]
async fn skopeo_copies_over_tls_with_a_cert_dir() {
    if !have_tool("skopeo") {
        return;
    }
    let pki = Pki::new();
    let (trow, base, _) = start_tls(&pki, &[]);
    let work = tempfile::tempdir().unwrap();
    let src = OciLayout::create(&work.path().join("src"));
    let img = Image::build(31, "amd64", 2);
    src.add_image(&img);
    src.tag(oci::OCI_MANIFEST, &img.manifest, "v1");
    let cert_dir = pki.cert_dir().display().to_string();
    let remote = format!("docker://{}/secure/app:v1", trow.host);

    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-cert-dir",
        &cert_dir,
        &src.reference("v1"),
        &remote,
    ])
    .await;
    let got = oci::get_manifest(&https_client(&pki.ca_pem), &base, "secure/app", "v1").await;
    assert_eq!(got.status, StatusCode::OK);
    assert!(got.body == img.manifest);

    // Back out, verifying with the same CA.
    let back = work.path().join("back");
    skopeo(&[
        "copy",
        "--quiet",
        "--preserve-digests",
        "--src-cert-dir",
        &cert_dir,
        &remote,
        &format!("oci:{}:v1", back.display()),
    ])
    .await;
    let back = OciLayout::open(&back);
    assert_eq!(back.resolve("v1").unwrap().1, img.digest);

    // Without the CA, skopeo refuses the certificate.
    let empty = work.path().join("empty-certs");
    std::fs::create_dir_all(&empty).unwrap();
    let out = tools::run(
        "skopeo",
        &[
            "inspect",
            "--cert-dir",
            &empty.display().to_string(),
            &remote,
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("certificate") || err.contains("x509"),
        "unexpected skopeo error: {err}"
    );
}

/// Lays out certificate files the way a Kubernetes Secret volume does:
/// `tls.crt -> ..data/tls.crt`, `..data -> ..<version>`; a rotation writes
/// a new version directory and swaps the `..data` symlink atomically.
struct SecretVolume {
    dir: std::path::PathBuf,
}

impl SecretVolume {
    fn new(dir: &Path) -> SecretVolume {
        std::fs::create_dir_all(dir).unwrap();
        for f in ["tls.crt", "tls.key"] {
            std::os::unix::fs::symlink(format!("..data/{f}"), dir.join(f)).unwrap();
        }
        SecretVolume {
            dir: dir.to_path_buf(),
        }
    }

    fn publish(&self, version: &str, cert_pem: &str, key_pem: &str) {
        let v = self.dir.join(format!("..{version}"));
        std::fs::create_dir_all(&v).unwrap();
        std::fs::write(v.join("tls.crt"), cert_pem).unwrap();
        std::fs::write(v.join("tls.key"), key_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("..{version}"), &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    fn flag(&self) -> String {
        format!(
            "--tls={},{}",
            self.dir.join("tls.crt").display(),
            self.dir.join("tls.key").display()
        )
    }
}

/// Waits until the server presents `want` to new connections.
async fn wait_for_cert(port: u16, ca: &str, want: &[u8], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if served_cert(port, ca).await.ok().as_deref() == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

#[tokio::test]
async fn certificate_rotation_while_a_client_keeps_pulling() {
    let pki = Pki::new();
    let vol = SecretVolume::new(&pki.dir.path().join("secret"));
    let first = pki.issue(1);
    vol.publish("v1", &first.cert_pem, &first.key_pem);
    let trow = Trow::start_with(&[&vol.flag()]);
    let base = format!("https://127.0.0.1:{}", trow.port);
    assert_eq!(
        served_cert(trow.port, &pki.ca_pem).await.unwrap(),
        first.der
    );

    let blob = oci::data(7, 256 * 1024);
    let digest = oci::push_blob(&https_client(&pki.ca_pem), &base, "rotate/app", &blob).await;

    // Pullers: one keeps its connections (keep-alive, HTTP/2), one opens
    // a new connection for every request, so both sides of a rotation are
    // exercised. Every failure is counted.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let ok = Arc::new(AtomicU64::new(0));
    let mut pullers = Vec::new();
    for fresh in [false, true] {
        let (stop, errors, ok) = (stop.clone(), errors.clone(), ok.clone());
        let mut b = https_builder(&pki.ca_pem);
        if fresh {
            b = b.pool_max_idle_per_host(0);
        }
        let c = b.build().unwrap();
        let (base, digest, blob) = (base.clone(), digest.clone(), blob.clone());
        pullers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let got = c
                    .get(format!("{base}/v2/rotate/app/blobs/{digest}"))
                    .send()
                    .await;
                match got {
                    Ok(r) if r.status() == StatusCode::OK => match r.bytes().await {
                        Ok(b) if b == blob => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => errors.lock().push("wrong bytes".into()),
                        Err(e) => errors.lock().push(format!("body: {e}")),
                    },
                    Ok(r) => errors.lock().push(format!("status {}", r.status())),
                    Err(e) => errors.lock().push(format!("request: {e:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = ok.load(Ordering::Relaxed);
    assert!(before > 0, "the pullers made no request");

    // A broken rotation: the key does not belong to the certificate. It is
    // refused and the old certificate stays.
    let stray = pki.issue(2);
    let third = pki.issue(3);
    vol.publish("v2", &third.cert_pem, &stray.key_pem);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !trow.log().contains("cannot be used") && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        trow.log()
            .contains("still serving the previous certificate"),
        "a bad pair must be logged; log:\n{}",
        trow.log()
    );
    assert_eq!(
        served_cert(trow.port, &pki.ca_pem).await.unwrap(),
        first.der
    );

    // A good rotation.
    vol.publish("v3", &third.cert_pem, &third.key_pem);
    assert!(
        wait_for_cert(trow.port, &pki.ca_pem, &third.der, Duration::from_secs(15)).await,
        "the new certificate was not served; log:\n{}",
        trow.log()
    );
    let at_rotation = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::Relaxed);
    for p in pullers {
        p.await.unwrap();
    }
    let after = ok.load(Ordering::Relaxed);
    let errors = errors.lock().clone();
    assert!(
        errors.is_empty(),
        "pulls failed during rotation: {errors:?}"
    );
    assert!(after > at_rotation, "no pull after the rotation");
    assert!(trow.log().contains("TLS certificate reloaded"));
    // Serial numbers tell the certificates apart as well.
    assert_ne!(first.der, third.der);
}

#[tokio::test]
async fn bad_certificate_files_stop_start_up_with_a_clear_error() {
    let pki = Pki::new();
    let dir = pki.dir.path().join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let a = pki.issue(1);
    let b = pki.issue(2);
    std::fs::write(dir.join("a.crt"), &a.cert_pem).unwrap();
    std::fs::write(dir.join("b.key"), &b.key_pem).unwrap();
    std::fs::write(dir.join("empty.crt"), "").unwrap();
    let data = tempfile::tempdir().unwrap();
    let run = |tls: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_trow"))
            .arg("--data-dir")
            .arg(data.path())
            .arg("--dry-run")
            .arg(tls)
            .output()
            .unwrap()
    };
    let d = dir.display();
    for (flag, expect) in [
        (format!("--tls={d}/missing.crt,{d}/b.key"), "missing.crt"),
        (format!("--tls={d}/a.crt,{d}/b.key"), "a.crt"),
        (
            format!("--tls={d}/empty.crt,{d}/b.key"),
            "no PEM certificate",
        ),
        (
            format!("--tls={d}/a.crt"),
            "expected <certificate file>,<key file>",
        ),
    ] {
        let out = run(flag.clone());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag}: {err}");
        assert!(err.contains(expect), "{flag}: {err}");
    }
}

#[tokio::test]
async fn sigterm_drains_tls_connections_and_exits_cleanly() {
    let pki = Pki::new();
    let (mut trow, base, _) = start_tls(&pki, &[]);
    let c = https_client(&pki.ca_pem);
    assert_eq!(
        c.get(format!("{base}/v2/")).send().await.unwrap().status(),
        StatusCode::OK
    );
    // An idle keep-alive connection must not hold the shutdown up.
    let status = tokio::task::spawn_blocking(move || trow.terminate())
        .await
        .unwrap();
    assert!(status.success(), "trow exited with {status}");
}

#[tokio::test]
async fn sigterm_lets_an_upload_in_flight_over_tls_finish() {
    let pki = Pki::new();
    let (mut trow, base, _) = start_tls(&pki, &[]);
    let c = https_client(&pki.ca_pem);
    let r = c
        .post(format!("{base}/v2/drain/app/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_string();

    // A PATCH whose body arrives in pieces, with SIGTERM in between.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let patch = tokio::spawn({
        let c = c.clone();
        let url = format!("{base}{location}");
        async move { c.patch(url).body(body).send().await }
    });
    let chunk = oci::data(5, 64 * 1024);
    tx.send(Ok(chunk.clone())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = trow.pid().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        tx.send(Ok(chunk.clone())).await.unwrap();
    }
    drop(tx);
    let r = patch.await.unwrap().expect("the PATCH in flight completes");
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(
        r.headers()["range"].to_str().unwrap(),
        format!("0-{}", 4 * chunk.len() - 1)
    );
    let status = tokio::task::spawn_blocking(move || {
        let s = trow.terminate();
        (s, trow.log())
    })
    .await
    .unwrap();
    assert!(status.0.success(), "exit {}; log:\n{}", status.0, status.1);
    assert!(status.1.contains("shut down cleanly"), "{}", status.1);
}

/// A `Stream` over an mpsc receiver.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}
