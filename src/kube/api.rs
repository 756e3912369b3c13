//! The few Kubernetes API calls `trow init` makes, on Secrets and
//! ConfigMaps of one namespace: get, create (create-only: an existing
//! object is reported, never overwritten) and replace (with the
//! `resourceVersion` read, so a concurrent change is a conflict, not lost).
//!
//! Every call is bounded in time (connect 10 s, read and write 30 s) and
//! retried a few times with exponential backoff when the failure may pass
//! (the server unreachable, 5xx, 429); a refusal (403, 404 where an object
//! must exist, 422) is returned at once with the server's message.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ClusterResourceScope;
use kube::api::{Api, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Why a call to the API server failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot find the Kubernetes API server: {0} (in a pod, the service account token is mounted automatically unless automountServiceAccountToken is false; elsewhere set KUBECONFIG or --kubeconfig)")]
    Config(String),
    #[error("{what}: the API server answered {code} {reason}: {message}{hint}")]
    Refused {
        what: String,
        code: u16,
        reason: String,
        message: String,
        hint: &'static str,
    },
    #[error("{what}: cannot reach the API server at {server}: {message}")]
    Unreachable {
        what: String,
        server: String,
        message: String,
    },
}

impl ApiError {
    /// Whether trying again may help.
    fn transient(&self) -> bool {
        match self {
            ApiError::Unreachable { .. } => true,
            ApiError::Refused { code, .. } => *code >= 500 || *code == 429,
            ApiError::Config(_) => false,
        }
    }
}

/// The answer to a create-only call.
#[derive(Debug)]
pub enum Created<K> {
    Created(K),
    /// Someone else created it first (409 AlreadyExists).
    AlreadyExists,
}

/// The answer to a replace.
#[derive(Debug)]
pub enum Replaced<K> {
    Replaced(K),
    /// It changed since it was read (409 Conflict): read it again.
    Conflict,
}

/// A client for one namespace.
#[derive(Clone)]
pub struct Kube {
    client: kube::Client,
    namespace: String,
    server: String,
    retries: u32,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const READ_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY_WAIT: Duration = Duration::from_secs(8);

impl Kube {
    /// Connects with `kubeconfig` when given, else as `kubectl` would:
    /// `KUBECONFIG`, `~/.kube/config`, then the pod's service account.
    pub async fn connect(
        kubeconfig: Option<&Path>,
        namespace: &str,
        retries: u32,
    ) -> Result<Kube, ApiError> {
        // One crypto provider for rustls, whatever else is linked in.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (mut config, source) = match kubeconfig {
            Some(path) => {
                let kc = Kubeconfig::read_from(path)
                    .map_err(|e| ApiError::Config(format!("{}: {e}", path.display())))?;
                let c = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                    .await
                    .map_err(|e| ApiError::Config(format!("{}: {e}", path.display())))?;
                (c, format!("kubeconfig {}", path.display()))
            }
            None => {
                let c = kube::Config::infer()
                    .await
                    .map_err(|e| ApiError::Config(e.to_string()))?;
                (
                    c,
                    "the environment (KUBECONFIG or the service account)".into(),
                )
            }
        };
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(READ_WRITE_TIMEOUT);
        config.write_timeout = Some(READ_WRITE_TIMEOUT);
        // kube's own retry layer retries 429/503/504 up to 15 times with
        // waits growing to 1000 s: unbounded for an init container. The
        // bounded retries below take its place.
        config.default_retry = false;
        let server = config.cluster_url.to_string();
        let client = kube::Client::try_from(config)
            .map_err(|e| ApiError::Config(format!("{source}: {e}")))?;
        tracing::info!(%server, from = %source, %namespace, "using the Kubernetes API server");
        Ok(Kube {
            client,
            namespace: namespace.to_string(),
            server,
            retries,
        })
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    fn error(&self, what: &str, e: kube::Error) -> ApiError {
        match e {
            kube::Error::Api(status) => ApiError::Refused {
                what: what.to_string(),
                code: status.code,
                reason: status.reason.clone(),
                message: status.message.clone(),
                hint: match status.code {
                    401 => " (the service account token was not accepted)",
                    403 => " (RBAC: the service account needs get and create on Secrets, and get, create and update on ConfigMaps, in this namespace; with --webhook-configs, get and update on those webhook configurations, which a ClusterRole grants)",
                    _ => "",
                },
            },
            other => ApiError::Unreachable {
                what: what.to_string(),
                server: self.server.clone(),
                message: error_chain(&other),
            },
        }
    }

