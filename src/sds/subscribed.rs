//! One name a stream subscribed to, as both protocols keep it: the name as requested (the secret is served
//! under exactly that name), what it resolved to under the access rules ([`Target`]: a configured secret in
//! any spelling, or an unconfigured name), and the registry subscription for it.
//!
//! Resolution is done again whenever the rules change (a reload): a name that now resolves to a configured
//! secret follows that secret from then on, so no certificate obtained on demand (or awaited under another
//! name) keeps being served for a name the configuration now claims. A name whose configured secret was
//! removed keeps its subscription: a stream that delivered a secret can keep sending it.

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

    /// Resolves the name again under `rules`: true when it now follows another secret (a configured one,
    /// which wins over whatever it followed), so the stream must arm the new subscription.
    pub fn resolve_again(&mut self, registry: &Arc<Registry>, rules: &Rules) -> bool {
        let target = rules.resolve(&self.requested);
        if !target.configured || target == self.target {
            return false;
        }
        *self = Subscribed::new(registry, std::mem::take(&mut self.requested), target);
        true
    }
}
