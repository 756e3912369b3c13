//! The optional YAML configuration file (`--config-file`) for the structured
//! parts of the configuration that flags cannot express well.
//!
//! Each feature owns one top-level section, an optional field of
//! [`ConfigFile`]; adding a section is adding a field. Unknown top-level
//! keys are refused, so a misspelt section name is an error at start-up
//! rather than a silently ignored setting.

use std::path::Path;

use serde::Deserialize;

use crate::admission::config::{ImageMutationConfig, ImageValidationConfig};
use crate::auth::permissions::PermissionsConfig;
use crate::proxy::config::ProxyConfig;
use crate::registry::quota::QuotasConfig;
use crate::registry::retention::RetentionPolicies;
use crate::signature::SignaturesConfig;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConfigFile {
    /// Who may pull, push, delete and list what (see `auth::permissions`).
    pub permissions: Option<PermissionsConfig>,
    /// The pull-through cache's upstreams (see `proxy::config`).
    pub registry_proxies: Option<ProxyConfig>,
    /// Which tags and untagged manifests the garbage collector deletes (see
    /// `registry::retention`).
    pub retention: Option<RetentionPolicies>,
    /// Storage quotas and blob size limits by repository pattern (see
    /// `registry::quota`).
    pub quotas: Option<QuotasConfig>,
    /// Which images need a cosign signature by which keys (see
    /// `signature::config`).
    pub signatures: Option<SignaturesConfig>,
    /// Which images pods may run: the validating admission webhook (see
    /// `admission::config`).
    pub image_validation: Option<ImageValidationConfig>,
    /// Rewriting upstream images to Trow's cache: the mutating admission
    /// webhook, off without this section (see `admission::config`).
    pub image_mutation: Option<ImageMutationConfig>,
}

