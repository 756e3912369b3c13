//! The `image_validation` and `image_mutation` sections of the
//! configuration file. `image_validation` keeps the original Trow's format
//! (`default`, `allow`, `deny`) and adds per-namespace exceptions.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::oci::image_ref;

/// What happens to an image that no rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum DefaultVerdict {
    #[default]
    #[serde(alias = "allow")]
    Allow,
    #[serde(alias = "deny")]
    Deny,
}

/// `image_validation`: which images pods may run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageValidationConfig {
    /// For images that no rule matches (default `Allow`).
    pub default: DefaultVerdict,
    /// Image prefixes that are allowed.
    pub allow: Vec<String>,
    /// Image prefixes that are denied.
    pub deny: Vec<String>,
    /// Namespaces whose pods are not checked at all.
    pub exempt_namespaces: Vec<String>,
    /// Rules of one namespace, checked before the global ones.
    pub namespaces: BTreeMap<String, NamespaceRules>,
}

/// The exceptions of one namespace.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceRules {
    /// Replaces the global `default` in this namespace.
    pub default: Option<DefaultVerdict>,
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

/// The registry name of the Kubernetes install.
pub const DEFAULT_REGISTRY: &str = "trow.kube-public:31000";

/// `image_mutation`: rewrite images of upstream registries to go through
/// Trow's cache. Off without this section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ImageMutationConfig {
    /// The name pods reach Trow by (host[:port]).
    pub registry: String,
    /// The upstream hosts whose images are rewritten; empty: every host
    /// listed in `registry_proxies.registries`.
    pub upstreams: Vec<String>,
    /// Namespaces whose pods are never rewritten.
    pub exempt_namespaces: Vec<String>,
}

impl Default for ImageMutationConfig {
    fn default() -> Self {
        ImageMutationConfig {
            registry: DEFAULT_REGISTRY.to_string(),
            upstreams: Vec::new(),
            exempt_namespaces: Vec::new(),
        }
    }
}

fn check_prefixes(at: &str, list: &[String]) -> Result<(), String> {
    for (i, p) in list.iter().enumerate() {
        let p = p.trim();
        if p.is_empty()
            || p.len() > image_ref::MAX_IMAGE_REF_LEN
            || p.chars().any(char::is_whitespace)
        {
            return Err(format!(
                "{at}[{i}]: `{p}` is not an image prefix (e.g. docker.io/library/ or quay.io/org/app)"
            ));
        }
    }
    Ok(())
}

fn check_namespaces(at: &str, list: &[String]) -> Result<(), String> {
    for (i, ns) in list.iter().enumerate() {
        if !is_namespace(ns) {
            return Err(format!(
                "{at}[{i}]: `{ns}` is not a Kubernetes namespace name"
            ));
        }
    }
    Ok(())
}

fn is_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl ImageValidationConfig {
    /// Checks what serde cannot, naming the bad field.
    pub fn validate(&self) -> Result<(), String> {
        check_prefixes("image_validation.allow", &self.allow)?;
        check_prefixes("image_validation.deny", &self.deny)?;
        check_namespaces(
            "image_validation.exempt_namespaces",
            &self.exempt_namespaces,
        )?;
        for (ns, rules) in &self.namespaces {
            if !is_namespace(ns) {
                return Err(format!(
                    "image_validation.namespaces: `{ns}` is not a Kubernetes namespace name"
                ));
            }
            check_prefixes(
                &format!("image_validation.namespaces.{ns}.allow"),
                &rules.allow,
            )?;
            check_prefixes(
                &format!("image_validation.namespaces.{ns}.deny"),
                &rules.deny,
            )?;
        }
        Ok(())
    }
}

impl ImageMutationConfig {
    /// Checks what serde cannot; `listed` are the hosts of
    /// `registry_proxies.registries` (normalised).
    pub fn validate(&self, listed: &[String]) -> Result<(), String> {
        let r = &self.registry;
        if r.is_empty()
            || r.contains('/')
            || !r
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':' | b'[' | b']'))
        {
            return Err(format!(
                "image_mutation.registry: `{r}` must be a host[:port] such as {DEFAULT_REGISTRY}"
            ));
        }
        for (i, u) in self.upstreams.iter().enumerate() {
            let host = image_ref::normalise_host(u.trim());
            if !listed.contains(&host) {
                return Err(format!(
                    "image_mutation.upstreams[{i}]: `{u}` is not listed in registry_proxies.registries, so Trow could not serve its images: add `- host: {u}` there"
                ));
            }
        }
        check_namespaces("image_mutation.exempt_namespaces", &self.exempt_namespaces)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_trow_format_parses() {
        let c: ImageValidationConfig = serde_norway::from_str(
            "default: Deny\nallow:\n  - trow.kube-public:31000/\n  - docker.io/\ndeny:\n  - docker.io/library/nginx:1.19\n",
        )
        .unwrap();
        assert_eq!(c.default, DefaultVerdict::Deny);
        assert_eq!(c.allow.len(), 2);
        assert!(c.validate().is_ok());
        let bad: ImageValidationConfig = serde_norway::from_str("allow: ['a b']\n").unwrap();
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("image_validation.allow[0]"));
        let bad: ImageValidationConfig =
            serde_norway::from_str("namespaces:\n  Dev: {}\n").unwrap();
        assert!(bad.validate().is_err());
        assert!(serde_norway::from_str::<ImageValidationConfig>("defualt: Deny\n").is_err());
    }

    #[test]
    fn mutation_upstreams_must_be_listed() {
        let c: ImageMutationConfig =
            serde_norway::from_str("upstreams: [index.docker.io]\n").unwrap();
        assert_eq!(c.registry, DEFAULT_REGISTRY);
        assert!(c.validate(&["docker.io".into()]).is_ok());
        let e = c.validate(&["quay.io".into()]).unwrap_err();
        assert!(e.contains("registry_proxies"), "{e}");
        let c: ImageMutationConfig = serde_norway::from_str("registry: 'a/b'\n").unwrap();
        assert!(c.validate(&[]).is_err());
    }
}
