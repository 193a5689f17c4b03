//! SDS listeners: binding TCP and Unix sockets and serving the gRPC service on all of them until shutdown.
//!
//! A Unix socket is bound under a temporary name, given its permission bits, then renamed into place, so it is
//! never reachable with the wrong mode and a stale socket left by a crash is replaced atomically. A live
//! socket (another acme-sds still serving it) or a path that is not a socket is never removed. On shutdown
//! the socket file is removed, if it is still the one this process created.

use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use anyhow::Context;
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::certs;
use crate::config::{ListenAddr, SdsConfig, SdsTlsConfig};
use crate::sds::SdsService;

mod batching;
use batching::BatchedWrites;

/// Why a listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: io::Error },
    #[error(
        "cannot listen on unix:{}: another process is serving this socket (is acme-sds already running?)",
        .0.display()
    )]
    InUse(PathBuf),
    #[error("cannot listen on unix:{}: the path exists and is not a socket; refusing to replace it", .0.display())]
    NotASocket(PathBuf),
}

/// A bound listener, not yet serving.
pub enum Bound {
    Tcp(TcpListener, SocketAddr),
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

/// Binds every configured address; fails on the first that cannot be bound.
pub async fn bind_all(sds: &SdsConfig) -> Result<Vec<Bound>, ListenError> {
    let mut out = Vec::with_capacity(sds.listen.len());
    for addr in &sds.listen {
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
            ListenAddr::Unix(path) => bind_unix(path, sds.socket_mode, sds.socket_group).await?,
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
        }
        Ok(_) => return Err(ListenError::NotASocket(path.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .and_then(|()| match group {
            Some(gid) => std::os::unix::fs::chown(&tmp, None, Some(gid)),
            None => Ok(()),
        })
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| std::fs::symlink_metadata(path));
    match placed {
        Ok(meta) => Ok(Bound::Unix(
            listener,
            UnixSocketGuard {
                path: path.to_owned(),
                dev_ino: (meta.dev(), meta.ino()),
            },
        )),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(err(e))
        }
    }
}

/// How long HTTP/2 connections may stay silent before a keepalive ping, and how long a ping may go
/// unanswered before the connection is dropped.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Most concurrent streams on one HTTP/2 connection (Envoy opens one per secret on a single connection).
const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;

fn builder() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(16 * 1024)
}

/// Who may connect, beyond the socket's own permission bits.
#[derive(Clone, Default)]
pub struct Admission {
    /// Unix sockets: only these peer uids (SO_PEERCRED).
    pub allowed_uids: Option<Vec<u32>>,
    /// TCP: mutual TLS (client certificates required).
    pub tls: Option<ServerTlsConfig>,
}

/// Loads `[sds.tls]`: our certificate and key (checked to match) and the CA that client certificates must
/// chain to. Errors name the config key.
pub fn load_tls(tls: &SdsTlsConfig) -> anyhow::Result<ServerTlsConfig> {
    let read = |key: &str, path: &Path| {
        std::fs::read(path)
            .with_context(|| format!("sds.tls.{key}: cannot read {}", path.display()))
    };
    let cert = read("cert_file", &tls.cert_file)?;
    let key = read("key_file", &tls.key_file)?;
    let ca = read("client_ca_file", &tls.client_ca_file)?;
    certs::certified_pem(&cert, &key).with_context(|| {
        format!(
            "sds.tls: {} + {}",
            tls.cert_file.display(),
            tls.key_file.display()
        )
    })?;
    certs::trust_bundle_pem(&ca)
        .with_context(|| format!("sds.tls.client_ca_file: {}", tls.client_ca_file.display()))?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false))
}

/// Serves SDS on one bound listener until `shutdown` is cancelled and every stream has ended.
pub async fn serve(
    bound: Bound,
    service: SdsService,
    admission: Admission,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let signal = shutdown.clone().cancelled_owned();
    match bound {
        Bound::Tcp(listener, _) => {
            let mut b = builder();
            if let Some(tls) = admission.tls {
                b = b.tls_config(tls)?;
            }
            let incoming = TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|conn| conn.map(BatchedWrites::new));
            b.add_service(service.into_server())
                .serve_with_incoming_shutdown(incoming, signal)
                .await
        }
        Bound::Unix(listener, guard) => {
            let allowed = admission.allowed_uids;
            let incoming = UnixListenerStream::new(listener)
                .filter(move |conn| {
                let (Some(allowed), Ok(stream)) = (&allowed, conn) else {
                    return true;
                };
                match stream.peer_cred() {
                    Ok(cred) if allowed.contains(&cred.uid()) => true,
                    Ok(cred) => {
                        tracing::warn!(uid = cred.uid(), pid = ?cred.pid(), "refused an SDS connection: uid not in sds.allowed_uids");
                        false
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "refused an SDS connection: peer credentials unavailable");
                        false
                    }
                }
            })
                .map(|conn| conn.map(BatchedWrites::new));
            let result = builder()
                .add_service(service.into_server())
                .serve_with_incoming_shutdown(incoming, signal)
                .await;
            drop(guard);
            result
        }
    }
}
