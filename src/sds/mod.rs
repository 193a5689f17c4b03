//! Envoy's Secret Discovery Service over gRPC: `StreamSecrets` (state of the world), `DeltaSecrets`
//! (incremental) and `FetchSecrets` (unary), all reading the [`Registry`].
//!
//! Each stream is a small state machine ([`sotw::Sotw`], [`delta::Delta`]) that holds only what the protocol
//! needs: its [`StreamContext`] (caller, node, quota slot), the subscribed names, what was last sent and the
//! last nonce. [`drive`] runs one as the response stream itself, with no task or channel per stream: when a
//! client stops reading, HTTP/2 flow control stops the polling, and the watch channels keep only the newest
//! version, so a stalled client costs nothing more and never holds back anyone else. `StreamSecrets`, the RPC
//! that carries a fleet's rotations, is framed by [`grpc`] rather than tonic's generic codec (less CPU per
//! push, a third less memory per idle stream); the other two go through tonic.
//!
//! Access is decided by the [`Policy`] in force at the moment of each decision: when a name is subscribed,
//! before every push, and at once when a reload changes the rules (a stream that may no longer read a secret
//! is ended with `PERMISSION_DENIED`). Every caller is counted against its peer's quotas ([`crate::net::peer`]).
//!
//! Rules kept (see `shared/reference/sds-protocol.md`): ACKs and NACKs are never answered, identical data is
//! never resent, a stale SotW nonce is ignored, an unknown name keeps the stream open until the secret
//! appears, an empty name list never enumerates secrets, and `sds://NAME` is the same secret as `NAME`.

pub mod access;
pub(crate) mod codec;
mod context;
mod delta;
pub mod grpc;
mod policy;
mod sotw;
mod subscribed;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::Stream;
use futures_util::task::AtomicWaker;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, ReusableBoxFuture, WaitForCancellationFutureOwned};
use tonic::{Request, Response, Status, Streaming};

use crate::metrics::Metrics;
use crate::net::peer::Limits;
use crate::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use crate::proto::envoy::service::secret::v3::secret_discovery_service_server::SecretDiscoveryService;
use crate::registry::{Registry, SECRET_TYPE_URL, Subscription};

pub use context::{
    MAX_NAME_BYTES, MAX_NAMES_PER_STREAM, MAX_NODE_FIELD_BYTES, NodeInfo, StreamContext,
};
pub(crate) use context::{Throttles, checked_names};
pub use policy::{Configured, Demand, Policy, Target};

/// The gRPC service. Cheap to clone.
#[derive(Clone)]
pub struct SdsService {
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    limits: Limits,
    metrics: Metrics,
    stall_timeout: std::time::Duration,
    shutdown: CancellationToken,
    stream_ids: Arc<AtomicU64>,
    throttles: Arc<Throttles>,
}

/// Default of `sds.stall_timeout`.
pub const DEFAULT_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// Largest request message accepted (requests are a node and a few names).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

