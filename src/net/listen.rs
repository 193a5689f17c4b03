//! SDS listeners: binding TCP and Unix sockets and serving the gRPC service on all of them until shutdown.
//!
//! A Unix socket is created with only its owner's permission bits, then given the configured ones, so it is
//! never reachable with a wider mode than asked for; a stale socket left by a crash is replaced. A live
//! socket (another acme-sds still serving it) or a path that is not a socket is never removed. On shutdown
//! the socket file is removed, if it is still the one this process created.
//!
//! Connections are accepted here and served by hyper's HTTP/2 server directly, so that everything a
//! connection can hold is bounded before it reaches gRPC: a cap per listener and per source (uid or IP
//! address, [`crate::net::peer::Limits`]), a deadline for the TLS handshake and the HTTP/2 preface (a client
//! that connects and says nothing is dropped), `allowed_uids` checked at accept, accept errors that back
//! off ([`super::accept`]), and on Unix sockets the `:authority` fix for gRPC-core clients ([`super::authority`]). Each
//! request carries its [`Peer`] to the SDS service, which counts streams and names against it.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

use crate::certs;
use crate::net::peer::{Limits, Peer, PeerKey};
use crate::net::throttle::Throttle;
use crate::values::ListenAddr;

use super::accept::AcceptBackoff;
use super::authority::AuthorityFix;
use super::batching::BatchedWrites;
use super::preface;

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    /// The address could not be bound.
    Bind {
        /// The address as configured (`unix:PATH` or `IP:PORT`).
        addr: String,
        /// What the system said.
        source: io::Error,
    },
    #[error(
        "cannot listen on unix:{}: another process is serving this socket (is acme-sds already running?)",
        .0.display()
    )]
    /// Another process serves this Unix socket.
    InUse(PathBuf),
    #[error("cannot listen on unix:{}: the path exists and is not a socket; refusing to replace it", .0.display())]
    /// The path exists and is not a socket.
    NotASocket(PathBuf),
    #[error("cannot give unix:{} the mode {mode:04o} (sds.socket_mode): {source}", .path.display())]
    /// The socket could not be given its mode.
    Mode {
        /// The socket.
        path: PathBuf,
        /// `sds.socket_mode`.
        mode: u32,
        /// What the system said.
        source: io::Error,
    },
    #[error(
        "cannot give unix:{} to group {gid} (sds.socket_group): {source}; acme-sds's user must be a member of that group (or root)",
        .path.display()
    )]
    /// The socket could not be given its group.
    Group {
        /// The socket.
        path: PathBuf,
        /// `sds.socket_group`.
        gid: u32,
        /// What the system said.
        source: io::Error,
    },
}

/// A bound listener, not yet serving.
pub enum Bound {
    /// A TCP listener and the address it got.
    Tcp(TcpListener, SocketAddr),
    /// A Unix socket, removed when its guard drops.
    Unix(UnixListener, UnixSocketGuard),
}

impl Bound {
    /// The address clients reach, with the real port when port 0 was asked for.
    pub fn describe(&self) -> String {
        match self {
            Bound::Tcp(_, addr) => addr.to_string(),
            Bound::Unix(_, guard) => format!("unix:{}", guard.path.display()),
        }
    }
}

/// Removes the Unix socket file on drop, if it is still the one we created.
pub struct UnixSocketGuard {
    path: PathBuf,
    dev_ino: (u64, u64),
}

impl UnixSocketGuard {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixSocketGuard {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path)
            && (meta.dev(), meta.ino()) == self.dev_ino
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The permission bits and group given to the Unix sockets a listener creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits (`sds.socket_mode`).
    pub mode: u32,
    /// Group id (`sds.socket_group`), so that its members may connect with mode 0660.
    pub group: Option<u32>,
}

