//! The prefix rules of `image_validation`, compiled: prefixes normalised
//! like images, the longest matching prefix decides, a deny wins a tie,
//! a namespace's own rules before the global ones.

use std::collections::{BTreeMap, BTreeSet};

use super::config::{DefaultVerdict, ImageValidationConfig};
use crate::oci::image_ref::prefix_matches;

/// One prefix rule.
#[derive(Debug, Clone)]
struct Rule {
    /// Normalised, as matched.
    prefix: String,
    /// As configured, for messages.
    written: String,
    allow: bool,
}

#[derive(Debug, Clone, Default)]
struct Rules {
    rules: Vec<Rule>,
    default: Option<DefaultVerdict>,
}

impl Rules {
    fn new(
        allow: &[String],
        deny: &[String],
        default: Option<DefaultVerdict>,
        normalise: &dyn Fn(&str) -> String,
    ) -> Rules {
        let mut rules = Vec::new();
        for (list, is_allow) in [(allow, true), (deny, false)] {
            for p in list {
                rules.push(Rule {
                    prefix: normalise(p),
                    written: p.trim().to_string(),
                    allow: is_allow,
                });
            }
        }
        Rules { rules, default }
    }

    /// The longest rule matching `image`; a deny rule wins a tie.
    fn best(&self, image: &str) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| prefix_matches(&r.prefix, image))
            .max_by_key(|r| (r.prefix.len(), !r.allow))
    }
}

/// The verdict on one image and the rule that gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleVerdict {
    pub allowed: bool,
    /// Which rule: `image_validation.deny "docker.io/library/nginx"`.
    pub rule: String,
}

/// `image_validation`, ready to decide.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    global: Rules,
    namespaces: BTreeMap<String, Rules>,
    exempt: BTreeSet<String>,
}

impl Policy {
    /// Compiles `config`; `normalise` turns a configured prefix into the
    /// form images are matched in.
    pub fn new(config: &ImageValidationConfig, normalise: &dyn Fn(&str) -> String) -> Policy {
        Policy {
            global: Rules::new(&config.allow, &config.deny, Some(config.default), normalise),
            namespaces: config
                .namespaces
                .iter()
                .map(|(ns, r)| {
                    (
                        ns.clone(),
                        Rules::new(&r.allow, &r.deny, r.default, normalise),
                    )
                })
                .collect(),
            exempt: config.exempt_namespaces.iter().cloned().collect(),
        }
    }

    /// Whether pods of `namespace` are not checked at all.
    pub fn exempt(&self, namespace: &str) -> bool {
        self.exempt.contains(namespace)
    }

    /// The verdict on the normalised `image` in `namespace`.
    pub fn decide(&self, namespace: &str, image: &str) -> RuleVerdict {
        let local = self.namespaces.get(namespace);
        if let Some(r) = local.and_then(|rules| rules.best(image)) {
            return RuleVerdict {
                allowed: r.allow,
                rule: format!(
                    "image_validation.namespaces.{namespace}.{} \"{}\"",
                    if r.allow { "allow" } else { "deny" },
                    r.written
                ),
            };
        }
        if let Some(r) = self.global.best(image) {
            return RuleVerdict {
                allowed: r.allow,
                rule: format!(
                    "image_validation.{} \"{}\"",
                    if r.allow { "allow" } else { "deny" },
                    r.written
                ),
            };
        }
        let (default, at) = match local.and_then(|l| l.default) {
            Some(d) => (
                d,
                format!("image_validation.namespaces.{namespace}.default"),
            ),
            None => (
                self.global.default.unwrap_or_default(),
                "image_validation.default".to_string(),
            ),
        };
        RuleVerdict {
            allowed: default == DefaultVerdict::Allow,
            rule: format!("{at} {default:?} (no rule matches)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::image_ref::prefix;

    fn policy(yaml: &str) -> Policy {
        let c: ImageValidationConfig = serde_norway::from_str(yaml).unwrap();
        Policy::new(&c, &|p| prefix(p))
    }

    #[test]
    fn longest_prefix_wins_and_deny_wins_ties() {
        let p = policy(
            "default: Deny\nallow: [docker.io/, quay.io/org/]\ndeny: [nginx, quay.io/org/]\n",
        );
        assert!(p.decide("a", "docker.io/library/redis:7").allowed);
        let v = p.decide("a", "docker.io/library/nginx:1");
        assert!(!v.allowed);
        assert_eq!(v.rule, "image_validation.deny \"nginx\"");
        assert!(!p.decide("a", "quay.io/org/x:1").allowed);
        let v = p.decide("a", "ghcr.io/x:1");
        assert!(!v.allowed);
        assert!(
            v.rule.contains("image_validation.default Deny"),
            "{}",
            v.rule
        );
        assert!(policy("{}").decide("a", "ghcr.io/x:1").allowed);
    }

    #[test]
    fn namespaces_have_exceptions() {
        let p = policy(
            "default: Deny\nallow: [docker.io/library/]\nexempt_namespaces: [ops]\nnamespaces:\n  dev:\n    default: Allow\n    deny: [docker.io/library/busybox]\n",
        );
        assert!(p.exempt("ops"));
        assert!(!p.exempt("dev"));
        assert!(p.decide("dev", "ghcr.io/x:1").allowed);
        assert!(!p.decide("prod", "ghcr.io/x:1").allowed);
        let v = p.decide("dev", "docker.io/library/busybox:1");
        assert!(!v.allowed);
        assert!(v.rule.contains("namespaces.dev.deny"), "{}", v.rule);
        assert!(p.decide("prod", "docker.io/library/busybox:1").allowed);
    }
}
