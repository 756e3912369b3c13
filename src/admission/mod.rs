//! Image policy for Kubernetes admission webhooks: which images pods may
//! run (`image_validation`), and rewriting upstream images to go through
//! Trow's cache (`image_mutation`). Pure logic over parsed objects: the
//! HTTP side (AdmissionReview in and out, body limits, metrics) is
//! `api::admission`.
//!
//! Every image is normalised first ([`crate::oci::image_ref`]), and images
//! named through Trow (its own host names, `f/<alias>/<repo>` cache paths)
//! are judged as what they really are: `trow.kube-public:31000/f/docker.io/library/nginx:1`
//! is `docker.io/library/nginx:1`.
//!
//! An extra check, such as signature verification, plugs in as an
//! [`ExtraCheck`] (see [`Admission::with_extra_check`]): it runs on every
//! image the prefix rules allow, and a digest it returns is what the
//! mutating webhook pins the image to.

pub mod config;
pub mod policy;
pub mod signatures;
pub mod workload;

use std::collections::BTreeSet;
use std::sync::Arc;

use serde_json::Value;

use crate::oci::image_ref::{self, ImageRef, ImageRefError};
use crate::oci::{Digest, RepoName};
use crate::proxy::config::ProxyConfig;
use crate::proxy::target::CACHE_PREFIX;
use crate::proxy::OwnNames;
use config::{ImageMutationConfig, ImageValidationConfig};
use policy::Policy;
use workload::{ContainerImage, WorkloadError};

/// An image of a pod, normalised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalisedImage {
    /// As written in the object.
    pub written: String,
    /// As written, parsed and normalised (the host it names).
    pub named: ImageRef,
    /// What it really is: for an image named through Trow, the upstream
    /// image of a cache path, or the image under Trow's canonical name.
    pub image: ImageRef,
    /// Whether `named` is on one of Trow's own names.
    pub on_trow: bool,
}

/// Where Trow stores an image: a repository (`team/app`,
/// `f/docker.io/library/nginx`) and a tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrowLocation {
    pub repo: RepoName,
    pub reference: String,
}

/// A check that runs on every image the prefix rules allow (signature
/// verification). `Ok(Some(digest))`: allowed, and the mutating webhook
/// pins the image to this digest; `Ok(None)`: allowed; `Err(reason)`:
/// denied with this reason (the denial names the image, its container and
/// "the signature policy: <reason>").
///
/// It is asked only when [`applies`](ExtraCheck::applies) is true, and
/// only for images Trow serves ([`Resolver::location`]; an image it covers
/// that Trow does not serve is denied). Plugged in by
/// `server.rs` with [`Admission::with_extra_check`], e.g. for a verifier
/// with `applies(&str)` and `verify(image, repo, reference)`:
///
/// ```ignore
/// #[async_trait::async_trait]
/// impl ExtraCheck for SignatureVerifier {
///     fn applies(&self, image: &NormalisedImage) -> bool {
///         SignatureVerifier::applies(self, &image.image.name())
///     }
///     async fn check(&self, image: &NormalisedImage, at: &TrowLocation) -> Result<Option<Digest>, String> {
///         self.verify(&image.image.name(), at.repo.as_str(), &at.reference).await.map(Some)
///     }
/// }
/// ```
#[async_trait::async_trait]
pub trait ExtraCheck: Send + Sync {
    /// Whether the check covers `image`.
    fn applies(&self, image: &NormalisedImage) -> bool;
    /// Checks `image`, stored in Trow at `location`.
    async fn check(
        &self,
        image: &NormalisedImage,
        location: &TrowLocation,
    ) -> Result<Option<Digest>, String>;
}

/// Maps image references to what they really are and to where Trow keeps
/// them.
#[derive(Debug, Clone)]
pub struct Resolver {
    own: OwnNames,
    /// The name own images are judged under (`image_mutation.registry`,
    /// else `--hostname`, else the first name of the serving certificate),
    /// so that every own name matches the same rules.
    canonical: Option<String>,
    proxies: ProxyConfig,
}

