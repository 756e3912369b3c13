//! Users, passwords, tokens and permissions. Nothing here knows HTTP: the
//! request guard and the `/login` endpoint are in `api::auth`.
//!
//! Authentication is on when users are configured (`--user`/`--password`,
//! `--htpasswd`) or the configuration file has a `permissions` section.
//! Without either, Trow is open, as before.

pub mod passwords;
pub mod permissions;
pub mod ratelimit;
pub mod token;
pub mod verified;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use passwords::Users;
use permissions::{Action, Permissions, ANONYMOUS};
use ratelimit::FailureLimiter;
use token::{Access, Scope, Tokens};
use verified::VerifiedCache;

/// A value that must never be printed (`--password`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Secret {
        Secret(s)
    }
}

/// clap value parser for secrets.
pub fn parse_secret(s: &str) -> Result<Secret, String> {
    Ok(Secret(s.to_string()))
}

/// Failed password checks allowed per client address per window.
pub const MAX_LOGIN_FAILURES: u32 = 10;
/// The window over which failures are counted.
pub const LOGIN_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Client addresses tracked by the limiter at most.
const LIMITER_CAPACITY: usize = 100_000;
/// The token service name (the `aud` of tokens) without `--hostname`. It is
/// fixed, never taken from a request: a client cannot choose the audience
/// of the tokens it is given.
pub const DEFAULT_SERVICE: &str = "trow";

/// What the configuration says about users and permissions, checked.
#[derive(Debug, Clone)]
pub struct AuthSetup {
    pub users: Users,
    pub permissions: Permissions,
    /// Things worth a warning at start-up.
    pub warnings: Vec<String>,
}

/// Where users come from: `--user`/`--password` and `--htpasswd`. The
/// configuration layer fills this in, so `auth` needs nothing from it.
#[derive(Debug, Clone, Copy, Default)]
pub struct UserSources<'a> {
    pub user: Option<&'a str>,
    pub password: Option<&'a Secret>,
    pub htpasswd: Option<&'a std::path::Path>,
}

impl AuthSetup {
    /// `None` when authentication is off (no users and no `permissions`).
    pub fn load(
        sources: UserSources<'_>,
        rules: Option<&permissions::PermissionsConfig>,
    ) -> Result<Option<AuthSetup>, String> {
        let user = match (sources.user, sources.password) {
            (Some(u), Some(p)) => Some((u.to_string(), passwords::read_password(p.expose())?)),
            (Some(_), None) => return Err("--user needs --password".into()),
            (None, Some(_)) => return Err("--password needs --user".into()),
            (None, None) => None,
        };
        let users = Users::load(
            user.as_ref().map(|(u, p)| (u.as_str(), p.as_str())),
            sources.htpasswd,
        )?;
        if users.is_empty() && rules.is_none() {
            return Ok(None);
        }
        let permissions = match rules {
            Some(p) => Permissions::from_config(p),
            None => Permissions::default_rules(),
        };
        let warnings = permissions
            .named_users()
            .filter(|u| !users.contains(u))
            .map(|u| {
                format!("permissions name user `{u}`, who is not defined by --user or --htpasswd")
            })
            .collect();
        Ok(Some(AuthSetup {
            users,
            permissions,
            warnings,
        }))
    }
}

/// Who is making a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Anonymous,
    User(String),
}

impl Identity {
    /// The user name, `None` for anonymous.
    pub fn user(&self) -> Option<&str> {
        match self {
            Identity::Anonymous => None,
            Identity::User(u) => Some(u),
        }
    }

    /// The name in tokens and logs.
    pub fn name(&self) -> &str {
        self.user().unwrap_or(ANONYMOUS)
    }

    /// The identity a token's `sub` names.
    pub fn from_subject(sub: &str) -> Identity {
        if sub == ANONYMOUS {
            Identity::Anonymous
        } else {
            Identity::User(sub.to_string())
        }
    }
}

/// Which repositories a caller may see in the catalog.
#[derive(Clone)]
pub struct CatalogFilter(Arc<dyn Fn(&str) -> bool + Send + Sync>);

impl CatalogFilter {
    pub fn allows(&self, repo: &str) -> bool {
        (self.0)(repo)
    }
}

impl fmt::Debug for CatalogFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CatalogFilter")
    }
}