/// Binds every address; fails on the first that cannot be bound.
pub async fn bind_all(addrs: &[ListenAddr], unix: SocketAccess) -> Result<Vec<Bound>, ListenError> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        out.push(match addr {
            ListenAddr::Tcp(a) => {
                let listener = TcpListener::bind(a)
                    .await
                    .map_err(|source| ListenError::Bind {
                        addr: a.to_string(),
                        source,
                    })?;
                let local = listener.local_addr().map_err(|source| ListenError::Bind {
                    addr: a.to_string(),
                    source,
                })?;
                Bound::Tcp(listener, local)
            }
            ListenAddr::Unix(path) => bind_unix(path, unix.mode, unix.group).await?,
        });
    }
    Ok(out)
}

async fn bind_unix(path: &Path, mode: u32, group: Option<u32>) -> Result<Bound, ListenError> {
    let err = |source| ListenError::Bind {
        addr: format!("unix:{}", path.display()),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // Live, or left behind by a crash? Only a refused connection proves it is stale.
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(ListenError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(err)?;
        }
        Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    // Created with only its owner's bits (the umask is the process's for a moment: it can only make
    // what other threads create meanwhile more private), then given the configured ones: the socket is
    // never reachable with wider bits than asked for, and it is bound under its own name (as `ss -lx` and
    // `lsof` show it).
    let listener = {
        use nix::sys::stat::{Mode, umask};
        let old = umask(Mode::from_bits_truncate(0o077));
        let bound = UnixListener::bind(path);
        umask(old);
        bound.map_err(err)?
    };
    let placed = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|source| ListenError::Mode {
            path: path.to_owned(),
            mode,
            source,
        })
        .and_then(|()| match group {
            Some(gid) => std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| {
                ListenError::Group {
                    path: path.to_owned(),
                    gid,
                    source,
                }
            }),
            None => Ok(()),
        })
        .and_then(|()| std::fs::symlink_metadata(path).map_err(err));
    match placed {
        Ok(meta) => Ok(Bound::Unix(
            listener,
            UnixSocketGuard {
                path: path.to_owned(),
                dev_ino: (meta.dev(), meta.ino()),
            },
        )),
        Err(e) => {
            drop(listener);
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// How long HTTP/2 connections may stay silent before a keepalive ping, and how long a ping may go
/// unanswered before the connection is dropped.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most concurrent streams on one HTTP/2 connection (Envoy opens one per secret on a single connection).
const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;

/// Most bytes of request headers (HTTP/2 header list) per request.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Who may connect, beyond the socket's own permission bits, and how quickly they must get going.
#[derive(Clone)]
pub struct Admission {
    /// Unix sockets: only these peer uids (SO_PEERCRED).
    pub allowed_uids: Option<Vec<u32>>,
    /// TCP: mutual TLS (client certificates required).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// A new connection must complete its TLS handshake (if any) and send the HTTP/2 preface within this
    /// (`sds.handshake_timeout`).
    pub handshake_timeout: Duration,
}

/// Mutual TLS on TCP listeners (`[sds.tls]`): our certificate and key, and the CA that client certificates
/// must chain to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Our certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// The CA client certificates must chain to (PEM).
    pub client_ca_file: PathBuf,
}

/// What is wrong with the `[sds.tls]` files: the key and file, and the cause.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct TlsError {
    /// The config key and the file, or the key alone (`sds.tls.cert_file: /etc/acme-sds/sds.crt`).
    what: String,
    #[source]
    source: Box<dyn std::error::Error + Send + Sync>,
}

impl TlsError {
    fn new(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        TlsError {
            what: what.into(),
            source: source.into(),
        }
    }
}

