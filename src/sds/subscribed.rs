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

use tonic::Status;

use super::StreamContext;
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

/// What both protocols do when the rules in force are newer than those a stream's subscription was
/// checked against: resolves every name of `watched` (each reached through `name`) again, checks them all
/// against `rules` (`Err` ends the stream), and tells the on-demand issuer of those that now follow an
/// unconfigured name. Returns the indexes of the names that follow another secret now: the stream forgets
/// what it sent of them, and arms their new subscriptions.
pub(crate) fn check_again<W>(
    ctx: &mut StreamContext,
    registry: &Arc<Registry>,
    rules: &Rules,
    watched: &mut [W],
    name: impl Fn(&mut W) -> &mut Subscribed,
) -> Result<Vec<usize>, Status> {
    if rules.generation() == ctx.checked() {
        return Ok(Vec::new());
    }
    let mut moved = Vec::new();
    for (i, w) in watched.iter_mut().enumerate() {
        if name(w).resolve_again(registry, rules) {
            moved.push(i);
        }
    }
    ctx.authorize(rules, [], watched.iter_mut().map(|w| name(w).pair()))?;
    let mut moved_names = Vec::with_capacity(moved.len());
    for (i, w) in watched.iter_mut().enumerate() {
        if moved.contains(&i) {
            moved_names.push(name(w).pair());
        }
    }
    ctx.unconfigured(moved_names);
    Ok(moved)
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
