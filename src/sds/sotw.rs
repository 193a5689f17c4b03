//! State-of-the-world SDS (`StreamSecrets`): every response carries every subscribed secret that exists.
//!
//! A response is sent only when the client lacks something: a newly subscribed name that exists, or a newer
//! version of one it has. ACKs and NACKs change nothing (so they are never answered), and a request whose
//! nonce is not the latest one sent is stale and ignored. Since secrets are never unpublished, a response
//! never drops a secret the stream already delivered. Every push is authorised against the access rules in
//! force at that moment.

use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::Status;

use super::policy::{Rules, Target};
use super::subscribed::{Subscribed, check_again};
use super::{
    Protocol, StreamContext, check_type_url, checked_names, combined_version, poll_any_changed,
};
use crate::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use crate::registry::{Registry, SECRET_TYPE_URL, SecretVersion};

struct Watched {
    name: Subscribed,
    /// The version last sent for this name on this stream.
    sent: Option<Arc<SecretVersion>>,
}

/// One `StreamSecrets` stream.
pub struct Sotw {
    registry: Arc<Registry>,
    ctx: StreamContext,
    watched: Vec<Watched>,
    /// The last nonce sent; 0 before the first response.
    nonce: u64,
    /// Subscriptions were added and are not armed yet.
    fresh: bool,
}

impl Sotw {
    /// A SotW stream for the caller `ctx` describes.
    pub fn new(registry: Arc<Registry>, ctx: StreamContext) -> Self {
        Sotw {
            registry,
            ctx,
            watched: Vec::new(),
            nonce: 0,
            fresh: false,
        }
    }

    fn subscribed(&self) -> impl Iterator<Item = &str> {
        self.watched.iter().map(|w| w.name.requested.as_str())
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
            self.watched[i].sent = None;
            self.fresh = true;
        }
        Ok(())
    }

    /// Makes `names` (checked, distinct; those not held yet resolved in `adding`) the subscription, keeping
    /// what the stream already knows of names it keeps. O(n): Envoy repeats its one name in every ACK, and
    /// a hostile client may send a thousand.
    fn subscribe(&mut self, names: Vec<String>, adding: HashMap<String, Target>) {
        let mut adding = adding;
        let mut old: HashMap<String, Watched> = self
            .watched
            .drain(..)
            .map(|w| (w.name.requested.clone(), w))
            .collect();
        for name in names {
            if let Some(w) = old.remove(&name) {
                self.watched.push(w);
            } else if let Some(target) = adding.remove(&name) {
                self.fresh = true;
                self.watched.push(Watched {
                    name: Subscribed::new(&self.registry, name, target),
                    sent: None,
                });
            }
        }
    }

    /// The response the client needs, if it lacks a secret or a version; `Err` when the caller may no longer
    /// read what it is subscribed to.
    fn respond(&mut self) -> Result<Option<DiscoveryResponse>, Status> {
        if self.ctx.rules_changed() {
            self.check_again(&self.ctx.rules())?;
        }
        let mut current = Vec::with_capacity(self.watched.len());
        let mut needed = false;
        for w in &mut self.watched {
            let cur = w.name.sub.current();
            if let Some(v) = &cur {
                needed |= w.sent.as_ref().is_none_or(|s| s.version() != v.version());
            }
            current.push(cur);
        }
        if !needed {
            return Ok(None);
        }
        let mut resources = Vec::with_capacity(current.len());
        for (w, cur) in self.watched.iter_mut().zip(current) {
            if let Some(v) = cur {
                resources.push(w.name.resource(&v));
                w.sent = Some(v);
            }
        }
        self.nonce += 1;
        self.ctx.sent();
        let version_info = combined_version(
            self.watched
                .iter()
                .filter_map(|w| w.sent.as_ref().map(|v| v.version())),
        );
        tracing::debug!(stream = self.ctx.id, node = self.ctx.node_id(), version = %version_info, resources = resources.len(), "SDS push");
        Ok(Some(DiscoveryResponse {
            version_info,
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: self.nonce.to_string(),
            control_plane: None,
        }))
    }
}