/// Loads [`TlsFiles`]: our certificate and key (checked to match) and the CA that client certificates must
/// chain to; client certificates are required. Errors name the `[sds.tls]` key the file came from.
pub fn load_tls(tls: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let read = |key: &str, path: &Path| {
        std::fs::read(path)
            .map_err(|e| TlsError::new(format!("sds.tls.{key}: cannot read {}", path.display()), e))
    };
    let cert = read("cert_file", &tls.cert_file)?;
    let key = read("key_file", &tls.key_file)?;
    let ca = read("client_ca_file", &tls.client_ca_file)?;
    let at = |key: &str, path: &Path| format!("sds.tls.{key}: {}", path.display());
    certs::certified_pem(&cert, &key).map_err(|e| {
        TlsError::new(
            format!(
                "sds.tls: {} + {}",
                tls.cert_file.display(),
                tls.key_file.display()
            ),
            e,
        )
    })?;
    certs::trust_bundle_pem(&ca)
        .map_err(|e| TlsError::new(at("client_ca_file", &tls.client_ca_file), e))?;
    let chain = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::new(at("cert_file", &tls.cert_file), e))?;
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| TlsError::new(at("key_file", &tls.key_file), e))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&ca) {
        let ca = ca.map_err(|e| TlsError::new(at("client_ca_file", &tls.client_ca_file), e))?;
        roots
            .add(ca)
            .map_err(|e| TlsError::new(at("client_ca_file", &tls.client_ca_file), e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(|e| TlsError::new("sds.tls.client_ca_file", e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::new("sds.tls", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::new("sds.tls", e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a listener serves: a gRPC service, called once per request with the caller's [`Peer`] in the
/// request's extensions. This module knows nothing else of it; the SDS service is one
/// (`sds::SdsService::into_grpc`).
pub type GrpcService = Arc<dyn Fn(http::Request<tonic::body::Body>) -> GrpcFuture + Send + Sync>;

/// The answer of a [`GrpcService`].
pub type GrpcFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            > + Send,
    >,
>;

/// Everything a connection task needs; shared by all of one listener's connections.
struct Shared {
    service: GrpcService,
    builder: hyper::server::conn::http2::Builder<TokioExecutor>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
    refused: Throttle,
    handshake_timeout: Duration,
}

fn http2() -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .max_header_list_size(MAX_HEADER_LIST_BYTES);
    b
}

/// A connection accepted by either kind of listener.
enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream, Peer),
}

/// Serves `service` on one bound listener until `shutdown` is cancelled and every connection has ended.
pub async fn serve(
    bound: Bound,
    service: GrpcService,
    admission: Admission,
    limits: Limits,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let shared = Arc::new(Shared {
        service,
        builder: http2(),
        tls: admission.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        shutdown: shutdown.clone(),
        refused: Throttle::default(),
        handshake_timeout: admission.handshake_timeout,
    });
    let quotas = limits.quotas();
    let cap = Arc::new(tokio::sync::Semaphore::new(quotas.max_connections));
    let mut conns = tokio::task::JoinSet::new();
    let mut backoff = AcceptBackoff::new("SDS");
    let (tcp, unix, guard) = match bound {
        Bound::Tcp(l, _) => (Some(l), None, None),
        Bound::Unix(l, g) => (None, Some(l), Some(g)),
    };
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = async {
                match (&tcp, &unix) {
                    (Some(l), _) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
                    (_, Some(l)) => {
                        let (s, _) = l.accept().await?;
                        let cred = s.peer_cred()?;
                        Ok(Accepted::Unix(s, Peer::unix(cred.uid(), cred.pid())))
                    }
                    (None, None) => std::future::pending().await,
                }
            } => a,
        };
        let conn = match accepted {
            Ok(c) => {
                backoff.accepted();
                c
            }
            Err(e) => {
                backoff.failed(&e, &shutdown).await;
                continue;
            }
        };
        let source = match &conn {
            Accepted::Tcp(_, addr) => PeerKey::for_ip(addr.ip()),
            Accepted::Unix(_, peer) => peer.key().clone(),
        };
        if let (Accepted::Unix(_, peer), Some(allowed)) = (&conn, &admission.allowed_uids)
            && !matches!(peer.key(), PeerKey::Uid(uid) if allowed.contains(uid))
        {
            if let Some(held_back) = shared.refused.allow() {
                tracing::warn!(peer = %peer, held_back, "refused an SDS connection: uid not in sds.allowed_uids");
            }
            continue;
        }
        let Ok(permit) = cap.clone().try_acquire_owned() else {
            if let Some(held_back) = shared.refused.allow() {
                tracing::warn!(source = %source, limit = quotas.max_connections, held_back, "refused an SDS connection: the listener's connection limit (sds.max_connections) is reached");
            }
            continue;
        };
        let counted = match limits.admit_connection(source.clone()) {
            Ok(c) => c,
            Err(refused) => {
                if let Some(held_back) = shared.refused.allow() {
                    tracing::warn!(source = %source, held_back, "refused an SDS connection: {refused} (sds.max_connections_per_peer)");
                }
                continue;
            }
        };
        let shared = shared.clone();
        conns.spawn(async move {
            let _held = (permit, counted);
            connection(conn, &shared).await;
        });
        while conns.try_join_next().is_some() {}
    }
    drop((tcp, unix));
    while conns.join_next().await.is_some() {}
    drop(guard);
    Ok(())
}

/// Runs one step of a connection's set-up (`what`: the TLS handshake, the preface) within the connection's
/// deadline; `None` (the connection is dropped) on failure, timeout or shutdown.
async fn set_up<T>(
    what: &'static str,
    peer: &(dyn std::fmt::Display + Sync),
    shared: &Shared,
    deadline: tokio::time::Instant,
    step: impl std::future::Future<Output = io::Result<T>>,
) -> Option<T> {
    tokio::select! {
        r = tokio::time::timeout_at(deadline, step) => match r {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "SDS connection dropped during the {what}");
                None
            }
            Err(_) => {
                tracing::debug!(peer = %peer, "SDS connection dropped: no {what} within sds.handshake_timeout ({:?})", shared.handshake_timeout);
                None
            }
        },
        _ = shared.shutdown.cancelled() => None,
    }
}

