//! `/metrics`, `/healthz` and `/readyz` over real HTTP against the real
//! binary: bounded label values, readiness failing when the data directory
//! takes no files or the server drains, `--metrics-bind`.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::fake_upstream::FakeUpstream;
use common::oci::*;
use common::{
    basic_client, client, insecure_upstream, metric_sample as sample, trow_with_config, Trow,
};
use reqwest::StatusCode;
use serde_json::Value;

async fn scrape(url: &str) -> String {
    let r = client().get(url).send().await.expect("GET /metrics");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    r.text().await.unwrap()
}

async fn get_json(url: &str) -> (StatusCode, Value) {
    let r = client().get(url).send().await.expect("GET");
    let status = r.status();
    (status, r.json().await.expect("a JSON body"))
}

fn random_hex(len: usize) -> String {
    let mut s = String::new();
    while s.len() < len {
        s.push_str(&format!("{:016x}", rand_u64()));
    }
    s.truncate(len);
    s
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

#[tokio::test]
async fn label_values_are_route_templates_never_paths() {
    let t = Trow::start();
    let c = client();
    let secret = random_hex(48);
    let repo = format!("team/{secret}/app");
    let (_m, digest) = push_image(&c, &t.url, &repo, &format!("t{secret}"), 3).await;
    assert_eq!(
        get_manifest(&c, &t.url, &repo, &digest).await.status,
        StatusCode::OK
    );
    // Paths that name nothing, and a method nobody knows.
    let r = c.get(t.at(&format!("/{secret}"))).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = c
        .get(t.at(&format!("/v2/{secret}/nothing")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let brew = reqwest::Method::from_bytes(format!("BREW{}", &secret[..8]).as_bytes()).unwrap();
    c.request(brew, t.at("/v2/")).send().await.unwrap();

    let text = scrape(&t.at("/metrics")).await;
    assert!(
        !text.contains(&secret[..16]),
        "a label value came from a request:\n{text}"
    );
    for series in [
        r#"trow_http_requests_total{method="PUT",route="manifest",status="201"}"#,
        r#"trow_http_requests_total{method="POST",route="upload",status="202"}"#,
        r#"trow_http_requests_total{method="PUT",route="upload",status="201"}"#,
        r#"trow_http_requests_total{method="GET",route="manifest",status="200"}"#,
        r#"trow_http_requests_total{method="GET",route="other",status="404"}"#,
        r#"trow_http_requests_total{method="other",route="base",status="405"}"#,
    ] {
        assert!(
            sample(&text, series).is_some_and(|v| v >= 1.0),
            "{series} in\n{text}"
        );
    }
    // Two blobs pushed, their bytes counted as received; the manifest's too.
    let received = sample(
        &text,
        r#"trow_http_received_bytes_total{method="PUT",route="upload"}"#,
    )
    .unwrap();
    assert!(received > 1000.0, "{received}");
    let sent = sample(
        &text,
        r#"trow_http_sent_bytes_total{method="GET",route="manifest"}"#,
    )
    .unwrap();
    assert!(sent > 100.0, "{sent}");
    assert!(text.contains(
        r#"trow_http_request_duration_seconds_bucket{method="PUT",route="manifest",le="+Inf"} 1"#
    ));
    // The scrape itself is in flight while it is written.
    assert_eq!(sample(&text, "trow_http_requests_in_flight"), Some(1.0));
    // Storage figures come from the metadata store: config, layer, manifest.
    assert_eq!(sample(&text, "trow_storage_blobs"), Some(3.0));
    assert!(sample(&text, "trow_storage_bytes").unwrap() > 1000.0);
    assert_eq!(
        sample(&text, r#"trow_uploads_in_progress{kind="client"}"#),
        Some(0.0)
    );
}

#[tokio::test]
async fn an_open_upload_is_in_progress() {
    let t = Trow::start();
    let r = client()
        .post(t.at("/v2/a/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let text = scrape(&t.at("/metrics")).await;
    assert_eq!(
        sample(&text, r#"trow_uploads_in_progress{kind="client"}"#),
        Some(1.0)
    );
}

#[tokio::test]
async fn metrics_and_health_need_no_registry_login_and_failed_logins_count() {
    let t = Trow::start_with(&["--user", "admin", "--password", "right"]);
    // Not behind registry auth, like the health endpoints.
    let text = scrape(&t.at("/metrics")).await;
    assert_eq!(
        sample(
            &text,
            r#"trow_login_failures_total{reason="bad_credentials"}"#
        ),
        Some(0.0)
    );
    for path in ["/healthz", "/readyz", "/readiness"] {
        let (status, _) = get_json(&t.at(path)).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
    let r = basic_client("admin", "wrong")
        .get(t.at("/v2/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let text = scrape(&t.at("/metrics")).await;
    assert_eq!(
        sample(
            &text,
            r#"trow_login_failures_total{reason="bad_credentials"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"trow_http_requests_total{method="GET",route="base",status="401"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn cache_figures_are_per_configured_upstream() {
    let up = FakeUpstream::start().await;
    let layer = Bytes::from(data(9, 5000));
    let config = Bytes::from_static(b"{\"seed\":9}");
    let layer_digest = up.add_blob(layer.clone());
    up.add_blob(config.clone());
    let manifest = Bytes::from(image_manifest(&config, &[&layer]));
    up.add_manifest("lib/app", Some("v1"), OCI_MANIFEST, manifest.clone());
    let yaml = format!(
        "registry_proxies:\n  registries:\n{}",
        insecure_upstream(&up.host, "fake")
    );
    let (t, _cfg) = trow_with_config(&yaml, &[]);
    let c = client();
    let r = get_manifest(&c, &t.url, "f/fake/lib/app", "v1").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get_blob(&c, &t.url, "f/fake/lib/app", &layer_digest).await;
    assert_eq!(r.status, StatusCode::OK);
    // The manifest once more: now from the cache (the tag is fresh).
    let r = get_manifest(&c, &t.url, "f/fake/lib/app", "v1").await;
    assert_eq!(r.status, StatusCode::OK);
    // An upstream that fails (here: rate-limits everything).
    up.behaviour.lock().rate_limit = Some("1".into());
    let r = get_manifest(&c, &t.url, "f/fake/lib/other", "v1").await;
    assert!(!r.status.is_success(), "{}", r.status);

    let text = scrape(&t.at("/metrics")).await;
    let host = &up.host;
    let series = |name: &str, outcome: Option<&str>| match outcome {
        Some(o) => format!(r#"{name}{{upstream="{host}",outcome="{o}"}}"#),
        None => format!(r#"{name}{{upstream="{host}"}}"#),
    };
    assert_eq!(
        sample(&text, &series("trow_cache_requests_total", Some("miss"))),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, &series("trow_cache_requests_total", Some("hit"))),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, &series("trow_cache_upstream_errors_total", None)),
        Some(1.0)
    );
    let bytes = sample(&text, &series("trow_cache_upstream_bytes_total", None)).unwrap();
    assert_eq!(bytes, (layer.len() + manifest.len()) as f64);
    // Unlisted upstreams are not allowed, so they have no series.
    assert!(!text.contains("upstream=\"unlisted\""));
}

#[tokio::test]
async fn readyz_fails_while_the_data_directory_takes_no_files() {
    let t = Trow::start();
    let (status, body) = get_json(&t.at("/readyz")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "ok");
    assert_eq!(body["checks"]["storage"], "ok");
    assert_eq!(body["checks"]["metadata"], "ok");

    // Tests run as root in CI, where permissions stop nothing: replace the
    // scratch directory with a file, so creating a file in it fails for
    // root too (ENOTDIR), as it would on a read-only or full disk.
    let tmp = t.data_dir.join("tmp");
    std::fs::remove_dir_all(&tmp).unwrap();
    std::fs::write(&tmp, b"not a directory").unwrap();
    for path in ["/readyz", "/readiness"] {
        let (status, body) = get_json(&t.at(path)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["checks"]["metadata"], "ok");
        let storage = body["checks"]["storage"].as_str().unwrap();
        assert!(storage.contains("data directory"), "{storage}");
    }
    // Alive all the same.
    let (status, body) = get_json(&t.at("/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({ "status": "ok" }));

    std::fs::remove_file(&tmp).unwrap();
    std::fs::create_dir(&tmp).unwrap();
    let (status, _) = get_json(&t.at("/readyz")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(t.log().contains("not ready"), "the change is logged");
}

#[tokio::test]
async fn metrics_bind_serves_metrics_and_health_on_a_second_port() {
    let mut t = Trow::start_with(&[
        "--metrics-bind",
        "127.0.0.1:0",
        "--user",
        "admin",
        "--password",
        "right",
    ]);
    let ops = format!("http://{}", t.metrics_addr());
    push_image(&basic_client("admin", "right"), &t.url, "a/b", "v1", 5).await;
    let text = scrape(&format!("{ops}/metrics")).await;
    assert!(
        sample(
            &text,
            r#"trow_http_requests_total{method="PUT",route="manifest",status="201"}"#
        ) == Some(1.0),
        "{text}"
    );
    for path in ["/healthz", "/readyz", "/readiness"] {
        let (status, _) = get_json(&format!("{ops}{path}")).await;
        assert_eq!(status, StatusCode::OK, "{path} on the ops port");
        let (status, _) = get_json(&t.at(path)).await;
        assert_eq!(status, StatusCode::OK, "{path} on the registry port");
    }
    // /metrics left the registry port; the registry is not on the ops port.
    let r = client().get(t.at("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = client().get(format!("{ops}/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Scrapes are counted too, under their own route.
    let text = scrape(&format!("{ops}/metrics")).await;
    assert!(sample(
        &text,
        r#"trow_http_requests_total{method="GET",route="metrics",status="200"}"#
    )
    .is_some());
}

#[tokio::test]
async fn readyz_is_503_while_the_server_drains() {
    let mut t = Trow::start_with(&["--metrics-bind", "127.0.0.1:0", "--shutdown-timeout", "20s"]);
    let ops = format!("http://{}", t.metrics_addr());
    let r = client()
        .post(t.at("/v2/a/blobs/uploads/"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    // A chunk that keeps arriving slowly holds the drain open.
    let mut upload = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    write!(
        upload,
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n"
    )
    .unwrap();
    upload.flush().unwrap();
    let (status, _) = get_json(&format!("{ops}/readyz")).await;
    assert_eq!(status, StatusCode::OK);

    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(t.pid().to_string())
        .status();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while last.is_none() && Instant::now() < deadline {
        match client().get(format!("{ops}/readyz")).send().await {
            Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {
                last = Some(r.json::<Value>().await.unwrap());
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let drained = last.is_some();
    let last = last.unwrap_or(Value::Null);
    assert!(
        drained,
        "/readyz never said 503 during the drain\n{}",
        t.log()
    );
    assert_eq!(last["status"], "unavailable");
    assert!(last["checks"]["shutdown"].is_string(), "{last}");
    // Still alive, and /metrics still answers while the drain goes on.
    let (status, _) = get_json(&format!("{ops}/healthz")).await;
    assert_eq!(status, StatusCode::OK);
    let text = scrape(&format!("{ops}/metrics")).await;
    assert_eq!(
        sample(&text, "trow_http_requests_in_flight"),
        Some(2.0),
        "the upload and the scrape"
    );

    // The upload ends; the drain ends; the process exits.
    upload.write_all(b"0\r\n\r\n").unwrap();
    let status = t.terminate_within(Duration::from_secs(15));
    assert!(status.is_some_and(|s| s.success()), "{}", t.log());
}

/// Garbage collection passes show in `/metrics`: runs by kind, and what
/// real passes deleted (a dry run adds to the runs only).
#[tokio::test]
async fn garbage_collection_passes_are_counted() {
    let t = Trow::start_with(&[
        "--user",
        "admin",
        "--password",
        "pw",
        "--gc-interval",
        "0",
        "--gc-grace",
        "1s",
    ]);
    let c = basic_client("admin", "pw");
    let orphan = data(7, 3_000);
    push_blob(&c, &t.url, "app", &orphan).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for dry_run in [true, false] {
        let r = c
            .post(t.at(&format!("/admin/gc?dry_run={dry_run}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let text = scrape(&t.at("/metrics")).await;
    assert_eq!(
        sample(&text, r#"trow_gc_runs_total{dry_run="true"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, r#"trow_gc_runs_total{dry_run="false"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&text, "trow_gc_blobs_deleted_total"), Some(1.0));
    assert_eq!(sample(&text, "trow_gc_bytes_freed_total"), Some(3000.0));
    assert_eq!(sample(&text, "trow_gc_manifests_deleted_total"), Some(0.0));
}
