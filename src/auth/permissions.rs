//! Who may do what on which repositories: the `permissions` section of the
//! YAML configuration file.
//!
//! ```yaml
//! permissions:
//!   anonymous:            # requests without credentials
//!     - repos: ["*"]
//!       actions: [pull]
//!   authenticated:        # every user who logged in
//!     - repos: ["*"]
//!       actions: [pull, push]
//!   alice:
//!     - repos: ["team-a/*"]
//!       actions: [pull, push, delete]
//! ```
//!
//! A user may do what its own rules, the `authenticated` rules and the
//! `anonymous` rules allow together. Repository patterns are exact names
//! (`library/alpine`) or prefixes ending in `*` (`team-a/*`, `*`).

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;

pub use crate::oci::pattern::RepoPattern;
use crate::oci::pattern::RepoPatterns;

/// An action on a repository (or, for `Catalog`, on the registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
    /// `GET /v2/_catalog` (which lists only repositories the caller may pull).
    Catalog,
    /// Running the registry: `POST /admin/gc`. Never granted by `*` (it has
    /// to be named) and never to anonymous requests.
    Admin,
}

impl Action {
    /// What `*` grants: everything but `admin`, which must be named.
    pub const ALL: [Action; 4] = [Action::Pull, Action::Push, Action::Delete, Action::Catalog];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Catalog => "catalog",
            Action::Admin => "admin",
        }
    }

    /// Parses an action as written in the configuration and in token scopes.
    pub fn parse(s: &str) -> Option<Action> {
        Some(match s {
            "pull" => Action::Pull,
            "push" => Action::Push,
            "delete" => Action::Delete,
            "catalog" => Action::Catalog,
            "admin" => Action::Admin,
            _ => return None,
        })
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One action in the YAML file: an action name or `*` for all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ActionSpec {
    One(Action),
    All,
}

impl<'de> Deserialize<'de> for ActionSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if s == "*" {
            return Ok(ActionSpec::All);
        }
        Action::parse(&s).map(ActionSpec::One).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown action `{s}`; use pull, push, delete, catalog, admin or *"
            ))
        })
    }
}

/// One rule: these actions on these repositories.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    repos: RepoPatterns,
    actions: Vec<ActionSpec>,
}

/// The `permissions` section as written: principal name → rules.
pub type PermissionsConfig = BTreeMap<String, Vec<RuleConfig>>;

/// The principal for requests without credentials.
pub const ANONYMOUS: &str = "anonymous";
/// The principal whose rules apply to every user who logged in.
pub const AUTHENTICATED: &str = "authenticated";

#[derive(Debug, Clone)]
struct Rule {
    patterns: Vec<RepoPattern>,
    actions: Vec<Action>,
}

impl From<&RuleConfig> for Rule {
    fn from(c: &RuleConfig) -> Rule {
        let patterns = c.repos.0.clone();
        let mut actions: Vec<Action> = c
            .actions
            .iter()
            .flat_map(|a| match a {
                ActionSpec::One(a) => vec![*a],
                ActionSpec::All => Action::ALL.to_vec(),
            })
            .collect();
        actions.sort();
        actions.dedup();
        Rule { patterns, actions }
    }
}

/// The compiled permission rules.
#[derive(Debug, Clone)]
pub struct Permissions {
    rules: BTreeMap<String, Vec<Rule>>,
}

impl Permissions {
    /// Without a `permissions` section: every user who logged in may do
    /// everything, `admin` included (the users are the operators);
    /// anonymous requests may do nothing.
    pub fn default_rules() -> Permissions {
        let mut rules = BTreeMap::new();
        let mut actions = Action::ALL.to_vec();
        actions.push(Action::Admin);
        rules.insert(
            AUTHENTICATED.to_string(),
            vec![Rule {
                patterns: vec![RepoPattern::Prefix(String::new())],
                actions,
            }],
        );
        Permissions { rules }
    }

    pub fn from_config(config: &PermissionsConfig) -> Permissions {
        let rules = config
            .iter()
            .map(|(who, rules)| (who.clone(), rules.iter().map(Rule::from).collect()))
            .collect();
        Permissions { rules }
    }

    /// Principals named in the rules other than the two special ones.
    pub fn named_users(&self) -> impl Iterator<Item = &str> {
        self.rules
            .keys()
            .map(String::as_str)
            .filter(|k| *k != ANONYMOUS && *k != AUTHENTICATED)
    }

