//! The ACME manager: obtains and renews certificates (validated over HTTP-01, TLS-ALPN-01 or DNS-01) and
//! publishes them to the registry.
//!
//! Each ACME certificate is one task driven by its schedule ([`schedule`]): at start the stored certificate
//! is served at once if it still matches its configuration, and nothing is ordered until it is due; a
//! certificate never issued gets a temporary self-signed stand-in ([`temporary`]) so that Envoy starts. An
//! order ([`order`]) publishes each challenge's key authorization to the store (where the HTTP-01 and
//! TLS-ALPN-01 responders read it), or its DNS-01 record to the zone ([`dns01`]), before telling the CA to
//! validate, and withdraws it when the order ends; it is resumed, not
//! placed again, after a crash or a failure. Every request to the CA has a deadline, and transient failures
//! are retried in seconds ([`http`], [`order`]). The issued chain and its key are checked, published, and
//! stored atomically as one value; if storing fails, the certificate is served from memory and the write
//! retried, so an issued certificate is never lost. Failed orders are retried with growing, jittered,
//! capped delays, and the time of the next attempt is stored before each order starts, so that no crash
//! loop can place orders faster than that. A semaphore bounds concurrent orders, and one certificate's
//! failure never delays another's.
//!
//! Several replicas may share one store (etcd). Exactly one of them orders a certificate at a time: a task
//! whose certificate is due takes the certificate's lock ([`Store::lock`]), then reads the store again
//! (another replica may just have stored a fresh certificate, failed and set a backoff, or left an order
//! to resume), and makes every write of the order under that lock, so a replica paused past its lease
//! cannot overwrite what the next holder stored. Every replica follows the stored certificates
//! ([`Store::watch`]) and pushes one another replica stored to its own Envoys at once. Pending challenges
//! live in the store on short leases, so any replica's HTTP-01 responder answers them.
//!
//! Store layout, per CA (so that state never mixes CAs): `acme/<ca>/account` (credentials),
//! `acme/<ca>/certs/<name>` (chain, key, domains, key type), `acme/<ca>/state/<name>` (failures, next
//! attempt), `acme/<ca>/orders/<name>` (the order in progress: URL, and key once made), `acme/<ca>/dns-01/<name>`
//! (DNS-01 records to delete). Pending challenges live under `challenges/` for every CA.

/// Runs one request to the CA (an expression, evaluated again for every attempt), retrying transient
/// failures as the module docs say; records every attempt's duration and outcome in `$metrics`.
macro_rules! retrying {
    ($metrics:expr, $action:literal, $call:expr) => {{
        let mut attempt = 1u32;
        loop {
            // A stale short wait is forgotten; a long one an earlier request ended with is the caller's
            // to honour, and stays.
            if $crate::sources::acme::http::peek_retry_after()
                .is_some_and(|w| w <= $crate::sources::acme::order::MAX_RETRY_AFTER)
            {
                let _ = $crate::sources::acme::http::take_retry_after();
            }
            match $crate::sources::acme::order::timed($metrics, $action, $call).await {
                Err(e) if $crate::sources::acme::order::again(&e, attempt) => {
                    let wait = match $crate::sources::acme::http::peek_retry_after() {
                        // Longer than a request is retried here: the failure goes to the caller, whose
                        // backoff honours the CA's word (it is left for it to take).
                        Some(w) if w > $crate::sources::acme::order::MAX_RETRY_AFTER => break Err(e),
                        Some(w) => {
                            let _ = $crate::sources::acme::http::take_retry_after();
                            w
                        }
                        None => $crate::sources::acme::order::backoff(attempt),
                    };
                    tracing::info!(
                        action = $action,
                        attempt,
                        error = %e,
                        "a request to the CA failed; retrying in {:.2} s",
                        wait.as_secs_f32()
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
                other => break other,
            }
        }
    }};
}

mod account;
pub mod dns01;
mod http;
pub mod http01;
pub mod on_demand;
mod order;
mod schedule;
pub mod temporary;
pub mod tls_alpn01;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, CertifiedPem, MaterialError};
use crate::config::{AcmeConfig, CertificateSource, Config};
use crate::metrics::Metrics;
use crate::registry::Published;
use crate::registry::{Registry, SecretContent};
use crate::sources::IssuerStatus;
use crate::sources::keys::AcmeKeys;
use crate::store::{Change, Lock, SharedStore, StoreError};
use crate::values::{Challenge, DnsName, KeyType, SecretId, same_names, to_strings};

pub use order::OrderError;

/// How many `request_timeout`s one order may take, end to end, before it counts as failed.
const ORDER_TIMEOUTS: u32 = 20;

/// How long a task waits before trying the store again when it cannot take a lock (etcd unavailable).
const STORE_RETRY: Duration = Duration::from_secs(5);

/// The retry after a first order that could not reach the name (see `run_cert`).
const FIRST_RETRY_UNREACHABLE: Duration = Duration::from_secs(2);

/// One ACME-managed certificate, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedCert {
    /// What it is published and stored as: a configured secret's name, or a name obtained on demand.
    pub id: SecretId,
    /// The names to validate and put on the certificate.
    pub domains: Vec<DnsName>,
    /// The key type.
    pub key_type: KeyType,
    /// Serve a temporary self-signed certificate until the first issuance.
    pub temporary: bool,
    /// How the CA validates the names.
    pub challenge: Challenge,
}

impl ManagedCert {
    /// The ACME certificates of `config`.
    pub fn from_config(config: &Config) -> Vec<ManagedCert> {
        let default_temporary = config
            .acme
            .as_ref()
            .is_none_or(|a| a.temporary_certificates);
        config
            .certificates
            .iter()
            .filter_map(|c| match &c.source {
                CertificateSource::Acme {
                    domains,
                    key_type,
                    temporary_certificate,
                    challenge,
                } => Some(ManagedCert {
                    id: SecretId::from(&c.name),
                    domains: domains.clone(),
                    key_type: *key_type,
                    temporary: temporary_certificate.unwrap_or(default_temporary),
                    challenge: *challenge,
                }),
                CertificateSource::Files { .. } | CertificateSource::Internal { .. } => None,
            })
            .collect()
    }
}