/// Takes one connection through its TLS handshake and preface (within `sds.handshake_timeout`) and serves
/// it.
async fn connection(conn: Accepted, shared: &Shared) {
    let deadline = tokio::time::Instant::now() + shared.handshake_timeout;
    const PREFACE: &str = "HTTP/2 preface";
    match conn {
        Accepted::Unix(stream, peer) => {
            let io = BatchedWrites::new(stream);
            let Some(io) =
                set_up(PREFACE, &peer, shared, deadline, preface::read_preface(io)).await
            else {
                return;
            };
            serve_http2(AuthorityFix::new(io), peer, shared).await;
        }
        Accepted::Tcp(stream, addr) => {
            let _ = stream.set_nodelay(true);
            let io = BatchedWrites::new(stream);
            let Some(acceptor) = &shared.tls else {
                let Some(io) =
                    set_up(PREFACE, &addr, shared, deadline, preface::read_preface(io)).await
                else {
                    return;
                };
                serve_http2(io, Peer::tcp(addr, None), shared).await;
                return;
            };
            let Some(tls) = set_up(
                "TLS handshake",
                &addr,
                shared,
                deadline,
                acceptor.accept(io),
            )
            .await
            else {
                return;
            };
            let peer = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                Some(der) => Peer::tcp(addr, Some((certs::identities(der), der))),
                None => Peer::tcp(addr, None),
            };
            let Some(io) =
                set_up(PREFACE, &addr, shared, deadline, preface::read_preface(tls)).await
            else {
                return;
            };
            serve_http2(io, peer, shared).await;
        }
    }
}

/// Serves HTTP/2 on `io` for `peer` until the connection closes, or gracefully after shutdown.
async fn serve_http2<IO>(io: IO, peer: Peer, shared: &Shared)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let grpc = shared.service.clone();
    let service =
        hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            grpc(req.map(tonic::body::Body::new))
        });
    let conn = shared.builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "SDS connection ended with an error");
            }
        }
        _ = shared.shutdown.cancelled() => {
            // Streams end themselves with UNAVAILABLE on the same signal; GOAWAY, then wait for them.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
