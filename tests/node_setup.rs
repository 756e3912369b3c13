//! A node as the copy-certs DaemonSet leaves it: `trow init` makes the
//! certificates (against the fake API server), Trow serves HTTPS with
//! them, `trow node-setup` writes containerd's and docker's files under a
//! temporary host root, and containerd pulls `trow.kube-public:31000/…`
//! through the host entry with the CA, no `--insecure` anywhere. Trow
//! serves the pull from its own repositories because `?ns=` names it.
//! `--remove` leaves the host root as it was.

mod common;

use std::path::Path;

use common::containerd::Containerd;
use common::fake_kube::{run_trow, stderr, trow_init, FakeKube};
use common::layout::Image;
use common::oci::*;
use common::Trow;

const REGISTRY: &str = "trow.kube-public:31000";

/// Certificates from `trow init`, and Trow serving HTTPS with them.
async fn trow_with_init_certs(certs: &Path) -> (Trow, String) {
    let kube = FakeKube::start(0).await;
    let out = trow_init(&kube, certs, &[]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let trow = Trow::start_with(&[&format!(
        "--tls={},{}",
        certs.join("tls.crt").display(),
        certs.join("tls.key").display()
    )]);
    let ca = std::fs::read_to_string(certs.join("ca.crt")).unwrap();
    (trow, ca)
}

/// Pushes a small image to `team/app:v1` over HTTPS (localhost is in the
/// certificate); returns it.
async fn push(trow: &Trow, ca: &str) -> Image {
    let c = common::secure::https_client(ca);
    let base = format!("https://localhost:{}", trow.port);
    let image = Image::build(61, "amd64", 2);
    for blob in image.blobs() {
        push_blob(&c, &base, "team/app", blob).await;
    }
    put_manifest(&c, &base, "team/app", "v1", OCI_MANIFEST, &image.manifest).await;
    image
}

#[tokio::test]
async fn ns_naming_trow_itself_is_served_from_its_own_repositories() {
    let tmp = tempfile::tempdir().unwrap();
    let (trow, ca) = trow_with_init_certs(&tmp.path().join("certs")).await;
    let image = push(&trow, &ca).await;
    let c = common::secure::https_client(&ca);
    let base = format!("https://localhost:{}", trow.port);
    // As containerd asks through the host entry.
    let r = c
        .get(format!("{base}/v2/team/app/manifests/v1?ns={REGISTRY}"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("oci-namespace").is_none());
    assert_eq!(r.bytes().await.unwrap().as_ref(), image.manifest.as_slice());
    // Any port, and the Service's other names.
    for ns in [
        "trow.kube-public.svc:443",
        "trow.kube-public.svc.cluster.local",
    ] {
        let r = c
            .get(format!("{base}/v2/team/app/manifests/v1?ns={ns}"))
            .header("Accept", OCI_MANIFEST)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{ns}");
    }
    // Loopback names are not Trow's, though its certificate has localhost:
    // a registry on the node's localhost:5000 is another registry (not
    // listed, so refused).
    let r = c
        .get(format!("{base}/v2/team/app/manifests/v1?ns=localhost:5000"))
        .send()
        .await
        .unwrap();
    expect_error_code(r, 404, "NAME_UNKNOWN").await;
    let log = trow.log();
    assert!(
        log.lines().any(|l| l.contains("/v2/team/app/manifests/v1")
            && l.contains("status=200")
            && l.contains("ns=\"own\"")),
        "{log}"
    );
    assert!(
        log.contains(
            "mirror requests (?ns=) naming these hosts are served from Trow's own repositories"
        ),
        "{log}"
    );
}

async fn expect_error_code(r: reqwest::Response, status: u16, code: &str) {
    assert_eq!(r.status().as_u16(), status);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], code, "{body}");
}