/// An issued certificate as stored: chain and key in one value, so they can never be half-replaced.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredCert {
    /// The names it was issued for.
    pub domains: Vec<String>,
    /// The key type it was issued with.
    pub key_type: KeyType,
    /// The chain, leaf first (PEM).
    pub chain_pem: String,
    /// The private key (PEM), zeroed when dropped.
    pub key_pem: zeroize::Zeroizing<String>,
    /// Unix time of issuance.
    pub issued_at: i64,
    /// The same in milliseconds (absent in certificates stored by earlier versions): how long another
    /// replica took to push it is measured from it.
    #[serde(default)]
    pub issued_at_ms: Option<i64>,
}

impl std::fmt::Debug for StoredCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredCert")
            .field("domains", &self.domains)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl StoredCert {
    /// Whether this certificate was issued for `cert`'s current domains and key type.
    pub fn matches(&self, cert: &ManagedCert) -> bool {
        same_names(&self.domains, &cert.domains) && self.key_type == cert.key_type
    }

    /// The stored chain and key, checked as a file pair would be.
    pub fn checked(&self) -> Result<CertifiedPem, MaterialError> {
        certs::certified_pem(self.chain_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

/// What a certificate's task remembers between attempts; stored so that a restart keeps backing off.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertState {
    /// Failed orders since the last issuance.
    pub failures: u32,
    /// The last failure, if the latest attempt failed.
    pub last_error: Option<String>,
    /// Unix time.
    pub last_error_at: Option<i64>,
    /// Unix time before which no new order is placed: written *before* each order (the delay it would get
    /// if it failed), after a failure (its backoff) and after an issuance (a minimum interval).
    pub next_attempt_at: Option<i64>,
    /// Issuances in a row whose certificate was due for renewal at once (a clock or CA dates gone wrong):
    /// each makes the interval before the next order grow, as failures do.
    #[serde(default)]
    pub premature: u32,
    /// Unix time of the planned renewal of the stored certificate (ARI's or the lifetime rule's), for
    /// `acme-sds status` read offline.
    #[serde(default)]
    pub next_renewal_at: Option<i64>,
    /// Unix time the latest attempt started: an order left behind by an attempt that failed after it
    /// (`last_error_at`) waits for its backoff; one left by a crash is resumed at once.
    #[serde(default)]
    pub attempt_started_at: Option<i64>,
}

impl CertState {
    /// Whether the latest attempt ended in a failure (rather than in a crash, or not at all).
    pub fn last_attempt_failed(&self) -> bool {
        self.failures > 0
            && match (self.last_error_at, self.attempt_started_at) {
                (Some(failed), Some(started)) => failed >= started,
                (Some(_), None) => true,
                (None, _) => false,
            }
    }
}

/// What storage holds for a certificate, read without changing anything (for `acme-sds status` when no
/// daemon runs): the stored certificate, if usable, and the retry state.
pub async fn stored_status(
    store: &dyn crate::store::Store,
    keys: &AcmeKeys,
    id: &SecretId,
) -> (Option<CertifiedPem>, IssuerStatus) {
    let cert = match store.get(&keys.cert(id)).await {
        Ok(Some(e)) => serde_json::from_slice::<StoredCert>(&e.value)
            .ok()
            .and_then(|s| s.checked().ok()),
        _ => None,
    };
    let state: CertState = match store.get(&keys.state(id)).await {
        Ok(Some(e)) => serde_json::from_slice(&e.value).unwrap_or_default(),
        _ => CertState::default(),
    };
    let at = |t: Option<i64>| t.and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
    let retrying = state.failures > 0;
    let plan = IssuerStatus {
        // As the daemon planned it; else the lifetime rule, which it follows without ARI.
        next_renewal: cert.as_ref().map(|p| {
            at(state.next_renewal_at).unwrap_or_else(|| {
                schedule::lifetime_renewal(
                    p.leaf.not_before,
                    p.leaf.not_after,
                    p.leaf.serial.as_bytes(),
                )
            })
        }),
        last_error: state.last_error.clone().filter(|_| retrying),
        next_retry: at(state.next_attempt_at).filter(|_| retrying),
    };
    (cert, plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_has_its_own_namespace() {
        let le = AcmeKeys::for_directory(crate::config::LETSENCRYPT);
        let staging = AcmeKeys::for_directory(crate::config::LETSENCRYPT_STAGING);
        assert_ne!(le.account(), staging.account());
        assert!(
            le.account()
                .starts_with("acme/acme-v02.api.letsencrypt.org-")
        );
        let pebble = AcmeKeys::for_directory("https://127.0.0.1:14000/dir");
        let web = SecretId::named("web");
        assert!(pebble.cert(&web).starts_with("acme/127.0.0.1-"));
        assert!(pebble.cert(&web).ends_with("/certs/web"));
        assert!(
            pebble
                .cert(&SecretId::named("a/b c"))
                .ends_with("/certs/x-612f622063")
        );
        // Certificates obtained on demand live apart, and their keys are sealed like the others'.
        let od = SecretId::OnDemand(DnsName::new("web.example.com").unwrap());
        assert!(
            pebble
                .cert(&od)
                .ends_with("/on-demand-certs/web.example.com")
        );
        assert_ne!(
            pebble.cert(&od),
            pebble.cert(&SecretId::named("web.example.com"))
        );
        for key in [pebble.cert(&od), pebble.order(&od), pebble.account()] {
            assert!(crate::sources::keys::holds_private_key(&key), "{key}");
        }
        assert!(!crate::sources::keys::holds_private_key(&pebble.state(&od)));
        assert!(!crate::sources::keys::holds_private_key(
            &pebble.on_demand(&DnsName::new("web.example.com").unwrap())
        ));
    }
}

/// Why [`AcmeManager::add`] refused a certificate.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    /// The manager has not started, or has stopped.
    #[error("the ACME manager is not running")]
    NotStarted,
    /// It runs this certificate already.
    #[error("{0} is managed already")]
    AlreadyManaged(String),
    /// A configured certificate has this name.
    #[error("{0} is a configured certificate's name or domain: it is never obtained on demand")]
    Configured(String),
}

/// Why a stored value could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    /// The store failed.
    Store(#[from] StoreError),
    #[error("stored value is not valid: {0}")]
    /// The stored value cannot be read.
    Corrupt(String),
}

/// Runs every ACME certificate of a configuration.
pub struct AcmeManager {
    status: std::sync::Mutex<std::collections::HashMap<SecretId, IssuerStatus>>,
    config: AcmeConfig,
    keys: AcmeKeys,
    store: SharedStore,
    registry: Arc<Registry>,
    metrics: Metrics,
    orders: Arc<Semaphore>,
    account: account::AccountSlot,
    tasks: tokio_util::task::TaskTracker,
    /// How long a certificate's lock outlives a replica that stopped renewing it.
    lock_ttl: Duration,
    /// Where DNS-01 records go (`[dns01]`), when configured.
    dns01: Option<dns01::Dns01>,
    /// TLS-ALPN-01 orders for one domain take turns.
    alpn_turns: order::AlpnTurns,
    /// Every certificate task's certificate and wake-up, by store key: what the watch follows.
    followed: std::sync::Mutex<std::collections::HashMap<String, Task>>,
    /// The token `start` was given: certificates added later stop with it.
    shutdown: std::sync::OnceLock<CancellationToken>,
    outcomes: tokio::sync::broadcast::Sender<(SecretId, Result<(), String>)>,
}

/// A certificate's running task, as the manager keeps it: what it runs, how to wake it (another replica
/// stored its certificate), how to stop it, and whether it has ended.
#[derive(Clone)]
struct Task {
    cert: ManagedCert,
    changed: Changed,
    stop: CancellationToken,
    ended: CancellationToken,
}

impl Task {
    fn new(cert: ManagedCert, stop: CancellationToken) -> Task {
        Task {
            cert,
            changed: Changed::default(),
            stop,
            ended: CancellationToken::new(),
        }
    }
}

/// How long [`AcmeManager::reconcile`] waits for a stopped task to end (withdrawing its challenges).
const TASK_END_GRACE: Duration = Duration::from_secs(10);

/// Everything under the CA's prefix, read at once at start.
type Prefetched = std::collections::HashMap<String, crate::store::Entry>;

/// Where a certificate's task hears that another replica stored it.
type Changed = Arc<tokio::sync::Notify>;

/// An issued certificate, and whether the store has it yet.
struct Current {
    stored: StoredCert,
    saved: bool,
}

impl AcmeManager {
    /// A manager for the `[acme]` CA, storing in `store` and publishing to `registry`; certificate locks
    /// in a shared store live `lock_ttl` past a replica that stopped; DNS-01 records go where `dns01` says.
    pub fn new(
        config: AcmeConfig,
        store: SharedStore,
        registry: Arc<Registry>,
        metrics: Metrics,
        lock_ttl: Duration,
        dns01: Option<dns01::Dns01>,
    ) -> Arc<Self> {
        Arc::new(AcmeManager {
            status: Default::default(),
            keys: AcmeKeys::for_directory(&config.directory),
            orders: Arc::new(Semaphore::new(config.max_concurrent_orders)),
            account: account::AccountSlot::default(),
            config,
            store,
            registry,
            metrics,
            tasks: tokio_util::task::TaskTracker::new(),
            lock_ttl,
            dns01,
            alpn_turns: Default::default(),
            followed: Default::default(),
            shutdown: Default::default(),
            outcomes: tokio::sync::broadcast::Sender::new(256),
        })
    }

    /// Where this CA's records are kept.
    pub fn keys(&self) -> &AcmeKeys {
        &self.keys
    }

    /// Each certificate's next renewal, last error and next retry.
    pub fn status(&self) -> std::collections::HashMap<SecretId, IssuerStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set_status(&self, id: &SecretId, f: impl FnOnce(&mut IssuerStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(s.entry(id.clone()).or_default());
        }
    }

    async fn load_json<T: for<'de> Deserialize<'de>>(
        &self,
        key: &str,
    ) -> Result<Option<T>, LoadError> {
        match self.store.get(key).await? {
            None => Ok(None),
            Some(e) => serde_json::from_slice(&e.value)
                .map(Some)
                .map_err(|e| LoadError::Corrupt(e.to_string())),
        }
    }

    /// Moves an unusable stored value aside, with one error log; it will be re-created.
    async fn set_aside(&self, key: &str, secret: &SecretId, why: &(dyn std::fmt::Display + Sync)) {
        match self.store.quarantine(key).await {
            Ok(aside) => {
                tracing::error!(%secret, key, moved_to = aside, error = %why, "stored value is unusable: moved aside; it will be obtained again")
            }
            Err(e) => {
                tracing::error!(%secret, key, error = %why, quarantine_error = %e, "stored value is unusable and could not be moved aside; it will be obtained again")
            }
        }
    }

    /// Loads a certificate's stored copy; a corrupt one is moved aside (it will be re-obtained).
    pub async fn load_stored(&self, cert: &ManagedCert) -> Option<(StoredCert, CertifiedPem)> {
        // (`start` reads every certificate at once with `parse_stored`, and comes here for those that
        // do not parse.)
        let key = self.keys.cert(&cert.id);
        let stored: StoredCert = match self.load_json(&key).await {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(LoadError::Corrupt(e)) => {
                self.set_aside(&key, &cert.id, &e).await;
                return None;
            }
            Err(e) => {
                tracing::error!(secret = %cert.id, key, error = %e, "cannot read the stored certificate; it will be obtained again");
                return None;
            }
        };
        match stored.checked() {
            Ok(pem) => Some((stored, pem)),
            Err(e) => {
                self.set_aside(&key, &cert.id, &e).await;
                None
            }
        }
    }

    /// Removes challenges a previous process left in a directory: one daemon per directory, so none of
    /// them is being validated now (an order that is resumed publishes its own again). In a shared store
    /// they may be another replica's, and expire by themselves.
    async fn clear_stale_challenges(&self) {
        if self.store.shared() {
            return;
        }
        let Ok(keys) = self.store.list("challenges").await else {
            return;
        };
        for key in keys {
            let _ = self.store.delete(&key).await;
        }
    }

    /// Publishes every stored certificate at once (before the SDS listeners open), and a temporary one for
    /// each certificate never issued (unless turned off), then starts one task per certificate.
    pub async fn start(
        self: &Arc<Self>,
        certs: Vec<ManagedCert>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let _ = self.shutdown.set(shutdown.clone());
        self.clear_stale_challenges().await;
        // Followed from before the stored certificates are read, so that none stored meanwhile is missed.
        let changes = self.store.watch(&self.keys.dir(), shutdown.clone()).await;
        // Everything this CA's certificates keep, in one read (one request on etcd: a replica with a
        // thousand certificates serves them all within a second); what does not parse is read again, one
        // key at a time, by the code that sets unusable values aside.
        let prefetched: Option<Prefetched> = self
            .store
            .scan(&self.keys.dir())
            .await
            .ok()
            .map(|all| all.into_iter().collect());
        let mut tasks = Vec::new();
        for cert in certs {
            tasks.push(
                self.launch(
                    self.register(cert, shutdown.child_token()),
                    prefetched.as_ref(),
                )
                .await,
            );
        }
        if let Some(changes) = changes {
            let manager = self.clone();
            tasks.push(self.tasks.spawn(manager.follow(changes, shutdown.clone())));
        }
        tasks
    }

    /// Adds a certificate while running (one obtained on demand): served at once when stored, else
    /// ordered, then renewed like the configured ones. Returns the token that stops it (it also stops with
    /// the manager). Refused before [`AcmeManager::start`], for a certificate this manager runs already,
    /// and for a name obtained on demand that a configured certificate here has (as name or domain). Its
    /// orders' outcomes are announced on [`AcmeManager::outcomes`].
    pub async fn add(self: &Arc<Self>, cert: ManagedCert) -> Result<CancellationToken, AddError> {
        let token = self
            .shutdown
            .get()
            .ok_or(AddError::NotStarted)?
            .child_token();
        // Checked and registered in one step: two adds of one certificate cannot both pass.
        let task = {
            let mut followed = self.followed.lock().map_err(|_| AddError::NotStarted)?;
            let key = self.keys.cert(&cert.id);
            if followed.contains_key(&key) {
                return Err(AddError::AlreadyManaged(cert.id.to_string()));
            }
            if let SecretId::OnDemand(name) = &cert.id {
                let configured = followed.values().any(|t| {
                    !t.cert.id.is_on_demand()
                        && (t.cert.id.as_str() == name.as_str() || t.cert.domains.contains(name))
                });
                if configured {
                    return Err(AddError::Configured(name.to_string()));
                }
            }
            let task = Task::new(cert, token.clone());
            followed.insert(key, task.clone());
            task
        };
        self.launch(task, None).await;
        Ok(token)
    }

    /// Registers `cert`'s task (stopping with `token`), replacing any before it: what the watch follows.
    fn register(&self, cert: ManagedCert, token: CancellationToken) -> Task {
        let task = Task::new(cert, token);
        if let Ok(mut followed) = self.followed.lock() {
            followed.insert(self.keys.cert(&task.cert.id), task.clone());
        }
        task
    }

    /// Makes `certs` the configured certificates (after a reload), keeping every task whose certificate is
    /// unchanged as it is (its schedule, its backoff, an order it is waiting to retry): tasks of removed or
    /// changed certificates are stopped (and awaited, so that their challenges are withdrawn before a new
    /// task resumes the same order), new and changed ones started. Certificates obtained on demand are
    /// not touched. Returns the new tasks' handles.
    pub async fn reconcile(
        self: &Arc<Self>,
        certs: Vec<ManagedCert>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let Some(shutdown) = self.shutdown.get().cloned() else {
            return Vec::new();
        };
        let mut wanted: std::collections::HashMap<String, ManagedCert> = certs
            .into_iter()
            .map(|c| (self.keys.cert(&c.id), c))
            .collect();
        let mut stopping = Vec::new();
        if let Ok(followed) = self.followed.lock() {
            for (key, task) in followed.iter() {
                if task.cert.id.is_on_demand() {
                    continue;
                }
                // Kept only while it runs: one stopped by an earlier reload (and still ending) is replaced.
                if wanted.get(key) == Some(&task.cert) && !task.stop.is_cancelled() {
                    wanted.remove(key);
                } else {
                    task.stop.cancel();
                    stopping.push((task.cert.id.clone(), task.ended.clone()));
                }
            }
        }
        // One deadline for them all: however many stop, a reload waits at most this long.
        let deadline = tokio::time::Instant::now() + TASK_END_GRACE;
        for (id, ended) in stopping {
            if tokio::time::timeout_at(deadline, ended.cancelled())
                .await
                .is_err()
            {
                tracing::warn!(secret = %id, "the certificate's previous task did not stop within {TASK_END_GRACE:?}");
            }
            if let Ok(mut status) = self.status.lock() {
                status.remove(&id);
            }
        }
        let mut handles = Vec::new();
        for cert in wanted.into_values() {
            let task = self.register(cert, shutdown.child_token());
            handles.push(self.launch(task, None).await);
        }
        handles
    }

    /// The longest a certificate's lock is held by a working replica: an order's time limit (with DNS-01
    /// propagation, when configured) and a lock's lifetime after it. A wait past it is for a lock nobody
    /// will give up; an on-demand certificate's first order holds its `max_pending` turn at most this long.
    pub(super) fn lock_wait_limit(&self) -> Duration {
        let propagation = self
            .dns01
            .as_ref()
            .map_or(Duration::ZERO, |d| d.propagation_timeout());
        self.config.request_timeout * ORDER_TIMEOUTS + propagation + self.lock_ttl
    }

    /// Forgets certificate `id` (its task stopped): its certificate, plan and order are deleted under
    /// `lock`, and it is no longer followed or reported.
    pub(super) async fn forget(&self, id: &SecretId, lock: &Lock) {
        if let Ok(mut followed) = self.followed.lock() {
            followed.remove(&self.keys.cert(id));
        }
        if let Ok(mut status) = self.status.lock() {
            status.remove(id);
        }
        for key in [self.keys.cert(id), self.keys.state(id), self.keys.order(id)] {
            if let Err(e) = self.store.delete_locked(lock, &key).await {
                tracing::warn!(secret = %id, key, error = %e, "cannot delete a forgotten certificate's record");
            }
        }
    }

    /// The outcome of every order from now on: (certificate name, `Ok` when issued, else the error).
    pub fn outcomes(&self) -> tokio::sync::broadcast::Receiver<(SecretId, Result<(), String>)> {
        self.outcomes.subscribe()
    }

    /// Serves `cert`'s stored certificate (from `prefetched` when the store was read at once) or its
    /// temporary stand-in, and starts its task.
    async fn launch(
        self: &Arc<Self>,
        task: Task,
        prefetched: Option<&Prefetched>,
    ) -> tokio::task::JoinHandle<()> {
        let Task {
            cert,
            changed,
            stop: token,
            ended,
        } = task;
        let cert_key = self.keys.cert(&cert.id);
        let stored = match prefetched.map(|p| p.get(&cert_key)) {
            Some(None) => None,
            Some(Some(entry)) => match parse_stored(entry) {
                Some(parsed) => Some(parsed),
                None => self.load_stored(&cert).await,
            },
            None => self.load_stored(&cert).await,
        };
        if let Some((s, pem)) = &stored {
            let v = self
                .registry
                .publish(&cert.id, &SecretContent::TlsCertificate(pem.clone()));
            let state = if s.matches(&cert) {
                "stored"
            } else {
                "stored (configuration changed; ordering a new one)"
            };
            crate::sources::log_loaded(
                cert.id.as_str(),
                &SecretContent::TlsCertificate(pem.clone()),
                v.version().version(),
                state,
            );
        } else {
            self.serve_temporary(&cert);
        }
        let state_key = self.keys.state(&cert.id);
        let loaded = match prefetched.map(|p| p.get(&state_key)) {
            Some(None) => Ok(None),
            Some(Some(e)) => match serde_json::from_slice::<CertState>(&e.value) {
                Ok(state) => Ok(Some(state)),
                Err(_) => self.load_json(&state_key).await,
            },
            None => self.load_json(&state_key).await,
        };
        let state: CertState = match loaded {
            Ok(s) => s.unwrap_or_default(),
            Err(LoadError::Corrupt(e)) => {
                self.set_aside(&state_key, &cert.id, &e).await;
                CertState::default()
            }
            Err(_) => CertState::default(),
        };
        let current = stored.map(|(stored, _)| Current {
            stored,
            saved: true,
        });
        // An order left in progress by a crash (or by a certificate that could not be stored) is resumed at
        // once: resuming places no new order. One whose last attempt failed waits for its backoff like any.
        let in_progress = match prefetched {
            Some(p) => p
                .get(&self.keys.order(&cert.id))
                .is_some_and(|e| order::record_matches(&e.value, &cert)),
            None => order::load_record(&self.store, &self.keys, &cert)
                .await
                .is_some(),
        };
        let resume = in_progress && !state.last_attempt_failed();
        let manager = self.clone();
        self.tasks.spawn(http::with_retry_after(async move {
            manager
                .clone()
                .run_cert(cert, current, state, resume, changed.clone(), token)
                .await;
            // No longer followed once it stopped (unless a new task for it took its place already).
            if let Ok(mut followed) = manager.followed.lock()
                && followed
                    .get(&cert_key)
                    .is_some_and(|t| Arc::ptr_eq(&t.changed, &changed))
            {
                followed.remove(&cert_key);
            }
            ended.cancel();
        }))
    }

    /// Pushes what other replicas store: a certificate written to the store (by any replica) is published
    /// if it is not what this replica serves already, and its task plans from it.
    async fn follow(
        self: Arc<Self>,
        mut changes: tokio::sync::mpsc::Receiver<Change>,
        shutdown: CancellationToken,
    ) {
        loop {
            let change = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = changes.recv() => match c {
                    Some(c) => c,
                    None => return,
                },
            };
            let which: Vec<Task> = {
                let Ok(followed) = self.followed.lock() else {
                    return;
                };
                match &change {
                    Change::Put(key) => followed.get(key).cloned().into_iter().collect(),
                    Change::Resync => followed.values().cloned().collect(),
                    Change::Deleted(_) => continue,
                }
            };
            for task in &which {
                self.adopt(&task.cert).await;
                task.changed.notify_one();
            }
        }
    }

    /// Publishes `cert`'s stored certificate when it is for its current configuration and is not what
    /// this replica serves (another replica stored it).
    async fn adopt(&self, cert: &ManagedCert) {
        let Some((stored, pem)) = self.load_stored(cert).await else {
            return;
        };
        if !stored.matches(cert) {
            return;
        }
        let content = SecretContent::TlsCertificate(pem.clone());
        if let Published::New(v) = self.registry.publish(&cert.id, &content) {
            if let Some(at) = stored.issued_at_ms {
                let now = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
                let lag = i64::try_from(now).unwrap_or(i64::MAX).saturating_sub(at);
                self.metrics.watch_lag(lag.max(0) as f64 / 1000.0);
            }
            tracing::info!(
                secret = %cert.id,
                version = v.version(),
                serial = %pem.leaf.serial,
                not_after = %certs::format_time(pem.leaf.not_after),
                "certificate stored by another replica: pushed to subscribers"
            );
        }
    }

    /// Takes `cert`'s lock, waiting while another replica orders it. `None` at shutdown, or when the
    /// store cannot be reached (logged, after a pause: the caller plans again, and nothing is ordered
    /// while etcd is unavailable).
    pub(super) async fn acquire(
        &self,
        id: &SecretId,
        shutdown: &CancellationToken,
    ) -> Option<Lock> {
        let started = std::time::Instant::now();
        let key = self.keys.cert(id);
        // Bounded: no order holds a lock longer than this, so a wait past it is a lock nobody will give
        // up (a lease kept alive by mistake); giving up lets the attempt's own lease lapse.
        let limit = self.lock_wait_limit();
        let taken = tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = tokio::time::timeout(limit, self.store.lock(&key, self.lock_ttl)) => r,
        };
        let Ok(taken) = taken else {
            tracing::warn!(secret = %id, "the certificate's lock is still held after {} s (longer than an order takes): planning again", limit.as_secs());
            return None;
        };
        match taken {
            Ok(lock) => {
                self.metrics.lock_taken(started);
                Some(lock)
            }
            Err(e) => {
                tracing::warn!(secret = %id, error = %e, "cannot take the certificate's lock in the store: ordering nothing until the store is back (the current certificate keeps being served)");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(STORE_RETRY) => {}
                }
                None
            }
        }
    }

    /// Gives a certificate's lock up.
    pub(super) async fn release(&self, lock: Lock) {
        self.metrics.lock_released();
        let name = lock.name().to_owned();
        if let Err(e) = self.store.unlock(lock).await {
            tracing::debug!(lock = name, error = %e, "cannot release a lock; it lapses with its lease");
        }
    }

    /// Reads `cert`'s certificate, plan and order again (after taking its lock, in a shared store): another
    /// replica may have stored a certificate, failed and set a backoff, or left an order to resume. True
    /// when anything changed, and the task must plan again.
    async fn refresh(
        &self,
        cert: &ManagedCert,
        current: &mut Option<Current>,
        state: &mut CertState,
        resume: &mut bool,
    ) -> bool {
        let mut changed = false;
        // Taken unless this replica holds a newer one the store refused so far (it is stored next).
        if let Some((stored, pem)) = self.load_stored(cert).await
            && stored.matches(cert)
            && current.as_ref().is_none_or(|c| {
                c.stored.chain_pem != stored.chain_pem
                    && (c.saved || stored.issued_at >= c.stored.issued_at)
            })
        {
            let content = SecretContent::TlsCertificate(pem);
            self.registry.publish(&cert.id, &content);
            *current = Some(Current {
                stored,
                saved: true,
            });
            changed = true;
        }
        if let Ok(Some(stored)) = self
            .load_json::<CertState>(&self.keys.state(&cert.id))
            .await
            && (stored.failures, stored.next_attempt_at) != (state.failures, state.next_attempt_at)
        {
            *state = stored;
            changed = true;
        }
        if !*resume
            && !state.last_attempt_failed()
            && order::load_record(&self.store, &self.keys, cert)
                .await
                .is_some()
        {
            *resume = true;
            changed = true;
        }
        changed
    }

    /// Waits until every certificate task has ended (after `shutdown` was cancelled): a new manager on the
    /// same store must not start while an old task still withdraws its challenges.
    pub async fn stopped(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Serves (or renews) the temporary stand-in for a certificate never issued, if it has one.
    fn serve_temporary(&self, cert: &ManagedCert) {
        if !cert.temporary {
            return;
        }
        let served = self.registry.get(&cert.id);
        // An issued certificate is served already (another replica's, adopted while this task could not
        // read the store): never replaced by a stand-in.
        if served.as_ref().is_some_and(|v| !v.summary().temporary) {
            return;
        }
        let fresh = served
            .and_then(|v| v.summary().not_after)
            .is_some_and(|t| t - OffsetDateTime::now_utc() > temporary::LIFETIME / 3);
        if fresh {
            return;
        }
        match temporary::make(cert.id.as_str(), &to_strings(&cert.domains)) {
            Ok(pem) => {
                self.registry
                    .publish_temporary(&cert.id, &SecretContent::TlsCertificate(pem.clone()));
                tracing::info!(
                    secret = %cert.id,
                    domains = ?cert.domains,
                    not_after = %certs::format_time(pem.leaf.not_after),
                    "serving a TEMPORARY self-signed certificate until the CA issues one (so that Envoy's listeners, port 80 included, start now); turn off with temporary_certificate = false"
                );
            }
            Err(e) => {
                tracing::error!(secret = %cert.id, error = %e, "cannot make a temporary certificate");
            }
        }
    }

    /// Stores a certificate's plan (under its lock when one is held).
    async fn save_state(&self, name: &SecretId, state: &CertState, lock: Option<&Lock>) {
        let key = self.keys.state(name);
        match serde_json::to_vec(state) {
            Ok(v) => {
                let written = match lock {
                    Some(lock) => self.store.put_locked(lock, &key, &v).await,
                    None => self.store.put(&key, &v).await,
                };
                if let Err(e) = written {
                    tracing::error!(secret = %name, error = %e, "cannot store certificate state");
                }
            }
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "cannot encode certificate state")
            }
        }
    }

    /// Stores an issued certificate (chain and key as one value) under its lock and forgets its order;
    /// `false` when the store refused (the certificate is then served from memory and the write retried).
    /// A write refused because the lock lapsed counts as done: another replica holds the certificate now,
    /// and what it stores is pushed here through the watch.
    async fn save_cert(&self, name: &SecretId, stored: &StoredCert, lock: &Lock) -> bool {
        let value = match serde_json::to_vec(stored) {
            Ok(v) => zeroize::Zeroizing::new(v),
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "cannot encode the certificate");
                return false;
            }
        };
        match self
            .store
            .put_locked(lock, &self.keys.cert(name), &value)
            .await
        {
            Ok(_) => {
                order::drop_record(&self.store, &self.keys, lock, name).await;
                true
            }
            Err(e @ StoreError::Fenced { .. }) => {
                tracing::warn!(secret = %name, error = %e, "the certificate's lock lapsed while it was ordered (this replica was paused or cut off): it is served here until the certificate another replica stores arrives");
                true
            }
            Err(e) => {
                tracing::error!(secret = %name, error = %e, "cannot store the issued certificate: it is served from memory, and storing it is retried (its order is kept, so a restart downloads it again rather than ordering)");
                false
            }
        }
    }

    /// One certificate's life: wait until due, order, publish, store; retry failures with backoff.
    async fn run_cert(
        self: Arc<Self>,
        cert: ManagedCert,
        mut current: Option<Current>,
        mut state: CertState,
        mut resume: bool,
        changed: Changed,
        shutdown: CancellationToken,
    ) {
        let shared = self.store.shared();
        let mut save_retry = self.config.retry_initial;
        loop {
            let now = OffsetDateTime::now_utc();
            let issued = current.as_ref().filter(|c| c.stored.matches(&cert));
            let due = match issued {
                Some(c) => self.renewal_time(&cert, &c.stored).await,
                None => now,
            };
            let not_before = state
                .next_attempt_at
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
            let at = match not_before {
                Some(r) if r > due && !resume => r,
                _ => due,
            };
            let retrying = state.failures > 0;
            let error = state.last_error.clone();
            self.set_status(&cert.id, |s| {
                s.next_renewal = current.as_ref().map(|_| due);
                s.last_error = error.filter(|_| retrying);
                s.next_retry = not_before.filter(|_| retrying);
            });
            let planned = current.as_ref().map(|_| due.unix_timestamp());
            // In a shared store the plan is written only under the lock (below), with the rest of it.
            if state.next_renewal_at != planned && !shared {
                state.next_renewal_at = planned;
                self.save_state(&cert.id, &state, None).await;
            }
            if current.is_none() {
                self.serve_temporary(&cert);
            }
            if at > now {
                if current.is_some() && state.failures == 0 {
                    tracing::info!(secret = %cert.id, "next renewal at {} ({})", certs::format_time(at), schedule::describe_in(at - now));
                }
                let mut wait: Duration = (at - now).try_into().unwrap_or(Duration::ZERO);
                // Re-evaluate at least every 12 hours (ARI windows move; clocks jump; a temporary
                // certificate needs renewing), and retry a store write that failed.
                wait = wait.min(Duration::from_secs(12 * 3600));
                if current.as_ref().is_some_and(|c| !c.saved) {
                    wait = wait.min(save_retry);
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                    _ = changed.notified() => {
                        // A certificate was stored (by another replica, or this one): plan from the
                        // store. Reading needs no lock; anything written is written under one, below.
                        self.refresh(&cert, &mut current, &mut state, &mut resume).await;
                        continue;
                    }
                }
                if current.as_ref().is_some_and(|c| !c.saved)
                    && let Some(lock) = self.acquire(&cert.id, &shutdown).await
                {
                    if shared {
                        self.refresh(&cert, &mut current, &mut state, &mut resume)
                            .await;
                    }
                    if let Some(c) = current.as_mut().filter(|c| !c.saved) {
                        c.saved = self.save_cert(&cert.id, &c.stored, &lock).await;
                        if c.saved {
                            tracing::info!(secret = %cert.id, "the issued certificate is stored now");
                        } else {
                            save_retry = (save_retry * 2).min(self.config.retry_max);
                        }
                    }
                    self.release(lock).await;
                }
                if OffsetDateTime::now_utc() < at {
                    continue;
                }
            }
            // One replica orders a certificate at a time; the one that waited reads what the other did.
            let Some(lock) = self.acquire(&cert.id, &shutdown).await else {
                if shutdown.is_cancelled() {
                    return;
                }
                continue;
            };
            if shared
                && self
                    .refresh(&cert, &mut current, &mut state, &mut resume)
                    .await
            {
                self.release(lock).await;
                continue;
            }
            if !resume {
                // Before the order: the time it would be retried at if it failed. A crash during the order
                // then leaves a restart waiting for it, rather than ordering again at once.
                let delay = schedule::retry_delay(
                    state.failures.saturating_add(1),
                    self.config.retry_initial,
                    self.config.retry_max,
                    None,
                );
                let now = OffsetDateTime::now_utc();
                state.next_attempt_at = Some((now + delay).unix_timestamp());
                state.attempt_started_at = Some(now.unix_timestamp());
                self.save_state(&cert.id, &state, Some(&lock)).await;
            }
            resume = false;
            let mut published = order::Published::default();
            let result = tokio::select! {
                _ = shutdown.cancelled() => None,
                r = self.obtain(&cert, issued_ref(&current, &cert), &lock, &mut published) => Some(r),
            };
            order::withdraw_challenges(&self.store, &published.keys).await;
            if !published.txt.is_empty() {
                order::withdraw_dns_records(
                    &self.store,
                    &self.keys,
                    &lock,
                    self.dns01.as_ref(),
                    &cert.id,
                    &published.txt,
                )
                .await;
            }
            let Some(result) = result else {
                self.release(lock).await;
                return;
            };
            match result {
                Ok((stored, pem)) => {
                    self.metrics.count_order(metric_name(&cert.id), "issued");
                    // Stored first (a crash after this serves it at the next start); published whatever
                    // the store said (an issued certificate is never thrown away).
                    let saved = self.save_cert(&cert.id, &stored, &lock).await;
                    // The status never shows an issued certificate without its schedule: the lifetime
                    // rule until the next turn of the loop refines it (ARI).
                    let due = schedule::lifetime_renewal(
                        pem.leaf.not_before,
                        pem.leaf.not_after,
                        pem.leaf.serial.as_bytes(),
                    );
                    self.set_status(&cert.id, |s| {
                        s.next_renewal = Some(due);
                        s.last_error = None;
                        s.next_retry = None;
                    });
                    let was_temporary = self
                        .registry
                        .get(&cert.id)
                        .is_some_and(|v| v.summary().temporary);
                    let content = SecretContent::TlsCertificate(pem.clone());
                    let v = self.registry.publish(&cert.id, &content);
                    let _ = self.outcomes.send((cert.id.clone(), Ok(())));
                    tracing::info!(
                        secret = %cert.id,
                        version = v.version().version(),
                        serial = %pem.leaf.serial,
                        not_after = %certs::format_time(pem.leaf.not_after),
                        names = ?pem.leaf.dns_names,
                        "certificate issued and pushed to subscribers{}{}",
                        if was_temporary { "; it replaces the temporary certificate" } else { "" },
                        if saved { "" } else { " (NOT STORED yet: served from memory; the write is retried)" }
                    );
                    save_retry = self.config.retry_initial;
                    state = self.after_issuance(&cert, &pem, &state);
                    state.next_renewal_at = Some(due.unix_timestamp());
                    self.save_state(&cert.id, &state, Some(&lock)).await;
                    current = Some(Current { stored, saved });
                }
                Err(e) => {
                    self.metrics.count_order(metric_name(&cert.id), "failed");
                    let _ = self.outcomes.send((cert.id.clone(), Err(e.to_string())));
                    if e.account_gone() {
                        tracing::warn!(
                            "the CA no longer knows the stored ACME account; a new one will be created"
                        );
                        self.account.forget(&self.keys, &self.store).await;
                    }
                    state.failures = state.failures.saturating_add(1);
                    // The CA's own Retry-After when it gave one; at least an hour for a rate limit; neither
                    // past retry_max.
                    let asked = http::take_retry_after()
                        .or(e.rate_limited().then_some(Duration::from_secs(3600)))
                        .map(|d| d.min(self.config.retry_max));
                    let mut delay = schedule::retry_delay(
                        state.failures,
                        self.config.retry_initial,
                        self.config.retry_max,
                        asked,
                    );
                    // The first order of a certificate never issued could not reach port 80: Envoy, started
                    // at the same moment, was not listening yet. One quick second try (one more failed
                    // validation, of the five an hour Let's Encrypt allows), then the usual backoff.
                    if state.failures == 1 && current.is_none() && e.unreachable() {
                        delay = delay.min(FIRST_RETRY_UNREACHABLE);
                    }
                    let now = OffsetDateTime::now_utc();
                    let next = now + delay;
                    tracing::error!(
                        secret = %cert.id,
                        attempt = state.failures,
                        "certificate order failed: {e}; next attempt at {} ({}){}",
                        certs::format_time(next),
                        schedule::describe_in(next - now),
                        match &current {
                            Some(_) => "; the current certificate keeps being served",
                            None if cert.temporary => "; the temporary certificate keeps being served",
                            None => "",
                        }
                    );
                    state.last_error = Some(e.to_string());
                    state.last_error_at = Some(now.unix_timestamp());
                    state.next_attempt_at = Some(next.unix_timestamp());
                    self.save_state(&cert.id, &state, Some(&lock)).await;
                }
            }
            self.release(lock).await;
        }
    }

    /// The state after an issuance: no failures, and a minimum interval before the next order (at least
    /// `retry_initial`, growing like a backoff when the new certificate is already due, which only a clock
    /// or CA dates gone wrong can cause: never an order loop, whatever they say).
    fn after_issuance(&self, cert: &ManagedCert, pem: &CertifiedPem, old: &CertState) -> CertState {
        let now = OffsetDateTime::now_utc();
        if now < pem.leaf.not_before {
            tracing::warn!(secret = %cert.id, not_before = %certs::format_time(pem.leaf.not_before), "the certificate the CA issued is not valid yet by this machine's clock: is the clock right?");
        }
        let renewal = schedule::lifetime_renewal(
            pem.leaf.not_before,
            pem.leaf.not_after,
            pem.leaf.serial.as_bytes(),
        );
        let floor = self.config.retry_initial;
        let premature = if renewal < now + floor {
            old.premature.saturating_add(1)
        } else {
            0
        };
        let wait = if premature > 0 {
            let wait = schedule::retry_delay(premature, floor, self.config.retry_max, None);
            tracing::warn!(
                secret = %cert.id,
                not_before = %certs::format_time(pem.leaf.not_before),
                not_after = %certs::format_time(pem.leaf.not_after),
                "the certificate just issued is already due for renewal (check this machine's clock, and the CA's certificate lifetimes); the next order waits {}",
                schedule::describe_in(time::Duration::try_from(wait).unwrap_or_default())
            );
            wait
        } else {
            floor
        };
        CertState {
            premature,
            next_attempt_at: Some((now + wait).unix_timestamp()),
            ..CertState::default()
        }
    }

    /// When `stored` should be renewed: the CA's ARI window when it offers one, else the lifetime rule.
    async fn renewal_time(&self, cert: &ManagedCert, stored: &StoredCert) -> OffsetDateTime {
        let Ok(pem) = stored.checked() else {
            return OffsetDateTime::now_utc();
        };
        if let Some(at) = self.ari_time(cert, stored).await {
            return at;
        }
        schedule::lifetime_renewal(
            pem.leaf.not_before,
            pem.leaf.not_after,
            pem.leaf.serial.as_bytes(),
        )
    }

    /// The CA's ARI window, when it offers one; every request it takes has a deadline, so a CA that hangs
    /// delays the schedule by at most that.
    async fn ari_time(&self, cert: &ManagedCert, stored: &StoredCert) -> Option<OffsetDateTime> {
        let account = self
            .account
            .get(&self.config, &self.keys, &self.store, &self.metrics)
            .await
            .ok()?;
        let der = order::leaf_der(&stored.chain_pem)?;
        let id = instant_acme::CertificateIdentifier::try_from(&der).ok()?;
        match account.renewal_info(&id).await {
            Ok((info, _retry_after)) => {
                let at = schedule::in_window(
                    info.suggested_window.start,
                    info.suggested_window.end,
                    der.as_ref(),
                );
                tracing::debug!(secret = %cert.id, "ARI renewal window {} .. {}", certs::format_time(info.suggested_window.start), certs::format_time(info.suggested_window.end));
                Some(at)
            }
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                tracing::debug!(secret = %cert.id, error = %e, "ARI unavailable; using the lifetime rule");
                None
            }
        }
    }

    /// Runs (or resumes) an order for `cert` and checks what it brings.
    async fn obtain(
        &self,
        cert: &ManagedCert,
        current: Option<&StoredCert>,
        lock: &Lock,
        published: &mut order::Published,
    ) -> Result<(StoredCert, CertifiedPem), OrderError> {
        let _permit = self
            .orders
            .acquire()
            .await
            .map_err(|_| OrderError::ShuttingDown)?;
        // DNS-01 records an earlier attempt left (a crash, a server that was down) go first.
        order::withdraw_dns_records(
            &self.store,
            &self.keys,
            lock,
            self.dns01.as_ref(),
            &cert.id,
            &[],
        )
        .await;
        let account = self
            .account
            .get(&self.config, &self.keys, &self.store, &self.metrics)
            .await?;
        // A DNS-01 order also waits for the zone's servers, as long as `propagation_timeout` allows.
        let propagation = match (&self.dns01, cert.challenge) {
            (Some(d), crate::values::Challenge::Dns01) => d.propagation_timeout(),
            _ => Duration::ZERO,
        };
        let limit = self.config.request_timeout * ORDER_TIMEOUTS + propagation;
        let ran = tokio::time::timeout(
            limit,
            order::run(
                &account,
                cert,
                current,
                &order::OrderCtx {
                    store: &self.store,
                    keys: &self.keys,
                    metrics: &self.metrics,
                    lock,
                    // A crashed replica's challenges outlive its order by little.
                    challenge_ttl: limit,
                    dns: self.dns01.as_ref(),
                    alpn_turns: &self.alpn_turns,
                },
                published,
            ),
        )
        .await
        .map_err(|_| OrderError::OrderTimedOut(limit))
        .and_then(|r| r);
        let (chain_pem, key_pem) = match ran {
            Ok(issued) => issued,
            Err(e) => {
                // An order that itself failed cannot be resumed: the next attempt places a new one.
                if !e.resumable() {
                    order::drop_record(&self.store, &self.keys, lock, &cert.id).await;
                }
                return Err(e);
            }
        };
        let pem = certs::certified_pem(chain_pem.as_bytes(), key_pem.as_bytes())?;
        let now = OffsetDateTime::now_utc();
        let stored = StoredCert {
            domains: to_strings(&cert.domains),
            key_type: cert.key_type,
            chain_pem,
            key_pem: zeroize::Zeroizing::new(key_pem),
            issued_at: now.unix_timestamp(),
            issued_at_ms: i64::try_from(now.unix_timestamp_nanos() / 1_000_000).ok(),
        };
        Ok((stored, pem))
    }
}

/// The `name` label of a certificate's order metrics: its name when configured; one series for all the
/// certificates obtained on demand (callers choose those names, and must not be able to create series).
fn metric_name(id: &SecretId) -> &str {
    match id {
        SecretId::Named(name) => name,
        SecretId::OnDemand(_) => "(on demand)",
    }
}

/// A stored certificate, parsed and checked; `None` when it is not usable.
fn parse_stored(entry: &crate::store::Entry) -> Option<(StoredCert, CertifiedPem)> {
    let stored: StoredCert = serde_json::from_slice(&entry.value).ok()?;
    let pem = stored.checked().ok()?;
    Some((stored, pem))
}

/// The issued certificate that an order for `cert` replaces (ARI), if it is still `cert`'s.
fn issued_ref<'a>(current: &'a Option<Current>, cert: &ManagedCert) -> Option<&'a StoredCert> {
    current
        .as_ref()
        .map(|c| &c.stored)
        .filter(|s| s.matches(cert))
}
