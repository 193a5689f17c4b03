//! Who may read which secret, and which secret a requested name is, as of now.
//!
//! The policy holds every configured secret with its access rule and the names it answers to, built by
//! the daemon, and is replaced as a whole when the configuration is reloaded. Each replacement has a new
//! *generation* and wakes every open stream: a stream's earlier decisions hold only for the generation they
//! were made in, so it checks its whole subscription again before its next push (and at once when woken),
//! and a caller that may no longer read a secret is cut off the moment the new rules are in force, not at
//! its next request.
//!
//! A requested name is *resolved* before anything else ([`Rules::resolve`]): a configured secret wins over
//! everything, whatever the spelling. Its exact name first; then the name folded as DNS names compare
//! (lower case, no trailing dot), against the configured names and the domains of configured certificates,
//! then against their wildcard domains. Only a name that none of these match is *unconfigured*: a DNS name
//! then goes to the on-demand namespace ([`SecretId::OnDemand`]), anything else waits under its own name.
//! So `ACME.EXAMPLE.TEST` is the configured secret `acme.example.test`, served under that secret's access
//! rule, and never a certificate obtained on demand under the same name. Unconfigured names share one rule
//! (`[on_demand] allowed_nodes`), and are counted apart: per-name metrics exist only for configured secrets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::certs::ClientIdentities;
use crate::sds::access::Access;
use crate::values::{DnsName, SecretId, SecretName, canonical_name, folded_name};

/// A configured secret as the policy knows it: its name, its rule, and the names a certificate is issued
/// for (requests for any of them, in any spelling, are this secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Configured {
    /// The secret's name.
    pub name: SecretName,
    /// Who may read it.
    pub access: Access,
    /// The names on its certificate, when acme-sds issues it (ACME or internal); may hold wildcards.
    pub domains: Vec<String>,
}

impl From<(SecretName, Access)> for Configured {
    fn from((name, access): (SecretName, Access)) -> Self {
        Configured {
            name,
            access,
            domains: Vec::new(),
        }
    }
}

/// What a requested name refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where it is published.
    pub id: SecretId,
    /// Whether it is a configured secret.
    pub configured: bool,
}

/// One generation of rules.
#[derive(Debug, Default)]
pub struct Rules {
    generation: u64,
    /// Every configured secret, restricted or not.
    secrets: HashMap<SecretName, Access>,
    /// Folded names (configured names, then domains) and the configured secret each one is: the first in
    /// configuration order when several share one.
    folded: HashMap<String, SecretName>,
    /// Wildcard domains (`*.example.com` as `example.com`) and their secret.
    wildcards: HashMap<String, SecretName>,
    /// The rule of every other name (with `[on_demand] allowed_nodes`: who may ask for, and read,
    /// certificates obtained on demand); open by default.
    unconfigured: Access,
}

impl Rules {
    fn build(secrets: Vec<Configured>, unconfigured: Access, generation: u64) -> Rules {
        let mut folded = HashMap::new();
        let mut wildcards = HashMap::new();
        for c in &secrets {
            folded
                .entry(folded_name(&c.name))
                .or_insert_with(|| c.name.clone());
        }
        for c in &secrets {
            for d in &c.domains {
                let d = folded_name(d);
                match d.strip_prefix("*.") {
                    Some(base) => {
                        wildcards
                            .entry(base.to_owned())
                            .or_insert_with(|| c.name.clone());
                    }
                    None => {
                        folded.entry(d).or_insert_with(|| c.name.clone());
                    }
                }
            }
        }
        Rules {
            generation,
            secrets: secrets.into_iter().map(|c| (c.name, c.access)).collect(),
            folded,
            wildcards,
            unconfigured,
        }
    }

    /// The rules' generation: bumped by every change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The configured secret `requested` is, in any spelling (see the module docs).
    fn configured(&self, requested: &str) -> Option<&SecretName> {
        let name = canonical_name(requested);
        if let Some((n, _)) = self.secrets.get_key_value(name) {
            return Some(n);
        }
        let folded = folded_name(name);
        if let Some(n) = self.folded.get(&folded) {
            return Some(n);
        }
        let (_, parent) = folded.split_once('.')?;
        self.wildcards.get(parent)
    }