impl ConfigFile {
    /// Reads, parses and validates the file once; the error names the file,
    /// the line and the bad field.
    pub fn load(path: &Path) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--config-file: cannot read {}: {e}", path.display()))?;
        ConfigFile::parse(&text).map_err(|e| format!("--config-file {}: {e}", path.display()))
    }

    /// Parses YAML text. An empty document is an empty configuration.
    pub fn parse(text: &str) -> Result<ConfigFile, String> {
        if text.trim().is_empty() {
            return Ok(ConfigFile::default());
        }
        let file: ConfigFile = serde_norway::from_str(text).map_err(|e| e.to_string())?;
        if let Some(proxies) = &file.registry_proxies {
            proxies.validate()?;
        }
        if let Some(retention) = &file.retention {
            retention.validate()?;
        }
        if let Some(quotas) = &file.quotas {
            crate::registry::quota::validate(quotas)?;
        }
        if let Some(signatures) = &file.signatures {
            signatures.load().map_err(|e| e.to_string())?;
        }
        if let Some(v) = &file.image_validation {
            v.validate()?;
        }
        if let Some(m) = &file.image_mutation {
            m.validate(&file.proxies().listed_hosts())?;
        }
        Ok(file)
    }

    /// The retention policies (none without a section).
    pub fn retention(&self) -> RetentionPolicies {
        self.retention.clone().unwrap_or_default()
    }

    /// The pull-through cache settings (the defaults without a section).
    pub fn proxies(&self) -> ProxyConfig {
        self.registry_proxies.clone().unwrap_or_default()
    }

    /// The quota rules (none without a section).
    pub fn quotas(&self) -> &[crate::registry::quota::QuotaRuleConfig] {
        self.quotas.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_are_optional_and_typos_are_errors() {
        assert!(ConfigFile::parse("").unwrap().permissions.is_none());
        assert!(ConfigFile::parse("{}").unwrap().permissions.is_none());
        let c = ConfigFile::parse(
            "permissions:\n  anonymous:\n    - repos: '*'\n      actions: [pull]\n",
        )
        .unwrap();
        assert_eq!(c.permissions.unwrap().len(), 1);
        assert!(ConfigFile::parse("registry_proxies:\n  registries: []\n").is_ok());
        let e = ConfigFile::parse("permission: {}\n").unwrap_err();
        assert!(e.contains("permission"), "{e}");
    }

    /// The examples in docs/CONFIGURATION.md are valid.
    #[test]
    fn documented_examples_parse() {
        let doc = include_str!("../docs/CONFIGURATION.md");
        let blocks: Vec<&str> = doc
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|b| b.starts_with("permissions:"))
            .collect();
        assert!(blocks.len() >= 3, "permission examples in the docs");
        for b in blocks {
            let c = ConfigFile::parse(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
            assert!(c.permissions.is_some());
        }
    }

    /// The `retention` examples in docs/CONFIGURATION.md are valid.
    #[test]
    fn documented_retention_examples_parse() {
        let doc = include_str!("../docs/CONFIGURATION.md");
        let blocks: Vec<&str> = doc
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|b| b.starts_with("retention:"))
            .collect();
        assert!(blocks.len() >= 2, "retention examples in the docs");
        for b in blocks {
            let c = ConfigFile::parse(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
            assert!(!c.retention().0.is_empty());
        }
    }

    /// The `quotas` examples in docs/CONFIGURATION.md are valid.
    #[test]
    fn documented_quota_examples_parse() {
        let doc = include_str!("../docs/CONFIGURATION.md");
        let blocks: Vec<&str> = doc
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|b| b.starts_with("quotas:"))
            .collect();
        assert!(blocks.len() >= 2, "quota examples in the docs");
        for b in blocks {
            let c = ConfigFile::parse(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
            assert!(!c.quotas().is_empty());
        }
    }

    /// The `signatures` examples in docs/CONFIGURATION.md use real keys
    /// (parsed only: their key files do not exist here), and their inline
    /// PEM keys are valid P-256 public keys.
    #[test]
    fn documented_signature_examples_parse() {
        use p256::pkcs8::DecodePublicKey;
        let doc = include_str!("../docs/CONFIGURATION.md");
        let blocks: Vec<&str> = doc
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|b| b.starts_with("signatures:"))
            .collect();
        assert!(!blocks.is_empty(), "signature examples in the docs");
        for b in blocks {
            let c: ConfigFile = serde_norway::from_str(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
            let s = c.signatures.unwrap();
            assert!(!s.policies.is_empty(), "{b}");
            for k in s.policies.iter().flat_map(|p| &p.keys) {
                if k.starts_with("-----BEGIN") {
                    p256::ecdsa::VerifyingKey::from_public_key_pem(k.trim())
                        .unwrap_or_else(|e| panic!("{e}\n{k}"));
                }
            }
        }
    }

    /// The `image_validation` and `image_mutation` examples in
    /// docs/CONFIGURATION.md and docs/USER_GUIDE.md are valid.
    #[test]
    fn documented_admission_examples_parse() {
        let mut n = 0;
        for doc in [
            include_str!("../docs/CONFIGURATION.md"),
            include_str!("../docs/USER_GUIDE.md"),
        ] {
            for b in doc
                .split("```yaml\n")
                .skip(1)
                .filter_map(|b| b.split("```").next())
                .filter(|b| b.contains("image_validation:") || b.contains("image_mutation:"))
            {
                let c = ConfigFile::parse(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
                assert!(c.image_validation.is_some() || c.image_mutation.is_some());
                n += 1;
            }
        }
        assert!(n >= 3, "admission examples in the docs");
    }

    /// The `registry_proxies` examples in docs/CONFIGURATION.md use real
    /// keys (parsed only: their CA files do not exist here), and list
    /// Docker Hub, which is no longer contacted unless listed.
    #[test]
    fn documented_proxy_examples_parse() {
        let doc = include_str!("../docs/CONFIGURATION.md");
        let blocks: Vec<&str> = doc
            .split("```yaml\n")
            .skip(1)
            .filter_map(|b| b.split("```").next())
            .filter(|b| b.starts_with("registry_proxies:"))
            .collect();
        assert!(blocks.len() >= 2, "proxy examples in the docs");
        for b in blocks {
            let c: ConfigFile = serde_norway::from_str(b).unwrap_or_else(|e| panic!("{e}\n{b}"));
            let p = c.registry_proxies.unwrap();
            assert!(p.registries.iter().any(|r| r.host == "docker.io"), "{b}");
        }
    }
}
