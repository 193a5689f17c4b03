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

use crate::config::ListenAddr;
use crate::sds::SdsService;

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
pub async fn bind_all(addrs: &[ListenAddr], socket_mode: u32) -> Result<Vec<Bound>, ListenError> {
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
            ListenAddr::Unix(path) => bind_unix(path, socket_mode).await?,
        });
    }
    Ok(out)
}

async fn bind_unix(path: &Path, mode: u32) -> Result<Bound, ListenError> {
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

fn builder() -> Server {
    Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Serves SDS on one bound listener until `shutdown` is cancelled and every stream has ended.
pub async fn serve(
    bound: Bound,
    service: SdsService,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let signal = shutdown.clone().cancelled_owned();
    let router = builder().add_service(service.into_server());
    match bound {
        Bound::Tcp(listener, _) => {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            router.serve_with_incoming_shutdown(incoming, signal).await
        }
        Bound::Unix(listener, guard) => {
            let result = router
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), signal)
                .await;
            drop(guard);
            result
        }
    }
}