    /// What `requested` refers to: a configured secret in any spelling; else an on-demand certificate for a
    /// DNS name; else a secret under the name itself (nothing configures it; it is waited for).
    pub fn resolve(&self, requested: &str) -> Target {
        if let Some(name) = self.configured(requested) {
            return Target {
                id: SecretId::from(name),
                configured: true,
            };
        }
        let name = canonical_name(requested);
        let id = match DnsName::new(name) {
            Ok(d) => SecretId::OnDemand(d),
            Err(_) => SecretId::named(name),
        };
        Target {
            id,
            configured: false,
        }
    }

    /// Whether a caller (node id when usable, client certificate identities) may read `target`.
    pub fn allows(&self, target: &Target, node_id: Option<&str>, ids: &ClientIdentities) -> bool {
        let rule = match &target.id {
            SecretId::Named(n) if target.configured => {
                self.secrets.get(n.as_str()).unwrap_or(&self.unconfigured)
            }
            _ => &self.unconfigured,
        };
        rule.allows(node_id, ids)
    }

    /// Whether `requested` names a configured secret, in any spelling.
    pub fn is_configured(&self, requested: &str) -> bool {
        self.configured(requested).is_some()
    }

    /// Whether `id` is a secret these rules configure.
    pub fn configures(&self, id: &SecretId) -> bool {
        matches!(id, SecretId::Named(n) if self.secrets.contains_key(n.as_str()))
    }
}

/// Certificates obtained on demand (`[on_demand]`): told of every name a caller subscribes to or fetches
/// that is not a configured secret in any spelling, with the caller's node id. It answers through the
/// registry: it publishes the certificate, expects it (streams wait for it), or refuses it (streams report
/// it missing, which fails Envoy's waiting handshake at once over delta SDS). It must answer quickly: what
/// takes time (an `ask` request, the order) happens in its own tasks.
pub trait Demand: Send + Sync + std::fmt::Debug {
    /// `requested` (resolved to `id`, never a configured secret) was requested by the node `node_id` (none
    /// when it sent no usable one).
    fn requested(&self, requested: &str, id: &SecretId, node_id: Option<&str>);
}

/// The rules in force; see the module docs. Shared by the service and every stream.
#[derive(Debug)]
pub struct Policy {
    current: RwLock<Arc<Rules>>,
    /// What the rules in force were built from.
    built_from: RwLock<(Vec<Configured>, Access)>,
    generation: AtomicU64,
    changed: watch::Sender<u64>,
    demand: RwLock<Option<Arc<dyn Demand>>>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(Vec::<Configured>::new())
    }
}

impl Policy {
    /// A policy over every configured secret, restricted or not (`(name, rule)` pairs, or [`Configured`]
    /// with the names its certificate is for).
    pub fn new<C: Into<Configured>>(secrets: impl IntoIterator<Item = C>) -> Self {
        let secrets: Vec<Configured> = secrets.into_iter().map(Into::into).collect();
        Policy {
            current: RwLock::new(Arc::new(Rules::build(
                secrets.clone(),
                Access::default(),
                0,
            ))),
            built_from: RwLock::new((secrets, Access::default())),
            generation: AtomicU64::new(0),
            changed: watch::Sender::new(0),
            demand: RwLock::new(None),
        }
    }

    /// Who is told of requests for names that are not configured (`None`: nobody; they are just waited
    /// for, or reported missing over delta SDS).
    pub fn set_demand(&self, demand: Option<Arc<dyn Demand>>) {
        *self.demand.write().unwrap_or_else(|e| e.into_inner()) = demand;
    }

    /// Tells the on-demand issuer, if there is one, that `requested` (resolved to `id`, not configured)
    /// was requested.
    pub fn demand(&self, requested: &str, id: &SecretId, node_id: Option<&str>) {
        let demand = self
            .demand
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(d) = demand {
            d.requested(requested, id, node_id);
        }
    }

