//! `trow init`: puts `tls.crt`, `tls.key` and `ca.crt` into `--cert-dir`
//! (the pod's certificate volume) for `trow --tls`, and publishes the CA
//! certificate in a ConfigMap for clients and nodes.
//!
//! Where the certificate comes from:
//!
//! - `--tls-secret NAME`: a `kubernetes.io/tls` Secret someone else keeps
//!   (cert-manager, the operator), used as it is; its `ca.crt`, if it has
//!   one, is the CA handed out.
//! - otherwise a CA of Trow's own, kept in the Secret `--ca-secret`. It is
//!   created only if it does not exist, by a create that fails when another
//!   pod's create came first (409), in which case that pod's CA is read and
//!   used: however many pods start together, and however often they
//!   restart, they all use one CA. Each run signs a new serving
//!   certificate with it, locally (the serving key never leaves the pod).
//!
//! With `--watch` it keeps running beside Trow: it signs a new serving
//! certificate at two thirds of the current one's life, rereads the
//! Secrets every `--interval` (a rotated `--tls-secret` is written out, a
//! replaced CA gets a new serving certificate at once), and keeps the
//! ConfigMap current. Trow reloads the files when they change. API errors
//! are retried with a backoff; the files stay as they are meanwhile.
//!
//! With `--webhook-configs NAME,…` it also puts the CA into the `caBundle`
//! of every webhook of the ValidatingWebhookConfiguration and
//! MutatingWebhookConfiguration of those names (Trow's admission
//! webhooks), so the API server trusts Trow's certificate. Each is
//! replaced only when its bundle differs, with the `resourceVersion` read.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;

use super::api::{Created, Kube, Replaced};
use super::certs::{self, CaPair, ServingPair};
use super::files;
use super::Error;

/// The file names in `--cert-dir`, as in a `kubernetes.io/tls` Secret.
pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";

/// Labels on what `trow init` creates.
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "trow-init");
const APP_NAME: (&str, &str) = ("app.kubernetes.io/name", "trow");

/// How long `--watch` waits after a failure before trying again: doubling
/// from the first to the last.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Flags of `trow init`.
#[derive(Debug, Clone, clap::Args)]
pub struct InitArgs {
    /// Directory to write tls.crt, tls.key (mode 0600) and ca.crt into.
    #[arg(long, env = "TROW_INIT_CERT_DIR")]
    pub cert_dir: PathBuf,

    /// Namespace of Trow's Service, Secrets and CA ConfigMap.
    #[arg(long, env = "TROW_INIT_NAMESPACE", default_value = "kube-public")]
    pub namespace: String,

    /// Name of Trow's Service: the certificate is for <service>.<namespace>,
    /// <service>.<namespace>.svc and <service>.<namespace>.svc.cluster.local.
    #[arg(long, env = "TROW_INIT_SERVICE", default_value = "trow")]
    pub service: String,

    /// More names (DNS names or IP addresses) for the serving certificate,
    /// comma-separated, e.g. registry.example.com,10.0.0.7.
    #[arg(long, env = "TROW_INIT_EXTRA_NAMES", value_delimiter = ',')]
    pub extra_names: Vec<String>,

    /// Use this kubernetes.io/tls Secret (cert-manager's, your own) instead
    /// of a CA of Trow's own.
    #[arg(long, env = "TROW_INIT_TLS_SECRET")]
    pub tls_secret: Option<String>,

    /// Secret holding Trow's own CA (created if missing; never replaced).
    #[arg(long, env = "TROW_INIT_CA_SECRET", default_value = "trow-ca")]
    pub ca_secret: String,

    /// ConfigMap to publish the CA certificate in (key ca.crt).
    #[arg(long, env = "TROW_INIT_CA_CONFIGMAP", default_value = "trow-ca")]
    pub ca_configmap: String,

    /// Keep running: renew the serving certificate at 2/3 of its life, pick
    /// up a rotated --tls-secret, keep the ConfigMap current.
    #[arg(long, env = "TROW_INIT_WATCH")]
    pub watch: bool,

