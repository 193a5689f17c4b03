//! One name a stream subscribed to, as both protocols keep it: the name as requested (the secret is served
//! under exactly that name), what it resolved to under the access rules ([`Target`]: a configured secret in
//! any spelling, or an unconfigured name), and the registry subscription for it.
//!
//! Resolution is done again whenever the rules change (a reload): a name that now resolves to a configured
//! secret follows that secret from then on, so no certificate obtained on demand (or awaited under another
//! name) keeps being served for a name the configuration now claims; a name that moved away from a secret
//! still configured (a domain taken off a certificate) follows what it resolves to now, so it is never
//! served a certificate that no longer covers it. A name whose configured secret was removed altogether
//! keeps its subscription: a stream that delivered a secret can keep sending it.

use std::sync::Arc;

use super::policy::{Rules, Target};
use crate::proto::google::protobuf::Any;
use crate::registry::{Registry, SecretVersion, Subscription};

/// See the module docs.
pub(crate) struct Subscribed {
    /// The name exactly as requested.
    pub requested: String,
    /// What it refers to.
    pub target: Target,
    /// The registry's channel for it.
    pub sub: Subscription,
}

impl Subscribed {
    /// Subscribes to what `requested` resolved to.
    pub fn new(registry: &Arc<Registry>, requested: String, target: Target) -> Self {
        let sub = registry.watch(&target.id, &requested);
        Subscribed {
            requested,
            target,
            sub,
        }
    }

    /// `version` encoded under the requested name.
    pub fn resource(&self, version: &Arc<SecretVersion>) -> Any {
        self.sub.resource(version, &self.requested)
    }

    /// The name and its target, for access checks and logs.
    pub fn pair(&self) -> (&str, &Target) {
        (self.requested.as_str(), &self.target)
    }

    /// Resolves the name again under `rules` (see the module docs): true when it now follows another
    /// secret, so the stream must arm the new subscription (and, for an unconfigured one, tell the
    /// on-demand issuer).
    pub fn resolve_again(&mut self, registry: &Arc<Registry>, rules: &Rules) -> bool {
        let target = rules.resolve(&self.requested);
        if target == self.target {
            return false;
        }
        let moved_away = self.target.configured && rules.configures(&self.target.id);
        if !target.configured && !moved_away {
            return false;
        }
        *self = Subscribed::new(registry, std::mem::take(&mut self.requested), target);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sds::access::Access;
    use crate::sds::policy::{Configured, Policy};
    use crate::values::{DnsName, SecretId, SecretName};

    fn web(domains: &[&str]) -> Configured {
        Configured {
            name: SecretName::new("web").unwrap(),
            access: Access::default(),
            domains: domains.iter().map(|d| d.to_string()).collect(),
        }
    }

    /// Under new rules a name follows a configured secret that claims it, and what it resolves to when it
    /// moved off a secret still configured; it keeps a secret that was removed altogether.
    #[test]
    fn names_follow_the_rules_that_claim_them() {
        let registry = Registry::new();
        let policy = Policy::new([web(&["www.example.com", "shop.example.com"])]);
        let sub =
            |name: &str| Subscribed::new(&registry, name.to_owned(), policy.rules().resolve(name));
        let (mut www, mut shop, mut other) = (
            sub("WWW.example.com"),
            sub("shop.example.com"),
            sub("other.example.com"),
        );
        assert_eq!(www.target.id, SecretId::named("web"));
        assert!(other.target.id.is_on_demand());

        // www moves off `web`, which stays configured: it follows what it is now (on demand).
        policy.replace([web(&["shop.example.com"])]);
        let rules = policy.rules();
        assert!(www.resolve_again(&registry, &rules));
        assert_eq!(
            www.target.id,
            SecretId::OnDemand(DnsName::new("www.example.com").unwrap())
        );
        assert!(!shop.resolve_again(&registry, &rules));
        assert!(!other.resolve_again(&registry, &rules));

        // `web` removed altogether: shop keeps what it has.
        policy.replace(Vec::<Configured>::new());
        assert!(!shop.resolve_again(&registry, &policy.rules()));
        assert_eq!(shop.target.id, SecretId::named("web"));

        // A configured secret claims other.example.com: it follows it.
        policy.replace([Configured {
            name: SecretName::new("other.example.com").unwrap(),
            access: Access::default(),
            domains: Vec::new(),
        }]);
        assert!(other.resolve_again(&registry, &policy.rules()));
        assert_eq!(other.target.id, SecretId::named("other.example.com"));
        assert_eq!(other.requested, "other.example.com");
    }
}
