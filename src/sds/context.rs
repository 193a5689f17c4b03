//! What a stream knows about its caller, and the checks every request and push goes through.
//!
//! A [`StreamContext`] holds the peer (from the listener), the node from the stream's first request (capped:
//! a client cannot make the server store more than a few KiB of what it says about itself), the stream's
//! quota slot, and the generation of access rules its subscription was last checked against. Requests are
//! checked here before they change any state: name counts after de-duplication, name lengths, and access.

use std::collections::HashSet;
use std::sync::Arc;

use tonic::{Request, Status};

use super::policy::{Policy, Rules, Target};
use crate::metrics::Metrics;
use crate::net::peer::{Limits, Peer, StreamSlot};
use crate::net::throttle::Throttle;
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::google::rpc;
use crate::values::canonical_name;

/// Most names one stream may subscribe to (Envoy asks for one per stream).
pub const MAX_NAMES_PER_STREAM: usize = 1000;
/// Longest secret name (without `sds://`): a DNS name's limit, and the limit on configured names.
pub const MAX_NAME_BYTES: usize = 253;
/// Most bytes of a node id or cluster kept; a longer node id can never match `allowed_nodes`.
pub const MAX_NODE_FIELD_BYTES: usize = 1024;
/// Most bytes of a NACK's error message written to the log.
const MAX_LOGGED_ERROR_BYTES: usize = 1024;
/// Most names listed in one log line.
const MAX_LOGGED_NAMES: usize = 10;

/// Log throttles for what a misbehaving caller can repeat at will.
#[derive(Debug, Default)]
pub(crate) struct Throttles {
    pub refused: Throttle,
    pub denied: Throttle,
    pub nacks: Throttle,
}

/// The node a stream's first request described, as kept.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// `node.id`, clipped.
    pub id: String,
    /// `node.cluster`, clipped.
    pub cluster: String,
    /// The id was longer than [`MAX_NODE_FIELD_BYTES`]: `id` holds its beginning, for logs only.
    pub truncated: bool,
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Who is on the other end of a stream, for quotas, access checks and logs.
#[derive(Debug)]
pub struct StreamContext {
    /// This stream's number, for logs.
    pub id: u64,
    /// The RPC (`StreamSecrets`, `DeltaSecrets`, `FetchSecrets`).
    pub rpc: &'static str,
    /// Who called.
    pub peer: Peer,
    /// The node it said it is, once it said.
    pub node: Option<NodeInfo>,
    policy: Arc<Policy>,
    /// The generation of rules every subscribed name was last checked against.
    checked: u64,
    throttles: Arc<Throttles>,
    metrics: Metrics,
    /// When the oldest response not yet acknowledged (ACK or NACK) was sent.
    unacked_since: Option<std::time::Instant>,
    slot: StreamSlot,
}

impl StreamContext {
    pub(crate) fn new<T>(
        rpc: &'static str,
        id: u64,
        request: &Request<T>,
        policy: Arc<Policy>,
        limits: &Limits,
        throttles: Arc<Throttles>,
        metrics: Metrics,
    ) -> Result<Self, Status> {
        let peer = request
            .extensions()
            .get::<Peer>()
            .cloned()
            .unwrap_or_else(Peer::local);
        let slot = match limits.open_stream(peer.key()) {
            Ok(slot) => slot,
            Err(refused) => {
                if let Some(held_back) = throttles.refused.allow() {
                    tracing::warn!(rpc, peer = %peer, counted_as = %peer.key(), held_back, "SDS stream refused: {refused}");
                }
                return Err(Status::resource_exhausted(refused.to_string()));
            }
        };
        metrics.stream_opened(rpc, 1);
        let checked = policy.generation();
        let ctx = StreamContext {
            id,
            rpc,
            peer,
            node: None,
            policy,
            checked,
            throttles,
            metrics,
            unacked_since: None,
            slot,
        };
        tracing::debug!(stream = ctx.id, rpc, peer = %ctx.peer, "SDS stream opened");
        Ok(ctx)
    }

    /// Keeps the node of the first request that has one (Envoy only guarantees it there), capped.
    pub(crate) fn remember_node(&mut self, node: Option<&Node>) {
        if self.node.is_none()
            && let Some(n) = node
        {
            self.node = Some(NodeInfo {
                id: clip(&n.id, MAX_NODE_FIELD_BYTES).to_owned(),
                cluster: clip(&n.cluster, MAX_NODE_FIELD_BYTES).to_owned(),
                truncated: n.id.len() > MAX_NODE_FIELD_BYTES,
            });
        }
    }

