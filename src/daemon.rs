//! The running daemon: loads the sources, publishes them, binds the listeners and serves SDS until shut down.
//!
//! Start-up is all-or-nothing: a file that cannot be loaded or an address that cannot be bound fails the
//! start with an error naming it, before anything is served. Shutdown cancels one token: listeners stop
//! accepting, every stream ends with `UNAVAILABLE` (Envoy reconnects), watchers stop, Unix sockets are
//! removed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::acme::{AcmeManager, ManagedCert};
use crate::config::{Config, ConfigError};
use crate::http01;
use crate::registry::Registry;
use crate::sds::{Policy, SdsService};
use crate::server::{self, Admission, Bound};
use crate::sources::files::{self, FileSource};
use crate::store::{FsStore, SharedStore};

/// How long shutdown waits for streams and tasks to finish before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A started daemon.
pub struct Running {
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    tasks: JoinSet<anyhow::Result<()>>,
    addresses: Vec<String>,
    tcp: Vec<SocketAddr>,
    http01_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

/// Loads every source of `config`, binds its listeners and starts serving.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    // One TLS crypto provider for the whole process (the ACME client's HTTPS uses it).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = Registry::new();
    let mut files = FileSource::from_config(config);
    let loaded = files.load_all().map_err(|problems| ConfigError {
        path: config.path.clone(),
        problems,
    })?;
    for (name, content) in &loaded {
        let v = registry.publish(name, content);
        files::log_loaded(name, content, v.version().version(), "loaded");
    }

    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let mut http01_addr = None;
    let mut acme_manager = None;
    if config.has_acme_certificates() {
        let acme_config = config
            .acme
            .clone()
            .context("ACME certificates need an [acme] table")?;
        let store: SharedStore = Arc::new(
            FsStore::open(&config.storage.path)
                .with_context(|| format!("opening storage {}", config.storage.path.display()))?,
        );
        let listener = http01::bind(config.http01.listen).await.with_context(|| {
            format!("starting the HTTP-01 responder on {}", config.http01.listen)
        })?;
        let addr = listener.local_addr().context("HTTP-01 responder address")?;
        tracing::info!(listen = %addr, "HTTP-01 responder listening");
        http01_addr = Some(addr);
        let manager = AcmeManager::new(acme_config, store.clone(), registry.clone());
        acme_manager = Some(manager.clone());
        // Stored certificates are published here, before any SDS listener opens.
        for handle in manager
            .start(ManagedCert::from_config(config), shutdown.clone())
            .await
        {
            tasks.spawn(async move { handle.await.context("an ACME certificate task panicked") });
        }
        let token = shutdown.clone();
        tasks.spawn(async move {
            http01::serve(listener, store, token).await;
            Ok(())
        });
    }
    let admission = Admission {
        allowed_uids: config.sds.allowed_uids.clone(),
        tls: config.sds.tls.as_ref().map(server::load_tls).transpose()?,
    };
    if config.sds.allow_plaintext && config.sds.tls.is_none() {
        for addr in &config.sds.listen {
            if matches!(addr, crate::config::ListenAddr::Tcp(a) if !a.ip().is_loopback()) {
                tracing::warn!(listen = %addr, "allow_plaintext: SDS serves private keys over unencrypted TCP beyond loopback");
            }
        }
    }
    let bound = server::bind_all(&config.sds)
        .await
        .context("starting the SDS listeners")?;
    let service = SdsService::with_policy(
        registry.clone(),
        Arc::new(Policy::from_config(config)),
        shutdown.clone(),
    )
    .with_stall_timeout(config.sds.stall_timeout);
    let mut addresses = Vec::new();
    let mut tcp = Vec::new();
    for b in bound {
        let addr = b.describe();
        if let Bound::Tcp(_, a) = &b {
            tcp.push(*a);
        }
        tracing::info!(listen = %addr, "SDS listening");
        let service = service.clone();
        let token = shutdown.clone();
        let what = addr.clone();
        let admission = admission.clone();
        tasks.spawn(async move {
            server::serve(b, service, admission, token)
                .await
                .with_context(|| format!("SDS server on {what}"))
        });
        addresses.push(addr);
    }
    {
        let registry = registry.clone();
        let token = shutdown.clone();
        tasks.spawn(async move {
            files.run(registry, token).await;
            Ok(())
        });
    }
    let mut admin_addr = None;
    if let Some(addr) = config.admin {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("admin.listen: cannot listen on {addr}"))?;
        let local = listener.local_addr().context("admin listener address")?;
        tracing::info!(listen = %local, "admin listening (/healthz, /readyz, /status)");
        admin_addr = Some(local);
        let view = crate::admin::StatusView::new(
            Arc::new(config.clone()),
            registry.clone(),
            acme_manager.clone(),
        );
        let token = shutdown.clone();
        tasks.spawn(async move {
            crate::admin::serve(listener, view, token).await;
            Ok(())
        });
    }
    Ok(Running {
        registry,
        shutdown,
        tasks,
        addresses,
        tcp,
        http01_addr,
        admin_addr,
    })
}

impl Running {
    /// The registry this daemon serves; other sources publish into it.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// Every SDS address, as clients reach it (`unix:/path`, `127.0.0.1:8234`).
    pub fn addresses(&self) -> &[String] {
        &self.addresses
    }

    /// The bound TCP addresses (with real ports when port 0 was configured).
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp
    }

    /// The HTTP-01 responder's bound address, when ACME certificates are configured.
    pub fn http01_addr(&self) -> Option<SocketAddr> {
        self.http01_addr
    }

    /// The admin listener's bound address, when `[admin] listen` is set.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Resolves when a server task stops on its own (which is an error), returning that error.
    pub async fn failed(&mut self) -> anyhow::Error {
        loop {
            match self.tasks.join_next().await {
                Some(Ok(Err(e))) => return e,
                Some(Err(e)) => return anyhow::Error::new(e).context("a server task panicked"),
                Some(Ok(Ok(()))) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Stops accepting, ends every stream, removes the Unix sockets and waits (bounded) for it all.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        let drain = async {
            let mut first_err = None;
            while let Some(res) = self.tasks.join_next().await {
                let err = match res {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e,
                    Err(e) => anyhow::Error::new(e),
                };
                first_err.get_or_insert(err);
            }
            first_err
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, drain).await {
            Ok(None) => Ok(()),
            Ok(Some(e)) => Err(e),
            Err(_) => {
                tracing::warn!("shutdown took longer than {SHUTDOWN_GRACE:?}; stopping anyway");
                Ok(())
            }
        }
    }
}
