//! The `signatures` section of the configuration file: which images must
//! carry a cosign signature by which public keys, and how long verification
//! may take and its results be remembered.
//!
//! ```yaml
//! signatures:
//!   policies:
//!     - images: ["docker.io/myorg/", "registry.example.com/team/"]
//!       keys: ["/keys/team.pub"]
//!   timeout: 5s
//! ```

use std::path::PathBuf;
use std::time::Duration;

use p256::ecdsa::VerifyingKey;
use p256::pkcs8::DecodePublicKey;
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// The whole section.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignaturesConfig {
    /// Image prefixes and the keys that may sign them.
    pub policies: Vec<PolicyConfig>,
    /// The longest one verification may take, fetches from upstream
    /// included; past it the answer is a denial saying so.
    #[serde(deserialize_with = "crate::units::de_duration")]
    pub timeout: Duration,
    /// How many verification results are remembered (least recently used
    /// beyond this are forgotten).
    pub cache_entries: usize,
    /// How long a successful verification of a digest is remembered.
    #[serde(deserialize_with = "crate::units::de_duration")]
    pub cache_ttl: Duration,
    /// How long a denial (no signature, or none that verifies) is
    /// remembered; a signature pushed later counts after this.
    #[serde(deserialize_with = "crate::units::de_duration")]
    pub negative_ttl: Duration,
}

impl Default for SignaturesConfig {
    fn default() -> Self {
        SignaturesConfig {
            policies: Vec::new(),
            timeout: Duration::from_secs(5),
            cache_entries: 4096,
            cache_ttl: Duration::from_secs(600),
            negative_ttl: Duration::from_secs(30),
        }
    }
}

/// One policy: images under these prefixes need a signature by one of
/// these keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Prefixes of normalised image names (`docker.io/library/nginx`):
    /// `docker.io/myorg/` covers that organisation, `docker.io/myorg/app`
    /// that repository (and any whose name continues it).
    pub images: Vec<String>,
    /// PEM public keys (`-----BEGIN PUBLIC KEY-----`, ECDSA P-256): a file
    /// path, or the PEM text itself.
    pub keys: Vec<String>,
}

/// Why the section cannot be used; Trow refuses to start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("signatures.policies[{policy}]: {what}")]
    Policy { policy: usize, what: String },
    #[error("signatures.policies[{policy}].keys[{key}]: cannot read the public key file {path}: {source}")]
    KeyFile {
        policy: usize,
        key: usize,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("signatures.policies[{policy}].keys[{key}] ({origin}): not a PEM ECDSA P-256 public key (cosign's `-----BEGIN PUBLIC KEY-----`, from `cosign generate-key-pair` or `cosign public-key`): {why}")]
    BadKey {
        policy: usize,
        key: usize,
        origin: String,
        why: String,
    },
    #[error("signatures.{0}")]
    Setting(String),
}

/// Most policies, prefixes per policy and keys per policy.
const MAX_POLICIES: usize = 256;
const MAX_PREFIXES: usize = 256;
const MAX_KEYS: usize = 64;
/// Largest key file read (a PEM P-256 key is under 200 bytes).
const MAX_KEY_FILE: u64 = 64 << 10;
/// Longest accepted `timeout`: a webhook waits 10 s by default, 30 s at most.
const MAX_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_CACHE_ENTRIES: usize = 1 << 20;

/// A policy with its keys loaded.
#[derive(Debug, Clone)]
pub struct Policy {
    pub prefixes: Vec<String>,
    pub keys: Vec<VerifyingKey>,
    /// SHA-256 over the keys (sorted SEC1 encodings): results are cached
    /// per digest and key set.
    pub key_set: [u8; 32],
}

impl SignaturesConfig {
    /// Checks the settings and loads every key; the error says which entry
    /// is wrong and how.
    pub fn load(&self) -> Result<Vec<Policy>, ConfigError> {
        if self.timeout.is_zero() || self.timeout > MAX_TIMEOUT {
            return Err(ConfigError::Setting(format!(
                "timeout: {} is not between 1ms and {} (an admission webhook is given at most 30s)",
                humantime::format_duration(self.timeout),
                humantime::format_duration(MAX_TIMEOUT)
            )));
        }
        if self.cache_entries == 0 || self.cache_entries > MAX_CACHE_ENTRIES {
            return Err(ConfigError::Setting(format!(
                "cache_entries: {} is not between 1 and {MAX_CACHE_ENTRIES}",
                self.cache_entries
            )));
        }
        if self.policies.len() > MAX_POLICIES {
            return Err(ConfigError::Setting(format!(
                "policies: {} policies, at most {MAX_POLICIES} are accepted",
                self.policies.len()
            )));
        }
        self.policies
            .iter()
            .enumerate()
            .map(|(i, p)| p.load(i))
            .collect()
    }
}

