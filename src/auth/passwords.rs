//! Users and their passwords: `--user`/`--password` and `--htpasswd` files
//! (bcrypt entries as written by `htpasswd -B`, and argon2 PHC strings).
//!
//! Checking a password costs the same whether the user exists or not: an
//! unknown user's password is checked against a stand-in hash of the same
//! kind and cost as the real ones, and the answer is then "no".

use std::collections::HashMap;
use std::path::Path;

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{CustomizedPasswordHasher, PasswordVerifier};
use argon2::Argon2;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use super::permissions::{ANONYMOUS, AUTHENTICATED};

/// How one user's password is checked.
#[derive(Clone)]
enum Verifier {
    /// `$2a$`/`$2b$`/`$2y$` bcrypt hash.
    Bcrypt(String),
    /// `$argon2id$…` (or `argon2i`/`argon2d`) PHC string.
    Argon2(String),
    /// SHA-256 of a password given on the command line, compared in
    /// constant time.
    Plain([u8; 32]),
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Hashes are not secrets in the usual sense, but they stay out of
        // `--dry-run` output and logs all the same.
        f.write_str(match self {
            Verifier::Bcrypt(_) => "bcrypt",
            Verifier::Argon2(_) => "argon2",
            Verifier::Plain(_) => "plain",
        })
    }
}

impl Verifier {
    fn parse_hash(hash: &str) -> Result<Verifier, String> {
        if ["$2a$", "$2b$", "$2y$", "$2x$"]
            .iter()
            .any(|p| hash.starts_with(p))
        {
            bcrypt_cost(hash).ok_or("malformed bcrypt hash")?;
            if hash.len() != 60 {
                return Err("malformed bcrypt hash (expected 60 characters)".into());
            }
            return Ok(Verifier::Bcrypt(hash.to_string()));
        }
        if hash.starts_with("$argon2") {
            let parsed =
                PasswordHash::new(hash).map_err(|e| format!("malformed argon2 hash: {e}"))?;
            if parsed.salt.is_none() || parsed.hash.is_none() {
                return Err("argon2 hash without salt or output".into());
            }
            argon2::Params::try_from(&parsed)
                .map_err(|e| format!("unusable argon2 parameters: {e}"))?;
            return Ok(Verifier::Argon2(hash.to_string()));
        }
        Err("unsupported hash; only bcrypt (`htpasswd -B`) and argon2 hashes are accepted".into())
    }

    fn plain(password: &str) -> Verifier {
        Verifier::Plain(Sha256::digest(password.as_bytes()).into())
    }

    /// Runs the full check. Blocking: bcrypt and argon2 are slow on purpose.
    fn verify(&self, password: &str) -> bool {
        match self {
            Verifier::Bcrypt(h) => bcrypt::verify(password, h).unwrap_or(false),
            Verifier::Argon2(h) => PasswordHash::new(h)
                .map(|parsed| {
                    Argon2::default()
                        .verify_password(password.as_bytes(), &parsed)
                        .is_ok()
                })
                .unwrap_or(false),
            Verifier::Plain(digest) => {
                let got: [u8; 32] = Sha256::digest(password.as_bytes()).into();
                bool::from(got.ct_eq(digest))
            }
        }
    }

    /// A hash of `password` of the same kind and cost as `self`, so that a
    /// command-line user costs the same to check as the htpasswd users.
    fn hash_like(&self, password: &str) -> Result<Verifier, String> {
        match self {
            Verifier::Bcrypt(h) => {
                let cost = bcrypt_cost(h).unwrap_or(bcrypt::DEFAULT_COST);
                bcrypt::hash(password, cost)
                    .map(Verifier::Bcrypt)
                    .map_err(|e| format!("cannot hash the --password: {e}"))
            }
            Verifier::Argon2(h) => {
                let parsed = PasswordHash::new(h).map_err(|e| e.to_string())?;
                let params = argon2::Params::try_from(&parsed).map_err(|e| e.to_string())?;
                let mut salt = [0u8; 16];
                getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
                Argon2::default()
                    .hash_password_customized(
                        password.as_bytes(),
                        &salt,
                        Some(parsed.algorithm.as_str()),
                        parsed.version,
                        params,
                    )
                    .map(|h| Verifier::Argon2(h.to_string()))
                    .map_err(|e| format!("cannot hash the --password: {e}"))
            }
            Verifier::Plain(_) => Ok(Verifier::plain(password)),
        }
    }