    /// How long a serving certificate signed with Trow's own CA is valid.
    #[arg(long, env = "TROW_INIT_CERT_VALIDITY", default_value = "90days", value_parser = humantime::parse_duration)]
    pub cert_validity: Duration,

    /// How long a new CA is valid.
    #[arg(long, env = "TROW_INIT_CA_VALIDITY", default_value = "3650days", value_parser = humantime::parse_duration)]
    pub ca_validity: Duration,

    /// With --watch, how often the Secrets and the ConfigMap are read again.
    #[arg(long, env = "TROW_INIT_INTERVAL", default_value = "1m", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// How many times a failed API call is retried (with backoff) when the
    /// failure may pass (unreachable, 5xx, 429).
    #[arg(long, env = "TROW_INIT_API_RETRIES", default_value = "4")]
    pub api_retries: u32,

    /// Webhook configurations (ValidatingWebhookConfiguration and
    /// MutatingWebhookConfiguration names, comma-separated, e.g.
    /// trow-validator,trow-mutator) whose webhooks get the CA as their
    /// caBundle. A name with no such object is skipped with a warning.
    #[arg(long, env = "TROW_INIT_WEBHOOK_CONFIGS", value_delimiter = ',')]
    pub webhook_configs: Vec<String>,

    /// Kubeconfig file; default: KUBECONFIG, ~/.kube/config, then the pod's
    /// service account.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,

    #[command(flatten)]
    pub log: super::LogArgs,
}

