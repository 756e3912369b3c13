//! The Kubernetes install (install/): the committed flat files are exactly
//! what the kustomize layout renders, every manifest is valid against the
//! Kubernetes schemas, the manifests keep the install's rules (namespace,
//! names, volumes, security), and the `trow` binary accepts the flags the
//! manifests give it.
//!
//! No Kubernetes API server can run here, so what a cluster would check is
//! checked offline: `kubectl kustomize` renders, kubernetes-validate checks
//! against the OpenAPI schemas, and Trow itself runs with the Deployment's
//! arguments and files like those its volumes would hold.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use common::secure::{self, Pki};
use common::{have_tool, logged_addr, strict, tools, trow_bin, SERVING};

const NAMESPACE: &str = "kube-public";
/// The kustomize install/render.sh renders the flat files with: the one
/// embedded in Debian's kubectl 1.20 (package kubernetes-client).
const PINNED_KUSTOMIZE: &str = "v2.0.3";
/// The flat files, and the kustomize directory each is rendered from.
const FLAT: [(&str, &str); 4] = [
    ("trow.yaml", "base"),
    ("trow-pvc.yaml", "overlays/pvc"),
    ("trow-gke.yaml", "overlays/pvc"),
    ("trow-webhooks.yaml", "overlays/webhooks"),
];
/// The webhook configurations of install/overlays/webhooks, which
/// `trow init --webhook-configs` gives the CA.
const WEBHOOK_CONFIGS: [(&str, &str); 2] = [
    ("ValidatingWebhookConfiguration", "trow-validator"),
    ("MutatingWebhookConfiguration", "trow-mutator"),
];
/// What may be cluster-wide, and only in the webhooks' renderings.
const CLUSTER_KINDS: [&str; 4] = [
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
    "ClusterRole",
    "ClusterRoleBinding",
];
/// Kubernetes versions to validate against: the oldest and the newest
/// whose strict schemas kubernetes-validate (1.37.0, .ci/run) ships.
const K8S_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];
/// Where the API token is mounted, for the containers that talk to the API.
const TOKEN_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn install_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("install")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The documents of a multi-document YAML text, as JSON values.
fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).expect("the manifest is YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The object of `kind` named `name`; panics naming `file` if missing.
fn object<'a>(docs: &'a [Value], kind: &str, name: &str, file: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{file}: no {kind} {name}"))
}

fn str_list(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    array(list).iter().find(|v| v["name"] == name)
}

/// Every container of a pod spec, init containers first.
fn containers(pod: &Value) -> Vec<&Value> {
    array(&pod["initContainers"])
        .iter()
        .chain(array(&pod["containers"]))
        .collect()
}

fn names(list: &Value) -> Vec<&str> {
    array(list)
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect()
}

/// The volume mount of `volume` in `container`, if it is mounted.
fn mount_of<'a>(container: &'a Value, volume: &str) -> Option<&'a Value> {
    array(&container["volumeMounts"])
        .iter()
        .find(|m| m["name"] == volume)
}

/// A pod's container port number for a probe or Service target (a number,
/// or the name of one of the container's ports).
fn port_number(container: &Value, port: &Value) -> Option<u64> {
    match port {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => array(&container["ports"])
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64()),
        _ => None,
    }
}

/// `kubectl` to render with: `TROW_KUBECTL` when set (CI: Debian's 1.20),
/// else the one on PATH; `None` (a skip) when there is none.
fn kubectl() -> Option<String> {
    if let Some(k) = std::env::var_os("TROW_KUBECTL") {
        return Some(k.into_string().expect("TROW_KUBECTL is UTF-8"));
    }
    have_tool("kubectl").then(|| "kubectl".to_string())
}

