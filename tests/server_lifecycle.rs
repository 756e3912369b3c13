//! The `trow` process itself: configuration, logging, shutdown, restarts.

mod common;

use std::process::Command;

use common::oci::*;
use common::{client, Trow};
use reqwest::StatusCode;

#[test]
fn dry_run_validates_and_exits() {
    let out = Command::new(env!("CARGO_BIN_EXE_trow"))
        .args(["--dry-run", "--max-manifest-size", "8MiB"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_manifest_size: 8388608"));

    let out = Command::new(env!("CARGO_BIN_EXE_trow"))
        .args(["--dry-run", "--max-manifest-size", "lots"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("max-manifest-size"));

    let out = Command::new(env!("CARGO_BIN_EXE_trow"))
        .args(["--dry-run", "--hostname", "http://x/y"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--hostname"));

    // Environment variables are the fallback for every flag.
    let out = Command::new(env!("CARGO_BIN_EXE_trow"))
        .arg("--dry-run")
        .env("TROW_BIND", "127.0.0.1:9999")
        .env("TROW_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("127.0.0.1:9999") && stdout.contains("Json"),
        "{stdout}"
    );
}

/// `--dry-run` checks everything a start would: a bad `registry_proxies`
/// section is refused with the field's name (before, only a real start
/// read that section), and the file is reported.
#[test]
fn dry_run_checks_the_whole_configuration_file() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "registry_proxies:\n  registries:\n    - host: \"https://quay.io\"\n",
    )
    .unwrap();
    let out = Command::new(common::trow_bin())
        .args(["--dry-run", "--config-file"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("registry_proxies.registries[0].host"), "{err}");

    let good = dir.path().join("good.yaml");
    std::fs::write(
        &good,
        "registry_proxies:\n  registries:\n    - host: quay.io\n",
    )
    .unwrap();
    let out = Command::new(common::trow_bin())
        .args(["--dry-run", "--config-file"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("quay.io"));
}

#[tokio::test]
async fn sigterm_exits_cleanly_and_data_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut t = Trow::start_in(&data, &[]);
    let c = client();
    let (manifest, digest) = push_image(&c, &t.url, "persist/me", "v1", 3).await;
    let status = t.terminate();
    assert!(status.success(), "exit status {status}; log:\n{}", t.log());
    assert!(t.log().contains("shut down cleanly"));

    let t = Trow::start_in(&data, &[]);
    let r = c
        .get(t.at("/v2/persist/me/manifests/v1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), manifest.as_slice());
    let r = c
        .get(t.at(&format!("/v2/persist/me/manifests/{digest}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn one_log_line_per_request_and_json_format() {
    let t = Trow::start_with(&["--log-format", "json"]);
    let c = client();
    c.get(t.at("/v2/")).send().await.unwrap();
    c.get(t.at("/v2/nope/manifests/x?secret=token123"))
        .header("Authorization", "Basic c2VjcmV0OnBhc3N3b3Jk")
        .send()
        .await
        .unwrap();
    // Give the log writer a moment; it writes synchronously per event.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let log = loop {
        let log = t.log();
        if log.matches("\"target\":\"trow::request\"").count() >= 2
            || std::time::Instant::now() > deadline
        {
            break log;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter(|l| l.contains("trow::request"))
        .map(|l| serde_json::from_str(l).expect("each log line is JSON"))
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(lines[0]["path"], "/v2/");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[1]["status"], 404);
    assert!(lines[1]["duration_ms"].is_number());
    assert!(lines[1]["bytes"].as_u64().unwrap() > 0);
    assert!(!log.contains("token123"), "query strings are not logged");
    assert!(!log.contains("c2VjcmV0"), "credentials are not logged");
}

/// Trow ships as one executable that needs no shared libraries: no ELF
/// interpreter (the dynamic loader) is named in its program headers.
#[cfg(target_os = "linux")]
#[test]
fn binary_is_statically_linked() {
    const PT_INTERP: u32 = 3;
    let elf = std::fs::read(env!("CARGO_BIN_EXE_trow")).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(elf[4], 2, "expected a 64-bit ELF file");
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap());
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    assert!(phnum > 0);
    let types: Vec<u32> = (0..phnum).map(|i| u32_at(phoff + i * phentsize)).collect();
    assert!(
        !types.contains(&PT_INTERP),
        "the trow binary names a dynamic loader: it is not statically linked (see .cargo/config.toml); program header types {types:?}"
    );
}

/// HTTP/1 request heads are limited by the connection's read buffer
/// (64 KiB): a long header (a large bearer token) is fine, a head beyond the
/// buffer is refused, and the server goes on serving.
#[tokio::test]
async fn long_headers_are_served_and_oversized_heads_refused() {
    let t = Trow::start();
    let c = client();
    let long = "a".repeat(16 * 1024);
    let r = c
        .get(t.at("/v2/"))
        .header("X-Long", &long)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let oversized = "a".repeat(100 * 1024);
    // The server answers 431 and closes; the client may see the reset of
    // the unread request instead of the answer. Either way it is refused.
    if let Ok(r) = c
        .get(t.at("/v2/"))
        .header("X-Huge", &oversized)
        .send()
        .await
    {
        assert_eq!(r.status(), StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    }
    let r = c.get(t.at("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}