impl InitArgs {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), Error> {
        for (flag, v) in [
            ("--namespace", &self.namespace),
            ("--service", &self.service),
            ("--ca-secret", &self.ca_secret),
            ("--ca-configmap", &self.ca_configmap),
        ] {
            if !is_dns_label(v) {
                return Err(Error::Usage(format!(
                    "{flag}: `{v}` is not a Kubernetes name (lowercase letters, digits and `-`)"
                )));
            }
        }
        if let Some(s) = &self.tls_secret {
            if !is_dns_subdomain(s) {
                return Err(Error::Usage(format!(
                    "--tls-secret: `{s}` is not a Kubernetes name"
                )));
            }
        }
        for n in &self.webhook_configs {
            if !is_dns_subdomain(n) {
                return Err(Error::Usage(format!(
                    "--webhook-configs: `{n}` is not a Kubernetes name"
                )));
            }
        }
        for n in &self.extra_names {
            let n = n.trim();
            if n.parse::<std::net::IpAddr>().is_err() && !is_dns_name(n) {
                return Err(Error::Usage(format!(
                    "--extra-names: `{n}` is neither a DNS name nor an IP address"
                )));
            }
        }
        if self.cert_validity < Duration::from_secs(2) {
            return Err(Error::Usage("--cert-validity: at least 2s".into()));
        }
        if self.ca_validity <= self.cert_validity {
            return Err(Error::Usage(
                "--ca-validity must be longer than --cert-validity".into(),
            ));
        }
        if self.interval < Duration::from_secs(1) {
            return Err(Error::Usage("--interval: at least 1s".into()));
        }
        Ok(())
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A DNS name for a certificate: labels of letters, digits and `-`, a
/// leading `*.` allowed.
fn is_dns_name(s: &str) -> bool {
    let s = s.strip_prefix("*.").unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Runs `trow init` until done (or, with `--watch`, until SIGTERM).
pub async fn run(args: InitArgs) -> Result<(), Error> {
    args.validate()?;
    let kube = Kube::connect(
        args.kubeconfig.as_deref(),
        &args.namespace,
        args.api_retries,
    )
    .await?;
    let mut init = Init::new(args, kube);
    if !init.args.watch {
        init.step().await?;
        tracing::info!(cert_dir = %init.args.cert_dir.display(), "trow init is done");
        return Ok(());
    }
    let stop = super::stop_requested();
    tokio::pin!(stop);
    let mut backoff = FIRST_BACKOFF;
    loop {
        let wait = match init.step().await {
            Ok(next) => {
                backoff = FIRST_BACKOFF;
                next.min(init.args.interval)
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in = ?backoff, "trow init --watch: this round failed; the files in the certificate directory are unchanged");
                let w = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                w
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = &mut stop => {
                tracing::info!("trow init --watch: stopping");
                return Ok(());
            }
        }
    }
}

/// What goes into the certificate directory.
struct Material {
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
    /// A new serving certificate, to announce in the log.
    fresh: bool,
}

/// The serving certificate signed last, with the CA it was signed with.
struct Issued {
    serving: ServingPair,
    ca_sha256: String,
}

struct Init {
    args: InitArgs,
    kube: Kube,
    names: Vec<String>,
    issued: Option<Issued>,
    /// What was last read or written, so that a `--watch` round that
    /// changes nothing logs at debug level only.
    seen: BTreeMap<&'static str, String>,
}

impl Init {
    fn new(args: InitArgs, kube: Kube) -> Init {
        let names = certs::serving_names(&args.service, &args.namespace, &args.extra_names);
        Init {
            args,
            kube,
            names,
            issued: None,
            seen: BTreeMap::new(),
        }
    }

    /// Logs `message` at info when `value` is new for `key`, else at
    /// debug: each step's line once, then again only when it changes.
    fn note(&mut self, key: &'static str, value: String, message: &str) {
        if self.seen.get(key) == Some(&value) {
            tracing::debug!("{message}");
        } else {
            tracing::info!("{message}");
            self.seen.insert(key, value);
        }
    }

    fn ns_name(&self, name: &str) -> String {
        format!("{}/{name}", self.kube.namespace())
    }

    /// One round: get the material, write what changed, publish the CA.
    /// Returns how long until the serving certificate is to be renewed.
    async fn step(&mut self) -> Result<Duration, Error> {
        let material = match self.args.tls_secret.clone() {
            Some(name) => self.material_from_tls_secret(&name).await?,
            None => self.material_from_own_ca().await?,
        };
        self.write(&material)?;
        self.publish_ca(&material.ca_pem).await?;
        for name in self.args.webhook_configs.clone() {
            self.patch_webhooks(&name, &material.ca_pem).await?;
        }
        let now = SystemTime::now();
        Ok(match &self.issued {
            Some(i) => i
                .serving
                .renew_at()
                .duration_since(now)
                .unwrap_or_default()
                .max(Duration::from_secs(1)),
            None => self.args.interval,
        })
    }

    // ----- a CA of our own -----

    async fn material_from_own_ca(&mut self) -> Result<Material, Error> {
        let ca = self.ensure_ca().await?;
        let now = SystemTime::now();
        let ca_info = certs::check_ca(&ca, now).map_err(|e| self.bad_ca(e))?;
        let still_good = self
            .issued
            .as_ref()
            .is_some_and(|i| i.ca_sha256 == ca_info.sha256 && now < i.serving.renew_at());
        let fresh = !still_good;
        if fresh {
            if let Some(old) = &self.issued {
                if old.ca_sha256 != ca_info.sha256 {
                    tracing::info!(ca_sha256 = %ca_info.sha256, "the CA in Secret {} changed: signing a new serving certificate with it", self.ns_name(&self.args.ca_secret));
                }
            }
            let serving = certs::sign_serving(&ca, &self.names, now, self.args.cert_validity)?;
            self.issued = Some(Issued {
                serving,
                ca_sha256: ca_info.sha256.clone(),
            });
        }
        let Some(issued) = &self.issued else {
            return Err(Error::Usage("no serving certificate was signed".into()));
        };
        Ok(Material {
            cert_pem: issued.serving.cert_pem.clone(),
            key_pem: issued.serving.key_pem.clone(),
            ca_pem: ca.cert_pem,
            fresh,
        })
    }

    fn bad_ca(&self, e: certs::CertError) -> Error {
        Error::Secret {
            name: self.ns_name(&self.args.ca_secret),
            problem: format!(
                "{e}. trow init never replaces an existing CA: delete the Secret (kubectl -n {} delete secret {}) to have a new one created, or fix it",
                self.args.namespace, self.args.ca_secret
            ),
        }
    }

    /// The CA from its Secret, creating it if there is none. A create that
    /// loses a race with another pod's reads and uses the winner's CA.
    async fn ensure_ca(&mut self) -> Result<CaPair, Error> {
        let name = self.args.ca_secret.clone();
        let full = self.ns_name(&name);
        if let Some(secret) = self.kube.get_secret(&name).await? {
            let ca = self.ca_from_secret(&secret)?;
            let info = certs::check_ca(&ca, SystemTime::now()).map_err(|e| self.bad_ca(e))?;
            self.note(
                "ca",
                info.sha256.clone(),
                &format!(
                    "read Secret {full}: using the existing CA \"{}\" (sha256 {}, valid until {})",
                    info.subject,
                    info.sha256,
                    certs::show_time(info.not_after)
                ),
            );
            return Ok(ca);
        }
        tracing::info!("Secret {full} not found: creating a new CA");
        let ca = certs::new_ca(
            &format!("Trow CA ({})", self.args.namespace),
            SystemTime::now(),
            self.args.ca_validity,
        )?;
        match self.kube.create_secret(&self.ca_secret(&ca)).await? {
            Created::Created(_) => {
                let info = certs::parse_one(&ca.cert_pem, "the new CA")?;
                self.note(
                    "ca",
                    info.sha256.clone(),
                    &format!(
                        "created Secret {full} with a new CA (sha256 {}, valid until {})",
                        info.sha256,
                        certs::show_time(info.not_after)
                    ),
                );
                Ok(ca)
            }
            Created::AlreadyExists => {
                tracing::info!("Secret {full} was created by another pod at the same moment: using its CA instead of this one");
                let secret = self.kube.get_secret(&name).await?.ok_or_else(|| Error::Secret {
                    name: full.clone(),
                    problem: "it was reported to exist (409 AlreadyExists) but cannot be read back (404); deleted meanwhile? Run trow init again".into(),
                })?;
                let ca = self.ca_from_secret(&secret)?;
                let info = certs::check_ca(&ca, SystemTime::now()).map_err(|e| self.bad_ca(e))?;
                self.note(
                    "ca",
                    info.sha256.clone(),
                    &format!(
                        "read Secret {full}: using the CA another pod created (sha256 {})",
                        info.sha256
                    ),
                );
                Ok(ca)
            }
        }
    }

    fn ca_from_secret(&self, secret: &Secret) -> Result<CaPair, Error> {
        let field = |key: &str| -> Result<String, Error> {
            let value = secret
                .data
                .as_ref()
                .and_then(|d| d.get(key))
                .ok_or_else(|| {
                    self.bad_ca(certs::CertError::Invalid(format!("it has no {key}")))
                })?;
            String::from_utf8(value.0.clone()).map_err(|_| {
                self.bad_ca(certs::CertError::Invalid(format!("{key} is not PEM text")))
            })
        };
        Ok(CaPair {
            cert_pem: field(TLS_CRT)?,
            key_pem: field(TLS_KEY)?,
        })
    }

    /// The CA Secret as created: `kubernetes.io/tls`, so that it can also
    /// serve a cert-manager CA Issuer; `ca.crt` for tools that look there.
    fn ca_secret(&self, ca: &CaPair) -> Secret {
        let data = BTreeMap::from([
            (
                TLS_CRT.to_string(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
            (
                TLS_KEY.to_string(),
                ByteString(ca.key_pem.clone().into_bytes()),
            ),
            (
                CA_CRT.to_string(),
                ByteString(ca.cert_pem.clone().into_bytes()),
            ),
        ]);
        Secret {
            metadata: self.meta(&self.args.ca_secret),
            type_: Some("kubernetes.io/tls".into()),
            data: Some(data),
            ..Default::default()
        }
    }

    fn meta(&self, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.args.namespace.clone()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                (APP_NAME.0.to_string(), APP_NAME.1.to_string()),
            ])),
            ..Default::default()
        }
    }

