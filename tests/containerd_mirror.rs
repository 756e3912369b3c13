//! A cluster node's view: containerd pulls through Trow configured as a
//! registry mirror (`hosts.toml` in a `--hosts-dir`), exactly as kubelet's
//! image pulls do. Needs root (containerd); CI runs as root.

mod common;

use common::containerd::Containerd;
use common::distribution::Distribution;
use common::layout::Image;
use common::oci::*;
use common::Trow;

#[tokio::test]
async fn containerd_pulls_through_trow_as_a_mirror() {
    let Some(ctd) = Containerd::start() else {
        return;
    };
    let Some(up) = Distribution::start() else {
        return;
    };
    let uc = up.client();
    let image = Image::build(91, "amd64", 2);
    for blob in image.blobs() {
        push_blob(&uc, &up.url, "team/app", blob).await;
    }
    put_manifest(
        &uc,
        &up.url,
        "team/app",
        "v1",
        OCI_MANIFEST,
        &image.manifest,
    )
    .await;

    // The upstream must be listed: Trow answers mirror requests for any
    // other host 404 NAME_UNKNOWN (and containerd then goes to the upstream
    // itself).
    let cfg = tempfile::tempdir().unwrap();
    let yaml = cfg.path().join("trow.yaml");
    std::fs::write(
        &yaml,
        format!(
            "registry_proxies:\n  registries:\n    - host: \"{}\"\n      insecure: true\n      username: {}\n      password: {}\n",
            up.host, up.user, up.password
        ),
    )
    .unwrap();
    let t = Trow::start_with(&["--config-file", yaml.to_str().unwrap()]);

    // The node's mirror configuration: every registry goes through Trow
    // first. Without a `server` line the fallback is https://<upstream>,
    // which this plain-HTTP upstream cannot answer: only the mirror can.
    let hosts = cfg.path().join("hosts");
    std::fs::create_dir_all(hosts.join("_default")).unwrap();
    std::fs::write(
        hosts.join("_default/hosts.toml"),
        format!(
            "[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            t.host
        ),
    )
    .unwrap();

    let reference = format!("{}/team/app:v1", up.host);
    let out = ctd.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        hosts.to_str().unwrap(),
        "--platform",
        "linux/amd64",
        &reference,
    ]);
    assert!(
        out.status.success(),
        "ctr pull failed: {}\n{}\ntrow log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        t.log()
    );
    let out = ctd.ctr(&["images", "ls"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains(&image.digest), "{listing}");

    // Trow really served it, from upstream into its cache.
    let log = t.log();
    assert!(
        log.lines()
            .any(|l| l.contains("/v2/team/app/manifests/") && l.contains("status=200")),
        "{log}"
    );
    for layer in &image.layers {
        let digest = sha256(layer);
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("/v2/team/app/blobs/{digest}"))
                    && l.contains("status=200")),
            "layer {digest} was not served by Trow:\n{log}"
        );
        let hex = digest.trim_start_matches("sha256:");
        assert!(common::wait_for_file(
            &t.data_dir.join("blobs/sha256").join(&hex[..2]).join(hex)
        ));
    }
    let catalog: serde_json::Value = reqwest::get(t.at("/v2/_catalog"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cache_repo = format!("f/{}/team/app", up.host.replace(':', "-"));
    assert_eq!(catalog["repositories"], serde_json::json!([cache_repo]));
}
