//! Incremental SDS (`DeltaSecrets`): responses carry only the secrets whose version the client lacks.
//!
//! Subscribe and unsubscribe are honoured on every request, whatever its nonce. Names the client says it
//! holds (`initial_resource_versions`, on a reconnect) are not resent when the version matches. A subscribed
//! name that does not exist is reported once in `removed_resources` (unless it is being obtained on demand:
//! then only if it is refused) and pushed as soon as it appears; a name
//! the client already holds is never reported removed, so a missing secret here never takes one away from
//! Envoy. Subscription changes cost O(n) in the names they carry (sets, not list scans), and every push is
//! authorised against the access rules in force at that moment.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use super::policy::{Rules, Target};
use super::subscribed::{Subscribed, check_again};
use super::{Protocol, StreamContext, check_type_url, checked_names, poll_any_changed};
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use crate::registry::{Registry, SECRET_TYPE_URL, SecretVersion};

/// What the client holds for one name.
enum Held {
    Nothing,
    /// A version it told us about in `initial_resource_versions`.
    Claimed(String),
    /// The version we last sent.
    Sent(Arc<SecretVersion>),
}

impl Held {
    fn version(&self) -> Option<&str> {
        match self {
            Held::Nothing => None,
            Held::Claimed(v) => Some(v),
            Held::Sent(v) => Some(v.version()),
        }
    }
}

struct Watched {
    name: Subscribed,
    held: Held,
    /// Whether `removed_resources` already told the client this name does not exist.
    reported_missing: bool,
}

/// One `DeltaSecrets` stream.
pub struct Delta {
    registry: Arc<Registry>,
    ctx: StreamContext,
    watched: Vec<Watched>,
    nonce: u64,
    /// The secrets the latest response carried (requested name, what it resolved to): what a NACK of it
    /// rejects.
    last_sent: Vec<(String, Target)>,
    /// Subscriptions were added and are not armed yet.
    fresh: bool,
    first: bool,
}

impl Delta {
    /// A delta stream for the caller `ctx` describes.
    pub fn new(registry: Arc<Registry>, ctx: StreamContext) -> Self {
        Delta {
            registry,
            ctx,
            watched: Vec::new(),
            nonce: 0,
            last_sent: Vec::new(),
            fresh: false,
            first: true,
        }
    }

    /// Under rules newer than the subscription was checked against: resolves every name again (a name a
    /// configured secret now claims follows it) and checks them all; `Err` ends the stream.
    fn check_again(&mut self, rules: &Rules) -> Result<(), Status> {
        let moved = check_again(
            &mut self.ctx,
            &self.registry,
            rules,
            &mut self.watched,
            |w| &mut w.name,
        )?;
        for i in moved {
            self.watched[i].reported_missing = false;
            self.fresh = true;
        }
        Ok(())
    }

    fn respond(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        if self.ctx.rules_changed() {
            self.check_again(&self.ctx.rules())?;
        }
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut sent = Vec::new();
        for w in &mut self.watched {
            match w.name.sub.current() {
                Some(v) => {
                    if w.held.version() != Some(v.version()) {
                        resources.push(Resource {
                            version: v.version().to_owned(),
                            resource: Some(w.name.resource(&v)),
                            name: w.name.requested.clone(),
                            aliases: Vec::new(),
                        });
                        sent.push((w.name.requested.clone(), w.name.target.clone()));
                        w.held = Held::Sent(v);
                        w.reported_missing = false;
                    }
                }
                None => {
                    // A name being obtained on demand is waited for; one refused is reported.
                    if matches!(w.held, Held::Nothing)
                        && !w.reported_missing
                        && (w.name.sub.is_refused()
                            || !self.registry.is_expected(&w.name.target.id))
                    {
                        removed.push(w.name.requested.clone());
                        w.reported_missing = true;
                    }
                }
            }
        }
        if resources.is_empty() && removed.is_empty() {
            return Ok(None);
        }
        self.nonce += 1;
        self.last_sent = sent;
        self.ctx.sent();
        tracing::debug!(
            stream = self.ctx.id,
            node = self.ctx.node_id(),
            resources = resources.len(),
            ?removed,
            "SDS delta push"
        );
        Ok(Some(DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: self.nonce.to_string(),
            removed_resources: removed,
        }))
    }
}