    // ----- someone else's TLS Secret -----

    async fn material_from_tls_secret(&mut self, name: &str) -> Result<Material, Error> {
        let full = self.ns_name(name);
        let bad = |problem: String| Error::Secret {
            name: full.clone(),
            problem,
        };
        let secret = self.kube.get_secret(name).await?.ok_or_else(|| {
            bad(format!(
                "not found (--tls-secret). Create it (a cert-manager Certificate with secretName: {name}, or kubectl -n {} create secret tls {name} --cert=tls.crt --key=tls.key), or leave out --tls-secret to use a CA of Trow's own",
                self.args.namespace
            ))
        })?;
        let text = |key: &str| -> Option<Result<String, Error>> {
            let v = secret.data.as_ref()?.get(key)?;
            Some(String::from_utf8(v.0.clone()).map_err(|_| bad(format!("{key} is not PEM text"))))
        };
        let cert_pem = text(TLS_CRT).ok_or_else(|| bad(format!("it has no {TLS_CRT}")))??;
        let key_pem = text(TLS_KEY).ok_or_else(|| bad(format!("it has no {TLS_KEY}")))??;
        crate::tls::check_pem_pair(cert_pem.as_bytes(), key_pem.as_bytes())
            .map_err(|e| bad(format!("{e}: not a usable certificate and key")))?;
        let leaf = certs::parse_one(&cert_pem, TLS_CRT).map_err(|e| bad(e.to_string()))?;
        let (ca_pem, ca_from) = match text(CA_CRT).transpose()? {
            Some(ca) if !ca.trim().is_empty() => {
                certs::parse_one(&ca, CA_CRT).map_err(|e| bad(e.to_string()))?;
                (ca, "its ca.crt")
            }
            _ => (
                certs::chain_anchor(&cert_pem).map_err(|e| bad(e.to_string()))?,
                "the last certificate of its tls.crt, as it has no ca.crt",
            ),
        };
        let ca_info = certs::parse_one(&ca_pem, CA_CRT)?;
        let missing: Vec<&String> = self
            .names
            .iter()
            .filter(|n| !leaf.names().iter().any(|l| name_covers(l, n)))
            .collect();
        if !missing.is_empty() {
            tracing::warn!(
                "the certificate in Secret {full} is not valid for {missing:?}: clients using those names will refuse it"
            );
        }
        let fresh = self.seen.get("tls-secret") != Some(&leaf.sha256);
        self.note(
            "tls-secret",
            leaf.sha256.clone(),
            &format!(
                "read Secret {full} (--tls-secret): certificate for {:?}, sha256 {}, valid until {}; CA from {ca_from} (sha256 {})",
                leaf.names(),
                leaf.sha256,
                certs::show_time(leaf.not_after),
                ca_info.sha256
            ),
        );
        Ok(Material {
            cert_pem,
            key_pem,
            ca_pem,
            fresh,
        })
    }

