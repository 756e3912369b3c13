//! A cluster node's view: containerd pulls through Trow configured as a
//! registry mirror (`hosts.toml` in a `--hosts-dir`), exactly as kubelet's
//! image pulls do. Needs root (containerd); CI runs as root.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::distribution::Distribution;
use common::layout::Image;
use common::oci::*;
use common::{have_tool, strict, Trow};

struct Containerd {
    child: Child,
    socket: String,
    _dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let socket = p.join("containerd.sock").display().to_string();
        let config = p.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{}\"\nstate = \"{}\"\n[grpc]\n  address = \"{socket}\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable = true\n",
                p.join("root").display(),
                p.join("state").display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(p.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !Path::new(&socket).exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Containerd {
            child,
            socket,
            _dir: dir,
        }
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .arg("--namespace")
            .arg("trow-test")
            .args(args)
            .env("CONTAINERD_SNAPSHOTTER", "native")
            .output()
            .expect("run ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

#[tokio::test]
async fn containerd_pulls_through_trow_as_a_mirror() {
    if !have_tool("containerd") || !have_tool("ctr") {
        return;
    }
    if !is_root() {
        assert!(!strict(), "containerd needs root (TROW_TEST_STRICT is set)");
        eprintln!("SKIPPED: containerd needs root");
        return;
    }
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

    let ctd = Containerd::start();
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
        assert!(t
            .data_dir
            .join("blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .exists());
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