    /// Runs `call` until it succeeds, fails for good, or has been retried
    /// `self.retries` times.
    async fn retrying<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, ApiError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, kube::Error>>,
    {
        let mut wait = FIRST_RETRY;
        let mut attempt = 0;
        loop {
            match call().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let e = self.error(what, e);
                    if !e.transient() || attempt >= self.retries {
                        return Err(e);
                    }
                    attempt += 1;
                    tracing::warn!(error = %e, retry_in = ?wait, attempt, "Kubernetes API call failed; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(MAX_RETRY_WAIT);
                }
            }
        }
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn what(&self, kind: &str, verb: &str, name: &str) -> String {
        format!("{verb} {kind} {}/{name}", self.namespace)
    }

    pub async fn get_secret(&self, name: &str) -> Result<Option<Secret>, ApiError> {
        let api = self.secrets();
        self.retrying(&self.what("Secret", "get", name), || api.get_opt(name))
            .await
    }

    /// Creates `secret` unless one of its name exists.
    pub async fn create_secret(&self, secret: &Secret) -> Result<Created<Secret>, ApiError> {
        let api = self.secrets();
        let name = secret.metadata.name.clone().unwrap_or_default();
        let what = self.what("Secret", "create", &name);
        let pp = PostParams::default();
        created(self.retrying(&what, || api.create(&pp, secret)).await)
    }

    pub async fn get_configmap(&self, name: &str) -> Result<Option<ConfigMap>, ApiError> {
        let api = self.configmaps();
        self.retrying(&self.what("ConfigMap", "get", name), || api.get_opt(name))
            .await
    }

    pub async fn create_configmap(&self, cm: &ConfigMap) -> Result<Created<ConfigMap>, ApiError> {
        let api = self.configmaps();
        let name = cm.metadata.name.clone().unwrap_or_default();
        let what = self.what("ConfigMap", "create", &name);
        let pp = PostParams::default();
        created(self.retrying(&what, || api.create(&pp, cm)).await)
    }

    /// Replaces `cm`, which carries the `resourceVersion` it was read with.
    pub async fn replace_configmap(&self, cm: &ConfigMap) -> Result<Replaced<ConfigMap>, ApiError> {
        let api = self.configmaps();
        let name = cm.metadata.name.clone().unwrap_or_default();
        let what = self.what("ConfigMap", "update", &name);
        let pp = PostParams::default();
        match self.retrying(&what, || api.replace(&name, &pp, cm)).await {
            Ok(v) => Ok(Replaced::Replaced(v)),
            Err(ApiError::Refused { code: 409, .. }) => Ok(Replaced::Conflict),
            Err(e) => Err(e),
        }
    }
}

impl Kube {
    /// A cluster-scoped object (a webhook configuration) by name.
    pub async fn get_cluster<K>(&self, kind: &str, name: &str) -> Result<Option<K>, ApiError>
    where
        K: kube::Resource<Scope = ClusterResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::all(self.client.clone());
        self.retrying(&format!("get {kind} {name}"), || api.get_opt(name))
            .await
    }

    /// Replaces a cluster-scoped object, which carries the
    /// `resourceVersion` it was read with.
    pub async fn replace_cluster<K>(
        &self,
        kind: &str,
        name: &str,
        obj: &K,
    ) -> Result<Replaced<K>, ApiError>
    where
        K: kube::Resource<Scope = ClusterResourceScope>
            + Clone
            + serde::Serialize
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        let api: Api<K> = Api::all(self.client.clone());
        let pp = PostParams::default();
        match self
            .retrying(&format!("update {kind} {name}"), || {
                api.replace(name, &pp, obj)
            })
            .await
        {
            Ok(v) => Ok(Replaced::Replaced(v)),
            Err(ApiError::Refused { code: 409, .. }) => Ok(Replaced::Conflict),
            Err(e) => Err(e),
        }
    }
}

fn created<K>(r: Result<K, ApiError>) -> Result<Created<K>, ApiError> {
    match r {
        Ok(v) => Ok(Created::Created(v)),
        Err(ApiError::Refused { code: 409, .. }) => Ok(Created::AlreadyExists),
        Err(e) => Err(e),
    }
}

/// An error with its causes, `a: b: c`, for messages that say why.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !out.contains(&s_text) {
            out.push_str(": ");
            out.push_str(&s_text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_final_and_outages_are_retried() {
        let refused = |code| ApiError::Refused {
            what: "get Secret a/b".into(),
            code,
            reason: "x".into(),
            message: "m".into(),
            hint: "",
        };
        assert!(!refused(403).transient());
        assert!(!refused(404).transient());
        assert!(refused(500).transient());
        assert!(refused(429).transient());
        assert!(ApiError::Unreachable {
            what: "w".into(),
            server: "s".into(),
            message: "m".into()
        }
        .transient());
        assert!(!ApiError::Config("none".into()).transient());
    }
}