impl Protocol for Sotw {
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn on_request(&mut self, req: DiscoveryRequest) -> Result<Option<DiscoveryResponse>, Status> {
        self.ctx.remember_node(req.node.as_ref());
        check_type_url(&req.type_url)?;
        if !req.response_nonce.is_empty() && req.response_nonce != self.nonce.to_string() {
            tracing::debug!(stream = self.ctx.id, nonce = %req.response_nonce, latest = self.nonce, "ignoring stale SDS request");
            return Ok(None);
        }
        if !req.response_nonce.is_empty() {
            self.ctx.answered();
        }
        let names = checked_names("resource_names", req.resource_names)?;
        if let Some(err) = &req.error_detail {
            // What was rejected: the secrets the last response carried.
            let sent: Vec<(&str, &Target)> = self
                .watched
                .iter()
                .filter(|w| w.sent.is_some())
                .map(|w| w.name.pair())
                .collect();
            let rejected = combined_version(
                self.watched
                    .iter()
                    .filter_map(|w| w.sent.as_ref().map(|v| v.version())),
            );
            self.ctx.log_nack(
                &sent,
                &format!(
                    "version {rejected} (Envoy keeps {:?})",
                    super::context::clip(&req.version_info, 64)
                ),
                err,
            );
        }
        if !self.subscribed().eq(names.iter().map(String::as_str)) {
            let rules = self.ctx.rules();
            self.check_again(&rules)?;
            let held: std::collections::HashSet<&str> = self.subscribed().collect();
            let adding: HashMap<String, Target> = names
                .iter()
                .filter(|n| !held.contains(n.as_str()))
                .map(|n| (n.clone(), rules.resolve(n)))
                .collect();
            drop(held);
            let pairs = || adding.iter().map(|(n, t)| (n.as_str(), t));
            self.ctx.authorize(&rules, pairs(), [])?;
            self.ctx.unconfigured(pairs());
            self.ctx.set_name_count(names.len())?;
            self.subscribe(names, adding);
        }
        self.respond()
    }

    fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        poll_any_changed(self.watched.iter_mut().map(|w| &mut w.name.sub), cx)
    }

    fn take_fresh(&mut self) -> bool {
        std::mem::take(&mut self.fresh)
    }

    fn on_change(&mut self) -> Result<Option<DiscoveryResponse>, Status> {
        self.respond()
    }

    fn reauthorize(&mut self) -> Result<Option<DiscoveryResponse>, Status> {
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
            names: &'static [&'static str],
            nonce: &'static str,
            nack: bool,
            type_url: &'static str,
        },
        Publish(&'static str),
    }

    fn req(names: &'static [&'static str], nonce: &'static str) -> Step {
        Step::Request {
            names,
            nonce,
            nack: false,
            type_url: SECRET_TYPE_URL,
        }
    }

    /// What the stream answers: nothing, a response (names served, nonce), or an error code.
    #[derive(Debug, PartialEq)]
    enum Answer {
        Nothing,
        Push(Vec<String>, String),
        Refused(tonic::Code),
    }
    use Answer::*;

    fn push(served: &[&str], nonce: &str) -> Answer {
        Push(
            served.iter().map(|s| s.to_string()).collect(),
            nonce.to_owned(),
        )
    }

    #[test]
    fn the_sotw_state_machine_answers_only_what_the_client_lacks() {
        let registry = Registry::new();
        registry.publish("web", &cert("web"));
        let mut stream = Sotw::new(registry.clone(), context(&registry));
        let table: Vec<(&str, Step, Answer)> = vec![
            (
                "first request: what exists",
                req(&["web", "api"], ""),
                push(&["web"], "1"),
            ),
            ("the ACK", req(&["web", "api"], "1"), Nothing),
            (
                "a stale nonce is ignored, even with a new name",
                req(&["web", "api", "db"], "7"),
                Nothing,
            ),
            ("a rotation", Step::Publish("web"), push(&["web"], "2")),
            (
                "a NACK changes nothing",
                Step::Request {
                    names: &["web", "api"],
                    nonce: "2",
                    nack: true,
                    type_url: SECRET_TYPE_URL,
                },
                Nothing,
            ),
            (
                "a subscribed name appears: the whole world",
                Step::Publish("api"),
                push(&["web", "api"], "3"),
            ),
            ("a secret nobody asked for", Step::Publish("db"), Nothing),
            ("dropping a name sends nothing", req(&["web"], "3"), Nothing),
            (
                "Istio's prefix: served under the name asked for",
                req(&["web", "sds://api"], "3"),
                push(&["web", "sds://api"], "4"),
            ),
            (
                "another resource type",
                Step::Request {
                    names: &["web"],
                    nonce: "4",
                    nack: false,
                    type_url: "type.googleapis.com/envoy.config.cluster.v3.Cluster",
                },
                Refused(tonic::Code::InvalidArgument),
            ),
        ];
        for (what, step, want) in table {
            let got = match step {
                Step::Request {
                    names: n,
                    nonce,
                    nack,
                    type_url,
                } => stream.on_request(DiscoveryRequest {
                    resource_names: n.iter().map(|s| s.to_string()).collect(),
                    response_nonce: nonce.into(),
                    type_url: type_url.into(),
                    error_detail: nack.then(|| crate::proto::google::rpc::Status {
                        code: 3,
                        message: "bad key".into(),
                        details: Vec::new(),
                    }),
                    ..Default::default()
                }),
                Step::Publish(name) => {
                    registry.publish(name, &cert(name));
                    stream.on_change()
                }
            };
            let got = match got {
                Ok(None) => Nothing,
                Ok(Some(r)) => Push(names(&r.resources), r.nonce),
                Err(status) => Refused(status.code()),
            };
            assert_eq!(got, want, "{what}");
        }
    }
}