/// The kustomize version `kubectl kustomize` embeds. kubectl 1.21 and later
/// print it; 1.14 to 1.20 embed v2.0.3 and do not say so.
async fn kustomize_version(kubectl: &str) -> String {
    let out = tools::run(kubectl, &["version", "--client"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(v) = text
        .lines()
        .find_map(|l| l.strip_prefix("Kustomize Version: "))
    {
        return v.trim().to_string();
    }
    let old = regex::Regex::new(r#"GitVersion:"v1\.(1[4-9]|20)\."#).expect("regex");
    assert!(
        old.is_match(&text),
        "cannot tell which kustomize `{kubectl}` embeds:\n{text}"
    );
    PINNED_KUSTOMIZE.to_string()
}

/// `kubectl kustomize install/<dir>`, which must succeed.
async fn kustomize(kubectl: &str, dir: &str) -> String {
    let path = install_dir().join(dir);
    let out = tools::run_ok(kubectl, &["kustomize", path.to_str().expect("UTF-8 path")]).await;
    String::from_utf8(out).expect("kustomize prints UTF-8")
}

/// The kustomize directories: the base and every overlay that has a
/// kustomization.
fn kustomize_dirs() -> Vec<String> {
    let mut dirs = vec!["base".to_string()];
    let overlays = install_dir().join("overlays");
    let mut entries: Vec<_> = std::fs::read_dir(&overlays)
        .expect("install/overlays")
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().expect("name").to_string_lossy().into_owned();
        dirs.push(format!("overlays/{name}"));
    }
    dirs
}

/// The comment lines a flat file starts with.
fn header(text: &str) -> Vec<&str> {
    text.lines().take_while(|l| l.starts_with('#')).collect()
}

/// The documents of a rendering, in a fixed order, to compare renderings of
/// different kustomize versions (which order some kinds differently).
fn sorted_documents(text: &str) -> Vec<Value> {
    let mut docs = documents(text);
    docs.sort_by_key(|d| {
        format!(
            "{}/{}/{}",
            d["apiVersion"], d["kind"], d["metadata"]["name"]
        )
    });
    docs
}

#[tokio::test]
async fn flat_files_are_what_the_kustomize_layout_renders() {
    let Some(kubectl) = kubectl() else { return };
    let version = kustomize_version(&kubectl).await;
    let pinned = version == PINNED_KUSTOMIZE;
    if !pinned {
        assert!(
            !strict(),
            "`{kubectl}` embeds kustomize {version}; the flat files are rendered with \
             {PINNED_KUSTOMIZE} (Debian's kubectl 1.20): set TROW_KUBECTL (see .ci/run)"
        );
        eprintln!(
            "NOTE: `{kubectl}` embeds kustomize {version}, not {PINNED_KUSTOMIZE}: comparing \
             the rendered documents, not the bytes (set TROW_KUBECTL to Debian's kubectl 1.20 \
             for the byte comparison)"
        );
    }
    let tmp = tempfile::tempdir().expect("temp dir");
    let script = install_dir().join("render.sh");
    let out = tools::run_env(
        "bash",
        &[
            script.to_str().expect("UTF-8 path"),
            tmp.path().to_str().expect("UTF-8 path"),
        ],
        &[
            ("TROW_KUBECTL", kubectl.as_str()),
            ("TROW_RENDER_ANY_KUSTOMIZE", if pinned { "0" } else { "1" }),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "install/render.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // render.sh writes exactly the flat files, and no other flat file is
    // committed (one left over would be installed by nobody, and drift).
    let mut rendered: Vec<String> = std::fs::read_dir(tmp.path())
        .expect("rendered files")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    rendered.sort();
    let mut expected: Vec<String> = FLAT.iter().map(|(f, _)| f.to_string()).collect();
    expected.sort();
    assert_eq!(rendered, expected, "the files install/render.sh writes");
    let mut committed: Vec<String> = std::fs::read_dir(install_dir())
        .expect("install/")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    committed.sort();
    assert_eq!(
        committed, expected,
        "install/*.yaml must be exactly the rendered files"
    );

    for (file, dir) in FLAT {
        let fresh = read(&tmp.path().join(file));
        let committed = read(&install_dir().join(file));
        if pinned {
            assert!(
                fresh == committed,
                "install/{file} differs from what install/{dir} renders: run install/render.sh \
                 (with kustomize {PINNED_KUSTOMIZE}) and commit the result. Fresh rendering:\n{fresh}"
            );
        } else {
            assert_eq!(header(&fresh), header(&committed), "install/{file}: header");
            assert!(
                sorted_documents(&fresh) == sorted_documents(&committed),
                "install/{file} differs from what install/{dir} renders (documents compared): \
                 run install/render.sh and commit the result. Fresh rendering:\n{fresh}"
            );
        }
    }
}

#[tokio::test]
async fn every_manifest_is_valid_for_kubernetes() {
    let Some(kubectl) = kubectl() else { return };
    if !have_tool("kubernetes-validate") {
        return;
    }
    // The committed flat files, and every overlay as it renders.
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut files: Vec<PathBuf> = FLAT.iter().map(|(f, _)| install_dir().join(f)).collect();
    for dir in kustomize_dirs() {
        let path = tmp.path().join(format!("{}.yaml", dir.replace('/', "-")));
        std::fs::write(&path, kustomize(&kubectl, &dir).await).expect("write rendering");
        files.push(path);
    }
    let paths: Vec<&str> = files
        .iter()
        .map(|p| p.to_str().expect("UTF-8 path"))
        .collect();
    for version in K8S_VERSIONS {
        let mut args = vec!["--strict", "--quiet", "--kubernetes-version", version];
        args.extend(&paths);
        let out = tools::run("kubernetes-validate", &args).await;
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !report.contains("ERROR"),
            "kubernetes-validate (Kubernetes {version}, strict) refused a manifest:\n{report}"
        );
    }
}

/// Whether a rendering is the admission webhooks' (the only one with
/// cluster-wide objects).
fn is_webhooks(file: &str) -> bool {
    file.contains("webhooks")
}

/// Everything in kube-public, which exists in every cluster: the manifests
/// must not create (and `kubectl delete -f` must not delete) the namespace.
/// Nothing cluster-wide, except in the webhooks' renderings their two
/// webhook configurations and the ClusterRole (and binding) that lets
/// `trow init` set their caBundle, which are cluster-scoped by nature and
/// carry no namespace.
fn check_namespace(file: &str, docs: &[Value]) {
    for d in docs {
        let what = format!("{file}: {} {}", d["kind"], d["metadata"]["name"]);
        let kind = d["kind"].as_str().unwrap_or("");
        assert_ne!(
            kind, "Namespace",
            "{what}: the install creates no namespace"
        );
        if CLUSTER_KINDS.contains(&kind) {
            assert!(
                is_webhooks(file),
                "{what}: only the webhooks overlay creates anything cluster-wide"
            );
            assert!(
                d["metadata"].get("namespace").is_none(),
                "{what}: cluster-scoped"
            );
            continue;
        }
        assert_eq!(d["metadata"]["namespace"], NAMESPACE, "{what}: namespace");
    }
    if is_webhooks(file) {
        check_webhooks(file, docs);
    }
}

/// The webhook configurations and the RBAC of `trow init
/// --webhook-configs`: what INSTALL.md and the user guide promise.
fn check_webhooks(file: &str, docs: &[Value]) {
    for (kind, name) in WEBHOOK_CONFIGS {
        let config = object(docs, kind, name, file);
        let hooks = array(&config["webhooks"]);
        assert!(!hooks.is_empty(), "{file}: {name} has webhooks");
        for h in hooks {
            let what = format!("{file}: {name} {}", h["name"]);
            assert_eq!(str_list(&h["admissionReviewVersions"]), ["v1"], "{what}");
            assert_eq!(h["sideEffects"], "None", "{what}");
            let failure = if kind.starts_with("Validating") {
                "Fail"
            } else {
                "Ignore"
            };
            assert_eq!(h["failurePolicy"], failure, "{what}");
            assert!(
                h["timeoutSeconds"]
                    .as_u64()
                    .is_some_and(|t| (1..=10).contains(&t)),
                "{what}: timeoutSeconds"
            );
            // Trow can always start: its own namespace and kube-system are
            // never sent to it.
            let exprs = array(&h["namespaceSelector"]["matchExpressions"]);
            assert!(
                exprs
                    .iter()
                    .any(|e| e["key"] == "kubernetes.io/metadata.name"
                        && e["operator"] == "NotIn"
                        && str_list(&e["values"]).contains(&"kube-system")
                        && str_list(&e["values"]).contains(&NAMESPACE)),
                "{what}: namespaceSelector"
            );
            let svc = &h["clientConfig"]["service"];
            assert_eq!(svc["name"], "trow", "{what}");
            assert_eq!(svc["namespace"], NAMESPACE, "{what}");
            assert_eq!(svc["port"], 31000, "{what}");
            let path = if kind.starts_with("Validating") {
                "/validate-image"
            } else {
                "/mutate-image"
            };
            assert_eq!(svc["path"], path, "{what}");
            assert!(
                h["clientConfig"].get("caBundle").is_none(),
                "{what}: set by trow init"
            );
            let resources: Vec<&str> = array(&h["rules"])
                .iter()
                .flat_map(|r| str_list(&r["resources"]))
                .collect();
            let expected: &[&str] = if kind.starts_with("Validating") {
                &[
                    "pods",
                    "pods/ephemeralcontainers",
                    "replicationcontrollers",
                    "deployments",
                    "statefulsets",
                    "daemonsets",
                    "replicasets",
                    "jobs",
                    "cronjobs",
                ]
            } else {
                &["pods"]
            };
            for r in expected {
                assert!(resources.contains(r), "{what}: rules cover {r}");
            }
        }
    }
    let role = object(docs, "ClusterRole", "trow-webhook-configs", file);
    for rule in array(&role["rules"]) {
        assert_eq!(
            str_list(&rule["apiGroups"]),
            ["admissionregistration.k8s.io"],
            "{file}"
        );
        let mut verbs = str_list(&rule["verbs"]);
        verbs.sort();
        assert_eq!(verbs, ["get", "update"], "{file}: {rule}");
        let names = str_list(&rule["resourceNames"]);
        assert!(
            !names.is_empty(),
            "{file}: limited by resourceNames: {rule}"
        );
        assert!(
            names
                .iter()
                .all(|n| WEBHOOK_CONFIGS.iter().any(|(_, w)| w == n)),
            "{file}: {rule}"
        );
    }
    let binding = object(docs, "ClusterRoleBinding", "trow-webhook-configs", file);
    assert_eq!(binding["roleRef"]["name"], "trow-webhook-configs");
    assert_eq!(
        array(&binding["subjects"]),
        [serde_json::json!({"kind": "ServiceAccount", "name": "trow", "namespace": NAMESPACE})]
    );
    // trow-init and cert-renewer keep the caBundle.
    let pod = &object(docs, "Deployment", "trow-deploy", file)["spec"]["template"]["spec"];
    let names: Vec<&str> = WEBHOOK_CONFIGS.iter().map(|(_, n)| *n).collect();
    let flag_value = names.join(",");
    for c in containers(pod) {
        if c["name"] == "trow-init" || c["name"] == "cert-renewer" {
            let args = str_list(&c["args"]);
            assert!(
                args.windows(2)
                    .any(|w| w == ["--webhook-configs", flag_value.as_str()]),
                "{file}: {} {args:?}",
                c["name"]
            );
        }
    }
}

/// The security settings of every pod and container, and what of the node
/// they may touch.
fn check_security(file: &str, docs: &[Value]) {
    let image = format!("ghcr.io/trow-registry/trow:{}", env!("CARGO_PKG_VERSION"));
    let pod = &object(docs, "Deployment", "trow-deploy", file)["spec"]["template"]["spec"];
    let volumes = &pod["volumes"];
    let ds_pod = &object(docs, "DaemonSet", "copy-certs", file)["spec"]["template"]["spec"];
    let copy = named(&ds_pod["containers"], "copy-certs").expect("copy-certs container");
    for (workload, pod) in [("trow-deploy", pod), ("copy-certs", ds_pod)] {
        let what = format!("{file}: {workload}");
        assert_eq!(
            pod["enableServiceLinks"], false,
            "{what}: TROW_* service variables"
        );
        for host in ["hostNetwork", "hostPID", "hostIPC"] {
            assert_ne!(pod[host], true, "{what}: {host}");
        }
        for c in containers(pod) {
            let what = format!("{what}/{}", c["name"]);
            let sc = &c["securityContext"];
            assert_eq!(c["image"], image.as_str(), "{what}: image");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_ne!(sc["privileged"], true, "{what}");
            assert_eq!(str_list(&sc["capabilities"]["drop"]), ["ALL"], "{what}");
            assert!(sc["capabilities"].get("add").is_none(), "{what}");
            let seccomp = sc["seccompProfile"]["type"]
                .as_str()
                .or(pod["securityContext"]["seccompProfile"]["type"].as_str());
            assert_eq!(seccomp, Some("RuntimeDefault"), "{what}: seccomp");
            for (k, v) in [("requests", "memory"), ("limits", "memory")] {
                assert!(
                    c["resources"][k][v].is_string(),
                    "{what}: resources.{k}.{v}"
                );
            }
            let setting = |key: &str| {
                let own = &sc[key];
                if own.is_null() {
                    pod["securityContext"][key].clone()
                } else {
                    own.clone()
                }
            };
            if c["name"] == "copy-certs" {
                // Root, to write the node's root-owned files; see below.
                assert_eq!(setting("runAsUser"), 0, "{what}");
            } else {
                assert_eq!(setting("runAsNonRoot"), true, "{what}");
                assert!(
                    setting("runAsUser").as_u64().is_some_and(|u| u != 0),
                    "{what}"
                );
            }
        }
    }
    // The node's files: only containerd's and docker's directories and
    // node-setup's record, and only the certs.d ones and the record
    // writable. No other pod touches the host.
    assert!(
        array(volumes).iter().all(|v| v.get("hostPath").is_none()),
        "{file}: trow-deploy mounts nothing of the node"
    );
    for v in array(&ds_pod["volumes"]) {
        let Some(path) = v["hostPath"]["path"].as_str() else {
            continue;
        };
        assert!(
            [
                "/etc/containerd",
                "/etc/containerd/certs.d",
                "/etc/docker/certs.d",
                "/var/lib/trow-node-setup"
            ]
            .contains(&path),
            "{file}: copy-certs mounts {path} of the node"
        );
        let mount = mount_of(copy, v["name"].as_str().unwrap_or("")).expect("mounted");
        if !path.ends_with("/certs.d") && path != "/var/lib/trow-node-setup" {
            assert_eq!(mount["readOnly"], true, "{file}: {path} is read-only");
        }
        assert_eq!(mount["mountPath"], format!("/host{path}"), "{file}");
    }
}

/// The install's rules, for one rendered file: what the user guide and
/// INSTALL.md promise, and the security settings.
fn check_install_rules(file: &str, docs: &[Value], persistent: bool) {
    check_namespace(file, docs);
    check_security(file, docs);

    let deploy = object(docs, "Deployment", "trow-deploy", file);
    let spec = &deploy["spec"];
    let pod = &spec["template"]["spec"];
    assert_eq!(
        spec["replicas"], 1,
        "{file}: one replica per data directory"
    );
    assert_eq!(spec["strategy"]["type"], "Recreate", "{file}: strategy");
    assert_eq!(names(&pod["initContainers"]), ["trow-init"], "{file}");
    assert_eq!(
        names(&pod["containers"]),
        ["trow", "cert-renewer"],
        "{file}"
    );
    assert_eq!(pod["serviceAccountName"], "trow", "{file}");
    let template_labels = &spec["template"]["metadata"]["labels"];
    let selects = |selector: &Value, labels: &Value| {
        selector
            .as_object()
            .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels[k] == *v))
    };
    assert!(
        selects(&spec["selector"]["matchLabels"], template_labels),
        "{file}: the Deployment's selector matches its pods"
    );

    // Volumes.
    let volumes = &pod["volumes"];
    let cert_vol = named(volumes, "cert-vol").expect("cert-vol");
    assert_eq!(cert_vol["emptyDir"]["medium"], "Memory", "{file}: cert-vol");
    let data_vol = named(volumes, "data-vol").expect("data-vol");
    if persistent {
        assert_eq!(
            data_vol["persistentVolumeClaim"]["claimName"], "data-claim",
            "{file}: data-vol on the claim"
        );
        assert!(data_vol.get("emptyDir").is_none(), "{file}: data-vol");
        let claim = object(docs, "PersistentVolumeClaim", "data-claim", file);
        assert_eq!(str_list(&claim["spec"]["accessModes"]), ["ReadWriteOnce"]);
        assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "10Gi");
    } else {
        assert!(
            data_vol["emptyDir"].is_object(),
            "{file}: data-vol is an emptyDir"
        );
        assert!(
            !docs.iter().any(|d| d["kind"] == "PersistentVolumeClaim"),
            "{file}: no claim"
        );
    }

    // The containers, as the interface with `trow init` fixes them.
    let all = containers(pod);
    let by_name = |n: &str| *all.iter().find(|c| c["name"] == n).expect("container");
    let init = by_name("trow-init");
    let renewer = by_name("cert-renewer");
    let trow = by_name("trow");
    // The webhooks' rendering adds `--webhook-configs <names>` at the end
    // (checked in check_webhooks).
    let job_args = |c: &Value| {
        let mut args = str_list(&c["args"]);
        if is_webhooks(file) && args.len() >= 2 && args[args.len() - 2] == "--webhook-configs" {
            args.truncate(args.len() - 2);
        }
        args.into_iter().map(str::to_string).collect::<Vec<_>>()
    };
    assert_eq!(job_args(init), ["init", "--cert-dir", "/certs"], "{file}");
    assert_eq!(
        job_args(renewer),
        ["init", "--cert-dir", "/certs", "--watch"],
        "{file}"
    );
    for c in [init, renewer] {
        assert_eq!(
            mount_of(c, "cert-vol").map(|m| &m["mountPath"]),
            Some(&Value::from("/certs"))
        );
        let token = mount_of(c, "kube-api-access").expect("the API token is mounted");
        assert_eq!(token["mountPath"], TOKEN_DIR);
    }
    // The registry faces the network: it gets no API token, and reads its
    // certificate without being able to change it.
    assert_eq!(pod["automountServiceAccountToken"], false, "{file}");
    assert!(
        mount_of(trow, "kube-api-access").is_none(),
        "{file}: no token for trow"
    );
    assert_eq!(
        mount_of(trow, "cert-vol").expect("cert-vol")["readOnly"],
        true
    );
    assert_eq!(
        mount_of(trow, "data-vol").expect("data-vol")["mountPath"],
        "/data"
    );
    let args = str_list(&trow["args"]);
    for pair in [
        ["--data-dir", "/data"],
        ["--hostname", "trow.kube-public:31000"],
    ] {
        assert!(
            args.windows(2).any(|w| w == pair),
            "{file}: trow {pair:?} in {args:?}"
        );
    }
    assert!(
        args.contains(&"--tls=/certs/tls.crt,/certs/tls.key"),
        "{file}: {args:?}"
    );
    // Trow listens on its default port, the container port.
    assert!(
        !args.iter().any(|a| a.starts_with("--bind")),
        "{file}: {args:?}"
    );
    assert_eq!(
        port_number(trow, &Value::from("https")),
        Some(8000),
        "{file}"
    );
    let config = args
        .windows(2)
        .find(|w| w[0] == "--config-file")
        .map(|w| w[1])
        .expect("--config-file");
    let config_mount = mount_of(trow, "trow-config").expect("the configuration is mounted");
    assert_eq!(
        format!(
            "{}/trow.yaml",
            config_mount["mountPath"].as_str().unwrap_or("")
        ),
        config,
        "{file}"
    );
    let config_map = object(docs, "ConfigMap", "trow-config", file);
    assert!(
        config_map["data"]["trow.yaml"].is_string(),
        "{file}: trow-config"
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &trow[probe]["httpGet"];
        assert_eq!(get["path"], path, "{file}: {probe}");
        assert_eq!(get["scheme"], "HTTPS", "{file}: {probe}");
        assert_eq!(
            port_number(trow, &get["port"]),
            Some(8000),
            "{file}: {probe}"
        );
    }

    // The Service: port 31000 for pods (trow.kube-public:31000) and as the
    // NodePort on every node, to Trow's 8000; only Trow's pods behind it.
    let service = object(docs, "Service", "trow", file);
    assert_eq!(service["spec"]["type"], "NodePort", "{file}");
    let ports = array(&service["spec"]["ports"]);
    assert_eq!(ports.len(), 1, "{file}: one service port");
    assert_eq!(ports[0]["port"], 31000, "{file}");
    assert_eq!(ports[0]["nodePort"], 31000, "{file}");
    assert_eq!(
        port_number(trow, &ports[0]["targetPort"]),
        Some(8000),
        "{file}"
    );
    assert!(
        selects(&service["spec"]["selector"], template_labels),
        "{file}"
    );

    // The node files.
    let daemonset = object(docs, "DaemonSet", "copy-certs", file);
    let ds_pod = &daemonset["spec"]["template"]["spec"];
    assert!(
        selects(
            &daemonset["spec"]["selector"]["matchLabels"],
            &daemonset["spec"]["template"]["metadata"]["labels"]
        ),
        "{file}: copy-certs selector"
    );
    assert!(
        !selects(
            &service["spec"]["selector"],
            &daemonset["spec"]["template"]["metadata"]["labels"]
        ),
        "{file}: the Service must not send requests to copy-certs"
    );
    let copy = &array(&ds_pod["containers"])[0];
    let copy_args = str_list(&copy["args"]);
    assert_eq!(copy_args.first(), Some(&"node-setup"), "{file}");
    for pair in [
        ["--host-root", "/host"],
        ["--ca", "/ca/ca.crt"],
        ["--registry", "trow.kube-public:31000"],
        ["--endpoint", "https://localhost:31000"],
    ] {
        assert!(
            copy_args.windows(2).any(|w| w == pair),
            "{file}: copy-certs {pair:?}"
        );
    }
    assert!(copy_args.contains(&"--watch"), "{file}: copy-certs --watch");
    assert_eq!(
        named(&ds_pod["volumes"], "trow-ca").expect("trow-ca volume")["configMap"]["name"],
        "trow-ca"
    );
    assert_eq!(
        mount_of(copy, "trow-ca").expect("CA mount")["mountPath"],
        "/ca"
    );

    // RBAC: the ServiceAccount may create, read and update what `trow
    // init` keeps, in this namespace only; reads and updates by name.
    object(docs, "ServiceAccount", "trow", file);
    let role = object(docs, "Role", "trow-init", file);
    for rule in array(&role["rules"]) {
        let verbs = str_list(&rule["verbs"]);
        assert!(
            verbs
                .iter()
                .all(|v| ["get", "create", "update"].contains(v)),
            "{file}: trow-init verbs {verbs:?}"
        );
        assert!(
            str_list(&rule["resources"])
                .iter()
                .all(|r| ["secrets", "configmaps"].contains(r)),
            "{file}: trow-init resources"
        );
        if verbs.iter().any(|v| *v != "create") {
            assert!(
                !str_list(&rule["resourceNames"]).is_empty(),
                "{file}: get and update are limited to named objects: {rule}"
            );
        }
    }
    let binding = object(docs, "RoleBinding", "trow-init", file);
    assert_eq!(binding["roleRef"]["name"], "trow-init");
    assert_eq!(
        array(&binding["subjects"]),
        [serde_json::json!({"kind": "ServiceAccount", "name": "trow", "namespace": NAMESPACE})]
    );
}