/// How many `f/` paths through Trow are followed (a cache path of a cache
/// path names Trow again).
const MAX_HOPS: usize = 4;

impl Resolver {
    pub fn new(proxies: ProxyConfig, own: OwnNames, canonical: Option<String>) -> Resolver {
        let canonical = canonical.map(|c| c.to_ascii_lowercase());
        Resolver {
            own,
            canonical,
            proxies,
        }
    }

    /// Whether `host` is one of Trow's own names.
    pub fn is_own(&self, host: &str) -> bool {
        self.proxies.is_own_namespace(&self.own, host)
    }

    /// Parses, normalises and resolves `written`.
    pub fn normalise(&self, written: &str) -> Result<NormalisedImage, ImageRefError> {
        let named = ImageRef::parse(written)?;
        let on_trow = self.is_own(&named.host);
        let mut image = named.clone();
        for _ in 0..MAX_HOPS {
            if !self.is_own(&image.host) {
                break;
            }
            match self.through_cache(&image) {
                Some(upstream) => image = upstream,
                None => {
                    if let Some(c) = &self.canonical {
                        image.host = c.clone();
                    }
                    break;
                }
            }
        }
        Ok(NormalisedImage {
            written: written.to_string(),
            named,
            image,
            on_trow,
        })
    }

    /// The upstream image of an own image with a cache path.
    fn through_cache(&self, image: &ImageRef) -> Option<ImageRef> {
        let rest = image.repo.as_str().strip_prefix(CACHE_PREFIX)?;
        if let Some(Ok(t)) = self.proxies.target_for_path(&image.repo) {
            if let Ok(repo) = RepoName::parse(&t.upstream_repo) {
                return Some(image.moved(&t.host, repo));
            }
        }
        // Not an upstream Trow serves; judged by the host it names.
        let named = ImageRef::parse(rest).ok()?;
        Some(image.moved(&named.host, named.repo))
    }

    /// A configured prefix in the form images are matched in: a prefix on
    /// one of Trow's names under the canonical name, and one of a cache
    /// path (`trow.kube-public:31000/f/docker.io/library/`) as the
    /// upstream's (`docker.io/library/`), as images are judged.
    pub fn prefix(&self, p: &str) -> String {
        let p = image_ref::prefix(p);
        let Some((host, rest)) = p.split_once('/') else {
            return p;
        };
        if !self.is_own(host) {
            return p;
        }
        if let Some(cached) = rest.strip_prefix(CACHE_PREFIX) {
            let (ns, tail) = cached.split_once('/').unwrap_or((cached, ""));
            let upstream = self
                .proxies
                .registries
                .iter()
                .find(|r| {
                    r.alias.as_deref() == Some(ns)
                        || image_ref::normalise_host(&r.host).replace(':', "-") == ns
                })
                .map_or_else(|| ns.to_string(), |r| image_ref::normalise_host(&r.host));
            if tail.is_empty() && !cached.contains('/') {
                // `…/f/docker.io` (no `/`): that host, at a boundary.
                return upstream;
            }
            return image_ref::prefix(&format!("{upstream}/{tail}"));
        }
        match &self.canonical {
            Some(c) => format!("{c}/{rest}"),
            None => p,
        }
    }

    /// Where Trow stores `image`: an own image in its repository, an
    /// upstream image Trow may cache in its cache repository; `None` for
    /// images Trow does not serve.
    pub fn location(&self, image: &NormalisedImage) -> Option<TrowLocation> {
        let named = &image.named;
        let repo = if image.on_trow {
            named.repo.clone()
        } else {
            self.proxies
                .target_for_namespace(&named.host, &named.repo)
                .ok()?
                .cache_repo
        };
        Some(TrowLocation {
            repo,
            reference: named.reference(),
        })
    }

    /// The same image through Trow's cache at `registry`, if its host is an
    /// upstream Trow may cache.
    fn cached_name(&self, image: &NormalisedImage, registry: &str) -> Option<ImageRef> {
        let t = self
            .proxies
            .target_for_namespace(&image.named.host, &image.named.repo)
            .ok()?;
        Some(image.named.moved(registry, t.cache_repo))
    }
}

