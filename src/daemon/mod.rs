//! The running daemon: loads the sources, publishes them, binds the listeners and serves SDS until shut down.
//!
//! Start-up is all-or-nothing: a file that cannot be loaded or an address that cannot be bound fails the
//! start with an error naming it, before anything is served. Shutdown cancels one token: listeners stop
//! accepting, every stream ends with `UNAVAILABLE` (Envoy reconnects), watchers stop, Unix sockets are
//! removed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::net::listen::{self, Admission, Bound};
use crate::net::peer::Limits;
use crate::registry::{Published, Registry, SecretContent};
use crate::sds::{Configured, Policy, SdsService};
use crate::sources::acme::dns01::Dns01;
use crate::sources::acme::http01;
use crate::sources::acme::on_demand::OnDemand;
use crate::sources::acme::{AcmeManager, ManagedCert};
use crate::sources::files::FileSource;
use crate::sources::internal::{InternalCert, InternalIssuer};
use crate::store::SharedStore;
use crate::values::{ListenAddr, SecretName};

mod preflight;

pub use preflight::{check_open_files_limit, preflight};

/// How long shutdown waits for streams and tasks to finish before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The running ACME side: manager, its tasks' token, the store and the responder's address.
struct AcmeRuntime {
    manager: Arc<AcmeManager>,
    token: CancellationToken,
    on_demand: Option<Arc<OnDemand>>,
}

/// The running internal CA: its issuer (the CA is loaded once) and the renewal task of the current set.
struct InternalRuntime {
    issuer: Arc<InternalIssuer>,
    task: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

/// A started daemon.
pub struct Running {
    config: Config,
    registry: Arc<Registry>,
    policy: Arc<Policy>,
    limits: Limits,
    /// The counters every part of this daemon updates, rendered by `/metrics`.
    metrics: Metrics,
    shutdown: CancellationToken,
    tasks: JoinSet<Result<(), DaemonError>>,
    files_token: CancellationToken,
    store: Option<SharedStore>,
    /// The directory the store keeps its files in (the configured one, or its private subdirectory).
    store_dir: Option<std::path::PathBuf>,
    acme: Option<AcmeRuntime>,
    internal: Option<InternalRuntime>,
    status: Option<crate::ops::status::StatusView>,
    addresses: Vec<String>,
    tcp: Vec<SocketAddr>,
    http01_addr: Option<SocketAddr>,
    /// Where the TLS-ALPN-01 responder listens, once a certificate uses it.
    tls_alpn01_addr: Option<SocketAddr>,
    admin_addr: Option<SocketAddr>,
}

/// Identity of a file's content as far as metadata tells (follows symlinks, as a ConfigMap mount needs).
fn file_stamp(path: &std::path::Path) -> Option<(u64, u64, i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.ino(), m.size(), m.mtime(), m.mtime_nsec()))
}

/// Watches the directory holding `path` (and its symlink target's directory, as a ConfigMap mount needs).
fn watch_file(path: &std::path::Path) -> Option<crate::watch::DirWatch> {
    let mut dirs = Vec::new();
    crate::watch::dirs_for(path, &mut dirs);
    match crate::watch::DirWatch::new(&dirs) {
        Ok((watch, failed)) => {
            for (dir, e) in failed {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the configuration directory; use SIGHUP to reload");
            }
            Some(watch)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the configuration file; use SIGHUP to reload");
            None
        }
    }
}