#[tokio::test]
async fn containerd_pulls_from_trow_through_the_files_node_setup_wrote() {
    let Some(ctd) = Containerd::start() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let certs = tmp.path().join("certs");
    let (trow, ca) = trow_with_init_certs(&certs).await;
    let image = push(&trow, &ca).await;

    // The node: a host root with containerd's directory already there.
    let host = tmp.path().join("host");
    std::fs::create_dir_all(host.join("etc/containerd")).unwrap();
    let before = common::file_tree(&host);
    let endpoint = format!("https://localhost:{}", trow.port);
    let ca_file = certs.join("ca.crt");
    let host_arg = host.to_str().unwrap();
    let out = run_trow(&[
        "node-setup",
        "--host-root",
        host_arg,
        "--ca",
        ca_file.to_str().unwrap(),
        "--registry",
        REGISTRY,
        "--endpoint",
        &endpoint,
        "--mirror-all",
    ])
    .await;
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains(&format!(
            "wrote /etc/containerd/certs.d/{REGISTRY}/hosts.toml"
        )),
        "{log}"
    );
    assert!(log.contains("this node trusts Trow's CA"), "{log}");
    let certs_d = host.join("etc/containerd/certs.d");
    assert_eq!(
        std::fs::read_to_string(host.join(format!("etc/docker/certs.d/{REGISTRY}/ca.crt")))
            .unwrap(),
        ca
    );
    let hosts_toml = std::fs::read_to_string(certs_d.join(REGISTRY).join("hosts.toml")).unwrap();
    assert!(!hosts_toml.contains("skip_verify"), "{hosts_toml}");
    assert!(certs_d.join("_default/hosts.toml").exists());

    // Pull as the node's containerd would: registry name, hosts directory,
    // nothing insecure.
    let reference = format!("{REGISTRY}/team/app:v1");
    let out = ctd.ctr(&[
        "images",
        "pull",
        "--hosts-dir",
        certs_d.to_str().unwrap(),
        "--platform",
        "linux/amd64",
        &reference,
    ]);
    assert!(
        out.status.success(),
        "ctr pull failed: {}\n{}\ntrow log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        trow.log()
    );
    let listing = String::from_utf8_lossy(&ctd.ctr(&["images", "ls"]).stdout).into_owned();
    assert!(listing.contains(&image.digest), "{listing}");

    // Trow served it from its own repository: the manifest and every
    // layer, each request with ?ns= naming Trow itself.
    let log = trow.log();
    assert!(
        log.lines().any(|l| l.contains("/v2/team/app/manifests/")
            && l.contains("status=200")
            && l.contains("ns=\"own\"")),
        "{log}"
    );
    for layer in &image.layers {
        let digest = sha256(layer);
        assert!(
            log.lines()
                .any(|l| l.contains(&format!("/v2/team/app/blobs/{digest}"))
                    && l.contains("status=200")
                    && l.contains("ns=\"own\"")),
            "layer {digest} was not served by Trow as its own:\n{log}"
        );
        assert!(common::stored::is_stored(&trow.data_dir, &digest).await);
    }
    assert!(
        !log.contains("cache="),
        "nothing went through the cache:\n{log}"
    );

    let catalog: serde_json::Value = common::secure::https_client(&ca)
        .get(format!("{endpoint}/v2/_catalog"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(catalog["repositories"], serde_json::json!(["team/app"]));

    // Uninstall: exactly what was written goes.
    let out = run_trow(&["node-setup", "--host-root", host_arg, "--remove"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(common::file_tree(&host), before);
}

#[tokio::test]
async fn node_setup_follows_the_ca_file_and_refuses_others_files() {
    let tmp = tempfile::tempdir().unwrap();
    let host = tmp.path().join("host");
    std::fs::create_dir_all(&host).unwrap();
    let pki_a = common::secure::Pki::new();
    let pki_b = common::secure::Pki::new();
    // A ConfigMap volume: ca.crt is a symlink into a directory that is
    // swapped when the ConfigMap changes.
    let vol = tmp.path().join("ca");
    std::fs::create_dir_all(vol.join("..v1")).unwrap();
    std::fs::write(vol.join("..v1/ca.crt"), &pki_a.ca_pem).unwrap();
    std::os::unix::fs::symlink("..v1", vol.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/ca.crt", vol.join("ca.crt")).unwrap();
    let mut child = tokio::process::Command::new(common::trow_bin())
        .args([
            "node-setup",
            "--host-root",
            host.to_str().unwrap(),
            "--ca",
            vol.join("ca.crt").to_str().unwrap(),
            "--watch",
            "--interval",
            "1s",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let node_ca = host.join(format!("etc/containerd/certs.d/{REGISTRY}/ca.crt"));
    let wait_for = |want: String| {
        let node_ca = node_ca.clone();
        async move {
            for _ in 0..200 {
                if std::fs::read_to_string(&node_ca).ok() == Some(want.clone()) {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("{} never held the expected CA", node_ca.display());
        }
    };
    wait_for(pki_a.ca_pem.clone()).await;
    // The kubelet's update: a new directory, the ..data link swapped.
    std::fs::create_dir_all(vol.join("..v2")).unwrap();
    std::fs::write(vol.join("..v2/ca.crt"), &pki_b.ca_pem).unwrap();
    std::os::unix::fs::symlink("..v2", vol.join("..data.tmp")).unwrap();
    std::fs::rename(vol.join("..data.tmp"), vol.join("..data")).unwrap();
    wait_for(pki_b.ca_pem.clone()).await;
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().unwrap().to_string()])
        .status();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(status.success());

    // Someone else's _default/hosts.toml is not overwritten: a clear
    // error and a failure exit, the file untouched.
    let other = host.join("etc/containerd/certs.d/_default/hosts.toml");
    std::fs::create_dir_all(other.parent().unwrap()).unwrap();
    std::fs::write(&other, "# the operator's own mirror\n").unwrap();
    let out = run_trow(&[
        "node-setup",
        "--host-root",
        host.to_str().unwrap(),
        "--ca",
        vol.join("ca.crt").to_str().unwrap(),
        "--mirror-all",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/etc/containerd/certs.d/_default/hosts.toml exists and was not written by trow node-setup"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&other).unwrap(),
        "# the operator's own mirror\n"
    );
    let out = run_trow(&[
        "node-setup",
        "--host-root",
        host.to_str().unwrap(),
        "--remove",
    ])
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        common::file_tree(&host).keys().cloned().collect::<Vec<_>>(),
        [
            "etc/",
            "etc/containerd/",
            "etc/containerd/certs.d/",
            "etc/containerd/certs.d/_default/",
            "etc/containerd/certs.d/_default/hosts.toml"
        ]
    );
}
