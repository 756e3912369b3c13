//! The admission webhooks (`POST /validate-image`, `POST /mutate-image`)
//! called as the Kubernetes API server calls them: HTTPS with the CA of
//! the install, `Content-Type: application/json`, AdmissionReviews
//! `admission.k8s.io/v1` built from k8s-openapi objects and kube's
//! admission types. The answer must be an AdmissionReview with the same
//! `uid`; patches are applied with json-patch and the result checked.

mod common;

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, ReplicaSet, ReplicaSetSpec, StatefulSet,
    StatefulSetSpec,
};
use k8s_openapi::api::batch::v1::{CronJob, CronJobSpec, Job, JobSpec, JobTemplateSpec};
use k8s_openapi::api::core::v1::{
    Container, EphemeralContainer, Pod, PodSpec, PodTemplateSpec, ReplicationController,
    ReplicationControllerSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use kube::core::{DynamicObject, GroupVersionKind, GroupVersionResource, TypeMeta};
use serde_json::Value;

use common::secure::{https_client, Pki};
use common::Trow;

const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Trow over TLS with a configuration file, and a client that trusts only
/// its CA, like the API server with the webhook's `caBundle`.
struct Webhooks {
    trow: Trow,
    client: reqwest::Client,
    pki: Pki,
    _config: tempfile::TempDir,
}

impl Webhooks {
    fn start(yaml: &str) -> Webhooks {
        Self::start_with(yaml, &[])
    }

    fn start_with(yaml: &str, extra: &[&str]) -> Webhooks {
        let pki = Pki::new();
        let config = tempfile::tempdir().unwrap();
        let (_, tls) = pki.write_cert(1, &config.path().join("certs"));
        let path = common::write_config(config.path(), yaml);
        let mut args = vec![
            tls.as_str(),
            "--config-file",
            path.to_str().unwrap(),
            "--hostname",
            "trow.kube-public:31000",
        ];
        args.extend_from_slice(extra);
        let trow = Trow::start_with(&args);
        Webhooks {
            client: https_client(&pki.ca_pem),
            trow,
            pki,
            _config: config,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.trow.port)
    }

    /// POSTs `body` as the API server does; returns status and body.
    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(self.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("webhook request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Sends `review` and checks the answer is an AdmissionReview v1 with
    /// the same uid; returns its `response`.
    async fn review(&self, path: &str, review: &AdmissionReview<DynamicObject>) -> Value {
        let uid = review.request.as_ref().unwrap().uid.clone();
        let (status, body) = self
            .post_raw(path, serde_json::to_vec(review).unwrap())
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1", "{body}");
        assert_eq!(body["kind"], "AdmissionReview", "{body}");
        assert_eq!(body["response"]["uid"], uid.as_str(), "{body}");
        body["response"].clone()
    }
}

fn container(name: &str, image: &str) -> Container {
    Container {
        name: name.into(),
        image: Some(image.into()),
        ..Default::default()
    }
}

fn pod_spec(images: &[&str]) -> PodSpec {
    PodSpec {
        containers: images
            .iter()
            .enumerate()
            .map(|(i, im)| container(&format!("c{i}"), im))
            .collect(),
        ..Default::default()
    }
}

fn meta(name: &str, ns: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(ns.into()),
        ..Default::default()
    }
}

fn template(images: &[&str]) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(BTreeMap::from([("app".to_string(), "x".to_string())])),
            ..Default::default()
        }),
        spec: Some(pod_spec(images)),
    }
}

fn selector() -> LabelSelector {
    LabelSelector {
        match_labels: Some(BTreeMap::from([("app".to_string(), "x".to_string())])),
        ..Default::default()
    }
}