/// Why the daemon could not start, apply a configuration, or keep serving. Each variant's text says what
/// was being done (as the log shows it, the cause after it).
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    /// The configuration, or a file it names, is not usable.
    Config(#[from] ConfigError),
    #[error("starting the SDS listeners")]
    /// An SDS listener could not be set up.
    Listen(#[source] crate::net::listen::ListenError),
    #[error(transparent)]
    /// The `[sds.tls]` files are not usable.
    Tls(#[from] crate::net::listen::TlsError),
    #[error("SDS server on {what}")]
    /// An SDS listener stopped with an error.
    Serve {
        /// The listener (`unix:PATH` or `IP:PORT`).
        what: String,
        #[source]
        /// What the system said.
        source: std::io::Error,
    },
    #[error("admin.listen: cannot listen on {addr}")]
    /// The admin listener could not be set up.
    Admin {
        /// `admin.listen`.
        addr: SocketAddr,
        #[source]
        /// What the system said.
        source: std::io::Error,
    },
    #[error("starting the HTTP-01 responder on {addr}")]
    /// The HTTP-01 responder could not be set up.
    Http01 {
        /// `http01.listen`.
        addr: SocketAddr,
        #[source]
        /// What the system said.
        source: std::io::Error,
    },
    #[error(transparent)]
    /// The storage directory could not be opened (or is locked by another acme-sds).
    Store(crate::sources::OpenStoreError),
    /// The `[dns01]` TSIG key cannot be used.
    #[error("{0}")]
    Dns01(#[source] crate::sources::acme::dns01::DnsError),
    #[error("tls_alpn01.listen: cannot listen on {addr}")]
    /// The TLS-ALPN-01 responder's address could not be bound.
    TlsAlpn01 {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    #[error("on_demand.ask: no TLS client for https:// URLs")]
    /// No TLS client could be made for `[on_demand] ask` (no system roots).
    OnDemand(#[source] rustls::Error),
    #[error("the internal CA (storage.path)")]
    /// The internal CA could not be loaded or created.
    Internal(#[source] crate::sources::internal::InternalError),
    #[error("{0} panicked")]
    /// A task (named) panicked: a bug.
    Panicked(&'static str, #[source] tokio::task::JoinError),
}

/// What the process asks of a running daemon ([`Running::run_until_stopped`]); each carries what caused it,
/// for the log (`"SIGHUP"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Read the configuration file again and apply what changed.
    Reload(&'static str),
    /// Stop serving, drain, and return.
    Shutdown(&'static str),
}

/// Who may ask for (and read) names that are not configured: with `[on_demand] allowed_nodes`, those
/// nodes; else anyone (such names are only waited for).
fn unconfigured_rule(config: &Config) -> crate::sds::access::Access {
    crate::sds::access::Access {
        nodes: config
            .on_demand
            .as_ref()
            .and_then(|o| o.allowed_nodes.clone()),
        clients: None,
    }
}

/// Every configured secret with its access rule and the names its certificate is for, for the SDS policy.
fn access_rules(config: &Config) -> Vec<Configured> {
    config
        .certificates
        .iter()
        .map(|c| Configured {
            name: c.name.clone(),
            access: c.access.clone(),
            domains: c
                .source
                .issued_domains()
                .unwrap_or_default()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        })
        .chain(
            config
                .trust_bundles
                .iter()
                .map(|b| Configured::from((b.name.clone(), b.access.clone()))),
        )
        .collect()
}

/// Logs what `config` allows but probably does not mean (`acme-sds check` prints the same).
fn log_warnings(config: &Config) {
    for w in config.warnings() {
        tracing::warn!("{}", w.located(&config.path));
    }
}

/// An error and its causes on one line, each said once: many errors name their cause in their own message
/// (`storage create /x: Permission denied`) and carry it as their source too.
pub fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = String::new();
    let chain = std::iter::successors(Some(e), |e| e.source());
    for cause in chain {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Loads every file-backed secret of `config`; a problem fails the whole load.
fn load_files(
    config: &Config,
) -> Result<(FileSource, Vec<(SecretName, SecretContent)>), ConfigError> {
    let mut files = FileSource::from_config(config);
    let loaded = files
        .load_all()
        .map_err(|problems| config.error(problems))?;
    Ok((files, loaded))
}

/// Loads every source of `config`, binds its listeners and starts serving.
pub async fn start(config: &Config) -> Result<Running, DaemonError> {
    let registry = Registry::new();
    let (files, loaded) = load_files(config)?;
    for (name, content) in &loaded {
        let v = registry.publish(name, content);
        crate::sources::log_loaded(name, content, v.version().version(), "loaded");
    }
    let shutdown = CancellationToken::new();
    log_warnings(config);
    let policy = Arc::new(Policy::new(access_rules(config)));
    policy.replace_unconfigured(unconfigured_rule(config));
    let limits = Limits::new(config.sds.quotas);
    let mut running = Running {
        config: config.clone(),
        registry: registry.clone(),
        policy: policy.clone(),
        limits: limits.clone(),
        metrics: Metrics::default(),
        files_token: shutdown.child_token(),
        shutdown: shutdown.clone(),
        tasks: JoinSet::new(),
        store: None,
        store_dir: None,
        acme: None,
        internal: None,
        status: None,
        addresses: Vec::new(),
        tcp: Vec::new(),
        http01_addr: None,
        tls_alpn01_addr: None,
        admin_addr: None,
    };
    // Stored ACME certificates and the internal CA's are published here, before any SDS listener opens.
    running.apply_internal(config).await?;
    running.apply_acme(config).await?;

    let admission = Admission {
        allowed_uids: config.sds.allowed_uids.clone(),
        tls: config.sds.tls.as_ref().map(listen::load_tls).transpose()?,
        handshake_timeout: config.sds.handshake_timeout,
    };
    if config.sds.allow_plaintext && config.sds.tls.is_none() {
        for addr in &config.sds.listen {
            if matches!(addr, ListenAddr::Tcp(a) if !a.ip().is_loopback()) {
                tracing::warn!(listen = %addr, "allow_plaintext: SDS serves private keys over unencrypted TCP beyond loopback");
            }
        }
    }
    let unix = listen::SocketAccess {
        mode: config.sds.socket_mode,
        group: config.sds.socket_group,
    };
    let bound = listen::bind_all(&config.sds.listen, unix)
        .await
        .map_err(DaemonError::Listen)?;
    let service = SdsService::new(
        registry.clone(),
        policy,
        limits.clone(),
        running.metrics.clone(),
        shutdown.clone(),
    )
    .with_stall_timeout(config.sds.stall_timeout)
    .into_grpc();
    for b in bound {
        let addr = b.describe();
        if let Bound::Tcp(_, a) = &b {
            running.tcp.push(*a);
        }
        tracing::info!(listen = %addr, "SDS listening");
        let service = service.clone();
        let token = shutdown.clone();
        let what = addr.clone();
        let admission = admission.clone();
        let limits = limits.clone();
        running.tasks.spawn(async move {
            listen::serve(b, service, admission, limits, token)
                .await
                .map_err(|source| DaemonError::Serve { what, source })
        });
        running.addresses.push(addr);
    }
    running.spawn_files(files);
    if let Some(addr) = config.admin {
        let (listener, local) = with_local_addr(tokio::net::TcpListener::bind(addr).await)
            .map_err(|source| DaemonError::Admin { addr, source })?;
        tracing::info!(listen = %local, "admin listening (/metrics, /healthz, /readyz, /status)");
        running.admin_addr = Some(local);
        let view = crate::ops::status::StatusView::new(
            running.sources(config),
            registry.clone(),
            limits.clone(),
        );
        running.status = Some(view.clone());
        let token = shutdown.clone();
        let admin = crate::ops::admin::Admin {
            status: view,
            metrics: running.metrics.clone(),
        };
        running.tasks.spawn(async move {
            crate::ops::admin::serve(listener, admin, token).await;
            Ok(())
        });
    }
    Ok(running)
}

impl Running {
    fn spawn_files(&mut self, files: FileSource) {
        self.files_token = self.shutdown.child_token();
        let registry = self.registry.clone();
        let token = self.files_token.clone();
        self.tasks.spawn(async move {
            files.run(registry, token).await;
            Ok(())
        });
    }

    /// What the status view reads.
    fn sources(&self, config: &Config) -> crate::ops::status::Sources {
        crate::ops::status::Sources {
            config: Arc::new(config.clone()),
            acme: self.acme.as_ref().map(|a| a.manager.clone()),
            internal: self.internal.as_ref().map(|i| i.issuer.clone()),
            on_demand: self.acme.as_ref().and_then(|a| a.on_demand.clone()),
            store: self.store.clone(),
        }
    }

    /// The store, opened (and locked) the first time a source needs it.
    async fn open_store(&mut self, config: &Config) -> Result<SharedStore, DaemonError> {
        if let Some(s) = &self.store {
            return Ok(s.clone());
        }
        let s = crate::sources::open_store(&config.storage, false)
            .await
            .map_err(DaemonError::Store)?;
        self.store_dir = config
            .storage
            .etcd
            .is_none()
            .then(|| config.storage.path.clone());
        self.store = Some(s.clone());
        Ok(s)
    }

    /// Starts (or restarts) the internal CA's certificates for `config`; stops them when there are none.
    async fn apply_internal(&mut self, config: &Config) -> Result<(), DaemonError> {
        if let Some((token, task)) = self.internal.as_mut().and_then(|i| i.task.take()) {
            token.cancel();
            // Bounded: it must not publish an old certificate after the new set has been published.
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                tracing::warn!(
                    "the previous internal CA task did not stop within {SHUTDOWN_GRACE:?}"
                );
            }
        }
        let certs = InternalCert::from_config(config);
        if certs.is_empty() {
            return Ok(());
        }
        let issuer = match &self.internal {
            Some(i) => i.issuer.clone(),
            None => {
                let store = self.open_store(config).await?;
                let issuer = InternalIssuer::open(store, self.registry.clone())
                    .await
                    .map_err(DaemonError::Internal)?;
                if let Some(root) = self.internal_root() {
                    tracing::info!(root = %root.display(), "internal CA ready: clients that trust its root trust the certificates with issuer = \"internal\"");
                }
                self.internal = Some(InternalRuntime {
                    issuer: issuer.clone(),
                    task: None,
                });
                issuer
            }
        };
        let token = self.shutdown.child_token();
        let task = issuer.start(certs, token.clone()).await;
        if let Some(i) = &mut self.internal {
            i.task = Some((token, task));
        }
        Ok(())
    }

    /// The internal CA's root certificate file (PEM), once the internal CA is in use.
    pub fn internal_root(&self) -> Option<std::path::PathBuf> {
        self.store_dir
            .as_ref()
            .map(|d| d.join(crate::sources::keys::INTERNAL_ROOT_CERT))
            .filter(|p| p.exists())
    }

    /// Starts (or restarts) the ACME side for `config`; stops it when no certificate needs it.
    async fn apply_acme(&mut self, config: &Config) -> Result<(), DaemonError> {
        self.policy.set_demand(None);
        if let Some(old) = self.acme.take() {
            old.token.cancel();
            // Its tasks withdraw their challenges as they end: wait (bounded), so that they cannot withdraw
            // one that the new manager, resuming the same order, has just published again.
            if tokio::time::timeout(SHUTDOWN_GRACE, old.manager.stopped())
                .await
                .is_err()
            {
                tracing::warn!("the previous ACME tasks did not stop within {SHUTDOWN_GRACE:?}");
            }
        }
        // A validated configuration has an [acme] table whenever a certificate is ordered.
        let Some(acme_config) = config
            .acme
            .clone()
            .filter(|_| config.has_acme_certificates())
        else {
            return Ok(());
        };
        let store = self.open_store(config).await?;
        if self.http01_addr.is_none() {
            let (listener, addr) = with_local_addr(http01::bind(config.http01.listen).await)
                .map_err(|source| DaemonError::Http01 {
                    addr: config.http01.listen,
                    source,
                })?;
            tracing::info!(listen = %addr, "HTTP-01 responder listening");
            self.http01_addr = Some(addr);
            let token = self.shutdown.clone();
            let responder_store = store.clone();
            let metrics = self.metrics.clone();
            self.tasks.spawn(async move {
                http01::serve(listener, responder_store, metrics, token).await;
                Ok(())
            });
        }
        if config.uses_challenge(crate::values::Challenge::TlsAlpn01)
            && self.tls_alpn01_addr.is_none()
        {
            let addr = config.tls_alpn01.listen;
            let (listener, local) = with_local_addr(tokio::net::TcpListener::bind(addr).await)
                .map_err(|source| DaemonError::TlsAlpn01 { addr, source })?;
            tracing::info!(listen = %local, "TLS-ALPN-01 responder listening");
            self.tls_alpn01_addr = Some(local);
            let token = self.shutdown.clone();
            let responder_store = store.clone();
            let metrics = self.metrics.clone();
            self.tasks.spawn(async move {
                crate::sources::acme::tls_alpn01::serve(listener, responder_store, metrics, token)
                    .await;
                Ok(())
            });
        }
        // A key that cannot be used stops the start (or the reload) here, not at the first order.
        let dns01 = config
            .dns01
            .clone()
            .map(|d| Dns01::new(d, self.metrics.clone()));
        if let Some(d) = &dns01 {
            d.check_key().map_err(DaemonError::Dns01)?;
        }
        let manager = AcmeManager::new(
            acme_config,
            store,
            self.registry.clone(),
            self.metrics.clone(),
            config
                .storage
                .etcd
                .as_ref()
                .map_or(crate::config::DEFAULT_LOCK_TTL, |e| e.lock_ttl),
            dns01,
        );
        let token = self.shutdown.child_token();
        for handle in manager
            .start(ManagedCert::from_config(config), token.clone())
            .await
        {
            self.tasks.spawn(async move {
                handle
                    .await
                    .map_err(|e| DaemonError::Panicked("an ACME certificate task", e))
            });
        }
        let mut on_demand = None;
        if let Some(od) = config.on_demand.clone() {
            let started = OnDemand::start(
                od,
                manager.clone(),
                self.registry.clone(),
                self.policy.clone(),
                self.metrics.clone(),
                token.clone(),
            )
            .await
            .map_err(DaemonError::OnDemand)?;
            self.policy.set_demand(Some(Arc::new(started.clone())));
            on_demand = Some(started);
        }
        self.acme = Some(AcmeRuntime {
            manager,
            token,
            on_demand,
        });
        Ok(())
    }

    /// Applies a new configuration without dropping SDS streams: added secrets are loaded (or ordered) and
    /// pushed, removed ones stop being offered (streams that hold them keep them), changed ones are
    /// reloaded or re-ordered, and access rules change at once. An invalid configuration is rejected as a
    /// whole and the running one stays in force. Listener settings need a restart.
    pub async fn reload(&mut self, path: &std::path::Path) -> Result<(), DaemonError> {
        let new = crate::config::load(path)?;
        let (files, loaded) = load_files(&new)?;
        let old = std::mem::replace(&mut self.config, new.clone());
        let restart_only = [
            ("[sds]", old.sds != new.sds),
            ("[http01]", old.http01 != new.http01),
            ("[admin]", old.admin != new.admin),
            ("[storage]", old.storage != new.storage),
        ];
        for (what, _) in restart_only.iter().filter(|(_, changed)| *changed) {
            tracing::warn!(
                "{what} changed: listener and storage settings take effect at the next restart"
            );
        }
        log_warnings(&new);
        // The new rules are in force before anything new is published, and every open stream checks its
        // subscription against them at once.
        self.policy.replace(access_rules(&new));
        self.policy.replace_unconfigured(unconfigured_rule(&new));

        // Files: publish what is new or changed, then watch the new set.
        self.files_token.cancel();
        for (name, content) in &loaded {
            if let Published::New(v) = self.registry.publish(name, content) {
                crate::sources::log_loaded(name, content, v.version(), "loaded");
            }
        }
        self.spawn_files(files);

        // ACME: restart the manager when anything ACME changed (stored certificates are served again at
        // once and nothing valid is re-ordered).
        if old.acme != new.acme
            || old.on_demand != new.on_demand
            || old.dns01 != new.dns01
            || ManagedCert::from_config(&old) != ManagedCert::from_config(&new)
        {
            self.apply_acme(&new).await?;
        }
        if InternalCert::from_config(&old) != InternalCert::from_config(&new) {
            self.apply_internal(&new).await?;
        }

        // Secrets no longer configured stop being offered.
        let names = |c: &Config| -> Vec<SecretName> {
            c.certificates
                .iter()
                .map(|x| x.name.clone())
                .chain(c.trust_bundles.iter().map(|x| x.name.clone()))
                .collect()
        };
        let (before, after) = (names(&old), names(&new));
        let removed: Vec<&SecretName> = before.iter().filter(|n| !after.contains(n)).collect();
        let added: Vec<&SecretName> = after.iter().filter(|n| !before.contains(n)).collect();
        for name in &removed {
            self.registry.withdraw(name);
        }
        if let Some(view) = &self.status {
            view.update(self.sources(&new));
        }
        tracing::info!(
            ?added,
            ?removed,
            secrets = after.len(),
            "configuration reloaded"
        );
        Ok(())
    }

    /// Serves until told to stop ([`Event::Shutdown`], or every sender of `events` gone), reloading the
    /// configuration on [`Event::Reload`] and whenever its file changes; then shuts down cleanly. The
    /// process turns its signals into events (`main.rs`); a test sends them itself.
    pub async fn run_until_stopped(
        mut self,
        mut events: mpsc::Receiver<Event>,
    ) -> Result<(), DaemonError> {
        let path = self.config.path.clone();
        // The built-in configuration has no file to watch: a new acme-sds.toml is used at the next start.
        let built_in = self.config.built_in;
        let mut watch = if built_in { None } else { watch_file(&path) };
        let mut stamp = file_stamp(&path);
        // Logged once events and the config watcher are in place: from here on, edits are seen.
        if built_in {
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                config = "built-in",
                "acme-sds started"
            );
        } else {
            tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %path.display(), "acme-sds started");
        }
        loop {
            let why = tokio::select! {
                event = events.recv() => match event {
                    Some(Event::Reload(why)) => why,
                    Some(Event::Shutdown(why)) => { tracing::info!("{why}: shutting down"); break; }
                    None => { tracing::info!("shutting down"); break; }
                },
                e = self.failed() => return Err(e),
                changed = crate::watch::next_change(&mut watch) => {
                    if let Err(e) = changed {
                        tracing::warn!(error = %e, "watching the configuration file failed; use SIGHUP to reload");
                        watch = None;
                        continue;
                    }
                    // Editors and ConfigMap updates write in bursts: let them finish.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let now = file_stamp(&path);
                    if now == stamp {
                        continue;
                    }
                    "the configuration file changed"
                }
            };
            stamp = file_stamp(&path);
            if built_in {
                tracing::info!(
                    "{why}: the built-in configuration has nothing to reload; start acme-sds again to use a configuration file"
                );
                continue;
            }
            tracing::info!("{why}: reloading {}", path.display());
            if let Err(e) = self.reload(&path).await {
                tracing::error!(
                    "configuration reload rejected; the running configuration stays in force: {}",
                    causes(&e)
                );
            }
        }
        self.shutdown().await
    }

    /// The store of the ACME side, when certificates are obtained over ACME.
    pub fn store(&self) -> Option<&SharedStore> {
        self.store.as_ref()
    }

    /// The stream, name and connection limits, and what each peer holds now.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

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
    pub async fn failed(&mut self) -> DaemonError {
        loop {
            match self.tasks.join_next().await {
                Some(Ok(Err(e))) => return e,
                Some(Err(e)) => return DaemonError::Panicked("a server task", e),
                Some(Ok(Ok(()))) => continue,
                None => std::future::pending::<()>().await,
            }
        }
    }

    /// Stops accepting, ends every stream, removes the Unix sockets and waits (bounded) for it all.
    pub async fn shutdown(mut self) -> Result<(), DaemonError> {
        self.shutdown.cancel();
        let drain = async {
            let mut first_err = None;
            while let Some(res) = self.tasks.join_next().await {
                let err = match res {
                    Ok(Ok(())) => continue,
                    Ok(Err(e)) => e,
                    Err(e) => DaemonError::Panicked("a server task", e),
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

/// A bound listener with the address it got (a port 0 resolved to the one the kernel chose): what is logged
/// and reported as listening.
fn with_local_addr(
    bound: std::io::Result<tokio::net::TcpListener>,
) -> std::io::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = bound?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