    // ----- output -----

    fn write(&mut self, m: &Material) -> Result<(), Error> {
        let dir = &self.args.cert_dir;
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let ca_path = dir.join(CA_CRT);
        if files::write_if_changed(&ca_path, m.ca_pem.as_bytes(), 0o644)
            .map_err(Error::io(&ca_path))?
        {
            tracing::info!("wrote {}", ca_path.display());
        }
        // The key first: Trow reloads when either changes and keeps the
        // previous pair until both match.
        let key_path = dir.join(TLS_KEY);
        let crt_path = dir.join(TLS_CRT);
        let wrote_key = files::write_if_changed(&key_path, m.key_pem.as_bytes(), 0o600)
            .map_err(Error::io(&key_path))?;
        let wrote_crt = files::write_if_changed(&crt_path, m.cert_pem.as_bytes(), 0o644)
            .map_err(Error::io(&crt_path))?;
        if wrote_key || wrote_crt {
            let info = certs::parse_one(&m.cert_pem, TLS_CRT)?;
            let renewal = match (&self.issued, self.args.tls_secret.is_some()) {
                (Some(i), false) => format!(
                    ", to be renewed at {}",
                    certs::show_time(i.serving.renew_at())
                ),
                _ => String::new(),
            };
            tracing::info!(
                "wrote {} and {} ({} serving certificate for {:?}, sha256 {}, valid until {}{renewal})",
                crt_path.display(),
                key_path.display(),
                if m.fresh { "new" } else { "the" },
                info.names(),
                info.sha256,
                certs::show_time(info.not_after),
            );
        } else {
            tracing::debug!(
                "{} and {} are up to date",
                crt_path.display(),
                key_path.display()
            );
        }
        Ok(())
    }

