//! Blob downloads over each path (src/storage/download.rs): sendfile from
//! the file on plain HTTP/1.1, copies for HTTP/2 and TLS. Every path must
//! serve exactly the bytes asked for, ranges included, and a blob removed
//! while a client is still reading it must reach that client whole.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::oci::{data, push_blob, sha256};
use common::secure::{https_builder, Pki};
use common::{basic_client, client, file_tree, metric_sample, Trow};
use reqwest::{Client, StatusCode};

/// `(sendfile, copied)` bytes of `trow_blob_read_bytes_total`.
async fn read_bytes(c: &Client, base: &str) -> (f64, f64) {
    let text = c
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |path: &str| {
        let series = format!("trow_blob_read_bytes_total{{path=\"{path}\"}}");
        metric_sample(&text, &series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    };
    (value("sendfile"), value("copied"))
}

/// The ranges every path is checked with: `(Range header, first, last)`.
fn ranges(len: usize) -> Vec<(String, usize, usize)> {
    let mut ranges = vec![
        ("bytes=0-0".into(), 0, 0),
        ("bytes=1-4096".into(), 1, 4096),
        ("bytes=4095-1048577".into(), 4095, 1048577),
        (format!("bytes={}-", len - 4097), len - 4097, len - 1),
        ("bytes=-100".into(), len - 100, len - 1),
        (format!("bytes=1000000-{}", len + 5000), 1000000, len - 1),
    ];
    // Across the end of the first sendfile window (8 MiB).
    let window = 8 << 20;
    if len > window + 100 {
        ranges.push((
            format!("bytes={}-{}", window - 100, window + 99),
            window - 100,
            window + 99,
        ));
    }
    ranges
}

/// GETs the whole blob and every range of [`ranges`] and compares the bytes.
async fn check_every_range(c: &Client, base: &str, repo: &str, blob: &[u8]) {
    let url = format!("{base}/v2/{repo}/blobs/{}", sha256(blob));
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let body = r.bytes().await.unwrap();
    assert!(body == blob, "whole blob differs ({} bytes)", body.len());
    for (range, first, last) in ranges(blob.len()) {
        let r = c.get(&url).header("Range", &range).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.headers()["content-range"].to_str().unwrap(),
            format!("bytes {first}-{last}/{}", blob.len()),
            "{range}"
        );
        let body = r.bytes().await.unwrap();
        assert!(body == blob[first..=last], "{range}: bytes differ");
    }
    let r = c
        .get(&url)
        .header("Range", format!("bytes={}-", blob.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
}

#[tokio::test]
async fn plain_http1_sends_from_the_file_with_exact_ranges() {
    let t = Trow::start();
    let c = client();
    // Not a multiple of the page size, and larger than one window (8 MiB).
    let blob = data(1, 9 * 1024 * 1024 + 1234);
    push_blob(&c, &t.url, "dl/plain", &blob).await;
    let (sent_before, _) = read_bytes(&c, &t.url).await;
    let http1 = Client::builder().http1_only().build().unwrap();
    check_every_range(&http1, &t.url, "dl/plain", &blob).await;
    let (sent_after, _) = read_bytes(&c, &t.url).await;
    // The blob was just written, so its pages are cached: plain HTTP/1.1
    // sends them with sendfile (the whole blob once, and every range).
    assert!(
        sent_after - sent_before >= blob.len() as f64,
        "bytes sent from the file grew by {} only",
        sent_after - sent_before
    );
}

#[tokio::test]
async fn http2_gets_copies_with_exact_ranges() {
    let t = Trow::start();
    let c = client();
    let blob = data(2, 2 * 1024 * 1024 + 77);
    push_blob(&c, &t.url, "dl/h2", &blob).await;
    let h2 = Client::builder().http2_prior_knowledge().build().unwrap();
    let r = h2.get(format!("{}/v2/", t.url)).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    let (sent_before, copied_before) = read_bytes(&c, &t.url).await;
    check_every_range(&h2, &t.url, "dl/h2", &blob).await;
    let (sent_after, copied_after) = read_bytes(&c, &t.url).await;
    assert_eq!(
        sent_after, sent_before,
        "HTTP/2 must not be sent from the file"
    );
    assert!(copied_after - copied_before >= blob.len() as f64);
}

#[tokio::test]
async fn tls_gets_copies_with_exact_ranges() {
    let pki = Pki::new();
    let (_cert, flag) = pki.write_cert(1, &pki.dir.path().join("server"));
    let t = Trow::start_with(&[flag.as_str()]);
    let base = format!("https://127.0.0.1:{}", t.port);
    let ca = std::fs::read_to_string(pki.ca_path()).unwrap();
    let https = https_builder(&ca).http1_only().build().unwrap();
    let blob = data(3, 2 * 1024 * 1024 + 4097);
    push_blob(&https, &base, "dl/tls", &blob).await;
    let (sent_before, copied_before) = read_bytes(&https, &base).await;
    check_every_range(&https, &base, "dl/tls", &blob).await;
    let (sent_after, copied_after) = read_bytes(&https, &base).await;
    assert_eq!(
        sent_after, sent_before,
        "TLS must not be sent from the file"
    );
    assert!(copied_after - copied_before >= blob.len() as f64);
}

/// A client reads the start of a large blob, stops, and while it waits the
/// blob is deleted and collected (its file unlinked); the client then reads
/// on and must get every byte. Plain HTTP/1.1, so the sendfile path.
#[tokio::test]
async fn a_blob_collected_under_a_reader_reaches_it_whole() {
    let t = Trow::start_with(&[
        "--user",
        "admin",
        "--password",
        "dl-test-password",
        "--gc-interval",
        "0",
        "--gc-grace",
        "0s",
    ]);
    let c = basic_client("admin", "dl-test-password");
    let blob = data(4, 48 * 1024 * 1024 + 3);
    let digest = push_blob(&c, &t.url, "dl/gone", &blob).await;
    let hex = digest.trim_start_matches("sha256:").to_string();
    let stored = |t: &Trow| {
        file_tree(&t.data_dir)
            .keys()
            .any(|p| p.contains("blobs/") && p.ends_with(&hex))
    };
    assert!(stored(&t));

    // A raw HTTP/1.1 request whose response we read a little of, then stop:
    // the server's socket buffer fills and the rest waits.
    let mut sock = TcpStream::connect(("127.0.0.1", t.port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let auth = base64_basic("admin", "dl-test-password");
    write!(
        sock,
        "GET /v2/dl/gone/blobs/{digest} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut received = vec![0u8; 1024 * 1024];
    sock.read_exact(&mut received).unwrap();

    let r = c
        .delete(format!("{}/v2/dl/gone/blobs/{digest}", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    // Grace is counted in whole seconds from the blob's last reference.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = c.post(format!("{}/admin/gc", t.url)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    assert!(!stored(&t), "the collection should have removed the file");
    let r = c
        .get(format!("{}/v2/dl/gone/blobs/{digest}", t.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let mut rest = Vec::new();
    sock.read_to_end(&mut rest).unwrap();
    received.extend_from_slice(&rest);
    let split = received
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of the response head");
    let head = String::from_utf8_lossy(&received[..split]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let body = &received[split + 4..];
    assert_eq!(body.len(), blob.len(), "{head}");
    assert!(body == blob.as_slice(), "the body differs from the blob");
}

fn base64_basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}