impl SdsService {
    /// A service over `registry`, deciding access by `policy` and counting callers against `limits`;
    /// cancelling `shutdown` ends every open stream with `UNAVAILABLE`, so that clients reconnect elsewhere
    /// or later.
    pub fn new(
        registry: Arc<Registry>,
        policy: Arc<Policy>,
        limits: Limits,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Self {
        SdsService {
            registry,
            policy,
            limits,
            metrics,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            shutdown,
            stream_ids: Arc::new(AtomicU64::new(1)),
            throttles: Arc::new(Throttles::default()),
        }
    }

    /// A stream whose last push has gone unacknowledged this long is ended (with `UNAVAILABLE`) when a
    /// newer version is due, instead of queueing behind it: the client reconnects and gets the newest.
    pub fn with_stall_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// The gRPC service to serve: `StreamSecrets` with [`grpc`]'s framing, the rest through tonic.
    /// This service as the SDS listeners serve it (`net::listen::serve`): `StreamSecrets` on the fast path
    /// ([`grpc`]), everything else through tonic's generated server.
    pub fn into_grpc(self) -> crate::net::listen::GrpcService {
        use tonic::codegen::Service;
        let server = grpc::SdsServer::new(self);
        std::sync::Arc::new(move |req| server.clone().call(req))
    }

    /// The context of a new stream (or fetch) from `request`'s caller, counted against its quotas.
    fn context<T>(&self, rpc: &'static str, request: &Request<T>) -> Result<StreamContext, Status> {
        StreamContext::new(
            rpc,
            self.stream_ids.fetch_add(1, Ordering::Relaxed),
            request,
            self.policy.clone(),
            &self.limits,
            self.throttles.clone(),
            self.metrics.clone(),
        )
    }

    /// Runs `state` as a response stream reading `inbound`.
    fn drive<P: Protocol, In>(&self, state: P, inbound: In) -> Driver<P, In> {
        drive(
            state,
            inbound,
            self.stall_timeout,
            self.shutdown.clone(),
            &self.policy,
        )
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
        let ctx = self.context("delta", &request)?;
        let state = delta::Delta::new(self.registry.clone(), ctx);
        Ok(Response::new(Box::pin(
            self.drive(state, request.into_inner()),
        )))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let ctx = self.context("sotw", &request)?;
        let state = sotw::Sotw::new(self.registry.clone(), ctx);
        Ok(Response::new(Box::pin(
            self.drive(state, request.into_inner()),
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let mut ctx = self.context("fetch", &request)?;
        let req = request.into_inner();
        ctx.remember_node(req.node.as_ref());
        check_type_url(&req.type_url)?;
        let names = checked_names("resource_names", req.resource_names)?;
        if names.is_empty() {
            return Err(Status::invalid_argument(
                "resource_names is empty: name the secrets to fetch (there is no wildcard)",
            ));
        }
        let rules = ctx.rules();
        let targets: Vec<policy::Target> = names.iter().map(|n| rules.resolve(n)).collect();
        let pairs = || names.iter().map(String::as_str).zip(&targets);
        ctx.authorize(&rules, pairs(), [])?;
        ctx.unconfigured(pairs());
        let mut resources = Vec::new();
        let mut versions = Vec::new();
        let mut missing = Vec::new();
        for (name, target) in pairs() {
            match self.registry.get(&target.id) {
                Some(v) => {
                    resources.push(v.resource_for(name));
                    versions.push(v);
                }
                None => missing.push(name),
            }
        }
        tracing::debug!(stream = ctx.id, peer = %ctx.peer, node = ctx.node_id(), names = ?names, ?missing, "SDS fetch");
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
            "type_url {:?} is not served here: this SDS server serves only {SECRET_TYPE_URL}",
            context::clip(type_url, 256)
        )))
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

    /// Called after [`Protocol::poll_changed`]: the response to send, if the client lacks anything; `Err`
    /// ends the stream (the caller may no longer read what it subscribed to).
    fn on_change(&mut self) -> Result<Option<Self::Response>, Status>;

    /// The access rules changed: resolves and checks the subscription against them; the response to send
    /// if a name now follows another secret; `Err` ends the stream.
    fn reauthorize(&mut self) -> Result<Option<Self::Response>, Status>;

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

/// Resolves, handing the receiver back, when the access rules change.
async fn next_policy(mut rx: watch::Receiver<u64>) -> watch::Receiver<u64> {
    if rx.changed().await.is_err() {
        // The policy is gone with the service: no rule will change again.
        std::future::pending::<()>().await;
    }
    rx
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
    /// The armed wait for the next change of access rules.
    policy: ReusableBoxFuture<'static, watch::Receiver<u64>>,
    policy_flag: Arc<Flag>,
    policy_waker: Waker,
    done: bool,
}

pub(crate) fn drive<P: Protocol, In>(
    proto: P,
    inbound: In,
    stall_timeout: std::time::Duration,
    shutdown: CancellationToken,
    policy: &Policy,
) -> Driver<P, In> {
    let shutdown_flag = Flag::new();
    let changed_flag = Flag::new();
    let policy_flag = Flag::new();
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
        policy: ReusableBoxFuture::new(next_policy(policy.subscribe())),
        policy_waker: Waker::from(policy_flag.clone()),
        policy_flag,
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
        match self.proto.on_change()? {
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
        this.policy_flag.task.register(cx.waker());
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
            if this.policy_flag.take() {
                let mut cx = Context::from_waker(&this.policy_waker);
                let mut changed = false;
                // Re-armed waits are polled at once, so that they are registered for the next change.
                while let Poll::Ready(mut rx) = this.policy.poll(&mut cx) {
                    rx.borrow_and_update();
                    this.policy.set(next_policy(rx));
                    changed = true;
                }
                if changed {
                    match this.proto.reauthorize() {
                        Ok(Some(resp)) => return Poll::Ready(Some(Ok(resp))),
                        Ok(None) => {}
                        Err(status) => return this.end(status),
                    }
                }
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
    let service = SdsService::new(
        registry.clone(),
        Arc::new(Policy::default()),
        Limits::default(),
        Metrics::default(),
        CancellationToken::new(),
    );
    let ctx = || service.context("fuzz", &Request::new(()));
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

/// What the state machines' table tests (in `sotw` and `delta`) share: a registry, streams without a
/// network, and a certificate to publish.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::proto::envoy::extensions::transport_sockets::tls::v3::Secret;
    use crate::registry::SecretContent;

    /// A fresh certificate for `name` (a new version each call).
    pub fn cert(name: &str) -> SecretContent {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![format!("{name}.example.com")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        SecretContent::TlsCertificate(
            crate::certs::certified_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
                .unwrap(),
        )
    }

    /// The context of a new stream on an open service (no access rules, default limits).
    pub fn context(registry: &Arc<Registry>) -> StreamContext {
        SdsService::new(
            registry.clone(),
            Arc::new(Policy::default()),
            Limits::default(),
            Metrics::default(),
            CancellationToken::new(),
        )
        .context("test", &Request::new(()))
        .unwrap()
    }

    /// The names of the secrets in `resources`, as served.
    pub fn names<'a>(
        resources: impl IntoIterator<Item = &'a crate::proto::google::protobuf::Any>,
    ) -> Vec<String> {
        use prost::Message;
        resources
            .into_iter()
            .map(|a| Secret::decode(&a.value[..]).unwrap().name)
            .collect()
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