    /// Makes the ConfigMap hold `ca_pem` under `ca.crt`, touching it only
    /// when it differs. Conflicting writers are retried a few times.
    async fn publish_ca(&mut self, ca_pem: &str) -> Result<(), Error> {
        let name = self.args.ca_configmap.clone();
        let full = self.ns_name(&name);
        for _ in 0..5 {
            match self.kube.get_configmap(&name).await? {
                None => {
                    let cm = ConfigMap {
                        metadata: self.meta(&name),
                        data: Some(BTreeMap::from([(CA_CRT.to_string(), ca_pem.to_string())])),
                        ..Default::default()
                    };
                    match self.kube.create_configmap(&cm).await? {
                        Created::Created(_) => {
                            tracing::info!(
                                "created ConfigMap {full} with the CA certificate (key ca.crt)"
                            );
                            self.seen.insert("configmap", ca_pem.to_string());
                            return Ok(());
                        }
                        Created::AlreadyExists => continue,
                    }
                }
                Some(mut cm) => {
                    let current = cm.data.as_ref().and_then(|d| d.get(CA_CRT)).cloned();
                    if current.as_deref() == Some(ca_pem) {
                        self.note(
                            "configmap",
                            ca_pem.to_string(),
                            &format!(
                                "ConfigMap {full} already holds this CA certificate: unchanged"
                            ),
                        );
                        return Ok(());
                    }
                    cm.data
                        .get_or_insert_with(BTreeMap::new)
                        .insert(CA_CRT.to_string(), ca_pem.to_string());
                    match self.kube.replace_configmap(&cm).await? {
                        Replaced::Replaced(_) => {
                            tracing::info!(
                                "updated ConfigMap {full}: its ca.crt {} the CA certificate",
                                if current.is_some() {
                                    "was another certificate; it is now"
                                } else {
                                    "was missing; it is now"
                                }
                            );
                            self.seen.insert("configmap", ca_pem.to_string());
                            return Ok(());
                        }
                        Replaced::Conflict => continue,
                    }
                }
            }
        }
        Err(Error::Usage(format!(
            "ConfigMap {full} kept changing while trow init was updating it; is something else writing it?"
        )))
    }
}

/// A webhook configuration, validating or mutating: the `caBundle` of
/// each of its webhooks.
trait WebhookConfig:
    kube::Resource<Scope = k8s_openapi::ClusterResourceScope, DynamicType = ()>
    + Clone
    + serde::Serialize
    + serde::de::DeserializeOwned
    + std::fmt::Debug
{
    const KIND: &'static str;
    fn bundles(&mut self) -> Vec<&mut Option<ByteString>>;
}

impl WebhookConfig for ValidatingWebhookConfiguration {
    const KIND: &'static str = "ValidatingWebhookConfiguration";
    fn bundles(&mut self) -> Vec<&mut Option<ByteString>> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config.ca_bundle)
            .collect()
    }
}

impl WebhookConfig for MutatingWebhookConfiguration {
    const KIND: &'static str = "MutatingWebhookConfiguration";
    fn bundles(&mut self) -> Vec<&mut Option<ByteString>> {
        self.webhooks
            .iter_mut()
            .flatten()
            .map(|w| &mut w.client_config.ca_bundle)
            .collect()
    }
}

