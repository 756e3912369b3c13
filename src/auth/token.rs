//! Bearer tokens as in the Docker token authentication specification: an
//! HS256-signed JWT naming the user (`sub`), the service it is good for
//! (`aud`), its validity (`nbf`, `exp`) and the access it grants
//! (`access: [{type, name, actions}]`).
//!
//! The signing key is a secret of at least 32 bytes, generated on first
//! start into `<data-dir>/token.key` (mode 0600) or read from `--token-key`,
//! so that replicas sharing the file accept each other's tokens.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::permissions::Action;

/// The `iss` of our tokens.
pub const ISSUER: &str = "trow";
/// The fewest key bytes we accept.
pub const MIN_KEY_LEN: usize = 32;
/// Longer bearer tokens are refused before any parsing.
const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Clock difference tolerated between replicas, for `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// One grant in a token, as the Docker token spec writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// The claims we put in and check in tokens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<Access>,
}

impl Claims {
    /// Whether the token grants `action` on repository `repo` (or, for
    /// [`Action::Catalog`], the catalog).
    pub fn allows(&self, repo: &str, action: Action) -> bool {
        let (kind, name) = match action {
            Action::Catalog => ("registry", "catalog"),
            _ => ("repository", repo),
        };
        self.access.iter().any(|a| {
            a.kind == kind
                && a.name == name
                && a.actions.iter().any(|x| x == "*" || x == action.as_str())
        })
    }
}

/// A scope asked for in a token request: `repository:<name>:<actions>` or
/// `registry:catalog:*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository { name: String, actions: Vec<Action> },
    Catalog,
}

impl Scope {
    /// The scope string for a challenge.
    pub fn to_challenge(&self) -> String {
        match self {
            Scope::Catalog => "registry:catalog:*".into(),
            Scope::Repository { name, actions } => {
                let actions: Vec<&str> = actions.iter().map(|a| a.as_str()).collect();
                format!("repository:{name}:{}", actions.join(","))
            }
        }
    }
}

/// Parses the `scope` parameters of a token request. Each may hold several
/// space-separated scopes. Unknown resource types and actions are ignored
/// (they are simply not granted).
pub fn parse_scopes<'a>(params: impl IntoIterator<Item = &'a str>) -> Vec<Scope> {
    let mut out = Vec::new();
    for scope in params.into_iter().flat_map(str::split_whitespace) {
        // type[(class)]:name:actions — names may hold `:` (host:port/…),
        // so the actions follow the last `:`.
        let Some((kind, rest)) = scope.split_once(':') else {
            continue;
        };
        let Some((name, actions)) = rest.rsplit_once(':') else {
            continue;
        };
        let kind = kind.split('(').next().unwrap_or(kind);
        match kind {
            "repository" if !name.is_empty() => {
                let mut acts: Vec<Action> = actions
                    .split(',')
                    .flat_map(|a| match a {
                        "*" => vec![Action::Pull, Action::Push, Action::Delete],
                        a => Action::parse(a)
                            .filter(|a| !matches!(a, Action::Catalog | Action::Admin))
                            .into_iter()
                            .collect(),
                    })
                    .collect();
                acts.sort();
                acts.dedup();
                if !acts.is_empty() {
                    out.push(Scope::Repository {
                        name: name.to_string(),
                        actions: acts,
                    });
                }
            }
            "registry" if name == "catalog" => out.push(Scope::Catalog),
            _ => {}
        }
    }
    out
}

/// Why a token was refused (always a 401 for the client).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is too long")]
    TooLong,
    #[error("the token is invalid: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
}

/// Issues and checks tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    lifetime: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Tokens {
    pub fn new(key: &[u8], lifetime: Duration) -> Tokens {
        Tokens {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            lifetime,
        }
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// Signs a token for `sub` on `service` granting `access`.
    pub fn issue(
        &self,
        sub: &str,
        service: &str,
        access: Vec<Access>,
    ) -> anyhow::Result<(String, Claims)> {
        let now = unix_now();
        let claims = Claims {
            iss: ISSUER.into(),
            sub: sub.into(),
            aud: service.into(),
            exp: now + self.lifetime.as_secs().max(1),
            nbf: now,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            access,
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, claims))
    }

    /// Checks signature, algorithm, issuer, audience and validity period.
    pub fn verify(&self, token: &str, service: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLong);
        }
        let mut v = Validation::new(Algorithm::HS256);
        v.set_audience(&[service]);
        v.set_issuer(&[ISSUER]);
        v.set_required_spec_claims(&["exp", "nbf", "aud", "iss", "sub"]);
        v.validate_nbf = true;
        v.leeway = LEEWAY_SECS;
        Ok(jsonwebtoken::decode::<Claims>(token, &self.decoding, &v)?.claims)
    }
}