    pub(crate) fn node_id(&self) -> &str {
        self.node.as_ref().map(|n| n.id.as_str()).unwrap_or("")
    }

    fn cluster(&self) -> &str {
        self.node.as_ref().map(|n| n.cluster.as_str()).unwrap_or("")
    }

    /// The node id access rules may match: none when the client sent none, or one too long to keep.
    fn usable_node_id(&self) -> Option<&str> {
        self.node
            .as_ref()
            .filter(|n| !n.truncated)
            .map(|n| n.id.as_str())
    }

    /// The rules in force now.
    pub(crate) fn rules(&self) -> Arc<Rules> {
        self.policy.rules()
    }

    /// The generation of rules the stream's subscription was last checked against.
    pub(crate) fn checked(&self) -> u64 {
        self.checked
    }

    /// Whether the stream's subscription was last checked against rules older than those in force.
    pub(crate) fn rules_changed(&self) -> bool {
        self.policy.generation() != self.checked
    }

    /// Checks names being added (`adding`) against `rules` (those in force) and, if those rules are newer
    /// than the ones the stream's subscription (`held`) was last checked against, the subscription too.
    /// Each name comes with what it resolved to. Refuses with `PERMISSION_DENIED` (the same answer whether
    /// or not the secret exists) and a log line naming the caller.
    pub(crate) fn authorize<'a>(
        &mut self,
        rules: &Rules,
        adding: impl IntoIterator<Item = (&'a str, &'a Target)>,
        held: impl IntoIterator<Item = (&'a str, &'a Target)>,
    ) -> Result<(), Status> {
        let allowed = |ctx: &Self, target: &Target| {
            rules.allows(target, ctx.usable_node_id(), ctx.peer.identities())
        };
        if rules.generation() != self.checked {
            for (name, target) in held {
                if !allowed(self, target) {
                    return Err(self.denied(
                        name,
                        "the access rules changed (configuration reloaded): ending the stream",
                    ));
                }
            }
        }
        for (name, target) in adding {
            if !allowed(self, target) {
                return Err(self.denied(name, "refusing the request"));
            }
        }
        self.checked = rules.generation();
        Ok(())
    }

    fn denied(&self, name: &str, reason: &'static str) -> Status {
        if let Some(held_back) = self.throttles.denied.allow() {
            tracing::warn!(
                stream = self.id,
                rpc = self.rpc,
                peer = %self.peer,
                node = self.node_id(),
                node_id_truncated = self.node.as_ref().is_some_and(|n| n.truncated),
                clients = ?self.peer.identities(),
                secret = clip(name, MAX_NAME_BYTES + 6),
                held_back,
                "SDS access denied: caller not allowed to read this secret; {reason}"
            );
        }
        Status::permission_denied(format!(
            "not permitted to read secret {:?}",
            clip(name, MAX_NAME_BYTES + 6)
        ))
    }

    /// The stream is now subscribed to `n` names: counted against the caller's quota.
    pub(crate) fn set_name_count(&mut self, n: usize) -> Result<(), Status> {
        self.slot.set_names(n).map_err(|refused| {
            if let Some(held_back) = self.throttles.refused.allow() {
                tracing::warn!(stream = self.id, peer = %self.peer, counted_as = %self.peer.key(), held_back, "SDS subscription refused: {refused}");
            }
            Status::resource_exhausted(refused.to_string())
        })
    }

    /// A response went out.
    pub(crate) fn sent(&mut self) {
        self.metrics.count_push();
        self.unacked_since
            .get_or_insert_with(std::time::Instant::now);
    }

    /// Counts the names of `requested` that are not configured, and tells the on-demand issuer (if any) of
    /// each: it publishes, expects or refuses them before the stream answers.
    pub(crate) fn unconfigured<'a>(
        &self,
        requested: impl IntoIterator<Item = (&'a str, &'a Target)>,
    ) {
        let mut n = 0u64;
        for (name, target) in requested {
            if !target.configured {
                n += 1;
                self.policy.demand(name, &target.id, self.usable_node_id());
            }
        }
        if n > 0 {
            self.metrics.count_unconfigured(n);
        }
    }

    /// The client answered (ACK or NACK) the latest response.
    pub(crate) fn answered(&mut self) {
        self.unacked_since = None;
    }

    /// How long the oldest unanswered response has waited.
    pub(crate) fn unanswered_for(&self) -> Option<std::time::Duration> {
        self.unacked_since.map(|t| t.elapsed())
    }

    /// Logs and counts a NACK of the secrets `names` (those the rejected response carried). `rejected` says
    /// what was rejected: "version V" (SotW) or "nonce N" (delta). Envoy's message is clipped and written as
    /// a quoted string, so it can neither flood the log nor forge lines in it.
    pub(crate) fn log_nack(&self, names: &[(&str, &Target)], rejected: &str, err: &rpc::Status) {
        let mut unconfigured = 0;
        for (_, target) in names {
            if target.configured {
                self.metrics.count_nack(target.id.as_str());
            } else {
                unconfigured += 1;
            }
        }
        if unconfigured > 0 {
            self.metrics.count_unconfigured(unconfigured);
        }
        let Some(held_back) = self.throttles.nacks.allow() else {
            return;
        };
        let shown: Vec<&str> = names
            .iter()
            .take(MAX_LOGGED_NAMES)
            .map(|(n, _)| clip(n, MAX_NAME_BYTES + 6))
            .collect();
        tracing::warn!(
            stream = self.id,
            rpc = self.rpc,
            peer = %self.peer,
            node = self.node_id(),
            cluster = self.cluster(),
            names = ?shown,
            more_names = names.len() - shown.len(),
            rejected = clip(rejected, 256),
            code = err.code,
            error = clip(&err.message, MAX_LOGGED_ERROR_BYTES),
            error_bytes = err.message.len(),
            held_back,
            "Envoy rejected (NACKed) a secret; not resending it until a new version exists"
        );
    }
}

