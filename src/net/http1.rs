//! One hardened HTTP/1.1 server, shared by the HTTP-01 responder (which faces the internet) and the admin
//! listener: caps on open connections, in all and per source address (over either, a new connection is
//! closed at once rather than queued, so one client flooding the port leaves room for the CA, Prometheus
//! and the kubelet's probes), request headers limited in size and in the time to send them (slow-loris
//! safe), accept errors that back off instead of spinning, and on shutdown a graceful drain of every open
//! connection, bounded in time.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::accept::AcceptBackoff;
use crate::net::peer::{Limits, PeerKey, Quotas};
use crate::net::throttle::Throttle;

/// A client must send its whole request head within this.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// How long a connection may take to finish its request once shutdown began.
const DRAIN: Duration = Duration::from_secs(2);
/// Cap on open connections per listener.
pub const MAX_CONNECTIONS: usize = 1024;

/// How many connections one listener holds at once.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// Open connections in all.
    pub total: usize,
    /// From one source address (IPv6: one /64).
    pub per_source: usize,
}

/// The HTTP-01 responder's caps: the CA validates from a few addresses per vantage point, and Envoy, in
/// front of it, pools its connections.
pub const HTTP01_CAPS: Caps = Caps {
    total: MAX_CONNECTIONS,
    per_source: 256,
};

/// The admin listener's caps: a scraper and a kubelet need a handful each.
pub const ADMIN_CAPS: Caps = Caps {
    total: MAX_CONNECTIONS,
    per_source: 64,
};

/// Serves one HTTP/1.1 connection with the limits above until it closes, or until `shutdown` (then
/// gracefully, bounded).
async fn serve_connection<S>(stream: tokio::net::TcpStream, service: S, shutdown: CancellationToken)
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
        >,
    S::Future: Send + 'static,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

/// Serves `listener` (named `what` in logs) until `shutdown`, with a service made per connection by
/// `make`, within `caps`; returns when every connection has been drained.
pub async fn serve<S, F>(
    listener: TcpListener,
    what: &'static str,
    caps: Caps,
    make: F,
    shutdown: CancellationToken,
) where
    F: Fn() -> S,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let limit = Arc::new(tokio::sync::Semaphore::new(caps.total));
    let sources = Limits::new(Quotas {
        max_connections_per_peer: caps.per_source,
        ..Quotas::default()
    });
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = AcceptBackoff::new(what);
    let over_cap = Throttle::default();
    loop {
        let (stream, addr) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.accepted();
                    a
                }
                Err(e) => {
                    backoff.failed(&e, &shutdown).await;
                    continue;
                }
            },
        };
        // Over a cap: refuse (close at once) rather than queue.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            if let Some(held_back) = over_cap.allow() {
                tracing::warn!(
                    listener = what,
                    limit = caps.total,
                    held_back,
                    "connection refused: the listener's connection limit is reached"
                );
            }
            continue;
        };
        let source = PeerKey::for_ip(addr.ip());
        let counted = match sources.admit_connection(source.clone()) {
            Ok(c) => c,
            Err(refused) => {
                if let Some(held_back) = over_cap.allow() {
                    tracing::warn!(listener = what, source = %source, held_back, "connection refused: {refused}");
                }
                continue;
            }
        };
        let service = make();
        let token = shutdown.clone();
        conns.spawn(async move {
            let _held = (permit, counted);
            serve_connection(stream, service, token).await;
        });
        while conns.try_join_next().is_some() {}
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}