#[tokio::test]
async fn every_rendering_keeps_the_namespace_and_security_rules() {
    for (what, docs) in renderings().await {
        check_namespace(&what, &docs);
        check_security(&what, &docs);
    }
}

#[test]
fn the_flat_files_keep_the_install_rules() {
    for (file, dir) in FLAT {
        let docs = documents(&read(&install_dir().join(file)));
        check_install_rules(file, &docs, dir == "overlays/pvc");
    }
}

/// The files a container's volumes would hold, in a temporary directory:
/// each mount path maps to a directory, filled as Kubernetes would (the
/// ConfigMaps' data from the same manifests, certificates as `trow init`
/// writes them, stand-ins for the Secrets the operator creates).
struct Sandbox {
    dir: tempfile::TempDir,
    mounts: Vec<(String, PathBuf)>,
    pki: Pki,
}

impl Sandbox {
    fn new(docs: &[Value], pod: &Value, container: &Value) -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki = Pki::new();
        let mut mounts = Vec::new();
        for m in array(&container["volumeMounts"]) {
            let name = m["name"].as_str().expect("volume name");
            let mount_path = m["mountPath"].as_str().expect("mount path").to_string();
            let volume = named(&pod["volumes"], name)
                .unwrap_or_else(|| panic!("volume {name} is mounted but not defined"));
            let path = dir.path().join(name);
            std::fs::create_dir_all(&path).expect("volume dir");
            if let Some(cm) = volume["configMap"]["name"].as_str() {
                let map = object(docs, "ConfigMap", cm, "the manifests");
                for (key, value) in map["data"].as_object().expect("ConfigMap data") {
                    std::fs::write(path.join(key), value.as_str().expect("text")).expect("write");
                }
            } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
                assert_eq!(
                    secret, "trow-users",
                    "a Secret this test cannot stand in for"
                );
                secure::write_htpasswd(&path.join("htpasswd"), &[("alice", "alice-password")]);
            } else if name == "cert-vol" {
                // What trow-init leaves there.
                pki.write_cert(1, &path);
                std::fs::write(path.join("ca.crt"), &pki.ca_pem).expect("write CA");
            } else {
                assert!(
                    volume["emptyDir"].is_object() || volume["persistentVolumeClaim"].is_object(),
                    "volume {name}: the test cannot stand in for {volume}"
                );
            }
            mounts.push((mount_path, path));
        }
        // Longest first, so that a mount inside another one wins.
        mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        Sandbox { dir, mounts, pki }
    }

    /// `arg` with every path under a mount moved into the sandbox (a path
    /// starts the argument or follows `=` or `,`, as in `--tls=a,b`).
    fn map_arg(&self, arg: &str) -> String {
        let mut out = String::new();
        let mut rest = arg;
        'outer: while !rest.is_empty() {
            let at_boundary = out.is_empty() || out.ends_with('=') || out.ends_with(',');
            if at_boundary {
                for (mount, path) in &self.mounts {
                    if let Some(tail) = rest.strip_prefix(mount.as_str()) {
                        if tail.is_empty() || tail.starts_with('/') || tail.starts_with(',') {
                            out.push_str(path.to_str().expect("UTF-8 path"));
                            rest = tail;
                            continue 'outer;
                        }
                    }
                }
            }
            let c = rest.chars().next().expect("non-empty");
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }

    /// The container's arguments, with paths in the sandbox.
    fn args(&self, container: &Value) -> Vec<String> {
        str_list(&container["args"])
            .into_iter()
            .map(|a| self.map_arg(a))
            .collect()
    }

    /// The container's environment (plain values only).
    fn env(&self, container: &Value) -> BTreeMap<String, String> {
        array(&container["env"])
            .iter()
            .map(|e| {
                let value = e["value"]
                    .as_str()
                    .unwrap_or_else(|| panic!("env {e}: only plain values are stood in for"));
                (
                    e["name"].as_str().expect("env name").to_string(),
                    self.map_arg(value),
                )
            })
            .collect()
    }
}

