//! Who may read which secret, as of now.
//!
//! The policy holds the access rule of every configured secret (`(name, rule)` pairs built by the daemon)
//! and is replaced as a whole when the configuration is reloaded. Each replacement has a new *generation*
//! and wakes every open stream: a stream's earlier decisions hold only for the generation they were made in,
//! so it checks its whole subscription again before its next push (and at once when woken), and a caller
//! that may no longer read a secret is cut off the moment the new rules are in force, not at its next
//! request. Names that are not configured have no rule (anyone who can reach a listener may wait for them),
//! but they are counted apart: per-name metrics exist only for configured secrets.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use crate::certs::ClientIdentities;
use crate::sds::access::Access;
use crate::values::{SecretName, canonical_name};

/// One generation of rules.
#[derive(Debug, Default)]
pub struct Rules {
    generation: u64,
    /// Every configured secret, restricted or not.
    secrets: HashMap<SecretName, Access>,
    /// The rule of every other name (with `[on_demand] allowed_nodes`: who may ask for, and read,
    /// certificates obtained on demand); open by default.
    unconfigured: Access,
}

impl Rules {
    /// The rules' generation: bumped by every change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether a caller (node id when usable, client certificate identities) may read `requested`.
    pub fn allows(&self, requested: &str, node_id: Option<&str>, ids: &ClientIdentities) -> bool {
        self.secrets
            .get(canonical_name(requested))
            .unwrap_or(&self.unconfigured)
            .allows(node_id, ids)
    }

    /// Whether `requested` names a configured secret.
    pub fn is_configured(&self, requested: &str) -> bool {
        self.secrets.contains_key(canonical_name(requested))
    }
}

/// Certificates obtained on demand (`[on_demand]`): told of every name a caller subscribes to or fetches
/// that no certificate is configured for, with the caller's node id. It answers through the registry: it
/// publishes the name, expects it (streams wait for it), or refuses it (streams report it missing, which
/// fails Envoy's waiting handshake at once over delta SDS). It must answer quickly: what takes time (an
/// `ask` request, the order) happens in its own tasks.
pub trait Demand: Send + Sync + std::fmt::Debug {
    /// `name` was requested by the node `node_id` (none when it sent no usable one).
    fn requested(&self, name: &str, node_id: Option<&str>);
}

/// The rules in force; see the module docs. Shared by the service and every stream.
#[derive(Debug)]
pub struct Policy {
    current: RwLock<Arc<Rules>>,
    generation: AtomicU64,
    changed: watch::Sender<u64>,
    demand: RwLock<Option<Arc<dyn Demand>>>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::new(std::iter::empty())
    }
}

impl Policy {
    /// A policy over `(secret name, access rule)` pairs: every configured secret, restricted or not.
    pub fn new(secrets: impl IntoIterator<Item = (SecretName, Access)>) -> Self {
        Policy {
            current: RwLock::new(Arc::new(Rules {
                generation: 0,
                secrets: secrets.into_iter().collect(),
                unconfigured: Access::default(),
            })),
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

    /// Tells the on-demand issuer, if there is one, that `name` (not configured) was requested.
    pub fn demand(&self, name: &str, node_id: Option<&str>) {
        let demand = self
            .demand
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(d) = demand {
            d.requested(name, node_id);
        }
    }

    /// Puts new rules in force and wakes every stream to check its subscription against them. Rules equal
    /// to those in force change nothing (a reload that touched no access rule wakes no stream).
    pub fn replace(&self, secrets: impl IntoIterator<Item = (SecretName, Access)>) {
        let secrets: HashMap<SecretName, Access> = secrets.into_iter().collect();
        let unconfigured = self.rules().unconfigured.clone();
        self.put(secrets, unconfigured);
    }

    /// Puts a new rule in force for every name that is not configured (`[on_demand] allowed_nodes`), as
    /// [`Policy::replace`] does for configured ones.
    pub fn replace_unconfigured(&self, rule: Access) {
        let secrets = self.rules().secrets.clone();
        self.put(secrets, rule);
    }

    fn put(&self, secrets: HashMap<SecretName, Access>, unconfigured: Access) {
        let generation = {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            if current.secrets == secrets && current.unconfigured == unconfigured {
                return;
            }
            let generation = current.generation + 1;
            *current = Arc::new(Rules {
                generation,
                secrets,
                unconfigured,
            });
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

    /// Whether `requested` names a configured secret.
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

    #[test]
    fn a_rule_for_unconfigured_names_applies_to_them_only() {
        let p = Policy::new([(name("web"), Access::default())]);
        let ids = ClientIdentities::default();
        assert!(p.rules().allows("anything.example.com", None, &ids));
        let before = p.generation();
        p.replace_unconfigured(edge_only());
        assert!(p.generation() > before, "a new rule wakes the streams");
        let r = p.rules();
        assert!(
            r.allows("web", None, &ids),
            "configured secrets keep their own rule"
        );
        assert!(r.allows("a.example.com", Some("edge-1"), &ids));
        assert!(!r.allows("a.example.com", Some("other"), &ids));
        assert!(!r.allows("a.example.com", None, &ids));
        // Configured rules replaced later keep the unconfigured one.
        p.replace([(name("web"), edge_only())]);
        assert!(!p.rules().allows("a.example.com", Some("other"), &ids));
    }

    #[test]
    fn rules_apply_by_canonical_name_and_unconfigured_names_are_open() {
        let p = Policy::new([
            (name("web"), edge_only()),
            (name("open"), Access::default()),
        ]);
        let none = ClientIdentities::default();
        let rules = p.rules();
        assert!(rules.allows("web", Some("edge-1"), &none));
        assert!(!rules.allows("sds://web", Some("intruder"), &none));
        assert!(!rules.allows("web", None, &none));
        assert!(rules.allows("open", None, &none));
        assert!(rules.allows("not-configured", None, &none));
        assert!(rules.is_configured("sds://open"));
        assert!(!rules.is_configured("not-configured"));
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
        assert!(
            !p.rules()
                .allows("web", Some("core"), &ClientIdentities::default())
        );
        p.replace([(name("web"), edge_only())]);
        assert_eq!(p.generation(), 1, "the same rules again change nothing");
        assert!(!rx.has_changed().unwrap());
    }
}
