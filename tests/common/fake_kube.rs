//! A scripted fake Kubernetes API server for `trow init`: the calls it
//! makes (get, create and replace of Secrets and ConfigMaps; get and
//! replace of the cluster-scoped Validating/MutatingWebhookConfigurations
//! of `admissionregistration.k8s.io/v1`, stored with namespace ""), with the
//! real API's JSON (objects and `Status` errors serialised from
//! `k8s-openapi` types), `resourceVersion` checks, 409 `AlreadyExists` on
//! a create of an existing name and 409 `Conflict` on a stale replace.
//! Creates are serialised by one lock, as etcd does. Scripts: refuse every
//! request with a status, or hold the first N Secret reads until all N
//! arrived (two pods reading "no CA yet" at the same moment).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Status, StatusDetails};
use parking_lot::Mutex;

/// (resource, namespace, name), e.g. ("secrets", "kube-public", "trow-ca").
type Key = (String, String, String);

#[derive(Default)]
struct Inner {
    objects: BTreeMap<Key, serde_json::Value>,
    resource_version: u64,
    /// `METHOD resource/name STATUS` for every request.
    log: Vec<String>,
    /// Answer every request with this status and reason.
    refuse: Option<(u16, String)>,
    /// Secret reads still to hold at the barrier.
    held_reads: usize,
}

#[derive(Clone)]
struct Shared {
    inner: Arc<Mutex<Inner>>,
    barrier: Arc<tokio::sync::Barrier>,
}

/// The fake API server, on a loopback port, with a kubeconfig for it.
pub struct FakeKube {
    shared: Shared,
    pub addr: SocketAddr,
    pub kubeconfig: PathBuf,
    _dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

fn status(code: u16, reason: &str, message: String, resource: &str, name: &str) -> Response {
    let body = Status {
        code: Some(code.into()),
        message: Some(message),
        reason: Some(reason.to_string()),
        status: Some("Failure".into()),
        details: Some(StatusDetails {
            kind: Some(resource.to_string()),
            name: Some(name.to_string()),
            ..Default::default()
        }),
        ..Default::default()
    };
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, axum::Json(body)).into_response()
}