/// The rendered manifests whose Trow flags are checked: the flat files, and
/// the other overlays when kubectl can render them.
async fn renderings() -> Vec<(String, Vec<Value>)> {
    let mut all: Vec<(String, Vec<Value>)> = FLAT
        .iter()
        .map(|(f, _)| {
            (
                format!("install/{f}"),
                documents(&read(&install_dir().join(f))),
            )
        })
        .collect();
    if let Some(kubectl) = kubectl() {
        for dir in kustomize_dirs() {
            if !FLAT.iter().any(|(_, d)| *d == dir) {
                let docs = documents(&kustomize(&kubectl, &dir).await);
                all.push((format!("install/{dir}"), docs));
            }
        }
    }
    all
}

fn trow_container(docs: &[Value], what: &str) -> (Value, Value) {
    let pod = object(docs, "Deployment", "trow-deploy", what)["spec"]["template"]["spec"].clone();
    let trow = named(&pod["containers"], "trow")
        .expect("trow container")
        .clone();
    (pod, trow)
}

#[tokio::test]
async fn trow_accepts_the_deployments_flags_and_files() {
    for (what, docs) in renderings().await {
        let (pod, trow) = trow_container(&docs, &what);
        let sandbox = Sandbox::new(&docs, &pod, &trow);
        let mut args = sandbox.args(&trow);
        args.push("--dry-run".into());
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(String, String)> = sandbox.env(&trow).into_iter().collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let bin = trow_bin();
        let out = tools::run_env(bin.to_str().expect("UTF-8 path"), &argv, &env).await;
        assert!(
            out.status.success(),
            "{what}: trow refuses the Deployment's flags {argv:?}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// `trow init` and `trow node-setup` accept the init and node jobs' flags.
#[tokio::test]
async fn the_jobs_flags_are_accepted() {
    let bin = trow_bin();
    let bin = bin.to_str().expect("UTF-8 path");
    for (what, docs) in renderings().await {
        let mut jobs = Vec::new();
        for (kind, name) in [("Deployment", "trow-deploy"), ("DaemonSet", "copy-certs")] {
            let pod = &object(&docs, kind, name, &what)["spec"]["template"]["spec"];
            for c in containers(pod) {
                let args = str_list(&c["args"]);
                if args.first().is_some_and(|a| !a.starts_with('-')) {
                    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
                    jobs.push((c["name"].as_str().unwrap_or("").to_string(), args));
                }
            }
        }
        assert_eq!(
            jobs.len(),
            3,
            "{what}: trow-init, cert-renewer and copy-certs run subcommands"
        );
        for (container, mut args) in jobs {
            // clap checks each flag as it parses; --help then stops before
            // anything runs (no files, no API server needed).
            args.push("--help".into());
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = tools::run(bin, &argv).await;
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success(),
                "{what}: {container}: trow refuses {argv:?}:\n{stderr}"
            );
        }
    }
}

/// Trow started as the Deployment starts it (its flags, its files) answers
/// the probes the kubelet sends, over HTTPS.
#[tokio::test]
async fn the_deployments_trow_answers_its_probes() {
    let docs = documents(&read(&install_dir().join("trow.yaml")));
    let (pod, trow) = trow_container(&docs, "install/trow.yaml");
    let sandbox = Sandbox::new(&docs, &pod, &trow);
    let mut args = sandbox.args(&trow);
    // Port 0, read back from the log: a port picked here could be taken by
    // another test's listener before Trow binds it.
    args.push("--bind=127.0.0.1:0".to_string());
    let log_path = sandbox.dir.path().join("trow.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut child = tokio::process::Command::new(trow_bin())
        .args(&args)
        .envs(sandbox.env(&trow))
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .expect("start trow");
    let client = secure::https_client(&sandbox.pki.ca_pem);
    // Up when its log names the port it got and /healthz answers there.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let port = loop {
        if let Some(addr) = logged_addr(&read(&log_path), SERVING) {
            let healthz = format!("https://localhost:{}/healthz", addr.port());
            if client.get(healthz).send().await.is_ok() {
                break addr.port();
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("trow exited ({status}) with {args:?}:\n{}", read(&log_path));
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "trow did not answer within 30 s:\n{}",
            read(&log_path)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let url = |path: &str| format!("https://localhost:{port}{path}");
    let status = |path: &str| {
        let request = client.get(url(path));
        async move {
            request
                .send()
                .await
                .expect("probe request")
                .status()
                .as_u16()
        }
    };
    assert_eq!(status("/v2/").await, 200, "{}", read(&log_path));
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let path = trow[probe]["httpGet"]["path"].as_str().expect("path");
        let code = status(path).await;
        assert_eq!(code, 200, "{probe} {path}:\n{}", read(&log_path));
    }
    child.kill().await.expect("stop trow");
}

/// `trow node-setup`, run with the DaemonSet's arguments against a stand-in
/// for the node's root, writes only inside the directories the DaemonSet
/// mounts writable (its root filesystem is read-only, and so is the rest of
/// the node it sees), and `--remove` takes back every file it wrote.
#[tokio::test]
async fn node_setup_writes_only_where_the_daemonset_mounts_writable() {
    let docs = documents(&read(&install_dir().join("trow.yaml")));
    let pod =
        &object(&docs, "DaemonSet", "copy-certs", "install/trow.yaml")["spec"]["template"]["spec"];
    let copy = named(&pod["containers"], "copy-certs").expect("copy-certs container");
    let writable: Vec<String> = array(&copy["volumeMounts"])
        .iter()
        .filter(|m| m["readOnly"] != true)
        .filter_map(|m| {
            m["mountPath"]
                .as_str()?
                .strip_prefix("/host")
                .map(String::from)
        })
        .collect();
    assert!(!writable.is_empty(), "copy-certs writes somewhere");

    let host = tempfile::tempdir().expect("temp dir");
    let pki = Pki::new();
    let ca = host.path().join("ca.crt");
    std::fs::write(&ca, &pki.ca_pem).expect("write CA");
    let host_root = host.path().join("node");
    // What the kubelet creates for DirectoryOrCreate hostPath volumes.
    for m in array(&copy["volumeMounts"]) {
        if let Some(p) = m["mountPath"]
            .as_str()
            .and_then(|p| p.strip_prefix("/host/"))
        {
            std::fs::create_dir_all(host_root.join(p)).expect("mount dir");
        }
    }
    let before = files_under(&host_root);
    let args: Vec<String> = str_list(&copy["args"])
        .into_iter()
        .filter(|a| *a != "--watch")
        .map(|a| match a {
            "/host" => host_root.to_str().expect("UTF-8").to_string(),
            "/ca/ca.crt" => ca.to_str().expect("UTF-8").to_string(),
            other => {
                assert!(
                    !other.starts_with('/'),
                    "a path this test cannot map: {other}"
                );
                other.to_string()
            }
        })
        .collect();
    let bin = trow_bin();
    let bin = bin.to_str().expect("UTF-8 path");
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = tools::run(bin, &argv).await;
    assert!(
        out.status.success(),
        "trow {argv:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let written: Vec<PathBuf> = files_under(&host_root)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    assert!(
        written.iter().any(|f| f.ends_with("hosts.toml")),
        "node-setup wrote {written:?}"
    );
    for f in &written {
        let on_node = format!(
            "/{}",
            f.strip_prefix(&host_root).expect("under root").display()
        );
        assert!(
            writable.iter().any(|w| on_node.starts_with(&format!("{w}/"))),
            "node-setup wrote {on_node}, which copy-certs does not mount writable ({writable:?}): on a node it fails with a read-only file system"
        );
    }

    // The uninstall step of INSTALL.md.
    let out = tools::run(
        bin,
        &[
            "node-setup",
            "--host-root",
            host_root.to_str().expect("UTF-8"),
            "--remove",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "--remove:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let left: Vec<PathBuf> = files_under(&host_root)
        .into_iter()
        .filter(|f| !before.contains(f))
        .collect();
    assert!(left.is_empty(), "--remove left {left:?}");
}

/// Every file (not directory) under `root`.
fn files_under(root: &Path) -> Vec<PathBuf> {
    common::file_tree(root)
        .into_keys()
        .filter(|k| !k.ends_with('/'))
        .map(|k| root.join(k))
        .collect()
}
