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

/// The running ACME side: manager, its tasks' token, and the on-demand issuer.
struct AcmeRuntime {
    manager: Arc<AcmeManager>,
    token: CancellationToken,
    on_demand: Option<Arc<OnDemand>>,
}

/// A challenge responder's listener: where it is configured, where it is bound, how to stop it, and
/// whether it has stopped (its listener closed).
struct Responder {
    configured: SocketAddr,
    bound: SocketAddr,
    stop: CancellationToken,
    ended: CancellationToken,
}

impl Responder {
    /// Stops it and waits (bounded) until its listener is closed.
    async fn stop(self) {
        self.stop.cancel();
        if tokio::time::timeout(SHUTDOWN_GRACE, self.ended.cancelled())
            .await
            .is_err()
        {
            tracing::warn!(listen = %self.bound, "a responder did not stop within {SHUTDOWN_GRACE:?}");
        }
    }
}

/// What a configuration asks of a responder, decided (and its listener bound) before anything changes.
enum ResponderPlan {
    /// As it is (running where configured, or not running and not needed).
    Keep,
    /// Start on this listener (bound now), replacing the running one if any.
    Start(tokio::net::TcpListener, SocketAddr, SocketAddr),
    /// Stop: nothing uses it any more.
    Stop,
}

/// What a configuration asks of the on-demand issuer.
enum OnDemandPlan {
    Keep,
    Start(Box<crate::sources::acme::on_demand::Prepared>),
    Stop,
}

/// The ACME side of a configuration, checked, its listeners bound and its files read, but nothing
/// started or stopped: what a reload swaps in only once everything that can fail has succeeded.
struct AcmePlan {
    http01: ResponderPlan,
    tls_alpn01: ResponderPlan,
    /// `None`: nothing is obtained over ACME any more.
    run: Option<AcmeRun>,
}

struct AcmeRun {
    config: crate::config::AcmeConfig,
    store: SharedStore,
    dns01: Option<Dns01>,
    lock_ttl: Duration,
    certs: Vec<ManagedCert>,
    /// The running manager goes on (same CA and DNS-01 settings): its certificates are reconciled, and
    /// unchanged ones keep their tasks, schedules and backoff.
    keep_manager: bool,
    on_demand: OnDemandPlan,
}