impl Init {
    /// Puts `ca_pem` into the caBundle of the webhook configurations named
    /// `name`, of both kinds; warns when there is neither.
    async fn patch_webhooks(&mut self, name: &str, ca_pem: &str) -> Result<(), Error> {
        let v = self
            .patch_webhook::<ValidatingWebhookConfiguration>(name, ca_pem)
            .await?;
        let m = self
            .patch_webhook::<MutatingWebhookConfiguration>(name, ca_pem)
            .await?;
        if !v && !m {
            tracing::warn!("--webhook-configs: there is no ValidatingWebhookConfiguration or MutatingWebhookConfiguration {name} (yet?); its caBundle is not set, and the API server will not trust Trow until it is (with --watch, the next round tries again)");
        }
        Ok(())
    }

    /// Sets the caBundle of every webhook of the `K` named `name`; whether
    /// it exists.
    async fn patch_webhook<K: WebhookConfig>(
        &mut self,
        name: &str,
        ca_pem: &str,
    ) -> Result<bool, Error> {
        let bundle = ByteString(ca_pem.as_bytes().to_vec());
        for _ in 0..5 {
            let Some(mut config) = self.kube.get_cluster::<K>(K::KIND, name).await? else {
                return Ok(false);
            };
            let mut bundles = config.bundles();
            let count = bundles.len();
            if bundles.iter().all(|b| b.as_ref() == Some(&bundle)) {
                self.note(
                    if K::KIND.starts_with('V') { "validating" } else { "mutating" },
                    format!("{name}\n{ca_pem}"),
                    &format!("{} {name}: the caBundle of its {count} webhook(s) is the CA already: unchanged", K::KIND),
                );
                return Ok(true);
            }
            for b in bundles.iter_mut() {
                **b = Some(bundle.clone());
            }
            match self.kube.replace_cluster(K::KIND, name, &config).await? {
                Replaced::Replaced(_) => {
                    tracing::info!("updated {} {name}: the caBundle of its {count} webhook(s) is now the CA certificate", K::KIND);
                    return Ok(true);
                }
                Replaced::Conflict => continue,
            }
        }
        Err(Error::Usage(format!(
            "{} {name} kept changing while trow init was updating it; is something else writing it?",
            K::KIND
        )))
    }
}

/// Whether certificate name `cert_name` (possibly `*.domain`) covers
/// `name`.
fn name_covers(cert_name: &str, name: &str) -> bool {
    let (c, n) = (cert_name.to_ascii_lowercase(), name.to_ascii_lowercase());
    if c == n {
        return true;
    }
    match c.strip_prefix("*.") {
        Some(domain) => n
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == domain),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        init: InitArgs,
    }

    fn args(extra: &[&str]) -> Result<InitArgs, String> {
        let mut argv = vec!["t", "--cert-dir", "/certs"];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv)
            .map(|t| t.init)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_and_checks() {
        let a = args(&[]).unwrap();
        assert_eq!(a.namespace, "kube-public");
        assert_eq!(a.service, "trow");
        assert_eq!(a.ca_secret, "trow-ca");
        assert_eq!(a.ca_configmap, "trow-ca");
        assert_eq!(a.cert_validity, Duration::from_secs(90 * 86400));
        assert!(a.validate().is_ok());
        let a = args(&["--extra-names", "a.example.com,10.0.0.1,*.b.example"]).unwrap();
        assert_eq!(a.extra_names.len(), 3);
        assert!(a.validate().is_ok());
        for bad in [
            &["--namespace", "Kube_Public"][..],
            &["--extra-names", "a b"],
            &["--cert-validity", "1s"],
            &["--ca-validity", "1day", "--cert-validity", "2days"],
            &["--tls-secret", "UPPER"],
        ] {
            assert!(args(bad).unwrap().validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_covers("*.example.com", "a.example.com"));
        assert!(!name_covers("*.example.com", "a.b.example.com"));
        assert!(!name_covers("*.example.com", "example.com"));
        assert!(name_covers("LocalHost", "localhost"));
    }
}