impl FakeKube {
    /// Starts the server. `hold_secret_reads`: how many Secret reads wait
    /// for each other before any is answered (0: none).
    pub async fn start(hold_secret_reads: usize) -> FakeKube {
        let shared = Shared {
            inner: Arc::new(Mutex::new(Inner {
                held_reads: hold_secret_reads,
                ..Default::default()
            })),
            barrier: Arc::new(tokio::sync::Barrier::new(hold_secret_reads.max(1))),
        };
        let app = Router::new()
            .route(
                "/api/v1/namespaces/{ns}/{resource}/{name}",
                get(read).put(replace),
            )
            .route("/api/v1/namespaces/{ns}/{resource}", post(create))
            .route(
                "/apis/admissionregistration.k8s.io/v1/{resource}/{name}",
                get(read_cluster).put(replace_cluster),
            )
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user:\n    token: fake-token\n"
            ),
        )
        .expect("write kubeconfig");
        FakeKube {
            shared,
            addr,
            kubeconfig,
            _dir: dir,
            task,
        }
    }

    /// Answers every request with `code` and `reason` from now on
    /// (`None`: serve again).
    pub fn refuse(&self, what: Option<(u16, &str)>) {
        self.shared.inner.lock().refuse = what.map(|(c, r)| (c, r.to_string()));
    }

    /// The requests so far: `METHOD resource/name STATUS`.
    pub fn log(&self) -> Vec<String> {
        self.shared.inner.lock().log.clone()
    }

    /// How many requests of the log contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.log().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn get<K: serde::de::DeserializeOwned>(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
    ) -> Option<K> {
        let inner = self.shared.inner.lock();
        let v = inner
            .objects
            .get(&(resource.into(), ns.into(), name.into()))?;
        Some(serde_json::from_value(v.clone()).expect("stored object"))
    }

    /// Stores (or replaces) an object as if someone had applied it.
    pub fn put<K: serde::Serialize>(&self, resource: &str, ns: &str, name: &str, obj: &K) {
        let mut inner = self.shared.inner.lock();
        inner.resource_version += 1;
        let mut v = serde_json::to_value(obj).expect("object JSON");
        v["metadata"]["name"] = name.into();
        if !ns.is_empty() {
            v["metadata"]["namespace"] = ns.into();
        }
        v["metadata"]["resourceVersion"] = inner.resource_version.to_string().into();
        inner
            .objects
            .insert((resource.into(), ns.into(), name.into()), v);
    }

    /// The Secret's data field `key`, decoded.
    pub fn secret_data(&self, ns: &str, name: &str, key: &str) -> Option<Vec<u8>> {
        let s: k8s_openapi::api::core::v1::Secret = self.get("secrets", ns, name)?;
        s.data?.get(key).map(|b| b.0.clone())
    }

    /// The ConfigMap's data field `key`.
    pub fn configmap_data(&self, ns: &str, name: &str, key: &str) -> Option<String> {
        let c: k8s_openapi::api::core::v1::ConfigMap = self.get("configmaps", ns, name)?;
        c.data?.get(key).cloned()
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn refused(s: &Shared, method: &str, resource: &str, name: &str) -> Option<Response> {
    let mut inner = s.inner.lock();
    let (code, reason) = inner.refuse.clone()?;
    inner.log.push(format!("{method} {resource}/{name} {code}"));
    Some(status(
        code,
        &reason,
        format!(
            "{} \"{name}\" is forbidden: scripted refusal ({reason})",
            resource
        ),
        resource,
        name,
    ))
}

async fn read(
    State(s): State<Shared>,
    UrlPath((ns, resource, name)): UrlPath<(String, String, String)>,
) -> Response {
    if let Some(r) = refused(&s, "GET", &resource, &name) {
        return r;
    }
    let hold = resource == "secrets" && {
        let mut inner = s.inner.lock();
        if inner.held_reads > 0 {
            inner.held_reads -= 1;
            true
        } else {
            false
        }
    };
    if hold {
        let _ = tokio::time::timeout(Duration::from_secs(20), s.barrier.wait()).await;
    }
    let mut inner = s.inner.lock();
    match inner
        .objects
        .get(&(resource.clone(), ns, name.clone()))
        .cloned()
    {
        Some(v) => {
            inner.log.push(format!("GET {resource}/{name} 200"));
            (StatusCode::OK, axum::Json(v)).into_response()
        }
        None => {
            inner.log.push(format!("GET {resource}/{name} 404"));
            status(
                404,
                "NotFound",
                format!("{resource} \"{name}\" not found"),
                &resource,
                &name,
            )
        }
    }
}

async fn create(
    State(s): State<Shared>,
    UrlPath((ns, resource)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return status(400, "BadRequest", "not JSON".into(), &resource, "");
    };
    let name = v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    if let Some(r) = refused(&s, "POST", &resource, &name) {
        return r;
    }
    let mut inner = s.inner.lock();
    let key = (resource.clone(), ns.clone(), name.clone());
    if inner.objects.contains_key(&key) {
        inner.log.push(format!("POST {resource}/{name} 409"));
        return status(
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
            &resource,
            &name,
        );
    }
    inner.resource_version += 1;
    v["metadata"]["namespace"] = ns.into();
    v["metadata"]["resourceVersion"] = inner.resource_version.to_string().into();
    v["metadata"]["uid"] = format!("uid-{}", inner.resource_version).into();
    v["apiVersion"] = "v1".into();
    v["kind"] = match resource.as_str() {
        "secrets" => "Secret",
        _ => "ConfigMap",
    }
    .into();
    inner.objects.insert(key, v.clone());
    inner.log.push(format!("POST {resource}/{name} 201"));
    (StatusCode::CREATED, axum::Json(v)).into_response()
}

async fn replace(
    State(s): State<Shared>,
    UrlPath((ns, resource, name)): UrlPath<(String, String, String)>,
    body: Bytes,
) -> Response {
    if let Some(r) = refused(&s, "PUT", &resource, &name) {
        return r;
    }
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return status(400, "BadRequest", "not JSON".into(), &resource, &name);
    };
    let mut inner = s.inner.lock();
    let key = (resource.clone(), ns, name.clone());
    let Some(current) = inner.objects.get(&key) else {
        inner.log.push(format!("PUT {resource}/{name} 404"));
        return status(
            404,
            "NotFound",
            format!("{resource} \"{name}\" not found"),
            &resource,
            &name,
        );
    };
    if current["metadata"]["resourceVersion"] != v["metadata"]["resourceVersion"] {
        inner.log.push(format!("PUT {resource}/{name} 409"));
        return status(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
            &resource,
            &name,
        );
    }
    inner.resource_version += 1;
    v["metadata"]["resourceVersion"] = inner.resource_version.to_string().into();
    inner.objects.insert(key, v.clone());
    inner.log.push(format!("PUT {resource}/{name} 200"));
    (StatusCode::OK, axum::Json(v)).into_response()
}

/// A cluster-scoped object: stored under namespace "".
async fn read_cluster(
    s: State<Shared>,
    UrlPath((resource, name)): UrlPath<(String, String)>,
) -> Response {
    read(s, UrlPath((String::new(), resource, name))).await
}

async fn replace_cluster(
    s: State<Shared>,
    UrlPath((resource, name)): UrlPath<(String, String)>,
    body: Bytes,
) -> Response {
    replace(s, UrlPath((String::new(), resource, name)), body).await
}

/// Runs `trow init` (or any `trow` subcommand) with `args`, bounded in
/// time; returns its output.
pub async fn run_trow(args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(super::trow_bin());
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("trow finished within 90 s")
        .expect("run trow")
}

/// `trow init` against `kube` writing into `cert_dir`, with extra flags.
pub async fn trow_init(kube: &FakeKube, cert_dir: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "init",
        "--kubeconfig",
        kube.kubeconfig.to_str().expect("UTF-8 path"),
        "--cert-dir",
        cert_dir.to_str().expect("UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    run_trow(&args).await
}

/// The output's stderr (the log), as text.
pub fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}