/// `image_mutation`, ready to rewrite.
#[derive(Debug, Clone)]
struct Mutation {
    registry: String,
    /// Hosts whose images are rewritten (normalised).
    upstreams: Vec<String>,
    exempt: BTreeSet<String>,
}

/// One container's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageVerdict {
    /// `container "app"`, `init container "setup"`.
    pub container: String,
    /// The image as written.
    pub written: String,
    /// What it was judged as (normalised, resolved).
    pub image: String,
    pub allowed: bool,
    /// The rule that decided.
    pub rule: String,
}

/// The validating webhook's answer for one object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validation {
    pub images: Vec<ImageVerdict>,
    /// The namespace is exempt: nothing was checked.
    pub exempt: bool,
}

impl Validation {
    pub fn allowed(&self) -> bool {
        self.images.iter().all(|v| v.allowed)
    }

    /// The refusal, naming every refused image, its container and rule.
    pub fn message(&self) -> Option<String> {
        let denied: Vec<String> = self
            .images
            .iter()
            .filter(|v| !v.allowed)
            .map(|v| {
                let judged = if v.image.is_empty() || v.image == v.written {
                    String::new()
                } else {
                    format!(" (as {})", v.image)
                };
                format!(
                    "{} image \"{}\"{judged} is refused by {}",
                    v.container, v.written, v.rule
                )
            })
            .collect();
        (!denied.is_empty()).then(|| format!("Trow image policy: {}", denied.join("; ")))
    }

    /// The rules that decided, for the log.
    pub fn rules(&self) -> Vec<&str> {
        let mut rules: Vec<&str> = self.images.iter().map(|v| v.rule.as_str()).collect();
        rules.dedup();
        rules
    }
}

/// One image rewritten by the mutating webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub container: String,
    /// JSON pointer to the `image` field.
    pub pointer: String,
    pub old: String,
    pub new: String,
}

/// The object of an admission request, as the webhooks need it.
#[derive(Debug, Clone, Copy)]
pub struct Object<'a> {
    pub kind: &'a str,
    pub namespace: &'a str,
    pub object: &'a Value,
}

/// Image validation and mutation as configured.
#[derive(Clone)]
pub struct Admission {
    resolver: Resolver,
    policy: Policy,
    mutation: Option<Mutation>,
    /// The extension point for signature verification: see [`ExtraCheck`].
    extra: Option<Arc<dyn ExtraCheck>>,
}

fn describe(c: &ContainerImage) -> String {
    format!("{} \"{}\"", c.list.noun(), c.name)
}

impl Admission {
    /// From the configuration sections; `hostname` is `--hostname`, `own`
    /// Trow's own names ([`OwnNames`]).
    pub fn new(
        validation: Option<&ImageValidationConfig>,
        mutation: Option<&ImageMutationConfig>,
        proxies: ProxyConfig,
        own: OwnNames,
        hostname: Option<&str>,
    ) -> Admission {
        // The registry name pods reach Trow by is Trow's own too.
        let own = match mutation {
            Some(m) => own.with_host(&m.registry),
            None => own,
        };
        // Without a registry name or --hostname, the first of the
        // certificate's names: any one, so long as every own name maps to
        // it, for images and prefixes alike.
        let canonical = mutation
            .map(|m| m.registry.clone())
            .or_else(|| hostname.map(str::to_string))
            .or_else(|| own.hosts().first().cloned());
        let listed = proxies.listed_hosts();
        let resolver = Resolver::new(proxies, own, canonical);
        let policy = match validation {
            Some(v) => Policy::new(v, &|p| resolver.prefix(p)),
            None => Policy::default(),
        };
        let mutation = mutation.map(|m| Mutation {
            registry: m.registry.clone(),
            upstreams: if m.upstreams.is_empty() {
                listed
            } else {
                m.upstreams
                    .iter()
                    .map(|u| image_ref::normalise_host(u.trim()))
                    .collect()
            },
            exempt: m.exempt_namespaces.iter().cloned().collect(),
        });
        Admission {
            resolver,
            policy,
            mutation,
            extra: None,
        }
    }