/// The internal CA's side of a configuration, ready to start.
struct InternalPlan {
    certs: Vec<InternalCert>,
    issuer: Option<Arc<InternalIssuer>>,
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
    /// The HTTP-01 responder, while a certificate (or on-demand TLS) uses it.
    http01: Option<Responder>,
    /// The TLS-ALPN-01 responder, while a certificate uses it.
    tls_alpn01: Option<Responder>,
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
    let policy = Arc::new(Policy::default());
    policy.replace_all(access_rules(config), unconfigured_rule(config));
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
        http01: None,
        tls_alpn01: None,
        admin_addr: None,
    };
    // Stored ACME certificates and the internal CA's are published here, before any SDS listener opens.
    let internal = running.prepare_internal(config).await?;
    let acme = running.prepare_acme(None, config).await?;
    running.commit_internal(internal).await;
    running.commit_acme(acme).await;

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

    /// What `config` asks of the internal CA, with its CA loaded (or created) if it was not yet: the only
    /// step that can fail.
    async fn prepare_internal(&mut self, config: &Config) -> Result<InternalPlan, DaemonError> {
        let certs = InternalCert::from_config(config);
        if certs.is_empty() || self.internal.is_some() {
            return Ok(InternalPlan {
                certs,
                issuer: None,
            });
        }
        let store = self.open_store(config).await?;
        let issuer = InternalIssuer::open(store, self.registry.clone())
            .await
            .map_err(DaemonError::Internal)?;
        Ok(InternalPlan {
            certs,
            issuer: Some(issuer),
        })
    }

    /// Starts (or restarts) the internal CA's certificates of `plan`; stops them when there are none.
    async fn commit_internal(&mut self, plan: InternalPlan) {
        if let Some((token, task)) = self.internal.as_mut().and_then(|i| i.task.take()) {
            token.cancel();
            // Bounded: it must not publish an old certificate after the new set has been published.
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                tracing::warn!(
                    "the previous internal CA task did not stop within {SHUTDOWN_GRACE:?}"
                );
            }
        }
        if let Some(issuer) = plan.issuer {
            self.internal = Some(InternalRuntime { issuer, task: None });
            if let Some(root) = self.internal_root() {
                tracing::info!(root = %root.display(), "internal CA ready: clients that trust its root trust the certificates with issuer = \"internal\"");
            }
        }
        if plan.certs.is_empty() {
            return;
        }
        let Some(issuer) = self.internal.as_ref().map(|i| i.issuer.clone()) else {
            return;
        };
        let token = self.shutdown.child_token();
        let task = issuer.start(plan.certs, token.clone()).await;
        if let Some(i) = &mut self.internal {
            i.task = Some((token, task));
        }
    }

    /// The internal CA's root certificate file (PEM), once the internal CA is in use.
    pub fn internal_root(&self) -> Option<std::path::PathBuf> {
        self.store_dir
            .as_ref()
            .map(|d| d.join(crate::sources::keys::INTERNAL_ROOT_CERT))
            .filter(|p| p.exists())
    }

    /// Decides what `new` (replacing `old`, `None` at start) asks of the ACME side and does everything in
    /// it that can fail: opens the store, binds the responders' listeners, reads the TSIG key, makes the
    /// `ask` client. Nothing running is touched: an error here leaves the running configuration in force.
    async fn prepare_acme(
        &mut self,
        old: Option<&Config>,
        new: &Config,
    ) -> Result<AcmePlan, DaemonError> {
        // A validated configuration has an [acme] table whenever a certificate is ordered.
        let acme = new.acme.clone().filter(|_| new.has_acme_certificates());
        let http01_wanted = acme.is_some()
            && (new.on_demand.is_some() || new.uses_challenge(crate::values::Challenge::Http01));
        let alpn_wanted = acme.is_some() && new.uses_challenge(crate::values::Challenge::TlsAlpn01);
        let store = match acme {
            Some(_) => Some(self.open_store(new).await?),
            None => None,
        };
        let http01 = plan_responder(
            "http01.listen",
            self.http01.as_ref(),
            http01_wanted.then_some(new.http01.listen),
            http01::bind,
        )
        .await
        .map_err(|(addr, source)| DaemonError::Http01 { addr, source })?;
        let tls_alpn01 = plan_responder(
            "tls_alpn01.listen",
            self.tls_alpn01.as_ref(),
            alpn_wanted.then_some(new.tls_alpn01.listen),
            |a| async move { tokio::net::TcpListener::bind(a).await },
        )
        .await
        .map_err(|(addr, source)| DaemonError::TlsAlpn01 { addr, source })?;
        let (Some(acme_config), Some(store)) = (acme, store) else {
            return Ok(AcmePlan {
                http01,
                tls_alpn01,
                run: None,
            });
        };
        // A key that cannot be used stops the start (or the reload) here, not at the first order.
        let dns01 = new
            .dns01
            .clone()
            .map(|d| Dns01::new(d, self.metrics.clone()));
        if let Some(d) = &dns01 {
            d.check_key().map_err(DaemonError::Dns01)?;
        }
        let keep_manager =
            self.acme.is_some() && old.is_some_and(|o| o.acme == new.acme && o.dns01 == new.dns01);
        let running_on_demand = self.acme.as_ref().and_then(|a| a.on_demand.as_ref());
        let on_demand = match &new.on_demand {
            None => OnDemandPlan::Stop,
            Some(od)
                if keep_manager
                    && running_on_demand.is_some()
                    && old.is_some_and(|o| o.on_demand.as_ref() == Some(od)) =>
            {
                OnDemandPlan::Keep
            }
            Some(od) => OnDemandPlan::Start(Box::new(
                OnDemand::prepare(od.clone()).map_err(DaemonError::OnDemand)?,
            )),
        };
        Ok(AcmePlan {
            http01,
            tls_alpn01,
            run: Some(AcmeRun {
                config: acme_config,
                store,
                dns01,
                lock_ttl: new
                    .storage
                    .etcd
                    .as_ref()
                    .map_or(crate::config::DEFAULT_LOCK_TTL, |e| e.lock_ttl),
                certs: ManagedCert::from_config(new),
                keep_manager,
                on_demand,
            }),
        })
    }

    /// Puts `plan` in force (nothing here fails): responders started or stopped, the ACME manager's
    /// certificates reconciled (or a new manager started in place of the old one), the on-demand issuer
    /// kept, replaced or stopped.
    async fn commit_acme(&mut self, plan: AcmePlan) {
        if let Some(store) = self.store.clone() {
            let metrics = self.metrics.clone();
            let current = self.http01.take();
            let (s, m) = (store.clone(), metrics.clone());
            self.http01 = self
                .apply_responder(current, plan.http01, "HTTP-01", |l, token| {
                    http01::serve(l, s, m, token)
                })
                .await;
            let current = self.tls_alpn01.take();
            self.tls_alpn01 = self
                .apply_responder(current, plan.tls_alpn01, "TLS-ALPN-01", |l, token| {
                    crate::sources::acme::tls_alpn01::serve(l, store, metrics, token)
                })
                .await;
        }
        let Some(run) = plan.run else {
            self.stop_acme().await;
            return;
        };
        if run.keep_manager
            && let Some(acme) = self.acme.as_mut()
        {
            for handle in acme.manager.reconcile(run.certs).await {
                self.tasks.spawn(async move {
                    handle
                        .await
                        .map_err(|e| DaemonError::Panicked("an ACME certificate task", e))
                });
            }
            let Some(acme) = self.acme.as_mut() else {
                return;
            };
            match run.on_demand {
                OnDemandPlan::Keep => {
                    if let Some(od) = &acme.on_demand {
                        od.release_claimed();
                    }
                }
                OnDemandPlan::Stop => {
                    self.policy.set_demand(None);
                    if let Some(od) = acme.on_demand.take() {
                        od.stop(true);
                    }
                }
                OnDemandPlan::Start(prepared) => {
                    let previous = acme.on_demand.take();
                    let started = OnDemand::start(
                        *prepared,
                        acme.manager.clone(),
                        self.registry.clone(),
                        self.policy.clone(),
                        self.metrics.clone(),
                        acme.token.child_token(),
                        previous,
                    )
                    .await;
                    self.policy.set_demand(Some(Arc::new(started.clone())));
                    acme.on_demand = Some(started);
                }
            }
            return;
        }
        // A new CA or DNS-01 settings: a new manager, once the old one's tasks have stopped (they
        // withdraw their challenges as they end, and the new manager may resume the same orders).
        self.stop_acme().await;
        let manager = AcmeManager::new(
            run.config,
            run.store,
            self.registry.clone(),
            self.metrics.clone(),
            run.lock_ttl,
            run.dns01,
        );
        let token = self.shutdown.child_token();
        for handle in manager.start(run.certs, token.clone()).await {
            self.tasks.spawn(async move {
                handle
                    .await
                    .map_err(|e| DaemonError::Panicked("an ACME certificate task", e))
            });
        }
        let mut on_demand = None;
        if let OnDemandPlan::Start(prepared) = run.on_demand {
            let started = OnDemand::start(
                *prepared,
                manager.clone(),
                self.registry.clone(),
                self.policy.clone(),
                self.metrics.clone(),
                token.child_token(),
                None,
            )
            .await;
            self.policy.set_demand(Some(Arc::new(started.clone())));
            on_demand = Some(started);
        }
        self.acme = Some(AcmeRuntime {
            manager,
            token,
            on_demand,
        });
    }

    /// Stops the ACME side (on-demand issuer, then every certificate task), waiting (bounded) for its tasks.
    async fn stop_acme(&mut self) {
        self.policy.set_demand(None);
        let Some(old) = self.acme.take() else {
            return;
        };
        if let Some(od) = &old.on_demand {
            od.stop(true);
        }
        old.token.cancel();
        // Its tasks withdraw their challenges as they end: wait (bounded), so that they cannot withdraw one
        // that a new manager, resuming the same order, has just published again.
        if tokio::time::timeout(SHUTDOWN_GRACE, old.manager.stopped())
            .await
            .is_err()
        {
            tracing::warn!("the previous ACME tasks did not stop within {SHUTDOWN_GRACE:?}");
        }
    }

    /// Carries out a responder's plan: the responder that runs afterwards (one stopped has closed its
    /// listener when this returns).
    async fn apply_responder<F, Fut>(
        &mut self,
        current: Option<Responder>,
        plan: ResponderPlan,
        what: &'static str,
        serve: F,
    ) -> Option<Responder>
    where
        F: FnOnce(tokio::net::TcpListener, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        match plan {
            ResponderPlan::Keep => current,
            ResponderPlan::Stop => {
                if let Some(r) = current {
                    let bound = r.bound;
                    r.stop().await;
                    tracing::info!(listen = %bound, "{what} responder stopped: no certificate uses it");
                }
                None
            }
            ResponderPlan::Start(listener, configured, bound) => {
                let stop = self.shutdown.child_token();
                let ended = CancellationToken::new();
                let task = serve(listener, stop.clone());
                let done = ended.clone().drop_guard();
                self.tasks.spawn(async move {
                    task.await;
                    drop(done);
                    Ok(())
                });
                if let Some(old) = current {
                    old.stop().await;
                }
                tracing::info!(listen = %bound, "{what} responder listening");
                Some(Responder {
                    configured,
                    bound,
                    stop,
                    ended,
                })
            }
        }
    }

    /// Applies a new configuration without dropping SDS streams: added secrets are loaded (or ordered) and
    /// pushed, removed ones stop being offered (streams that hold them keep them), changed ones are
    /// reloaded or re-ordered, unchanged ACME certificates keep their tasks (schedules, backoff), access
    /// rules change at once, and the challenge responders follow the configuration. Everything that can
    /// fail (files, the internal CA, listeners, keys) is done before anything changes: an invalid
    /// configuration is rejected as a whole and the running one stays in force. SDS, admin and storage
    /// settings need a restart.
    pub async fn reload(&mut self, path: &std::path::Path) -> Result<(), DaemonError> {
        let new = crate::config::load(path)?;
        let (files, loaded) = load_files(&new)?;
        let old = self.config.clone();
        let internal = if InternalCert::from_config(&old) != InternalCert::from_config(&new) {
            Some(self.prepare_internal(&new).await?)
        } else {
            None
        };
        let acme = self.prepare_acme(Some(&old), &new).await?;

        // Nothing fails from here on.
        self.config = new.clone();
        let restart_only = [
            ("[sds]", old.sds != new.sds),
            ("[admin]", old.admin != new.admin),
            ("[storage]", old.storage != new.storage),
        ];
        for (what, _) in restart_only.iter().filter(|(_, changed)| *changed) {
            tracing::warn!(
                "{what} changed: listener and storage settings take effect at the next restart"
            );
        }
        log_warnings(&new);
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
        // Secrets no longer configured stop being offered before the rules that no longer name them are in
        // force (under those, such a name falls to the rule of unconfigured names); streams that hold one
        // keep it. Then the new rules, all at once, before anything new is published: every open stream
        // checks its subscription against them at once.
        for name in &removed {
            self.registry.withdraw(name);
        }
        self.policy
            .replace_all(access_rules(&new), unconfigured_rule(&new));
        for name in &added {
            self.registry.offer(name);
        }

        // Files: publish what is new or changed, then watch the new set.
        self.files_token.cancel();
        for (name, content) in &loaded {
            if let Published::New(v) = self.registry.publish(name, content) {
                crate::sources::log_loaded(name, content, v.version(), "loaded");
            }
        }
        self.spawn_files(files);
        self.commit_acme(acme).await;
        if let Some(internal) = internal {
            self.commit_internal(internal).await;
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

    /// The HTTP-01 responder's bound address, while a certificate uses it.
    pub fn http01_addr(&self) -> Option<SocketAddr> {
        self.http01.as_ref().map(|r| r.bound)
    }

    /// The TLS-ALPN-01 responder's bound address, while a certificate uses it.
    pub fn tls_alpn01_addr(&self) -> Option<SocketAddr> {
        self.tls_alpn01.as_ref().map(|r| r.bound)
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

/// Decides a responder's plan: `wanted` is where the configuration wants it (`None`: nothing uses it). A
/// new address is bound now (`bind`), so that a failure stops the reload before anything changes; when
/// the responder runs already and the new address cannot be bound (its port is the running one's), the
/// running responder stays, with a warning that the change needs a restart.
async fn plan_responder<F, Fut>(
    key: &'static str,
    current: Option<&Responder>,
    wanted: Option<SocketAddr>,
    bind: F,
) -> Result<ResponderPlan, (SocketAddr, std::io::Error)>
where
    F: FnOnce(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = std::io::Result<tokio::net::TcpListener>>,
{
    match (current, wanted) {
        (None, None) => Ok(ResponderPlan::Keep),
        (Some(_), None) => Ok(ResponderPlan::Stop),
        (Some(r), Some(addr)) if r.configured == addr => Ok(ResponderPlan::Keep),
        (current, Some(addr)) => match with_local_addr(bind(addr).await) {
            Ok((listener, bound)) => Ok(ResponderPlan::Start(listener, addr, bound)),
            Err(e) if current.is_some() => {
                tracing::warn!(error = %e, "{key} changed to {addr}, which cannot be bound while the responder runs on {}: the change takes effect at the next restart", current.map(|r| r.bound.to_string()).unwrap_or_default());
                Ok(ResponderPlan::Keep)
            }
            Err(e) => Err((addr, e)),
        },
    }
}