impl Drop for StreamContext {
    fn drop(&mut self) {
        self.metrics.stream_opened(self.rpc, -1);
        tracing::debug!(stream = self.id, rpc = self.rpc, peer = %self.peer, node = self.node_id(), "SDS stream closed");
    }
}

/// The names of one request field, checked and de-duplicated (first occurrence kept, order kept): each
/// at most [`MAX_NAME_BYTES`] (without `sds://`), and at most [`MAX_NAMES_PER_STREAM`] distinct ones. Costs
/// O(n) however many names a request carries.
pub(crate) fn checked_names(field: &str, names: Vec<String>) -> Result<Vec<String>, Status> {
    if let Some((i, long)) = names
        .iter()
        .enumerate()
        .find(|(_, n)| canonical_name(n).len() > MAX_NAME_BYTES)
    {
        return Err(Status::invalid_argument(format!(
            "{field}[{i}]: a name of {} bytes; secret names are at most {MAX_NAME_BYTES} bytes",
            long.len()
        )));
    }
    let names = if names.len() <= 8 {
        let mut out: Vec<String> = Vec::with_capacity(names.len());
        for n in names {
            if !out.contains(&n) {
                out.push(n);
            }
        }
        out
    } else {
        let mut seen = HashSet::with_capacity(names.len().min(4 * MAX_NAMES_PER_STREAM));
        let mut out = Vec::new();
        for n in names {
            if seen.contains(n.as_str()) {
                continue;
            }
            if seen.len() == MAX_NAMES_PER_STREAM {
                return Err(too_many(field));
            }
            seen.insert(n.clone());
            out.push(n);
        }
        out
    };
    if names.len() > MAX_NAMES_PER_STREAM {
        return Err(too_many(field));
    }
    Ok(names)
}

pub(crate) fn too_many(field: &str) -> Status {
    Status::invalid_argument(format!(
        "{field}: more than {MAX_NAMES_PER_STREAM} distinct names; at most {MAX_NAMES_PER_STREAM} per stream"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_deduplicated_before_the_cap_and_checked_for_length() {
        assert_eq!(
            checked_names("f", names(&["a", "b", "a", "sds://a"])).unwrap(),
            names(&["a", "b", "sds://a"])
        );
        let many: Vec<String> = std::iter::repeat_n("web".to_string(), 200_000).collect();
        assert_eq!(checked_names("f", many).unwrap(), names(&["web"]));
        let distinct: Vec<String> = (0..=MAX_NAMES_PER_STREAM)
            .map(|i| format!("n{i}"))
            .collect();
        let err = checked_names("resource_names_subscribe", distinct).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("resource_names_subscribe:"),
            "{err}"
        );
        let long = format!("sds://{}", "a".repeat(MAX_NAME_BYTES));
        assert!(
            checked_names("f", vec![long]).is_ok(),
            "the prefix does not count"
        );
        let err = checked_names("f", names(&["ok", &"a".repeat(254)])).unwrap_err();
        assert!(err.message().contains("f[1]"), "{err}");
    }

    #[test]
    fn clip_respects_characters() {
        assert_eq!(clip("héllo", 2), "h");
        assert_eq!(clip("héllo", 3), "hé");
        assert_eq!(clip("abc", 10), "abc");
    }
}