    /// A key telling verifiers of the same kind and cost apart.
    fn cost_class(&self) -> String {
        match self {
            Verifier::Bcrypt(h) => format!("bcrypt/{}", bcrypt_cost(h).unwrap_or(0)),
            Verifier::Argon2(h) => {
                let params = PasswordHash::new(h)
                    .map(|p| p.params.to_string())
                    .unwrap_or_default();
                format!("argon2/{params}")
            }
            Verifier::Plain(_) => "plain".into(),
        }
    }
}

/// The cost of a bcrypt hash: `$2y$<cost>$…`.
fn bcrypt_cost(hash: &str) -> Option<u32> {
    let cost: u32 = hash.get(4..6)?.parse().ok()?;
    (hash.as_bytes().get(6) == Some(&b'$') && (4..=31).contains(&cost)).then_some(cost)
}

/// The user database.
#[derive(Debug, Clone)]
pub struct Users {
    users: HashMap<String, Verifier>,
    /// What unknown users' passwords are checked against.
    stand_in: Verifier,
}

/// Reads `--password`: the value itself, or the contents of `file://<path>`
/// without its trailing newline.
pub fn read_password(value: &str) -> Result<String, String> {
    let password = match value.strip_prefix("file://") {
        Some(path) => {
            let mut s = std::fs::read_to_string(path)
                .map_err(|e| format!("--password: cannot read {path}: {e}"))?;
            while s.ends_with('\n') || s.ends_with('\r') {
                s.pop();
            }
            s
        }
        None => value.to_string(),
    };
    if password.is_empty() {
        return Err("--password: the password is empty".into());
    }
    Ok(password)
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty user name".into());
    }
    if name == ANONYMOUS || name == AUTHENTICATED {
        return Err(format!(
            "`{name}` is reserved for permission rules and cannot be a user name"
        ));
    }
    if name.contains(':') || name.chars().any(char::is_control) {
        return Err(format!(
            "user name `{name}` contains `:` or a control character"
        ));
    }
    Ok(())
}

/// Parses an htpasswd file's text into (user, verifier) pairs.
fn parse_htpasswd(text: &str, origin: &str) -> Result<Vec<(String, Verifier)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let at = || format!("{origin} line {}", i + 1);
        let (name, hash) = line
            .split_once(':')
            .ok_or_else(|| format!("{}: expected `user:hash`", at()))?;
        check_name(name).map_err(|e| format!("{}: {e}", at()))?;
        let verifier =
            Verifier::parse_hash(hash).map_err(|e| format!("{}: user `{name}`: {e}", at()))?;
        out.push((name.to_string(), verifier));
    }
    Ok(out)
}

