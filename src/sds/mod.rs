//! Envoy's Secret Discovery Service over gRPC: `StreamSecrets` (state of the world), `DeltaSecrets`
//! (incremental) and `FetchSecrets` (unary), all reading the [`Registry`].
//!
//! Each stream is a small state machine ([`sotw::Sotw`], [`delta::Delta`]) that holds only what the protocol
//! needs: the node from the stream's first request, the subscribed names, what was last sent and the last
//! nonce. [`drive`] runs one as the response stream itself, with no task or channel per stream: when a client
//! stops reading, HTTP/2 flow control stops the polling, and the watch channels keep only the newest version,
//! so a stalled client costs nothing more and never holds back anyone else. `StreamSecrets`, the RPC that
//! carries a fleet's rotations, is framed by [`grpc`] rather than tonic's generic codec (less CPU per push,
//! a third less memory per idle stream); the other two go through tonic.
//!
//! Rules kept (see `shared/reference/sds-protocol.md`): ACKs and NACKs are never answered, identical data is
//! never resent, a stale SotW nonce is ignored, an unknown name keeps the stream open until the secret
//! appears, an empty name list never enumerates secrets, and `sds://NAME` is the same secret as `NAME`.

pub mod codec;
pub mod delta;
pub mod grpc;
pub mod sotw;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status, Streaming};

use crate::certs;
use crate::config::{Access, Config, glob_match};
use crate::proto::envoy::config::core::v3::Node;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use crate::proto::google::rpc;
use crate::registry::{Registry, SECRET_TYPE_URL, Subscription, canonical_name};
use std::collections::HashMap;

pub use crate::registry::ISTIO_PREFIX;

/// Who may read which secret: per secret name, the `allowed_nodes` / `allowed_clients` patterns.
/// Names without a rule may be read by anyone who can reach the listener.
/// Replaced as a whole on a configuration reload; streams consult it on every subscription.
#[derive(Debug, Default)]
pub struct Policy {
    rules: std::sync::RwLock<HashMap<String, Access>>,
}

impl Policy {
    pub fn from_config(config: &Config) -> Self {
        let rules = config
            .certificates
            .iter()
            .map(|c| (c.name.clone(), c.access.clone()))
            .chain(
                config
                    .trust_bundles
                    .iter()
                    .map(|b| (b.name.clone(), b.access.clone())),
            )
            .filter(|(_, a)| a.nodes.is_some() || a.clients.is_some())
            .collect();
        Policy {
            rules: std::sync::RwLock::new(rules),
        }
    }

    /// Takes the rules of `other` (a reloaded configuration).
    pub fn replace(&self, other: Policy) {
        let rules = other.rules.into_inner().unwrap_or_else(|e| e.into_inner());
        *self.rules.write().unwrap_or_else(|e| e.into_inner()) = rules;
    }

    /// Whether a caller (node id, client certificate identities) may read `requested`.
    pub fn allows(&self, requested: &str, node: Option<&str>, clients: &[String]) -> bool {
        let rules = self.rules.read().unwrap_or_else(|e| e.into_inner());
        let Some(rule) = rules.get(canonical_name(requested)) else {
            return true;
        };
        let nodes_ok = rule
            .nodes
            .as_ref()
            .is_none_or(|pats| node.is_some_and(|n| pats.iter().any(|p| glob_match(p, n))));
        let clients_ok = rule.clients.as_ref().is_none_or(|pats| {
            clients
                .iter()
                .any(|c| pats.iter().any(|p| glob_match(p, c)))
        });
        nodes_ok && clients_ok
    }
}

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct SdsService {
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    stall_timeout: std::time::Duration,
    shutdown: CancellationToken,
}

/// Default of `sds.stall_timeout`.
pub const DEFAULT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

impl SdsService {
    /// A service over `registry`; cancelling `shutdown` ends every open stream with `UNAVAILABLE`, so that
    /// clients reconnect elsewhere or later.
    pub fn new(registry: Arc<Registry>, shutdown: CancellationToken) -> Self {
        Self::with_policy(registry, Arc::new(Policy::default()), shutdown)
    }

    pub fn with_policy(
        registry: Arc<Registry>,
        policy: Arc<Policy>,
        shutdown: CancellationToken,
    ) -> Self {
        SdsService {
            registry,
            policy,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            shutdown,
        }
    }