    /// Adds a check that runs after the prefix rules allow an image
    /// (signature verification).
    pub fn with_extra_check(mut self, check: Arc<dyn ExtraCheck>) -> Admission {
        self.extra = Some(check);
        self
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// Whether `/mutate-image` rewrites anything.
    pub fn mutation_enabled(&self) -> bool {
        self.mutation.is_some()
    }

    /// The verdict on every image of `obj`; `Ok(None)` when its kind runs
    /// no pods.
    pub async fn validate(&self, obj: Object<'_>) -> Result<Option<Validation>, WorkloadError> {
        let Some(containers) = workload::containers(obj.kind, obj.object)? else {
            return Ok(None);
        };
        if self.policy.exempt(obj.namespace) {
            return Ok(Some(Validation {
                images: Vec::new(),
                exempt: true,
            }));
        }
        let mut images = Vec::with_capacity(containers.len());
        for c in &containers {
            images.push(self.judge(obj.namespace, c).await);
        }
        Ok(Some(Validation {
            images,
            exempt: false,
        }))
    }

    async fn judge(&self, namespace: &str, c: &ContainerImage) -> ImageVerdict {
        let container = describe(c);
        let Some(written) = c.image.clone().filter(|i| !i.trim().is_empty()) else {
            return ImageVerdict {
                container,
                written: String::new(),
                image: String::new(),
                allowed: false,
                rule: "the image check (the container names no image)".into(),
            };
        };
        let img = match self.resolver.normalise(&written) {
            Ok(img) => img,
            Err(e) => {
                return ImageVerdict {
                    container,
                    written,
                    image: String::new(),
                    allowed: false,
                    rule: format!("the image check ({e})"),
                }
            }
        };
        let judged = img.image.to_string();
        let verdict = self.policy.decide(namespace, &judged);
        let mut out = ImageVerdict {
            container,
            written,
            image: judged,
            allowed: verdict.allowed,
            rule: verdict.rule,
        };
        // ----- Extension point: signature verification. -----
        // After the prefix rules allow an image, the extra check (when one
        // is configured and covers the image) has the last word.
        if out.allowed {
            if let Some(extra) = self.extra.as_ref().filter(|x| x.applies(&img)) {
                match self.resolver.location(&img) {
                    None => {
                        out.allowed = false;
                        out.rule = "the signature policy (the image is not served by Trow, so it cannot be verified)".into();
                    }
                    Some(location) => match extra.check(&img, &location).await {
                        Ok(_) => out.rule.push_str(", then the signature policy"),
                        Err(reason) => {
                            out.allowed = false;
                            out.rule = format!("the signature policy: {reason}");
                        }
                    },
                }
            }
        }
        out
    }

    /// The images of `obj` to rewrite; empty when mutation is off, the
    /// namespace is exempt or nothing applies. Never rewrites images
    /// already on Trow (so applying twice changes nothing), and leaves
    /// images it cannot parse to the validating webhook.
    pub async fn mutate(&self, obj: Object<'_>) -> Result<Vec<Rewrite>, WorkloadError> {
        let Some(m) = &self.mutation else {
            return Ok(Vec::new());
        };
        if m.exempt.contains(obj.namespace) {
            return Ok(Vec::new());
        }
        let Some(containers) = workload::containers(obj.kind, obj.object)? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for c in &containers {
            let Some(written) = c.image.as_deref() else {
                continue;
            };
            let Ok(img) = self.resolver.normalise(written) else {
                continue;
            };
            let mut new = None;
            if !img.on_trow && m.upstreams.contains(&img.named.host) {
                new = self.resolver.cached_name(&img, &m.registry);
            }
            // ----- Extension point: a digest the extra check returns pins
            // the image (the rewritten one, or the one as written). -----
            if let Some(extra) = self.extra.as_ref().filter(|x| x.applies(&img)) {
                if let Some(location) = self.resolver.location(&img) {
                    if let Ok(Some(digest)) = extra.check(&img, &location).await {
                        let mut pinned = new.clone().unwrap_or_else(|| img.named.clone());
                        pinned.digest = Some(digest);
                        new = Some(pinned);
                    }
                }
            }
            if let Some(new) = new.map(|n| n.to_string()).filter(|n| n != written) {
                out.push(Rewrite {
                    container: describe(c),
                    pointer: c.pointer.clone(),
                    old: written.to_string(),
                    new,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::config::UpstreamConfig;
    use serde_json::json;

    fn proxies() -> ProxyConfig {
        ProxyConfig {
            registries: vec![
                UpstreamConfig {
                    host: "docker.io".into(),
                    ..Default::default()
                },
                UpstreamConfig {
                    host: "127.0.0.1:5000".into(),
                    alias: Some("local".into()),
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    fn admission(validation: &str, mutation: Option<&str>) -> Admission {
        let v: ImageValidationConfig = serde_norway::from_str(validation).unwrap();
        let m: Option<ImageMutationConfig> = mutation.map(|m| serde_norway::from_str(m).unwrap());
        let own = OwnNames::new(
            None,
            &["trow.kube-public".into(), "trow.kube-public.svc".into()],
        );
        Admission::new(Some(&v), m.as_ref(), proxies(), own, None)
    }

    fn pod(images: &[&str]) -> Value {
        let containers: Vec<Value> = images
            .iter()
            .enumerate()
            .map(|(i, im)| json!({"name": format!("c{i}"), "image": im}))
            .collect();
        json!({"spec": {"containers": containers}})
    }

    async fn verdict(a: &Admission, ns: &str, images: &[&str]) -> Validation {
        let obj = pod(images);
        a.validate(Object {
            kind: "Pod",
            namespace: ns,
            object: &obj,
        })
        .await
        .unwrap()
        .unwrap()
    }

    #[tokio::test]
    async fn images_through_trow_are_judged_as_what_they_are() {
        let a = admission(
            "default: Allow\ndeny: [docker.io/library/nginx, 127.0.0.1:5000/secret/]\n",
            None,
        );
        for image in [
            "nginx",
            "index.docker.io/library/nginx:1",
            "trow.kube-public:31000/f/docker.io/library/nginx:1",
            "trow.kube-public.svc:31000/f/docker.io/nginx",
            "trow.kube-public:31000/f/local/../x",
        ] {
            let v = verdict(&a, "default", &[image]).await;
            if image.contains("..") {
                assert!(!v.allowed(), "{image}: malformed");
                continue;
            }
            assert!(!v.allowed(), "{image}: {v:?}");
        }
        let v = verdict(
            &a,
            "default",
            &["trow.kube-public:31000/f/local/secret/app:1"],
        )
        .await;
        assert!(!v.allowed());
        assert_eq!(v.images[0].image, "127.0.0.1:5000/secret/app:1");
        let v = verdict(&a, "default", &["trow.kube-public:31000/team/app", "redis"]).await;
        assert!(v.allowed(), "{v:?}");
    }

    #[tokio::test]
    async fn own_names_are_one_name_without_hostname_too() {
        // No image_mutation, no --hostname: the certificate's names.
        let v: ImageValidationConfig =
            serde_norway::from_str("deny: [trow.kube-public.svc:31000/secret/]\n").unwrap();
        let own = OwnNames::new(
            None,
            &["trow.kube-public".into(), "trow.kube-public.svc".into()],
        );
        let a = Admission::new(Some(&v), None, proxies(), own, None);
        for image in [
            "trow.kube-public:31000/secret/x",
            "trow.kube-public.svc:8000/secret/x",
        ] {
            assert!(!verdict(&a, "d", &[image]).await.allowed(), "{image}");
        }
        assert!(verdict(&a, "d", &["trow.kube-public/open/x"])
            .await
            .allowed());
    }

    #[test]
    fn prefixes_through_trow_are_the_upstreams() {
        let a = admission("{}", Some("{}"));
        let r = a.resolver();
        assert_eq!(
            r.prefix("trow.kube-public:31000/f/docker.io/library/"),
            "docker.io/library/"
        );
        assert_eq!(
            r.prefix("trow.kube-public.svc:443/f/docker.io/nginx"),
            "docker.io/library/nginx"
        );
        assert_eq!(
            r.prefix("trow.kube-public:31000/f/local/team/"),
            "127.0.0.1:5000/team/"
        );
        assert_eq!(r.prefix("trow.kube-public:31000/f/docker.io"), "docker.io");
        assert_eq!(
            r.prefix("trow.kube-public.svc/team/"),
            "trow.kube-public:31000/team/"
        );
        assert_eq!(r.prefix("quay.io/x/"), "quay.io/x/");
    }

    #[tokio::test]
    async fn denial_names_every_image_container_and_rule() {
        let a = admission("default: Deny\nallow: [docker.io/library/redis]\n", None);
        let v = verdict(&a, "default", &["nginx:1", "redis:7", "quay.io/x/y"]).await;
        let m = v.message().unwrap();
        assert!(
            m.contains("container \"c0\" image \"nginx:1\" (as docker.io/library/nginx:1)"),
            "{m}"
        );
        assert!(m.contains("container \"c2\" image \"quay.io/x/y\""), "{m}");
        assert!(m.contains("image_validation.default Deny"), "{m}");
        assert!(!m.contains("c1"), "{m}");
    }

    #[tokio::test]
    async fn mutation_rewrites_upstreams_once() {
        let a = admission("{}", Some("exempt_namespaces: [kube-system]\n"));
        let obj = pod(&["nginx:1", "127.0.0.1:5000/team/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "quay.io/x/y", "trow.kube-public:31000/f/docker.io/library/nginx:1"]);
        let o = Object {
            kind: "Pod",
            namespace: "default",
            object: &obj,
        };
        let r = a.mutate(o).await.unwrap();
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(
            r[0].new,
            "trow.kube-public:31000/f/docker.io/library/nginx:1"
        );
        assert_eq!(r[0].pointer, "/spec/containers/0/image");
        assert!(
            r[1].new
                .starts_with("trow.kube-public:31000/f/local/team/app@sha256:"),
            "{r:?}"
        );
        let o = Object {
            kind: "Pod",
            namespace: "kube-system",
            object: &obj,
        };
        assert!(a.mutate(o).await.unwrap().is_empty());
        let off = admission("{}", None);
        let o = Object {
            kind: "Pod",
            namespace: "default",
            object: &obj,
        };
        assert!(off.mutate(o).await.unwrap().is_empty());
    }

    struct Pin;
    #[async_trait::async_trait]
    impl ExtraCheck for Pin {
        fn applies(&self, image: &NormalisedImage) -> bool {
            image.image.name() == "docker.io/library/nginx"
        }
        async fn check(
            &self,
            image: &NormalisedImage,
            at: &TrowLocation,
        ) -> Result<Option<Digest>, String> {
            if image
                .image
                .tag
                .as_ref()
                .is_some_and(|t| t.as_str() == "bad")
            {
                return Err("no valid signature".into());
            }
            assert_eq!(at.repo.as_str(), "f/docker.io/library/nginx");
            Ok(Some(Digest::sha256_of(b"x")))
        }
    }

    #[tokio::test]
    async fn the_extra_check_decides_after_the_rules_and_pins() {
        let a = admission("{}", Some("{}\n")).with_extra_check(Arc::new(Pin));
        let v = verdict(&a, "default", &["nginx:bad", "nginx:1", "redis"]).await;
        assert!(!v.images[0].allowed);
        assert!(v.images[0].rule.contains("no valid signature"));
        assert!(v.images[1].allowed && v.images[2].allowed, "{v:?}");
        let obj = pod(&["nginx:1"]);
        let r = a
            .mutate(Object {
                kind: "Pod",
                namespace: "d",
                object: &obj,
            })
            .await
            .unwrap();
        assert_eq!(
            r[0].new,
            format!(
                "trow.kube-public:31000/f/docker.io/library/nginx:1@{}",
                Digest::sha256_of(b"x")
            )
        );
    }
}