impl Users {
    /// Builds the user database from `--user`/`--password` and `--htpasswd`.
    pub fn load(user: Option<(&str, &str)>, htpasswd: Option<&Path>) -> Result<Users, String> {
        let mut users: HashMap<String, Verifier> = HashMap::new();
        if let Some(path) = htpasswd {
            let origin = format!("--htpasswd {}", path.display());
            let text =
                std::fs::read_to_string(path).map_err(|e| format!("{origin}: cannot read: {e}"))?;
            for (name, verifier) in parse_htpasswd(&text, &origin)? {
                if users.insert(name.clone(), verifier).is_some() {
                    return Err(format!("{origin}: user `{name}` appears twice"));
                }
            }
            if users.is_empty() {
                return Err(format!("{origin}: the file defines no user"));
            }
        }
        // The stand-in: a real hash of the most common kind and cost, so an
        // unknown user costs what a typical known user costs.
        let stand_in = {
            let mut classes: HashMap<String, (usize, &Verifier)> = HashMap::new();
            for v in users.values() {
                classes.entry(v.cost_class()).or_insert((0, v)).0 += 1;
            }
            classes
                .into_values()
                .max_by_key(|(n, _)| *n)
                .map(|(_, v)| v.clone())
                .unwrap_or(Verifier::Plain([0; 32]))
        };
        if let Some((name, password)) = user {
            check_name(name).map_err(|e| format!("--user: {e}"))?;
            if users.contains_key(name) {
                return Err(format!(
                    "--user `{name}` is also in the --htpasswd file; define it once"
                ));
            }
            let verifier = stand_in.hash_like(password)?;
            users.insert(name.to_string(), verifier);
        }
        Ok(Users { users, stand_in })
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.users.contains_key(name)
    }

    /// Whether checks are cheap (only command-line passwords, compared as
    /// SHA-256 digests), so they need not leave the async threads.
    pub fn checks_are_cheap(&self) -> bool {
        matches!(self.stand_in, Verifier::Plain(_))
    }

    /// Whether `password` is `user`'s. Blocking; the same cost for unknown
    /// users as for known ones.
    pub fn verify(&self, user: &str, password: &str) -> bool {
        match self.users.get(user) {
            Some(v) => v.verify(password),
            None => {
                let _ = self.stand_in.verify(password);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htpasswd_bcrypt_and_argon2() {
        let b = bcrypt::hash("s3cret", 4).unwrap();
        let a = Verifier::Argon2(
            "$argon2id$v=19$m=8,t=1,p=1$c29tZXNhbHQ$ZKS2VIrFV+hlSzTb1zu5Hw".into(),
        )
        .hash_like("pw2")
        .unwrap();
        let Verifier::Argon2(a) = a else { panic!() };
        let text = format!("# comment\n\nalice:{b}\nbob:{a}\n");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        std::fs::write(&path, text).unwrap();
        let users = Users::load(Some(("carol", "pw3")), Some(&path)).unwrap();
        assert_eq!(users.len(), 3);
        assert!(!users.checks_are_cheap());
        assert!(users.verify("alice", "s3cret"));
        assert!(!users.verify("alice", "s3cret "));
        assert!(users.verify("bob", "pw2"));
        assert!(!users.verify("bob", "s3cret"));
        assert!(users.verify("carol", "pw3"));
        assert!(!users.verify("nobody", "s3cret"));
        // carol is hashed like the others (bcrypt, the most common here
        // is a tie; either way not plain).
        assert!(!matches!(users.users["carol"], Verifier::Plain(_)));
    }

    #[test]
    fn plain_user() {
        let users = Users::load(Some(("u", "p")), None).unwrap();
        assert!(users.checks_are_cheap());
        assert!(users.verify("u", "p"));
        assert!(!users.verify("u", "q"));
        assert!(!users.verify("v", "p"));
    }

    #[test]
    fn rejects_bad_files() {
        let e = parse_htpasswd("alice:$apr1$xyz$abc\n", "f").unwrap_err();
        assert!(e.contains("f line 1") && e.contains("htpasswd -B"), "{e}");
        assert!(parse_htpasswd("alice\n", "f").is_err());
        assert!(parse_htpasswd("anonymous:$2y$05$x\n", "f").is_err());
        assert!(parse_htpasswd("a:$2y$05$tooshort\n", "f").is_err());
    }

    #[test]
    fn password_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "hunter2\n").unwrap();
        assert_eq!(
            read_password(&format!("file://{}", p.display())).unwrap(),
            "hunter2"
        );
        assert_eq!(read_password("x\n").unwrap(), "x\n");
        assert!(read_password("").is_err());
        assert!(read_password("file:///nonexistent/pw").is_err());
    }
}