impl Protocol for Delta {
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn on_request(
        &mut self,
        req: DeltaDiscoveryRequest,
    ) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        self.ctx.remember_node(req.node.as_ref());
        check_type_url(&req.type_url)?;
        if !req.response_nonce.is_empty() && req.response_nonce == self.nonce.to_string() {
            self.ctx.answered();
        }
        let subscribe = checked_names("resource_names_subscribe", req.resource_names_subscribe)?;
        let unsubscribe =
            checked_names("resource_names_unsubscribe", req.resource_names_unsubscribe)?;
        if let Some(err) = &req.error_detail {
            // What was rejected: the secrets of the response it names, if that is the latest one.
            let names: Vec<(&str, &Target)> = if req.response_nonce == self.nonce.to_string() {
                self.last_sent
                    .iter()
                    .map(|(n, t)| (n.as_str(), t))
                    .collect()
            } else {
                Vec::new()
            };
            self.ctx.log_nack(
                &names,
                &format!("nonce {}", super::context::clip(&req.response_nonce, 64)),
                err,
            );
        }
        let mut initial: HashMap<String, String> = if self.first {
            req.initial_resource_versions
        } else {
            HashMap::new()
        };
        self.first = false;
        if !unsubscribe.is_empty() {
            let gone: HashSet<&str> = unsubscribe.iter().map(String::as_str).collect();
            self.watched
                .retain(|w| !gone.contains(w.name.requested.as_str()));
        }
        if subscribe.is_empty() {
            // An ACK, a NACK or an unsubscribe: nothing to look up (the count can only go down).
            self.ctx.set_name_count(self.watched.len())?;
            return self.respond();
        }
        let index: HashMap<&str, usize> = self
            .watched
            .iter()
            .enumerate()
            .map(|(i, w)| (w.name.requested.as_str(), i))
            .collect();
        let is_new: Vec<bool> = subscribe
            .iter()
            .map(|n| !index.contains_key(n.as_str()))
            .collect();
        let again: Vec<usize> = subscribe
            .iter()
            .filter_map(|n| index.get(n.as_str()).copied())
            .collect();
        drop(index);
        let total = self.watched.len() + is_new.iter().filter(|new| **new).count();
        if total > super::MAX_NAMES_PER_STREAM {
            return Err(super::context::too_many("resource_names_subscribe"));
        }
        let rules = self.ctx.rules();
        self.check_again(&rules)?;
        let adding: Vec<(String, Target)> = subscribe
            .into_iter()
            .zip(&is_new)
            .filter(|(_, new)| **new)
            .map(|(n, _)| {
                let target = rules.resolve(&n);
                (n, target)
            })
            .collect();
        let pairs = || adding.iter().map(|(n, t)| (n.as_str(), t));
        self.ctx.authorize(&rules, pairs(), [])?;
        self.ctx.unconfigured(pairs());
        self.ctx.set_name_count(total)?;
        for i in again {
            // Subscribing again asks for the resource again.
            let w = &mut self.watched[i];
            w.held = Held::Nothing;
            w.reported_missing = false;
        }
        for (name, target) in adding {
            let held = match initial.remove(&name) {
                Some(v) => Held::Claimed(v),
                None => Held::Nothing,
            };
            self.fresh = true;
            self.watched.push(Watched {
                name: Subscribed::new(&self.registry, name, target),
                held,
                reported_missing: false,
            });
        }
        self.respond()
    }

    fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        poll_any_changed(self.watched.iter_mut().map(|w| &mut w.name.sub), cx)
    }

    fn take_fresh(&mut self) -> bool {
        std::mem::take(&mut self.fresh)
    }

    fn on_change(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        self.respond()
    }

    fn reauthorize(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        if !self.ctx.rules_changed() {
            return Ok(None);
        }
        self.check_again(&self.ctx.rules())?;
        if self.fresh {
            // A name follows another secret now: what the client lacks of it goes out at once.
            return self.respond();
        }
        Ok(None)
    }

    fn context(&self) -> &StreamContext {
        &self.ctx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sds::testing::{cert, context, names};

    /// One step of a stream's life: a request from the client, or a secret published (then the stream is
    /// woken, as a change wakes it).
    enum Step {
        Request {
            subscribe: &'static [&'static str],
            unsubscribe: &'static [&'static str],
            initial: Vec<(&'static str, String)>,
        },
        Publish(&'static str),
    }

    fn sub(names: &'static [&'static str]) -> Step {
        Step::Request {
            subscribe: names,
            unsubscribe: &[],
            initial: vec![],
        }
    }

    /// What the stream answers: nothing, or a response (names served, names reported missing).
    #[derive(Debug, PartialEq)]
    enum Answer {
        Nothing,
        Push(Vec<String>, Vec<String>),
    }
    use Answer::*;

    fn push(served: &[&str], removed: &[&str]) -> Answer {
        Push(
            served.iter().map(|s| s.to_string()).collect(),
            removed.iter().map(|s| s.to_string()).collect(),
        )
    }

    #[test]
    fn the_delta_state_machine_sends_only_what_changed() {
        let registry = Registry::new();
        registry.publish("web", &cert("web"));
        registry.publish("old", &cert("old"));
        let held = registry.get("old").unwrap().version().to_owned();
        let mut stream = Delta::new(registry.clone(), context(&registry));
        let table: Vec<(&str, Step, Answer)> = vec![
            (
                "first request: what exists, what does not, and not what the client says it holds",
                Step::Request {
                    subscribe: &["web", "api", "old"],
                    unsubscribe: &[],
                    initial: vec![("old", held.clone())],
                },
                push(&["web"], &["api"]),
            ),
            ("an ACK", sub(&[]), Nothing),
            (
                "a missing name is reported once",
                Step::Publish("db"),
                Nothing,
            ),
            (
                "subscribing to it again asks anew (xDS: a re-subscription is a request to resend)",
                sub(&["api"]),
                push(&[], &["api"]),
            ),
            ("it appears", Step::Publish("api"), push(&["api"], &[])),
            (
                "a rotation: that secret alone",
                Step::Publish("web"),
                push(&["web"], &[]),
            ),
            (
                "unsubscribed",
                Step::Request {
                    subscribe: &[],
                    unsubscribe: &["web"],
                    initial: vec![],
                },
                Nothing,
            ),
            ("and no longer pushed", Step::Publish("web"), Nothing),
            (
                "subscribed again: sent again",
                sub(&["web"]),
                push(&["web"], &[]),
            ),
            (
                "the secret the client held changes",
                Step::Publish("old"),
                push(&["old"], &[]),
            ),
        ];
        for (what, step, want) in table {
            let got = match step {
                Step::Request {
                    subscribe,
                    unsubscribe,
                    initial,
                } => stream.on_request(DeltaDiscoveryRequest {
                    type_url: SECRET_TYPE_URL.into(),
                    resource_names_subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
                    resource_names_unsubscribe: unsubscribe.iter().map(|s| s.to_string()).collect(),
                    initial_resource_versions: initial
                        .iter()
                        .map(|(n, v)| (n.to_string(), v.to_string()))
                        .collect(),
                    ..Default::default()
                }),
                Step::Publish(name) => {
                    registry.publish(name, &cert(name));
                    stream.on_change()
                }
            };
            let got = match got.unwrap() {
                None => Nothing,
                Some(r) => Push(
                    names(r.resources.iter().filter_map(|x| x.resource.as_ref())),
                    r.removed_resources,
                ),
            };
            assert_eq!(got, want, "{what}");
        }
    }
}