/// Everything authentication needs at run time.
pub struct Auth {
    users: Arc<Users>,
    permissions: Arc<Permissions>,
    pub tokens: Tokens,
    pub limiter: FailureLimiter,
    /// The token service name: the `aud` of every token issued and the
    /// only one accepted. `--hostname`, else [`DEFAULT_SERVICE`].
    pub service: String,
    /// `--hostname`: the realm host. Without it, the host each request
    /// addressed.
    pub hostname: Option<String>,
    /// Whether the realm is `https://` (TLS is on).
    pub https: bool,
    /// Password hashing is slow on purpose; at most this many run at once,
    /// so a flood of logins cannot take every core.
    hash_slots: Arc<tokio::sync::Semaphore>,
    /// Passwords checked successfully in the last minute.
    verified: Option<VerifiedCache>,
    /// Full (hashing) password checks done, for tests and diagnostics.
    hash_checks: AtomicU64,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("users", &self.users.len())
            .field("tokens", &self.tokens)
            .finish_non_exhaustive()
    }
}

impl Auth {
    pub fn new(
        setup: AuthSetup,
        key: &[u8],
        token_lifetime: Duration,
        hostname: Option<String>,
        https: bool,
    ) -> Auth {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let verified = VerifiedCache::new(verified::VERIFIED_CAPACITY, verified::VERIFIED_TTL);
        if verified.is_none() {
            tracing::warn!("no randomness for the verified-password cache; every Basic request is checked in full");
        }
        Auth {
            users: Arc::new(setup.users),
            permissions: Arc::new(setup.permissions),
            tokens: Tokens::new(key, token_lifetime),
            limiter: FailureLimiter::new(
                MAX_LOGIN_FAILURES,
                LOGIN_FAILURE_WINDOW,
                LIMITER_CAPACITY,
            ),
            service: hostname.clone().unwrap_or_else(|| DEFAULT_SERVICE.into()),
            hostname,
            https,
            hash_slots: Arc::new(tokio::sync::Semaphore::new(cores)),
            verified,
            hash_checks: AtomicU64::new(0),
        }
    }

    /// Checks a password off the async threads. The same cost whether the
    /// user exists or not; a password that was right in the last minute is
    /// not hashed again.
    pub async fn check_password(&self, user: &str, password: &str) -> bool {
        if self.users.checks_are_cheap() {
            return self.users.verify(user, password);
        }
        if let Some(v) = &self.verified {
            if v.contains(user, password) {
                return true;
            }
        }
        let ok = self.hash_check(user, password).await;
        if ok {
            if let Some(v) = &self.verified {
                v.insert(user, password);
            }
        }
        ok
    }

    /// The full check: bcrypt or argon2 on the blocking pool, at most one
    /// per core at a time.
    async fn hash_check(&self, user: &str, password: &str) -> bool {
        self.hash_checks.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(user, "checking a password against its hash");
        // The permit moves into the blocking task, so a client that hangs
        // up does not free its slot before the hashing is done.
        let Ok(slot) = self.hash_slots.clone().acquire_owned().await else {
            return false;
        };
        let users = self.users.clone();
        let (user, password) = (user.to_string(), password.to_string());
        tokio::task::spawn_blocking(move || {
            let ok = users.verify(&user, &password);
            drop(slot);
            ok
        })
        .await
        .unwrap_or(false)
    }

    /// How many passwords were checked against their hash (cache misses).
    pub fn hash_checks(&self) -> u64 {
        self.hash_checks.load(Ordering::Relaxed)
    }

    /// Whether `who` may do `action` on `repo` under the configured rules.
    pub fn allows(&self, who: &Identity, repo: &str, action: Action) -> bool {
        self.permissions.allows(who.user(), repo, action)
    }

    /// The part of `scopes` that `who` is allowed: what a token gets.
    pub fn grant(&self, who: &Identity, scopes: &[Scope]) -> Vec<Access> {
        let mut out: Vec<Access> = Vec::new();
        for scope in scopes {
            match scope {
                Scope::Catalog => {
                    if self.allows(who, "", Action::Catalog)
                        && !out.iter().any(|a| a.kind == "registry")
                    {
                        out.push(Access {
                            kind: "registry".into(),
                            name: "catalog".into(),
                            actions: vec!["*".into()],
                        });
                    }
                }
                Scope::Repository { name, actions } => {
                    let granted: Vec<String> = actions
                        .iter()
                        .filter(|a| self.allows(who, name, **a))
                        .map(|a| a.as_str().to_string())
                        .collect();
                    if granted.is_empty() {
                        continue;
                    }
                    match out
                        .iter_mut()
                        .find(|a| a.kind == "repository" && a.name == *name)
                    {
                        Some(a) => {
                            for g in granted {
                                if !a.actions.contains(&g) {
                                    a.actions.push(g);
                                }
                            }
                        }
                        None => out.push(Access {
                            kind: "repository".into(),
                            name: name.clone(),
                            actions: granted,
                        }),
                    }
                }
            }
        }
        out
    }

