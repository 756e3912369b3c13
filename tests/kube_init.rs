//! `trow init` against a fake Kubernetes API server (tests/common/fake_kube.rs):
//! a fresh cluster, a restart, two pods at once, a TLS Secret of one's own,
//! the ConfigMap, API errors, and `--watch` renewing the certificate.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::fake_kube::{stderr, trow_init, FakeKube};
use common::secure::Pki;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;

const NS: &str = "kube-public";

fn read(dir: &Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Checks that `tls.crt` in `dir` is signed by `ca.crt` in `dir`, is for
/// Trow's Service names, and that `tls.key` is its key (by serving with
/// them and connecting with only the CA trusted).
async fn check_cert_dir(dir: &Path) {
    let (ca, crt, key) = (
        read(dir, "ca.crt"),
        read(dir, "tls.crt"),
        read(dir, "tls.key"),
    );
    assert!(ca.contains("BEGIN CERTIFICATE"));
    assert!(key.contains("PRIVATE KEY"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |n: &str| std::fs::metadata(dir.join(n)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode("tls.key"), 0o600);
        assert_eq!(mode("tls.crt"), 0o644);
    }
    let info = trow::kube::certs::parse_one(&crt, "tls.crt").unwrap();
    for name in [
        "trow.kube-public",
        "trow.kube-public.svc",
        "trow.kube-public.svc.cluster.local",
        "localhost",
    ] {
        assert!(info.dns_names.iter().any(|n| n == name), "{name}: {info:?}");
    }
    // Trow serves with them, and a client trusting only ca.crt accepts it.
    let trow = common::Trow::start_with(&[&format!(
        "--tls={},{}",
        dir.join("tls.crt").display(),
        dir.join("tls.key").display()
    )]);
    let client = common::secure::https_builder(&ca)
        .resolve("trow.kube-public", ([127, 0, 0, 1], trow.port).into())
        .build()
        .unwrap();
    let r = client
        .get(format!("https://trow.kube-public:{}/v2/", trow.port))
        .send()
        .await
        .expect("HTTPS with the CA from trow init");
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn fresh_cluster_creates_the_ca_and_a_restart_keeps_it() {
    let kube = FakeKube::start(0).await;
    let tmp = tempfile::tempdir().unwrap();
    let first = tmp.path().join("first");
    let out = trow_init(&kube, &first, &["--extra-names", "registry.example.com"]).await;
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    // One log line per step.
    for line in [
        "Secret kube-public/trow-ca not found: creating a new CA",
        "created Secret kube-public/trow-ca with a new CA",
        "wrote ",
        "new serving certificate for",
        "created ConfigMap kube-public/trow-ca with the CA certificate",
        "trow init is done",
    ] {
        assert!(log.contains(line), "missing `{line}` in:\n{log}");
    }
    let secret: Secret = kube.get("secrets", NS, "trow-ca").expect("CA Secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    let ca_pem = String::from_utf8(kube.secret_data(NS, "trow-ca", "tls.crt").unwrap()).unwrap();
    assert_eq!(read(&first, "ca.crt"), ca_pem);
    assert_eq!(
        kube.configmap_data(NS, "trow-ca", "ca.crt").as_deref(),
        Some(ca_pem.as_str())
    );
    // The CA's key is in the Secret only, never in the ConfigMap or files.
    let cm: ConfigMap = kube.get("configmaps", NS, "trow-ca").unwrap();
    assert!(!serde_json::to_string(&cm).unwrap().contains("PRIVATE"));
    assert!(!read(&first, "ca.crt").contains("PRIVATE"));
    check_cert_dir(&first).await;
    let names = trow::kube::certs::parse_one(&read(&first, "tls.crt"), "x")
        .unwrap()
        .dns_names;
    assert!(names.iter().any(|n| n == "registry.example.com"));

    // A restart (a new pod, an empty certificate volume): the same CA, a
    // new serving certificate, nothing created or updated.
    let second = tmp.path().join("second");
    let out = trow_init(&kube, &second, &[]).await;
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("read Secret kube-public/trow-ca: using the existing CA"),
        "{log}"
    );
    assert!(
        log.contains("ConfigMap kube-public/trow-ca already holds this CA certificate: unchanged"),
        "{log}"
    );
    assert_eq!(read(&second, "ca.crt"), ca_pem);
    assert_ne!(read(&second, "tls.crt"), read(&first, "tls.crt"));
    assert_ne!(read(&second, "tls.key"), read(&first, "tls.key"));
    assert_eq!(kube.count("POST secrets/trow-ca"), 1);
    assert_eq!(kube.count("POST configmaps/trow-ca"), 1);
    assert_eq!(kube.count("PUT "), 0, "{:?}", kube.log());
    check_cert_dir(&second).await;
}

#[tokio::test]
async fn two_pods_starting_together_agree_on_one_ca() {
    // Both pods read "no CA" before either creates one; the server
    // serialises the creates: one gets 201, the other 409 and reads the
    // winner's CA.
    let kube = FakeKube::start(2).await;
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let (out_a, out_b) = tokio::join!(trow_init(&kube, &a, &[]), trow_init(&kube, &b, &[]));
    assert!(out_a.status.success(), "{}", stderr(&out_a));
    assert!(out_b.status.success(), "{}", stderr(&out_b));
    assert_eq!(kube.count("GET secrets/trow-ca 404"), 2, "{:?}", kube.log());
    assert_eq!(
        kube.count("POST secrets/trow-ca 201"),
        1,
        "{:?}",
        kube.log()
    );
    assert_eq!(
        kube.count("POST secrets/trow-ca 409"),
        1,
        "{:?}",
        kube.log()
    );
    let logs = format!("{}{}", stderr(&out_a), stderr(&out_b));
    assert!(
        logs.contains("was created by another pod at the same moment: using its CA"),
        "{logs}"
    );
    let ca = String::from_utf8(kube.secret_data(NS, "trow-ca", "tls.crt").unwrap()).unwrap();
    assert_eq!(read(&a, "ca.crt"), ca);
    assert_eq!(read(&b, "ca.crt"), ca);
    assert_eq!(kube.configmap_data(NS, "trow-ca", "ca.crt"), Some(ca));
    check_cert_dir(&a).await;
    check_cert_dir(&b).await;
}

fn tls_secret(cert: &str, key: &str, ca: Option<&str>) -> Secret {
    let mut data = std::collections::BTreeMap::from([
        ("tls.crt".to_string(), ByteString(cert.as_bytes().to_vec())),
        ("tls.key".to_string(), ByteString(key.as_bytes().to_vec())),
    ]);
    if let Some(ca) = ca {
        data.insert("ca.crt".into(), ByteString(ca.as_bytes().to_vec()));
    }
    Secret {
        type_: Some("kubernetes.io/tls".into()),
        data: Some(data),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_tls_secret_is_used_as_it_is_and_the_configmap_follows_it() {
    let kube = FakeKube::start(0).await;
    let pki = Pki::new();
    let cert = pki.issue(7);
    kube.put(
        "secrets",
        NS,
        "my-tls",
        &tls_secret(&cert.cert_pem, &cert.key_pem, Some(&pki.ca_pem)),
    );
    // A ConfigMap left from another CA is brought up to date.
    let stale = ConfigMap {
        data: Some([("ca.crt".to_string(), "old CA".to_string())].into()),
        ..Default::default()
    };
    kube.put("configmaps", NS, "trow-ca", &stale);
    let tmp = tempfile::tempdir().unwrap();
    let out = trow_init(&kube, tmp.path(), &["--tls-secret", "my-tls"]).await;
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("read Secret kube-public/my-tls (--tls-secret)"),
        "{log}"
    );
    assert!(log.contains("CA from its ca.crt"), "{log}");
    // Its names are not Trow's Service names: said, not refused.
    assert!(log.contains("is not valid for"), "{log}");
    assert!(
        log.contains("updated ConfigMap kube-public/trow-ca"),
        "{log}"
    );
    assert_eq!(read(tmp.path(), "tls.crt"), cert.cert_pem);
    assert_eq!(read(tmp.path(), "tls.key"), cert.key_pem);
    assert_eq!(read(tmp.path(), "ca.crt"), pki.ca_pem);
    assert_eq!(
        kube.configmap_data(NS, "trow-ca", "ca.crt"),
        Some(pki.ca_pem.clone())
    );
    assert_eq!(kube.count("PUT configmaps/trow-ca 200"), 1);
    // No CA of Trow's own was made.
    assert!(kube.get::<Secret>("secrets", NS, "trow-ca").is_none());
    assert_eq!(kube.count("secrets/trow-ca"), 0);

    // Run again: the ConfigMap is already right and is not written.
    let out = trow_init(&kube, tmp.path(), &["--tls-secret", "my-tls"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(kube.count("PUT configmaps/trow-ca"), 1);

    // A Secret whose key is not its certificate's is refused, files kept.
    let other = pki.issue(8);
    kube.put(
        "secrets",
        NS,
        "my-tls",
        &tls_secret(&cert.cert_pem, &other.key_pem, None),
    );
    let out = trow_init(&kube, tmp.path(), &["--tls-secret", "my-tls"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("Secret kube-public/my-tls"),
        "{}",
        stderr(&out)
    );
    assert_eq!(read(tmp.path(), "tls.key"), cert.key_pem);

    // A missing Secret says what to do.
    let out = trow_init(&kube, tmp.path(), &["--tls-secret", "nope"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not found (--tls-secret)"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn api_errors_give_a_clear_message_and_a_failure_exit() {
    let kube = FakeKube::start(0).await;
    let tmp = tempfile::tempdir().unwrap();
    kube.refuse(Some((403, "Forbidden")));
    let out = trow_init(&kube, tmp.path(), &[]).await;
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("get Secret kube-public/trow-ca: the API server answered 403 Forbidden"),
        "{log}"
    );
    assert!(log.contains("RBAC"), "{log}");
    // A refusal is final: asked once, not retried.
    assert_eq!(kube.count("GET secrets/trow-ca 403"), 1);
    assert!(!tmp.path().join("tls.crt").exists());

    // A server error is retried, then reported.
    kube.refuse(Some((503, "ServiceUnavailable")));
    let out = trow_init(&kube, tmp.path(), &["--api-retries", "2"]).await;
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("retrying"), "{log}");
    assert_eq!(kube.count("GET secrets/trow-ca 503"), 3);

    // Nobody listening.
    let addr = kube.addr;
    drop(kube);
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: x\n  context:\n    cluster: x\n    user: x\ncurrent-context: x\nusers:\n- name: x\n  user:\n    token: t\n"
        ),
    )
    .unwrap();
    let out = common::fake_kube::run_trow(&[
        "init",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--cert-dir",
        tmp.path().to_str().unwrap(),
        "--api-retries",
        "0",
    ])
    .await;
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("cannot reach the API server at"), "{log}");

    // Bad flags: exit 2 before anything is contacted.
    let out =
        common::fake_kube::run_trow(&["init", "--cert-dir", "/x", "--namespace", "Bad_NS"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

/// Waits until `path` holds something other than `old`; returns it.
async fn changed(path: &Path, old: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(now) = std::fs::read_to_string(path) {
            if now != old && !now.is_empty() {
                return now;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} did not change",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn terminate(child: &tokio::process::Child) {
    let pid = child.id().expect("running").to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
}

#[tokio::test]
async fn watch_renews_the_certificate_and_follows_a_rotated_secret() {
    let kube = FakeKube::start(0).await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("own");
    let mut child = tokio::process::Command::new(common::trow_bin())
        .args([
            "init",
            "--watch",
            "--kubeconfig",
            kube.kubeconfig.to_str().unwrap(),
            "--cert-dir",
            dir.to_str().unwrap(),
            "--cert-validity",
            "3s",
            "--interval",
            "1s",
        ])
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let crt = dir.join("tls.crt");
    let first = changed(&crt, "", Duration::from_secs(30)).await;
    // Renewed at 2/3 of 3 s, twice.
    let second = changed(&crt, &first, Duration::from_secs(10)).await;
    let third = changed(&crt, &second, Duration::from_secs(10)).await;
    for pem in [&first, &second, &third] {
        let info = trow::kube::certs::parse_one(pem, "tls.crt").unwrap();
        assert!(info.dns_names.iter().any(|n| n == "trow.kube-public.svc"));
    }
    assert_eq!(kube.count("POST secrets/trow-ca"), 1);
    terminate(&child);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("stops on SIGTERM")
        .unwrap();
    assert!(out.success());
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        use tokio::io::AsyncReadExt as _;
        let _ = e.read_to_string(&mut log).await;
    }
    assert!(log.contains("to be renewed at"), "{log}");
    check_cert_dir(&dir).await;

    // With --tls-secret: a rotated Secret is written out.
    let pki = Pki::new();
    let one = pki.issue(1);
    kube.put(
        "secrets",
        NS,
        "rotating",
        &tls_secret(&one.cert_pem, &one.key_pem, Some(&pki.ca_pem)),
    );
    let dir = tmp.path().join("given");
    let mut child = tokio::process::Command::new(common::trow_bin())
        .args([
            "init",
            "--watch",
            "--tls-secret",
            "rotating",
            "--kubeconfig",
            kube.kubeconfig.to_str().unwrap(),
            "--cert-dir",
            dir.to_str().unwrap(),
            "--interval",
            "1s",
        ])
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let crt = dir.join("tls.crt");
    assert_eq!(
        changed(&crt, "", Duration::from_secs(30)).await,
        one.cert_pem
    );
    let two = pki.issue(2);
    kube.put(
        "secrets",
        NS,
        "rotating",
        &tls_secret(&two.cert_pem, &two.key_pem, Some(&pki.ca_pem)),
    );
    assert_eq!(
        changed(&crt, &one.cert_pem, Duration::from_secs(10)).await,
        two.cert_pem
    );
    let key = changed(&dir.join("tls.key"), &one.key_pem, Duration::from_secs(5)).await;
    assert_eq!(key, two.key_pem);
    terminate(&child);
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
}

/// A webhook configuration as the webhooks overlay ships it: no caBundle.
fn webhook_configs() -> (
    k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration,
    k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration,
) {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhook, MutatingWebhookConfiguration, ServiceReference, ValidatingWebhook,
        ValidatingWebhookConfiguration, WebhookClientConfig,
    };
    let client = |path: &str| WebhookClientConfig {
        service: Some(ServiceReference {
            name: "trow".into(),
            namespace: NS.into(),
            path: Some(path.into()),
            port: Some(31000),
        }),
        ..Default::default()
    };
    let validating = ValidatingWebhookConfiguration {
        webhooks: Some(vec![ValidatingWebhook {
            name: "validator.trow.io".into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            client_config: client("/validate-image"),
            ..Default::default()
        }]),
        ..Default::default()
    };
    let mutating = MutatingWebhookConfiguration {
        webhooks: Some(vec![MutatingWebhook {
            name: "mutator.trow.io".into(),
            admission_review_versions: vec!["v1".into()],
            side_effects: "None".into(),
            client_config: client("/mutate-image"),
            ..Default::default()
        }]),
        ..Default::default()
    };
    (validating, mutating)
}

#[tokio::test]
async fn webhook_configs_get_the_ca_as_their_ca_bundle() {
    use k8s_openapi::api::admissionregistration::v1::{
        MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
    };
    let kube = FakeKube::start(0).await;
    let (v, m) = webhook_configs();
    kube.put("validatingwebhookconfigurations", "", "trow-validator", &v);
    kube.put("mutatingwebhookconfigurations", "", "trow-mutator", &m);
    let tmp = tempfile::tempdir().unwrap();
    let args = ["--webhook-configs", "trow-validator,trow-mutator"];
    let out = trow_init(&kube, &tmp.path().join("a"), &args).await;
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let ca = read(&tmp.path().join("a"), "ca.crt");
    let v: ValidatingWebhookConfiguration = kube
        .get("validatingwebhookconfigurations", "", "trow-validator")
        .unwrap();
    let m: MutatingWebhookConfiguration = kube
        .get("mutatingwebhookconfigurations", "", "trow-mutator")
        .unwrap();
    let bundle =
        |b: &Option<ByteString>| String::from_utf8(b.clone().expect("caBundle").0).unwrap();
    assert_eq!(bundle(&v.webhooks.unwrap()[0].client_config.ca_bundle), ca);
    assert_eq!(bundle(&m.webhooks.unwrap()[0].client_config.ca_bundle), ca);
    assert!(
        log.contains("updated ValidatingWebhookConfiguration trow-validator: the caBundle of its 1 webhook(s) is now the CA certificate"),
        "{log}"
    );
    // Only the kinds that exist under each name are updated; a second run
    // (same CA) changes nothing.
    assert_eq!(
        kube.count("PUT validatingwebhookconfigurations/trow-validator 200"),
        1
    );
    assert_eq!(
        kube.count("PUT mutatingwebhookconfigurations/trow-mutator 200"),
        1
    );
    assert_eq!(
        kube.count("PUT mutatingwebhookconfigurations/trow-validator"),
        0
    );
    let out = trow_init(&kube, &tmp.path().join("b"), &args).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        kube.count("PUT validatingwebhookconfigurations"),
        1,
        "{:?}",
        kube.log()
    );
    assert!(stderr(&out).contains("is the CA already: unchanged"));
    // A name with no configuration is a warning, not a failure.
    let out = trow_init(
        &kube,
        &tmp.path().join("c"),
        &["--webhook-configs", "missing"],
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(
        "there is no ValidatingWebhookConfiguration or MutatingWebhookConfiguration missing"
    ));
    // RBAC refusals stop the one-shot run with the server's message.
    kube.refuse(Some((403, "Forbidden")));
    let out = trow_init(&kube, &tmp.path().join("d"), &args).await;
    assert!(!out.status.success());
}