    /// A stream whose last push has gone unacknowledged this long is ended (with `UNAVAILABLE`) when a
    /// newer version is due, instead of queueing behind it: the client reconnects and gets the newest.
    pub fn with_stall_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// The gRPC service to serve: `StreamSecrets` with [`grpc`]'s framing, the rest through tonic.
    pub fn into_server(self) -> grpc::SdsServer {
        grpc::SdsServer::new(self)
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl SecretDiscoveryService for SdsService {
    type DeltaSecretsStream = ResponseStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = ResponseStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        let ctx = StreamContext::new("delta", &request, self.policy.clone())?;
        let state = delta::Delta::new(self.registry.clone(), ctx);
        let stream = drive(
            state,
            request.into_inner(),
            self.stall_timeout,
            self.shutdown.clone(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let ctx = StreamContext::new("sotw", &request, self.policy.clone())?;
        let state = sotw::Sotw::new(self.registry.clone(), ctx);
        let stream = drive(
            state,
            request.into_inner(),
            self.stall_timeout,
            self.shutdown.clone(),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut ctx = StreamContext::new("fetch", &request, self.policy.clone())?;
        let req = request.into_inner();
        ctx.remember_node(req.node.as_ref());
        check_type_url(&req.type_url)?;
        check_name_count(req.resource_names.len())?;
        for name in &req.resource_names {
            ctx.authorize(name)?;
        }
        let peer = ctx.peer.clone();
        if req.resource_names.is_empty() {
            return Err(Status::invalid_argument(
                "resource_names is empty: name the secrets to fetch (there is no wildcard)",
            ));
        }
        let node = req.node.as_ref().map(|n| n.id.as_str()).unwrap_or("");
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        let mut missing = Vec::new();
        for name in &req.resource_names {
            match self.registry.get(name) {
                Some(v) => {
                    resources.push(v.resource_for(name));
                    versions.push(v);
                }
                None => missing.push(name.as_str()),
            }
        }
        tracing::debug!(%peer, node, names = ?req.resource_names, ?missing, "SDS fetch");
        if resources.is_empty() {
            return Err(Status::not_found(format!(
                "no secret named {}",
                missing.join(", ")
            )));
        }
        Ok(Response::new(DiscoveryResponse {
            version_info: combined_version(versions.iter().map(|v| v.version())),
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: String::new(),
            control_plane: None,
        }))
    }
}

/// A version for a response carrying several secrets: their versions, combined.
pub(crate) fn combined_version<'a>(mut versions: impl Iterator<Item = &'a str>) -> String {
    let Some(first) = versions.next() else {
        return String::new();
    };
    let rest: Vec<&str> = versions.collect();
    if rest.is_empty() {
        return first.to_owned();
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(first.as_bytes());
    for v in rest {
        ctx.update(b".");
        ctx.update(v.as_bytes());
    }
    ctx.finish().as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Rejects requests for resource types other than secrets. An empty type URL is taken as the secret type,
/// since this service serves nothing else.
pub(crate) fn check_type_url(type_url: &str) -> Result<(), Status> {
    if type_url.is_empty() || type_url == SECRET_TYPE_URL {
        Ok(())
    } else {
        Err(Status::invalid_argument(format!(
            "type_url {type_url:?} is not served here: this SDS server serves only {SECRET_TYPE_URL}"
        )))
    }
}

static STREAM_IDS: AtomicU64 = AtomicU64::new(1);

/// Most names one stream may subscribe to (Envoy asks for one per stream).
pub const MAX_NAMES_PER_STREAM: usize = 1000;
/// Most SDS streams open at once across all connections; more are refused with RESOURCE_EXHAUSTED.
pub const MAX_STREAMS: usize = 100_000;
/// Largest request message accepted (requests are a node and a few names).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

static OPEN_STREAMS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Counts a stream as open until dropped.
#[derive(Debug)]
struct StreamSlot(&'static str);

impl StreamSlot {
    fn acquire(rpc: &'static str) -> Result<Self, Status> {
        let before = OPEN_STREAMS.fetch_add(1, Ordering::Relaxed);
        if before >= MAX_STREAMS {
            OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(
                limit = MAX_STREAMS,
                "SDS stream refused: too many open streams"
            );
            return Err(Status::resource_exhausted("too many open SDS streams"));
        }
        crate::metrics::stream_opened(rpc, 1);
        Ok(StreamSlot(rpc))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        OPEN_STREAMS.fetch_sub(1, Ordering::Relaxed);
        crate::metrics::stream_opened(self.0, -1);
    }
}

/// How many SDS streams are open now.
pub fn open_streams() -> usize {
    OPEN_STREAMS.load(Ordering::Relaxed)
}

/// Refuses requests naming more secrets than one stream may hold.
pub(crate) fn check_name_count(n: usize) -> Result<(), Status> {
    if n > MAX_NAMES_PER_STREAM {
        Err(Status::invalid_argument(format!(
            "resource_names: {n} names; at most {MAX_NAMES_PER_STREAM} per stream"
        )))
    } else {
        Ok(())
    }
}

/// Who is on the other end of a stream, for logs and authorization.
#[derive(Debug)]
pub struct StreamContext {
    pub id: u64,
    pub rpc: &'static str,
    pub peer: String,
    /// Node id and cluster from the stream's first request that carried a node.
    pub node: Option<(String, String)>,
    /// DNS and URI (SPIFFE ID) names of the client certificate, over mTLS.
    pub clients: Vec<String>,
    policy: Arc<Policy>,
    /// When the oldest response not yet acknowledged (ACK or NACK) was sent.
    unacked_since: Option<std::time::Instant>,
    _slot: StreamSlot,
}

impl StreamContext {
    fn new<T>(
        rpc: &'static str,
        request: &Request<T>,
        policy: Arc<Policy>,
    ) -> Result<Self, Status> {
        let slot = StreamSlot::acquire(rpc)?;
        let clients = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| certs::identities(c)))
            .unwrap_or_default();
        let ctx = StreamContext {
            id: STREAM_IDS.fetch_add(1, Ordering::Relaxed),
            rpc,
            peer: describe_peer(request),
            node: None,
            clients,
            policy,
            unacked_since: None,
            _slot: slot,
        };
        tracing::debug!(stream = ctx.id, rpc, peer = %ctx.peer, "SDS stream opened");
        Ok(ctx)
    }

    /// Keeps the node of the first request that has one: Envoy only guarantees it there.
    pub(crate) fn remember_node(&mut self, node: Option<&Node>) {
        if self.node.is_none()
            && let Some(n) = node
        {
            self.node = Some((n.id.clone(), n.cluster.clone()));
        }
    }

    /// Refuses, with `PERMISSION_DENIED` and a log naming the caller, a secret this caller may not read. The
    /// answer is the same whether or not the secret exists.
    pub(crate) fn authorize(&self, requested: &str) -> Result<(), Status> {
        let node = self.node.as_ref().map(|(id, _)| id.as_str());
        if self.policy.allows(requested, node, &self.clients) {
            return Ok(());
        }
        tracing::warn!(
            stream = self.id,
            rpc = self.rpc,
            peer = %self.peer,
            node = node.unwrap_or(""),
            clients = ?self.clients,
            secret = requested,
            "SDS request denied: caller not allowed to read this secret"
        );
        Err(Status::permission_denied(format!(
            "not permitted to read secret {requested:?}"
        )))
    }

    /// A response went out.
    pub(crate) fn sent(&mut self) {
        self.unacked_since
            .get_or_insert_with(std::time::Instant::now);
    }

    /// The client answered (ACK or NACK) the latest response.
    pub(crate) fn answered(&mut self) {
        self.unacked_since = None;
    }

    /// How long the oldest unanswered response has waited.
    pub(crate) fn unanswered_for(&self) -> Option<std::time::Duration> {
        self.unacked_since.map(|t| t.elapsed())
    }

    pub(crate) fn node_id(&self) -> &str {
        self.node.as_ref().map(|(id, _)| id.as_str()).unwrap_or("")
    }

    /// `rejected` says what was rejected: "version V" (SotW) or "nonce N" (delta).
    pub(crate) fn log_nack(&self, names: &[&str], rejected: &str, err: &rpc::Status) {
        for name in names {
            crate::metrics::count_nack(name);
        }
        tracing::warn!(
            stream = self.id,
            rpc = self.rpc,
            peer = %self.peer,
            node = self.node_id(),
            cluster = self.node.as_ref().map(|(_, c)| c.as_str()).unwrap_or(""),
            names = ?names,
            rejected,
            code = err.code,
            error = %err.message,
            "Envoy rejected (NACKed) a secret; not resending it until a new version exists"
        );
    }
}

impl Drop for StreamContext {
    fn drop(&mut self) {
        tracing::debug!(stream = self.id, rpc = self.rpc, peer = %self.peer, node = self.node_id(), "SDS stream closed");
    }
}

fn describe_peer<T>(request: &Request<T>) -> String {
    if let Some(addr) = request.remote_addr() {
        return addr.to_string();
    }
    match request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
    {
        Some(cred) => match cred.pid() {
            Some(pid) => format!("unix(uid={},pid={pid})", cred.uid()),
            None => format!("unix(uid={})", cred.uid()),
        },
        None => "unix".to_owned(),
    }
}

/// Polls every subscription in `subs` (all of them, so each re-arms): ready if any saw a new version.
pub(crate) fn poll_any_changed<'a>(
    subs: impl Iterator<Item = &'a mut Subscription>,
    cx: &mut Context<'_>,
) -> Poll<()> {
    let mut any = false;
    for sub in subs {
        any |= sub.poll_changed(cx).is_ready();
    }
    if any { Poll::Ready(()) } else { Poll::Pending }
}

/// A per-stream protocol state machine.
pub(crate) trait Protocol: Send + Unpin + 'static {
    type Request: prost::Message + Default + Send + 'static;
    type Response: Send + 'static;

    /// Handles one request; `Err` ends the stream with that status.
    fn on_request(&mut self, req: Self::Request) -> Result<Option<Self::Response>, Status>;

    /// Polls the subscriptions: ready when one has a new version (then call [`Protocol::on_change`]).
    fn poll_changed(&mut self, cx: &mut Context<'_>) -> Poll<()>;

    /// Whether subscriptions were added since the last call: they must be polled once to be armed.
    fn take_fresh(&mut self) -> bool;

    /// Called after [`Protocol::poll_changed`]: the response to send, if the client lacks anything.
    fn on_change(&mut self) -> Option<Self::Response>;

    fn context(&self) -> &StreamContext;
}

/// A waker that notes it was woken before waking the stream's task.
///
/// A stream's task is woken by three sources (a request arriving, a secret changing, shutdown), and polling
/// the last two takes a lock shared with every other stream on the same secret. Giving each its own flagged
/// waker lets a poll skip the sources that have nothing new: an ACK costs no lock beyond HTTP/2's own.
#[derive(Default)]
struct Flag {
    set: AtomicBool,
    task: AtomicWaker,
}

impl Flag {
    fn new() -> Arc<Self> {
        let flag = Flag::default();
        // Everything is polled once, to arm it.
        flag.set.store(true, Ordering::Relaxed);
        Arc::new(flag)
    }

    fn take(&self) -> bool {
        self.set.swap(false, Ordering::AcqRel)
    }
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.set.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// Runs a protocol state machine as a response stream (see the module docs), reading its requests from
/// `inbound` (tonic's decoder, or [`grpc::Requests`]).
pub(crate) struct Driver<P: Protocol, In = Streaming<<P as Protocol>::Request>> {
    proto: P,
    inbound: In,
    inbound_open: bool,
    stall_timeout: std::time::Duration,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    shutdown_flag: Arc<Flag>,
    shutdown_waker: Waker,
    changed_flag: Arc<Flag>,
    changed_waker: Waker,
    done: bool,
}

pub(crate) fn drive<P: Protocol, In>(
    proto: P,
    inbound: In,
    stall_timeout: std::time::Duration,
    shutdown: CancellationToken,
) -> Driver<P, In> {
    let shutdown_flag = Flag::new();
    let changed_flag = Flag::new();
    Driver {
        proto,
        inbound,
        inbound_open: true,
        stall_timeout,
        shutdown: Box::pin(shutdown.cancelled_owned()),
        shutdown_waker: Waker::from(shutdown_flag.clone()),
        shutdown_flag,
        changed_waker: Waker::from(changed_flag.clone()),
        changed_flag,
        done: false,
    }
}

impl<P: Protocol, In> Driver<P, In> {
    /// The stream ends with `status`.
    fn end(&mut self, status: Status) -> Poll<Option<Result<P::Response, Status>>> {
        self.done = true;
        Poll::Ready(Some(Err(status)))
    }

    /// A subscribed secret changed: the push it calls for, unless the client has stalled.
    fn on_change(&mut self) -> Result<Option<P::Response>, Status> {
        let stalled = self
            .proto
            .context()
            .unanswered_for()
            .filter(|t| *t > self.stall_timeout);
        match self.proto.on_change() {
            Some(_) if stalled.is_some() => {
                let ctx = self.proto.context();
                tracing::warn!(
                    stream = ctx.id,
                    peer = %ctx.peer,
                    node = ctx.node_id(),
                    "ending a stalled SDS stream: its last push has not been acknowledged for {:?}; the client will reconnect and get the newest version",
                    stalled.unwrap_or_default()
                );
                Err(Status::unavailable(
                    "stream stalled: the last push was never acknowledged; reconnect",
                ))
            }
            other => Ok(other),
        }
    }
}

impl<P: Protocol, In> Stream for Driver<P, In>
where
    In: Stream<Item = Result<P::Request, Status>> + Unpin,
{
    type Item = Result<P::Response, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.done {
            return Poll::Ready(None);
        }
        this.shutdown_flag.task.register(cx.waker());
        this.changed_flag.task.register(cx.waker());
        loop {
            if this.shutdown_flag.take()
                && this
                    .shutdown
                    .as_mut()
                    .poll(&mut Context::from_waker(&this.shutdown_waker))
                    .is_ready()
            {
                return this.end(Status::unavailable("acme-sds is shutting down"));
            }
            if this.inbound_open {
                match Pin::new(&mut this.inbound).poll_next(cx) {
                    Poll::Ready(Some(Ok(req))) => match this.proto.on_request(req) {
                        Ok(Some(resp)) => return Poll::Ready(Some(Ok(resp))),
                        Ok(None) => continue,
                        Err(status) => return this.end(status),
                    },
                    // The client closed its side but may still be listening: keep pushing updates until it
                    // cancels the stream.
                    Poll::Ready(None) => this.inbound_open = false,
                    Poll::Ready(Some(Err(status))) => {
                        tracing::debug!(error = %status, "SDS stream request error");
                        return this.end(status);
                    }
                    Poll::Pending => {}
                }
            }
            if (this.changed_flag.take() | this.proto.take_fresh())
                && this
                    .proto
                    .poll_changed(&mut Context::from_waker(&this.changed_waker))
                    .is_ready()
            {
                match this.on_change() {
                    Ok(Some(resp)) => return Poll::Ready(Some(Ok(resp))),
                    Ok(None) => continue,
                    Err(status) => return this.end(status),
                }
            }
            return Poll::Pending;
        }
    }
}

/// Runs raw request bytes through the SotW and delta state machines, as a stream would, against
/// `registry`: for fuzzing the request handling without a network. Each input is decoded as a request;
/// undecodable ones are what gRPC would refuse, and are skipped.
#[doc(hidden)]
pub fn fuzz_requests(registry: &Arc<Registry>, inputs: &[&[u8]]) {
    use prost::Message;
    let ctx = || StreamContext::new("fuzz", &Request::new(()), Arc::new(Policy::default()));
    let (Ok(a), Ok(b)) = (ctx(), ctx()) else {
        return;
    };
    let mut sotw = sotw::Sotw::new(registry.clone(), a);
    let mut delta = delta::Delta::new(registry.clone(), b);
    for input in inputs {
        if let Ok(req) = DiscoveryRequest::decode(*input)
            && sotw.on_request(req).is_err()
        {
            sotw = sotw::Sotw::new(
                registry.clone(),
                match ctx() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            );
        }
        if let Ok(req) = DeltaDiscoveryRequest::decode(*input)
            && delta.on_request(req).is_err()
        {
            delta = delta::Delta::new(
                registry.clone(),
                match ctx() {
                    Ok(c) => c,
                    Err(_) => return,
                },
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combined_version_of_one_is_that_version() {
        assert_eq!(combined_version(["abc"].into_iter()), "abc");
        assert_eq!(combined_version([].into_iter()), "");
        let ab = combined_version(["a", "b"].into_iter());
        assert_ne!(ab, combined_version(["a", "c"].into_iter()));
        assert_eq!(ab.len(), 16);
    }

    #[test]
    fn type_url_check() {
        assert!(check_type_url("").is_ok());
        assert!(check_type_url(SECRET_TYPE_URL).is_ok());
        let err =
            check_type_url("type.googleapis.com/envoy.config.cluster.v3.Cluster").unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}