    /// The rules that apply to `user` (`None` for anonymous requests).
    fn rules_for<'a>(&'a self, user: Option<&'a str>) -> impl Iterator<Item = &'a Rule> + 'a {
        let own = user.and_then(|u| self.rules.get(u));
        let authenticated = user.and_then(|_| self.rules.get(AUTHENTICATED));
        let anonymous = self.rules.get(ANONYMOUS);
        own.into_iter()
            .chain(authenticated)
            .chain(anonymous)
            .flatten()
    }

    /// Whether `user` (`None`: anonymous) may do `action` on `repo`. For
    /// [`Action::Catalog`] and [`Action::Admin`] the repository is ignored:
    /// a rule granting them on any pattern grants them. `admin` is never
    /// anonymous: neither anonymous requests nor the `anonymous` rules
    /// grant it.
    pub fn allows(&self, user: Option<&str>, repo: &str, action: Action) -> bool {
        if action == Action::Admin {
            let Some(user) = user else { return false };
            let own = self.rules.get(user).into_iter().flatten();
            let authenticated = self.rules.get(AUTHENTICATED).into_iter().flatten();
            return own
                .chain(authenticated)
                .any(|r| r.actions.contains(&action));
        }
        self.rules_for(user).any(|r| {
            r.actions.contains(&action)
                && (action == Action::Catalog || r.patterns.iter().any(|p| p.matches(repo)))
        })
    }

    /// Whether `user` may pull every repository (so listings need no filter).
    pub fn pulls_everything(&self, user: Option<&str>) -> bool {
        self.rules_for(user).any(|r| {
            r.actions.contains(&Action::Pull) && r.patterns.iter().any(RepoPattern::is_everything)
        })
    }

    /// Whether `user` has any permission at all.
    pub fn has_any(&self, user: Option<&str>) -> bool {
        self.rules_for(user).any(|r| !r.actions.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Permissions {
        let c: PermissionsConfig = serde_norway::from_str(yaml).unwrap();
        Permissions::from_config(&c)
    }

    #[test]
    fn admin_is_named_never_anonymous_and_never_from_a_star() {
        let p = parse(
            "alice:\n  - repos: '*'\n    actions: [admin]\nbob:\n  - repos: '*'\n    actions: ['*']\nanonymous:\n  - repos: '*'\n    actions: [pull, admin]\n",
        );
        assert!(p.allows(Some("alice"), "", Action::Admin));
        assert!(!p.allows(Some("bob"), "", Action::Admin));
        assert!(!p.allows(None, "", Action::Admin));
        assert!(
            !p.allows(Some("carol"), "", Action::Admin),
            "not through the anonymous rules"
        );
        assert!(Permissions::default_rules().allows(Some("anyone"), "", Action::Admin));
        assert!(!Permissions::default_rules().allows(None, "", Action::Admin));
    }

    #[test]
    fn rules_combine() {
        let p = parse(
            r#"
anonymous:
  - repos: "*"
    actions: [pull]
authenticated:
  - repos: ["*"]
    actions: [catalog]
alice:
  - repos: [team-a/*]
    actions: [push, delete]
bob:
  - repos: "*"
    actions: ["*"]
"#,
        );
        assert!(p.allows(None, "x", Action::Pull));
        assert!(!p.allows(None, "x", Action::Push));
        assert!(!p.allows(None, "x", Action::Catalog));
        assert!(p.allows(Some("alice"), "team-a/app", Action::Push));
        assert!(p.allows(Some("alice"), "team-b/app", Action::Pull));
        assert!(!p.allows(Some("alice"), "team-b/app", Action::Push));
        assert!(p.allows(Some("alice"), "", Action::Catalog));
        assert!(p.allows(Some("carol"), "q", Action::Pull));
        assert!(!p.allows(Some("carol"), "q", Action::Delete));
        assert!(p.allows(Some("bob"), "q", Action::Delete));
        assert!(p.pulls_everything(None));
        assert_eq!(p.named_users().collect::<Vec<_>>(), ["alice", "bob"]);
    }

    #[test]
    fn defaults() {
        let p = Permissions::default_rules();
        assert!(!p.has_any(None));
        assert!(p.allows(Some("u"), "any/thing", Action::Delete));
        assert!(p.pulls_everything(Some("u")));
    }

    #[test]
    fn bad_config_names_the_problem() {
        let e = serde_norway::from_str::<PermissionsConfig>(
            "alice:\n  - repos: x\n    actions: [pul]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("unknown action `pul`"), "{e}");
        let e = serde_norway::from_str::<PermissionsConfig>(
            "alice:\n  - repo: x\n    actions: [pull]\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("repo"), "{e}");
    }
}