/// A workload of every kind with `images`: (group, version, kind,
/// resource, object).
fn workloads(ns: &str, images: &[&str]) -> Vec<(&'static str, &'static str, Value)> {
    let v = |o: &dyn erased::Ser| o.json();
    vec![
        (
            "",
            "Pod",
            v(&Pod {
                metadata: meta("p", ns),
                spec: Some(pod_spec(images)),
                ..Default::default()
            }),
        ),
        (
            "apps",
            "Deployment",
            v(&Deployment {
                metadata: meta("d", ns),
                spec: Some(DeploymentSpec {
                    selector: selector(),
                    template: template(images),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "apps",
            "StatefulSet",
            v(&StatefulSet {
                metadata: meta("s", ns),
                spec: Some(StatefulSetSpec {
                    selector: selector(),
                    template: template(images),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "apps",
            "DaemonSet",
            v(&DaemonSet {
                metadata: meta("ds", ns),
                spec: Some(DaemonSetSpec {
                    selector: selector(),
                    template: template(images),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "apps",
            "ReplicaSet",
            v(&ReplicaSet {
                metadata: meta("rs", ns),
                spec: Some(ReplicaSetSpec {
                    selector: selector(),
                    template: Some(template(images)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "",
            "ReplicationController",
            v(&ReplicationController {
                metadata: meta("rc", ns),
                spec: Some(ReplicationControllerSpec {
                    template: Some(template(images)),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "batch",
            "Job",
            v(&Job {
                metadata: meta("j", ns),
                spec: Some(JobSpec {
                    template: template(images),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
        (
            "batch",
            "CronJob",
            v(&CronJob {
                metadata: meta("cj", ns),
                spec: Some(CronJobSpec {
                    schedule: "* * * * *".into(),
                    job_template: JobTemplateSpec {
                        metadata: None,
                        spec: Some(JobSpec {
                            template: template(images),
                            ..Default::default()
                        }),
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }),
        ),
    ]
}

/// Serialising any k8s-openapi object to JSON, behind one trait object.
mod erased {
    pub trait Ser {
        fn json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> serde_json::Value {
            serde_json::to_value(self).expect("object JSON")
        }
    }
}

/// The plural resource of a kind.
fn resource(kind: &str) -> String {
    format!("{}s", kind.to_ascii_lowercase())
}

static NEXT_UID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// An AdmissionReview for `object` of `group`/`kind` in `ns`, as the API
/// server sends it.
fn review_of(
    group: &str,
    kind: &str,
    ns: &str,
    object: Value,
    operation: Operation,
    sub_resource: Option<&str>,
) -> AdmissionReview<DynamicObject> {
    let version = "v1";
    let object: DynamicObject = serde_json::from_value(object).expect("a Kubernetes object");
    let uid = format!(
        "705ab4f5-6393-11e8-b7cc-{:012}",
        NEXT_UID.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let request = AdmissionRequest {
        types: TypeMeta::default(),
        uid,
        kind: GroupVersionKind::gvk(group, version, kind),
        resource: GroupVersionResource::gvr(group, version, &resource(kind)),
        sub_resource: sub_resource.map(str::to_string),
        request_kind: None,
        request_resource: None,
        request_sub_resource: None,
        name: object.metadata.name.clone().unwrap_or_default(),
        namespace: Some(ns.to_string()),
        operation: operation.clone(),
        user_info: Default::default(),
        old_object: (operation == Operation::Update).then(|| object.clone()),
        object: Some(object),
        dry_run: false,
        options: None,
    };
    AdmissionReview {
        types: TypeMeta {
            api_version: "admission.k8s.io/v1".into(),
            kind: "AdmissionReview".into(),
        },
        request: Some(request),
        response: None,
    }
}

fn create(group: &str, kind: &str, ns: &str, object: Value) -> AdmissionReview<DynamicObject> {
    review_of(group, kind, ns, object, Operation::Create, None)
}

fn message(response: &Value) -> String {
    response["status"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

const POLICY: &str = "registry_proxies:\n  registries:\n    - host: docker.io\n    - host: quay.io\n      alias: quay\nimage_validation:\n  default: Deny\n  allow:\n    - docker.io/\n    - trow.kube-public:31000/\n    - quay.io/good/\n  deny:\n    - docker.io/library/nginx\n  namespaces:\n    dev:\n      allow: [docker.io/library/nginx:1.27]\n  exempt_namespaces: [ops]\n";

#[tokio::test]
async fn every_workload_kind_is_checked() {
    let w = Webhooks::start(POLICY);
    for (group, kind, obj) in
        workloads("default", &["redis:7", "trow.kube-public:31000/team/app:1"])
    {
        let r = w
            .review("/validate-image", &create(group, kind, "default", obj))
            .await;
        assert_eq!(r["allowed"], true, "{kind}: {r}");
    }
    for (group, kind, obj) in workloads("default", &["redis:7", "ghcr.io/x/y:1"]) {
        let r = w
            .review("/validate-image", &create(group, kind, "default", obj))
            .await;
        assert_eq!(r["allowed"], false, "{kind}: {r}");
        assert_eq!(r["status"]["code"], 403, "{kind}: {r}");
        let m = message(&r);
        assert!(
            m.contains("container \"c1\" image \"ghcr.io/x/y:1\" is refused by image_validation.default Deny"),
            "{kind}: {m}"
        );
        assert!(!m.contains("redis"), "{kind}: {m}");
    }
    // Kinds that run no pods, and deletes, pass.
    let cm = serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "default"}});
    let r = w
        .review("/validate-image", &create("", "ConfigMap", "default", cm))
        .await;
    assert_eq!(r["allowed"], true, "{r}");
    // Every decision on a workload is logged at info.
    let log = w.trow.log();
    assert!(log.contains("image policy"), "{log}");
    assert!(log.contains("verdict=\"denied\""), "{log}");
    assert!(log.contains("kind=\"CronJob\""), "{log}");
    assert!(log.contains("namespace=\"default\""), "{log}");
}

#[tokio::test]
async fn spellings_and_trow_paths_do_not_dodge_a_rule() {
    let w = Webhooks::start(POLICY);
    for image in [
        "nginx".to_string(),
        "nginx:1.25".into(),
        "docker.io/nginx".into(),
        "index.docker.io/library/nginx:latest".into(),
        "registry-1.docker.io/library/nginx".into(),
        "DOCKER.IO/library/nginx:1".into(),
        format!("nginx@{D}"),
        format!("docker.io/library/nginx:1.25@{D}"),
        "trow.kube-public:31000/f/docker.io/library/nginx:1".into(),
        "trow.kube-public:443/f/docker.io/nginx:1".into(),
        "localhost:31000/f/docker.io/library/nginx:1".into(),
    ] {
        let pod = Pod {
            metadata: meta("p", "default"),
            spec: Some(pod_spec(&[&image])),
            ..Default::default()
        };
        let r = w
            .review(
                "/validate-image",
                &create("", "Pod", "default", serde_json::to_value(&pod).unwrap()),
            )
            .await;
        if image.starts_with("localhost") {
            // localhost is not one of Trow's names (only --hostname and the
            // certificate's other names are): judged as its own registry,
            // which no rule allows.
            assert_eq!(r["allowed"], false, "{image}: {r}");
            continue;
        }
        assert_eq!(r["allowed"], false, "{image}: {r}");
        let m = message(&r);
        assert!(
            m.contains("image_validation.deny \"docker.io/library/nginx\""),
            "{image}: {m}"
        );
        assert!(m.contains("docker.io/library/nginx"), "{image}: {m}");
    }
    // Not a prefix match on a longer name; cache paths of allowed images pass.
    for image in [
        "nginx-exporter:1",
        "trow.kube-public:31000/f/docker.io/library/redis:7",
        "trow.kube-public:31000/f/quay/good/app:1",
    ] {
        let pod = Pod {
            metadata: meta("p", "default"),
            spec: Some(pod_spec(&[image])),
            ..Default::default()
        };
        let r = w
            .review(
                "/validate-image",
                &create("", "Pod", "default", serde_json::to_value(&pod).unwrap()),
            )
            .await;
        assert_eq!(r["allowed"], true, "{image}: {r}");
    }
    // Namespace exceptions: dev may run nginx:1.27 (only that tag), ops
    // anything.
    let for_ns = |ns: &str, image: &str| {
        let pod = Pod {
            metadata: meta("p", ns),
            spec: Some(pod_spec(&[image])),
            ..Default::default()
        };
        create("", "Pod", ns, serde_json::to_value(&pod).unwrap())
    };
    let r = w
        .review("/validate-image", &for_ns("dev", "nginx:1.27"))
        .await;
    assert_eq!(r["allowed"], true, "{r}");
    let r = w
        .review("/validate-image", &for_ns("dev", "nginx:1.25"))
        .await;
    assert_eq!(r["allowed"], false, "{r}");
    let r = w
        .review("/validate-image", &for_ns("ops", "ghcr.io/anything:1"))
        .await;
    assert_eq!(r["allowed"], true, "{r}");
}

#[tokio::test]
async fn a_denial_names_every_refused_image_its_container_and_rule() {
    let w = Webhooks::start(POLICY);
    let mut spec = pod_spec(&["redis:7", "nginx:1.25"]);
    spec.init_containers = Some(vec![container("setup", "ghcr.io/tools/setup:2")]);
    spec.containers.push(container("bad", "Not A Valid Ref"));
    let pod = Pod {
        metadata: meta("web", "default"),
        spec: Some(spec),
        ..Default::default()
    };
    let r = w
        .review(
            "/validate-image",
            &create("", "Pod", "default", serde_json::to_value(&pod).unwrap()),
        )
        .await;
    assert_eq!(r["allowed"], false, "{r}");
    let m = message(&r);
    for part in [
        "init container \"setup\" image \"ghcr.io/tools/setup:2\" is refused by image_validation.default Deny",
        "container \"c1\" image \"nginx:1.25\" (as docker.io/library/nginx:1.25) is refused by image_validation.deny \"docker.io/library/nginx\"",
        "container \"bad\" image \"Not A Valid Ref\" is refused by the image check",
    ] {
        assert!(m.contains(part), "missing `{part}` in: {m}");
    }
    assert!(!m.contains("redis"), "{m}");
}

#[tokio::test]
async fn ephemeral_containers_are_checked_also_through_their_subresource() {
    let w = Webhooks::start(POLICY);
    let mut spec = pod_spec(&["redis:7"]);
    spec.ephemeral_containers = Some(vec![EphemeralContainer {
        name: "debugger".into(),
        image: Some("ghcr.io/evil/shell:1".into()),
        ..Default::default()
    }]);
    let pod = Pod {
        metadata: meta("p", "default"),
        spec: Some(spec),
        ..Default::default()
    };
    let obj = serde_json::to_value(&pod).unwrap();
    // `kubectl debug`: an UPDATE of the pods/ephemeralcontainers subresource.
    let mut review = review_of(
        "",
        "Pod",
        "default",
        obj.clone(),
        Operation::Update,
        Some("ephemeralcontainers"),
    );
    let r = w.review("/validate-image", &review).await;
    assert_eq!(r["allowed"], false, "{r}");
    assert!(
        message(&r).contains("ephemeral container \"debugger\" image \"ghcr.io/evil/shell:1\""),
        "{r}"
    );
    // An allowed debugging image passes.
    let mut allowed = obj;
    allowed["spec"]["ephemeralContainers"][0]["image"] = "busybox:1".into();
    review.request.as_mut().unwrap().object = Some(serde_json::from_value(allowed).unwrap());
    let r = w.review("/validate-image", &review).await;
    assert_eq!(r["allowed"], true, "{r}");
}

const MUTATION: &str = "registry_proxies:\n  registries:\n    - host: docker.io\n    - host: quay.io\n      alias: quay\n    - host: ghcr.io\nimage_mutation:\n  upstreams: [docker.io, quay.io]\n  exempt_namespaces: [kube-system]\n";

/// The JSONPatch of a mutating answer, decoded.
fn patch_of(response: &Value) -> Option<json_patch::Patch> {
    let b64 = response["patch"].as_str()?;
    assert_eq!(response["patchType"], "JSONPatch", "{response}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("the patch is base64");
    Some(serde_json::from_slice(&bytes).expect("the patch is a JSON Patch"))
}

#[tokio::test]
async fn the_mutating_webhook_rewrites_upstream_images_to_the_cache() {
    let w = Webhooks::start(MUTATION);
    let images = [
        "nginx:1.27".to_string(),
        format!("quay.io/org/app:v2@{D}"),
        "ghcr.io/not/rewritten:1".into(),
        "trow.kube-public:31000/team/app:1".into(),
        "trow.kube-public:31000/f/docker.io/library/redis:7".into(),
    ];
    let refs: Vec<&str> = images.iter().map(String::as_str).collect();
    for (group, kind, obj) in workloads("default", &refs) {
        let r = w
            .review(
                "/mutate-image",
                &create(group, kind, "default", obj.clone()),
            )
            .await;
        assert_eq!(r["allowed"], true, "{kind}: {r}");
        let patch = patch_of(&r).unwrap_or_else(|| panic!("{kind}: no patch: {r}"));
        let mut patched = obj.clone();
        json_patch::patch(&mut patched, &patch).expect("the patch applies");
        let spec = workload_spec(&patched, kind);
        let got: Vec<&str> = spec["containers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["image"].as_str().unwrap())
            .collect();
        assert_eq!(
            got,
            [
                "trow.kube-public:31000/f/docker.io/library/nginx:1.27",
                &format!("trow.kube-public:31000/f/quay/org/app:v2@{D}"),
                "ghcr.io/not/rewritten:1",
                "trow.kube-public:31000/team/app:1",
                "trow.kube-public:31000/f/docker.io/library/redis:7",
            ],
            "{kind}"
        );
        // Nothing else changed.
        let mut expected = obj.clone();
        for (i, image) in got.iter().enumerate() {
            let p = format!("{}/containers/{i}/image", spec_pointer(kind));
            *expected.pointer_mut(&p).unwrap() = (*image).into();
        }
        assert_eq!(patched, expected, "{kind}");
        // Idempotent: the patched object needs no patch.
        let again = w
            .review("/mutate-image", &create(group, kind, "default", patched))
            .await;
        assert_eq!(again["allowed"], true);
        assert!(patch_of(&again).is_none(), "{kind}: {again}");
    }
    // Excluded namespaces are left alone.
    let pod = Pod {
        metadata: meta("p", "kube-system"),
        spec: Some(pod_spec(&["nginx:1"])),
        ..Default::default()
    };
    let r = w
        .review(
            "/mutate-image",
            &create(
                "",
                "Pod",
                "kube-system",
                serde_json::to_value(&pod).unwrap(),
            ),
        )
        .await;
    assert_eq!(r["allowed"], true);
    assert!(patch_of(&r).is_none(), "{r}");
    let log = w.trow.log();
    assert!(log.contains("image rewrite"), "{log}");
}

#[tokio::test]
async fn mutation_is_off_unless_configured() {
    let w = Webhooks::start(POLICY);
    let pod = Pod {
        metadata: meta("p", "default"),
        spec: Some(pod_spec(&["nginx:1"])),
        ..Default::default()
    };
    let r = w
        .review(
            "/mutate-image",
            &create("", "Pod", "default", serde_json::to_value(&pod).unwrap()),
        )
        .await;
    assert_eq!(r["allowed"], true, "{r}");
    assert!(patch_of(&r).is_none(), "{r}");
}

fn spec_pointer(kind: &str) -> &'static str {
    match kind {
        "Pod" => "/spec",
        "CronJob" => "/spec/jobTemplate/spec/template/spec",
        _ => "/spec/template/spec",
    }
}

fn workload_spec<'a>(obj: &'a Value, kind: &str) -> &'a Value {
    obj.pointer(spec_pointer(kind)).expect("pod spec")
}

#[tokio::test]
async fn malformed_reviews_are_400_with_a_clear_message() {
    let w = Webhooks::start(POLICY);
    let pod = Pod {
        metadata: meta("p", "default"),
        spec: Some(pod_spec(&["redis"])),
        ..Default::default()
    };
    let good = serde_json::to_value(create(
        "",
        "Pod",
        "default",
        serde_json::to_value(&pod).unwrap(),
    ))
    .unwrap();
    let mut v1beta1 = good.clone();
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let mut no_request = good.clone();
    no_request.as_object_mut().unwrap().remove("request");
    let mut no_uid = good.clone();
    no_uid["request"]["uid"] = "".into();
    let mut bad_op = good.clone();
    bad_op["request"]["operation"] = "EXPLODE".into();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json".to_vec(), "not an AdmissionReview"),
        (b"".to_vec(), "not an AdmissionReview"),
        (b"[]".to_vec(), "not an AdmissionReview"),
        (
            serde_json::to_vec(&v1beta1).unwrap(),
            "admission.k8s.io/v1beta1",
        ),
        (serde_json::to_vec(&no_request).unwrap(), "no `request`"),
        (serde_json::to_vec(&no_uid).unwrap(), "uid"),
        (serde_json::to_vec(&bad_op).unwrap(), "EXPLODE"),
        (vec![b'['; 100_000], "not an AdmissionReview"),
    ];
    for path in ["/validate-image", "/mutate-image"] {
        for (body, needle) in &cases {
            let (status, answer) = w.post_raw(path, body.clone()).await;
            assert_eq!(status, 400, "{path} {needle}: {answer}");
            let m = answer["errors"][0]["message"].as_str().unwrap_or_default();
            assert!(m.contains(needle), "{path}: `{needle}` not in {m}");
        }
    }
    // Another media type.
    let r = w
        .client
        .post(w.url("/validate-image"))
        .header("content-type", "application/yaml")
        .body(serde_json::to_vec(&good).unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 415);
    // A review that parses but whose object is broken: an answer, refused.
    let mut broken = good.clone();
    broken["request"]["object"]["spec"]["containers"] = serde_json::json!("nope");
    let (status, answer) = w
        .post_raw("/validate-image", serde_json::to_vec(&broken).unwrap())
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"]["allowed"], false, "{answer}");
    assert_eq!(answer["response"]["uid"], good["request"]["uid"]);
    assert!(
        message(&answer["response"]).contains("/spec/containers is not a list"),
        "{answer}"
    );
    // The server is fine after all that.
    let (status, _) = w
        .post_raw("/validate-image", serde_json::to_vec(&good).unwrap())
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let w = Webhooks::start(POLICY);
    // With a Content-Length: refused before the body is read.
    let big = vec![b' '; 4 << 20];
    let (status, answer) = w.post_raw("/validate-image", big.clone()).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["errors"][0]["message"]
        .as_str()
        .unwrap_or("")
        .contains("larger than"));
    // Chunked, without a length: cut off at the limit.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..64).map(|_| Ok(vec![b' '; 64 << 10])).collect();
    let r = w
        .client
        .post(w.url("/mutate-image"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("chunked request");
    assert_eq!(r.status(), 413);
    // Just under the limit is read (and is then not an AdmissionReview).
    let (status, _) = w
        .post_raw("/validate-image", vec![b' '; (3 << 20) - 10])
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn decisions_are_counted_in_metrics() {
    let w = Webhooks::start(&format!("{POLICY}image_mutation: {{}}\n"));
    let pod = |image: &str| {
        let p = Pod {
            metadata: meta("p", "default"),
            spec: Some(pod_spec(&[image])),
            ..Default::default()
        };
        create("", "Pod", "default", serde_json::to_value(&p).unwrap())
    };
    w.review("/validate-image", &pod("redis")).await;
    w.review("/validate-image", &pod("ghcr.io/x:1")).await;
    w.review("/validate-image", &pod("ghcr.io/x:2")).await;
    w.review("/mutate-image", &pod("redis")).await;
    w.post_raw("/validate-image", b"{".to_vec()).await;
    let text = w
        .client
        .get(w.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "trow_admission_reviews_total{webhook=\"validate\",verdict=\"allowed\"} 1",
        "trow_admission_reviews_total{webhook=\"validate\",verdict=\"denied\"} 2",
        "trow_admission_reviews_total{webhook=\"validate\",verdict=\"invalid\"} 1",
        "trow_admission_reviews_total{webhook=\"mutate\",verdict=\"patched\"} 1",
        "trow_admission_reviews_total{webhook=\"mutate\",verdict=\"denied\"} 0",
        "trow_http_requests_total{method=\"POST\",route=\"admission\",status=\"200\"} 4",
        "trow_http_requests_total{method=\"POST\",route=\"admission\",status=\"400\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
}

/// The API server sends no registry credentials: with logins on, the
/// webhooks still answer (the registry itself still asks for a login).
#[tokio::test]
async fn the_webhooks_answer_without_registry_logins() {
    let w = Webhooks::start_with(
        POLICY,
        &["--user", "admin", "--password", "secret-password"],
    );
    let pod = Pod {
        metadata: meta("p", "default"),
        spec: Some(pod_spec(&["ghcr.io/x/y:1"])),
        ..Default::default()
    };
    let r = w
        .review(
            "/validate-image",
            &create("", "Pod", "default", serde_json::to_value(&pod).unwrap()),
        )
        .await;
    assert_eq!(r["allowed"], false, "{r}");
    let r = w
        .review(
            "/mutate-image",
            &create("", "Pod", "default", serde_json::to_value(&pod).unwrap()),
        )
        .await;
    assert_eq!(r["allowed"], true, "{r}");
    let v2 = w.client.get(w.url("/v2/")).send().await.unwrap();
    assert_eq!(v2.status(), 401);
}

/// Mistakes in the policy sections stop Trow at start-up, naming the field.
#[test]
fn bad_policy_configurations_are_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    for (yaml, needle) in [
        ("image_validation:\n  default: Maybe\n", "default"),
        (
            "image_validation:\n  allow: ['a b']\n",
            "image_validation.allow[0]",
        ),
        (
            "image_validation:\n  namespaces:\n    Bad_NS: {}\n",
            "Bad_NS",
        ),
        ("image_validation:\n  alow: []\n", "alow"),
        (
            "image_mutation:\n  upstreams: [quay.io]\n",
            "image_mutation.upstreams[0]",
        ),
        (
            "image_mutation:\n  registry: 'http://x/y'\n",
            "image_mutation.registry",
        ),
    ] {
        let path = common::write_config(dir.path(), yaml);
        let out = std::process::Command::new(common::trow_bin())
            .args(["--dry-run", "--config-file", path.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{yaml}: accepted");
        assert!(err.contains(needle), "{yaml}: `{needle}` not in {err}");
    }
    let path = common::write_config(dir.path(), POLICY);
    let out = std::process::Command::new(common::trow_bin())
        .args(["--dry-run", "--config-file", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// With a `signatures` policy, the webhooks admit an image it covers only
/// with a signature by one of its keys (signed here by the independent
/// signer, tests/cosign_sign.py), and the mutating webhook pins the image
/// to the digest that was verified, so the node runs exactly that.
#[tokio::test]
async fn signed_images_are_admitted_and_pinned_unsigned_ones_denied() {
    use common::cosign::{can_sign, keygen, sign};
    use common::oci::push_image;
    if !can_sign() {
        return;
    }
    let keys = tempfile::tempdir().unwrap();
    let (team_pub, team_key) = keygen(&keys.path().join("team")).await;
    let (_, other_key) = keygen(&keys.path().join("other")).await;
    let yaml = format!(
        "registry_proxies:\n  registries:\n    - host: docker.io\nimage_mutation:\n  upstreams: [docker.io]\nsignatures:\n  policies:\n    - images: ['trow.kube-public:31000/team/']\n      keys: ['{}']\n",
        team_pub.display()
    );
    let w = Webhooks::start(&yaml);
    let base = w.url("");
    let ca = w.pki.ca_path();
    let (_, signed) = push_image(&w.client, &base, "team/app", "v1", 1).await;
    sign(
        &base,
        "team/app",
        &signed,
        &team_key,
        "tag",
        None,
        Some(&ca),
    )
    .await;
    let (_, unsigned) = push_image(&w.client, &base, "team/app", "v2", 2).await;
    let (_, by_other) = push_image(&w.client, &base, "team/app", "v3", 3).await;
    sign(
        &base,
        "team/app",
        &by_other,
        &other_key,
        "referrer",
        None,
        Some(&ca),
    )
    .await;

    let pod = |images: &[&str]| {
        let pod = Pod {
            metadata: meta("p", "default"),
            spec: Some(pod_spec(images)),
            ..Default::default()
        };
        create("", "Pod", "default", serde_json::to_value(&pod).unwrap())
    };
    let v1 = "trow.kube-public:31000/team/app:v1";
    let v2 = "trow.kube-public:31000/team/app:v2";
    let v3 = "trow.kube-public:31000/team/app:v3";
    // An image no signature policy covers is left to the prefix rules.
    let r = w.review("/validate-image", &pod(&[v1, "busybox:1"])).await;
    assert_eq!(r["allowed"], true, "{r}");
    for (image, digest) in [(v2, &unsigned), (v3, &by_other)] {
        let r = w.review("/validate-image", &pod(&[v1, image])).await;
        assert_eq!(r["allowed"], false, "{image}: {r}");
        let m = message(&r);
        assert!(
            m.contains(image) && m.contains("c1") && m.contains("signature") && !m.contains(v1),
            "{image} ({digest}): {m}"
        );
    }

    // Mutation pins the signed image to what was verified.
    let review = pod(&[v1, "busybox:1"]);
    let object =
        serde_json::to_value(review.request.as_ref().unwrap().object.as_ref().unwrap()).unwrap();
    let r = w.review("/mutate-image", &review).await;
    assert_eq!(r["allowed"], true, "{r}");
    let patch = patch_of(&r).unwrap_or_else(|| panic!("no patch: {r}"));
    let mut patched = object.clone();
    json_patch::patch(&mut patched, &patch).expect("the patch applies");
    assert_eq!(
        patched["spec"]["containers"][0]["image"],
        format!("{v1}@{signed}")
    );
    assert_eq!(
        patched["spec"]["containers"][1]["image"],
        "trow.kube-public:31000/f/docker.io/library/busybox:1"
    );
    // The pinned pod passes validation and needs no further patch.
    let again = create("", "Pod", "default", patched);
    let r = w.review("/validate-image", &again).await;
    assert_eq!(r["allowed"], true, "{r}");
    let r = w.review("/mutate-image", &again).await;
    assert!(patch_of(&r).is_none(), "{r}");
}