    /// The catalog filter for `who`: `None` when it may pull everything.
    pub fn catalog_filter(&self, who: &Identity) -> Option<CatalogFilter> {
        let user = who.user().map(str::to_string);
        if self.permissions.pulls_everything(user.as_deref()) {
            return None;
        }
        let permissions = self.permissions.clone();
        Some(CatalogFilter(Arc::new(move |repo: &str| {
            permissions.allows(user.as_deref(), repo, Action::Pull)
        })))
    }

    /// Whether anonymous requests may do anything at all.
    pub fn anonymous_has_access(&self) -> bool {
        self.permissions.has_any(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(yaml: &str) -> Auth {
        let c: permissions::PermissionsConfig = serde_norway::from_str(yaml).unwrap();
        let setup = AuthSetup {
            users: Users::load(Some(("alice", "pw")), None).unwrap(),
            permissions: Permissions::from_config(&c),
            warnings: vec![],
        };
        Auth::new(setup, &[1u8; 32], Duration::from_secs(60), None, false)
    }

    #[test]
    fn grant_is_the_intersection() {
        let a = auth(
            "alice:\n  - repos: team-a/*\n    actions: [pull, push]\nanonymous:\n  - repos: '*'\n    actions: [pull]\n",
        );
        let scopes = token::parse_scopes([
            "repository:team-a/x:pull,push,delete",
            "repository:other:pull,push",
            "registry:catalog:*",
        ]);
        let alice = Identity::User("alice".into());
        let g = a.grant(&alice, &scopes);
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].name, "team-a/x");
        assert_eq!(g[0].actions, ["pull", "push"]);
        assert_eq!(g[1].name, "other");
        assert_eq!(g[1].actions, ["pull"]);
        let anon = a.grant(&Identity::Anonymous, &scopes);
        assert_eq!(anon.len(), 2);
        assert!(anon.iter().all(|x| x.actions == ["pull"]));
        assert!(a.catalog_filter(&alice).is_none());
    }

    #[test]
    fn catalog_filter_follows_pull_rights() {
        let a = auth("alice:\n  - repos: [team-a/*, shared]\n    actions: [pull, catalog]\n");
        let f = a
            .catalog_filter(&Identity::User("alice".into()))
            .expect("a filter");
        assert!(f.allows("team-a/app"));
        assert!(f.allows("shared"));
        assert!(!f.allows("team-b/app"));
        assert!(!a.anonymous_has_access());
    }

    #[tokio::test]
    async fn a_verified_password_is_not_hashed_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        let hash = bcrypt::hash("pw", 4).unwrap();
        std::fs::write(&path, format!("alice:{hash}\n")).unwrap();
        let setup = AuthSetup {
            users: Users::load(None, Some(&path)).unwrap(),
            permissions: Permissions::default_rules(),
            warnings: vec![],
        };
        let a = Auth::new(setup, &[1u8; 32], Duration::from_secs(60), None, false);
        assert_eq!(a.service, DEFAULT_SERVICE);
        for _ in 0..5 {
            assert!(a.check_password("alice", "pw").await);
        }
        assert_eq!(a.hash_checks(), 1, "one hash, then the cache");
        // Failures are never cached: each wrong password is hashed.
        for _ in 0..3 {
            assert!(!a.check_password("alice", "wrong").await);
            assert!(!a.check_password("nobody", "pw").await);
        }
        assert_eq!(a.hash_checks(), 7);
        assert!(a.check_password("alice", "pw").await);
        assert_eq!(a.hash_checks(), 7);
    }

    #[test]
    fn the_service_is_the_hostname_or_fixed() {
        let with = |h: Option<&str>| {
            let setup = AuthSetup {
                users: Users::load(Some(("u", "p")), None).unwrap(),
                permissions: Permissions::default_rules(),
                warnings: vec![],
            };
            Auth::new(
                setup,
                &[1u8; 32],
                Duration::from_secs(60),
                h.map(Into::into),
                false,
            )
            .service
        };
        assert_eq!(with(None), "trow");
        assert_eq!(
            with(Some("registry.example.com:5000")),
            "registry.example.com:5000"
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let s = Secret("hunter2".into());
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