/// Where the generated key lives.
pub fn key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("token.key")
}

/// Reads a key file: its bytes without trailing whitespace, at least
/// [`MIN_KEY_LEN`] of them.
pub fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let mut bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read token key {}: {e}", path.display()))?;
    while bytes.last().is_some_and(u8::is_ascii_whitespace) {
        bytes.pop();
    }
    if bytes.len() < MIN_KEY_LEN {
        return Err(format!(
            "token key {} holds {} bytes; it needs at least {MIN_KEY_LEN} (e.g. `openssl rand -hex 32 > {}`)",
            path.display(),
            bytes.len(),
            path.display()
        ));
    }
    Ok(bytes)
}

/// The key from `--token-key`, or the one in the data directory, created
/// (mode 0600, atomically) on first start.
pub fn load_or_create_key(data_dir: &Path, token_key: Option<&Path>) -> Result<Vec<u8>, String> {
    if let Some(path) = token_key {
        return read_key(path);
    }
    let path = key_path(data_dir);
    if path.exists() {
        return read_key(&path);
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness for the token key: {e}"))?;
    let text = format!("{}\n", hex::encode(secret));
    // Write aside, then hard-link into place: the key appears whole or not
    // at all, and if another replica won the race, its key is used.
    let tmp = data_dir.join(format!("token.key.tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    };
    let result = write();
    let _ = std::fs::remove_file(&tmp);
    result.map_err(|e| format!("cannot create token key {}: {e}", path.display()))?;
    read_key(&path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        let s = parse_scopes([
            "repository:a/b:pull,push",
            "repository:c:* registry:catalog:*",
            "repository(plugin):d:pull",
            "repository:localhost:5000/e:pull",
            "repository:f:bogus",
            "nonsense",
            "user:x:pull",
        ]);
        assert_eq!(
            s,
            vec![
                Scope::Repository {
                    name: "a/b".into(),
                    actions: vec![Action::Pull, Action::Push]
                },
                Scope::Repository {
                    name: "c".into(),
                    actions: vec![Action::Pull, Action::Push, Action::Delete]
                },
                Scope::Catalog,
                Scope::Repository {
                    name: "d".into(),
                    actions: vec![Action::Pull]
                },
                Scope::Repository {
                    name: "localhost:5000/e".into(),
                    actions: vec![Action::Pull]
                },
            ]
        );
        assert_eq!(s[0].to_challenge(), "repository:a/b:pull,push");
        assert_eq!(s[2].to_challenge(), "registry:catalog:*");
    }

    #[test]
    fn round_trip_and_refusals() {
        let t = Tokens::new(&[7u8; 32], Duration::from_secs(300));
        let access = vec![Access {
            kind: "repository".into(),
            name: "a".into(),
            actions: vec!["pull".into()],
        }];
        let (tok, _) = t.issue("alice", "reg:5000", access).unwrap();
        let c = t.verify(&tok, "reg:5000").unwrap();
        assert_eq!(c.sub, "alice");
        assert!(c.allows("a", Action::Pull));
        assert!(!c.allows("a", Action::Push));
        assert!(!c.allows("b", Action::Pull));
        assert!(!c.allows("", Action::Catalog));
        // Another audience, another key, garbage.
        assert!(t.verify(&tok, "other:5000").is_err());
        let other = Tokens::new(&[8u8; 32], Duration::from_secs(300));
        assert!(other.verify(&tok, "reg:5000").is_err());
        assert!(t.verify("a.b.c", "reg:5000").is_err());
        assert!(t.verify("", "reg:5000").is_err());
        // alg: none
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let parts: Vec<&str> = tok.split('.').collect();
        let none = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            parts[1]
        );
        assert!(t.verify(&none, "reg:5000").is_err());
    }

    #[test]
    fn key_created_once_with_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let k1 = load_or_create_key(dir.path(), None).unwrap();
        let k2 = load_or_create_key(dir.path(), None).unwrap();
        assert_eq!(k1, k2);
        assert_eq!(k1.len(), 64);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(key_path(dir.path()))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let short = dir.path().join("short");
        std::fs::write(&short, "abc\n").unwrap();
        assert!(load_or_create_key(dir.path(), Some(&short)).is_err());
    }
}