    /// Puts new rules in force and wakes every stream to check its subscription against them. Rules equal
    /// to those in force change nothing (a reload that touched no access rule wakes no stream).
    pub fn replace<C: Into<Configured>>(&self, secrets: impl IntoIterator<Item = C>) {
        let secrets: Vec<Configured> = secrets.into_iter().map(Into::into).collect();
        let unconfigured = self.built_from().1;
        self.put(secrets, unconfigured);
    }

    /// Puts new rules in force for configured secrets and for every other name at once (one generation:
    /// no request is decided by half of them).
    pub fn replace_all<C: Into<Configured>>(
        &self,
        secrets: impl IntoIterator<Item = C>,
        unconfigured: Access,
    ) {
        self.put(secrets.into_iter().map(Into::into).collect(), unconfigured);
    }

    /// Puts a new rule in force for every name that is not configured (`[on_demand] allowed_nodes`), as
    /// [`Policy::replace`] does for configured ones.
    pub fn replace_unconfigured(&self, rule: Access) {
        let secrets = self.built_from().0;
        self.put(secrets, rule);
    }

    fn built_from(&self) -> (Vec<Configured>, Access) {
        self.built_from
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn put(&self, secrets: Vec<Configured>, unconfigured: Access) {
        let generation = {
            let mut built_from = self.built_from.write().unwrap_or_else(|e| e.into_inner());
            if built_from.0 == secrets && built_from.1 == unconfigured {
                return;
            }
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            let generation = current.generation + 1;
            *current = Arc::new(Rules::build(
                secrets.clone(),
                unconfigured.clone(),
                generation,
            ));
            *built_from = (secrets, unconfigured);
            self.generation.store(generation, Ordering::Release);
            generation
        };
        self.changed.send_replace(generation);
    }

    /// The rules in force now.
    pub fn rules(&self) -> Arc<Rules> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The generation in force now: cheaper than [`Policy::rules`] for a stream that only needs to know
    /// whether its decisions are still current.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Changes from now on.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// What `requested` refers to under the rules in force (see [`Rules::resolve`]).
    pub fn resolve(&self, requested: &str) -> Target {
        self.rules().resolve(requested)
    }

    /// Whether `requested` names a configured secret, in any spelling.
    pub fn is_configured(&self, requested: &str) -> bool {
        self.rules().is_configured(requested)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> SecretName {
        SecretName::new(s).unwrap()
    }
    use crate::sds::access::NodePattern;

    fn edge_only() -> Access {
        Access {
            nodes: Some(vec![NodePattern::new("edge-*").unwrap()]),
            clients: None,
        }
    }

    /// Whether `node` may read what `requested` resolves to.
    fn may(rules: &Rules, requested: &str, node: Option<&str>) -> bool {
        rules.allows(
            &rules.resolve(requested),
            node,
            &ClientIdentities::default(),
        )
    }

    #[test]
    fn a_rule_for_unconfigured_names_applies_to_them_only() {
        let p = Policy::new([(name("web"), Access::default())]);
        assert!(may(&p.rules(), "anything.example.com", None));
        let before = p.generation();
        p.replace_unconfigured(edge_only());
        assert!(p.generation() > before, "a new rule wakes the streams");
        let r = p.rules();
        assert!(
            may(&r, "web", None),
            "configured secrets keep their own rule"
        );
        assert!(may(&r, "a.example.com", Some("edge-1")));
        assert!(!may(&r, "a.example.com", Some("other")));
        assert!(!may(&r, "a.example.com", None));
        // Configured rules replaced later keep the unconfigured one.
        p.replace([(name("web"), edge_only())]);
        assert!(!may(&p.rules(), "a.example.com", Some("other")));
    }

    #[test]
    fn rules_apply_by_canonical_name_and_unconfigured_names_are_open() {
        let p = Policy::new([
            (name("web"), edge_only()),
            (name("open"), Access::default()),
        ]);
        let rules = p.rules();
        assert!(may(&rules, "web", Some("edge-1")));
        assert!(!may(&rules, "sds://web", Some("intruder")));
        assert!(!may(&rules, "web", None));
        assert!(may(&rules, "open", None));
        assert!(may(&rules, "not-configured", None));
        assert!(rules.is_configured("sds://open"));
        assert!(!rules.is_configured("not-configured"));
    }

    /// Every spelling of a configured name, or of a domain of a configured certificate, is that secret,
    /// under its rule; only what matches nothing configured is on demand.
    #[test]
    fn configured_names_win_in_every_spelling() {
        let configured = |n: &str, domains: &[&str]| Configured {
            name: name(n),
            access: edge_only(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
        };
        let p = Policy::new([
            configured("acme.example.test", &["acme.example.test"]),
            configured("shop.example.test", &[]),
            configured("web", &["www.example.test", "Api.Example.Test"]),
            configured("wild", &["*.wild.example.test"]),
            configured("Mixed.Example.Test", &[]),
        ]);
        p.replace_unconfigured(Access::default());
        let rules = p.rules();
        let table: &[(&str, SecretId, bool)] = &[
            (
                "acme.example.test",
                SecretId::named("acme.example.test"),
                true,
            ),
            (
                "ACME.EXAMPLE.TEST",
                SecretId::named("acme.example.test"),
                true,
            ),
            (
                "Acme.example.test",
                SecretId::named("acme.example.test"),
                true,
            ),
            (
                "acme.example.test.",
                SecretId::named("acme.example.test"),
                true,
            ),
            (
                "sds://Acme.Example.Test.",
                SecretId::named("acme.example.test"),
                true,
            ),
            (
                "SHOP.example.test",
                SecretId::named("shop.example.test"),
                true,
            ),
            ("www.example.test", SecretId::named("web"), true),
            ("WWW.EXAMPLE.TEST.", SecretId::named("web"), true),
            ("api.example.test", SecretId::named("web"), true),
            ("a.wild.example.test", SecretId::named("wild"), true),
            ("A.WILD.example.test", SecretId::named("wild"), true),
            (
                "mixed.example.test",
                SecretId::named("Mixed.Example.Test"),
                true,
            ),
            (
                "Mixed.Example.Test",
                SecretId::named("Mixed.Example.Test"),
                true,
            ),
            // Not configured: on demand, by the DNS name it folds to.
            (
                "a.b.wild.example.test",
                SecretId::OnDemand(DnsName::new("a.b.wild.example.test").unwrap()),
                false,
            ),
            (
                "wild.example.test",
                SecretId::OnDemand(DnsName::new("wild.example.test").unwrap()),
                false,
            ),
            (
                "New.Example.Test.",
                SecretId::OnDemand(DnsName::new("new.example.test").unwrap()),
                false,
            ),
            ("WEB", SecretId::named("web"), true),
            // Neither configured nor a DNS name: waited for under its own name.
            ("OTHER", SecretId::named("OTHER"), false),
            (
                "bad_name.example.test",
                SecretId::named("bad_name.example.test"),
                false,
            ),
            ("sds://other", SecretId::named("other"), false),
        ];
        for (requested, id, configured) in table {
            let t = rules.resolve(requested);
            assert_eq!((&t.id, t.configured), (id, *configured), "{requested}");
            assert_eq!(rules.is_configured(requested), *configured, "{requested}");
            // A configured secret is read under its own rule, whatever the spelling.
            assert_eq!(
                may(&rules, requested, Some("intruder")),
                !configured,
                "{requested}"
            );
            assert!(may(&rules, requested, Some("edge-1")), "{requested}");
        }
    }

    #[tokio::test]
    async fn a_replacement_has_a_new_generation_and_wakes_subscribers() {
        let p = Policy::new([(name("web"), Access::default())]);
        let mut rx = p.subscribe();
        assert_eq!(p.generation(), 0);
        p.replace([(name("web"), edge_only())]);
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow_and_update(), 1);
        assert_eq!(p.generation(), 1);
        assert_eq!(p.rules().generation(), 1);
        assert!(!may(&p.rules(), "web", Some("core")));
        p.replace([(name("web"), edge_only())]);
        assert_eq!(p.generation(), 1, "the same rules again change nothing");
        assert!(!rx.has_changed().unwrap());
    }
}