impl PolicyConfig {
    fn load(&self, policy: usize) -> Result<Policy, ConfigError> {
        let bad = |what: String| ConfigError::Policy { policy, what };
        if self.images.is_empty() {
            return Err(bad(
                "images: list at least one image prefix, such as `docker.io/myorg/`".into(),
            ));
        }
        if self.images.len() > MAX_PREFIXES {
            return Err(bad(format!(
                "images: at most {MAX_PREFIXES} prefixes per policy"
            )));
        }
        for p in &self.images {
            if p.is_empty()
                || p.len() > 512
                || p.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(bad(format!(
                    "images: `{p}` is not an image name prefix such as `docker.io/myorg/`"
                )));
            }
            let tagged = p.contains('/') && p.rsplit('/').next().is_some_and(|l| l.contains(':'));
            if p.contains('@') || tagged {
                return Err(bad(format!(
                    "images: `{p}` has a tag or digest; prefixes are image names without them"
                )));
            }
        }
        if self.keys.is_empty() {
            return Err(bad(
                "keys: list at least one public key (a PEM file path or inline PEM)".into(),
            ));
        }
        if self.keys.len() > MAX_KEYS {
            return Err(bad(format!("keys: at most {MAX_KEYS} keys per policy")));
        }
        let keys = self
            .keys
            .iter()
            .enumerate()
            .map(|(key, k)| load_key(policy, key, k))
            .collect::<Result<Vec<_>, _>>()?;
        let mut encoded: Vec<Vec<u8>> = keys
            .iter()
            .map(|k| k.to_encoded_point(false).as_bytes().to_vec())
            .collect();
        encoded.sort();
        let mut h = Sha256::new();
        for e in &encoded {
            h.update(e);
        }
        Ok(Policy {
            prefixes: self.images.clone(),
            keys,
            key_set: h.finalize().into(),
        })
    }
}

/// A key: inline PEM, or the path of a PEM file.
fn load_key(policy: usize, key: usize, spec: &str) -> Result<VerifyingKey, ConfigError> {
    let (pem, origin) = if spec.trim_start().starts_with("-----BEGIN") {
        (spec.to_string(), "inline PEM".to_string())
    } else {
        let path = PathBuf::from(spec);
        let read = || -> std::io::Result<String> {
            use std::io::Read as _;
            let mut text = String::new();
            std::fs::File::open(&path)?
                .take(MAX_KEY_FILE)
                .read_to_string(&mut text)?;
            Ok(text)
        };
        let text = read().map_err(|source| ConfigError::KeyFile {
            policy,
            key,
            path: path.clone(),
            source,
        })?;
        (text, path.display().to_string())
    };
    VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| ConfigError::BadKey {
        policy,
        key,
        origin,
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEGRzsF+C1fKLKJhgNBa6V5NPesn92
iU0yAyzKy8EAX/jkZlypmuDzZx/K1bprps6vT3WTtSQ6P4kGBDLN8yIWEA==
-----END PUBLIC KEY-----";

    fn section(yaml: &str) -> Result<Vec<Policy>, ConfigError> {
        serde_norway::from_str::<SignaturesConfig>(yaml)
            .expect("parses")
            .load()
    }

    #[test]
    fn inline_keys_load_and_bad_ones_are_named() {
        let yaml = format!(
            "policies:\n  - images: ['docker.io/myorg/']\n    keys:\n      - |\n{}\n",
            KEY.lines()
                .map(|l| format!("        {l}\n"))
                .collect::<String>()
        );
        let p = section(&yaml).expect("loads");
        assert_eq!(p[0].keys.len(), 1);
        let e = section("policies:\n  - images: ['x/']\n    keys: ['/nonexistent/key.pub']\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("policies[0].keys[0]") && e.contains("/nonexistent/key.pub"),
            "{e}"
        );
        let e = section("policies:\n  - images: ['x/']\n    keys: ['-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----']\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a PEM ECDSA P-256 public key"), "{e}");
        let e = section("policies:\n  - images: []\n    keys: []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("images"), "{e}");
        let e = section("timeout: 0s\n").unwrap_err().to_string();
        assert!(e.contains("timeout"), "{e}");
    }
}
