//! The ACME manager: obtains and renews certificates over HTTP-01 and publishes them to the registry.
//!
//! Each ACME certificate is one task driven by its schedule ([`schedule`]): at start the stored certificate
//! is served at once if it still matches its configuration, and nothing is ordered until it is due. An
//! order ([`order`]) publishes each challenge's key authorization to the store (where the HTTP-01 responder
//! reads it) before telling the CA to validate, and withdraws it when the order ends. The issued chain and
//! its key are checked, stored atomically as one value, then published. Failures are retried with growing,
//! jittered, capped delays; the last good certificate keeps being served meanwhile. A semaphore bounds
//! concurrent orders, and one certificate's failure never delays another's.
//!
//! Store layout, per CA (so that state never mixes CAs): `acme/<ca>/account` (credentials),
//! `acme/<ca>/certs/<name>` (chain, key, domains, key type), `acme/<ca>/state/<name>` (last error, next
//! attempt). Pending challenges live under `challenges/<token>` for every CA.

mod account;
mod order;
pub mod schedule;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, CertifiedPem, MaterialError};
use crate::config::{AcmeConfig, CertificateSource, Config, KeyType};
use crate::registry::{Registry, SecretContent};
use crate::store::{SharedStore, StoreError};

pub use order::OrderError;

/// How many `request_timeout`s one order may take, end to end, before it counts as failed.
const ORDER_TIMEOUTS: u32 = 20;

/// One ACME-managed certificate, as configured.
#[derive(Debug, Clone)]
pub struct ManagedCert {
    pub name: String,
    pub domains: Vec<String>,
    pub key_type: KeyType,
}

impl ManagedCert {
    pub fn from_config(config: &Config) -> Vec<ManagedCert> {
        config
            .certificates
            .iter()
            .filter_map(|c| match &c.source {
                CertificateSource::Acme { domains, key_type } => Some(ManagedCert {
                    name: c.name.clone(),
                    domains: domains.clone(),
                    key_type: *key_type,
                }),
                CertificateSource::Files { .. } => None,
            })
            .collect()
    }
}

/// An issued certificate as stored: chain and key in one value, so they can never be half-replaced.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredCert {
    pub domains: Vec<String>,
    pub key_type: KeyType,
    pub chain_pem: String,
    pub key_pem: zeroize::Zeroizing<String>,
    /// Unix time of issuance.
    pub issued_at: i64,
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
        let mut a = self.domains.clone();
        let mut b = cert.domains.clone();
        a.sort();
        b.sort();
        a == b && self.key_type == cert.key_type
    }

    pub fn checked(&self) -> Result<CertifiedPem, MaterialError> {
        certs::certified_pem(self.chain_pem.as_bytes(), self.key_pem.as_bytes())
    }
}

/// What a certificate's task remembers between attempts; stored so that a restart keeps backing off.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CertState {
    pub failures: u32,
    pub last_error: Option<String>,
    /// Unix time.
    pub last_error_at: Option<i64>,
    /// Unix time of the next attempt after a failure.
    pub next_attempt_at: Option<i64>,
}

/// Store keys of one CA.
#[derive(Debug, Clone)]
pub struct Keys {
    ca: String,
}

impl Keys {
    pub fn for_directory(directory: &str) -> Self {
        let host = directory
            .trim_start_matches("https://")
            .split(['/', ':'])
            .next()
            .unwrap_or("ca");
        let host: String = host
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let digest = ring::digest::digest(&ring::digest::SHA256, directory.as_bytes());
        let short: String = digest.as_ref()[..4]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Keys {
            ca: format!("{}-{short}", host.trim_start_matches('.')),
        }
    }

    pub fn account(&self) -> String {
        format!("acme/{}/account", self.ca)
    }

    pub fn cert(&self, name: &str) -> String {
        format!("acme/{}/certs/{}", self.ca, key_segment(name))
    }

    pub fn state(&self, name: &str) -> String {
        format!("acme/{}/state/{}", self.ca, key_segment(name))
    }
}

/// What storage holds for a certificate, read without changing anything (for `acme-sds status` when no
/// daemon runs): the stored certificate, if usable, and the retry state.
pub async fn stored_status(
    store: &dyn crate::store::Store,
    keys: &Keys,
    name: &str,
) -> (Option<CertifiedPem>, CertState) {
    let cert = match store.get(&keys.cert(name)).await {
        Ok(Some(e)) => serde_json::from_slice::<StoredCert>(&e.value)
            .ok()
            .and_then(|s| s.checked().ok()),
        _ => None,
    };
    let state = match store.get(&keys.state(name)).await {
        Ok(Some(e)) => serde_json::from_slice(&e.value).unwrap_or_default(),
        _ => CertState::default(),
    };
    (cert, state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_directory_has_its_own_namespace() {
        let le = Keys::for_directory(crate::config::LETSENCRYPT);
        let staging = Keys::for_directory(crate::config::LETSENCRYPT_STAGING);
        assert_ne!(le.account(), staging.account());
        assert!(
            le.account()
                .starts_with("acme/acme-v02.api.letsencrypt.org-")
        );
        let pebble = Keys::for_directory("https://127.0.0.1:14000/dir");
        assert!(pebble.cert("web").starts_with("acme/127.0.0.1-"));
        assert!(pebble.cert("web").ends_with("/certs/web"));
        assert!(pebble.cert("a/b c").ends_with("/certs/x-612f622063"));
    }
}

/// A secret name as one store key segment: kept as is when safe, hex-encoded otherwise.
fn key_segment(name: &str) -> String {
    let safe = !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if safe {
        name.to_owned()
    } else {
        let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
        format!("x-{hex}")
    }
}

/// Why a stored value could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored value is not valid: {0}")]
    Corrupt(String),
}

/// A certificate's schedule and last failure, for status views.
#[derive(Debug, Clone, Default)]
pub struct AcmeStatus {
    pub next_renewal: Option<OffsetDateTime>,
    pub last_error: Option<String>,
    pub next_retry: Option<OffsetDateTime>,
}

/// Runs every ACME certificate of a configuration.
pub struct AcmeManager {
    status: std::sync::Mutex<std::collections::HashMap<String, AcmeStatus>>,
    config: AcmeConfig,
    keys: Keys,
    store: SharedStore,
    registry: Arc<Registry>,
    orders: Arc<Semaphore>,
    account: account::AccountSlot,
}

impl AcmeManager {
    pub fn new(config: AcmeConfig, store: SharedStore, registry: Arc<Registry>) -> Arc<Self> {
        Arc::new(AcmeManager {
            status: Default::default(),
            keys: Keys::for_directory(&config.directory),
            orders: Arc::new(Semaphore::new(config.max_concurrent_orders)),
            account: account::AccountSlot::default(),
            config,
            store,
            registry,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Each certificate's next renewal, last error and next retry.
    pub fn status(&self) -> std::collections::HashMap<String, AcmeStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set_status(&self, name: &str, f: impl FnOnce(&mut AcmeStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(s.entry(name.to_owned()).or_default());
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
    async fn set_aside(&self, key: &str, secret: &str, why: &dyn std::fmt::Display) {
        match self.store.quarantine(key).await {
            Ok(aside) => {
                tracing::error!(secret, key, moved_to = aside, error = %why, "stored value is unusable: moved aside; it will be obtained again")
            }
            Err(e) => {
                tracing::error!(secret, key, error = %why, quarantine_error = %e, "stored value is unusable and could not be moved aside; it will be obtained again")
            }
        }
    }

    /// Loads a certificate's stored copy; a corrupt one is moved aside (it will be re-obtained).
    pub async fn load_stored(&self, cert: &ManagedCert) -> Option<(StoredCert, CertifiedPem)> {
        let key = self.keys.cert(&cert.name);
        let stored: StoredCert = match self.load_json(&key).await {
            Ok(Some(s)) => s,
            Ok(None) => return None,
            Err(LoadError::Corrupt(e)) => {
                self.set_aside(&key, &cert.name, &e).await;
                return None;
            }
            Err(e) => {
                tracing::error!(secret = %cert.name, key, error = %e, "cannot read the stored certificate; it will be obtained again");
                return None;
            }
        };
        match stored.checked() {
            Ok(pem) => Some((stored, pem)),
            Err(e) => {
                self.set_aside(&key, &cert.name, &e).await;
                None
            }
        }
    }

    /// Publishes every stored certificate at once (before the SDS listeners open), then starts one task per
    /// certificate.
    pub async fn start(
        self: &Arc<Self>,
        certs: Vec<ManagedCert>,
        shutdown: CancellationToken,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for cert in certs {
            let stored = self.load_stored(&cert).await;
            if let Some((s, pem)) = &stored {
                let v = self
                    .registry
                    .publish(&cert.name, &SecretContent::TlsCertificate(pem.clone()));
                let state = if s.matches(&cert) {
                    "stored"
                } else {
                    "stored (configuration changed; ordering a new one)"
                };
                crate::sources::files::log_loaded(
                    &cert.name,
                    &SecretContent::TlsCertificate(pem.clone()),
                    v.version().version(),
                    state,
                );
            }
            let state_key = self.keys.state(&cert.name);
            let state: CertState = match self.load_json(&state_key).await {
                Ok(s) => s.unwrap_or_default(),
                Err(LoadError::Corrupt(e)) => {
                    self.set_aside(&state_key, &cert.name, &e).await;
                    CertState::default()
                }
                Err(_) => CertState::default(),
            };
            let manager = self.clone();
            let token = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                manager
                    .run_cert(cert, stored.map(|(s, _)| s), state, token)
                    .await;
            }));
        }
        tasks
    }

    async fn save_state(&self, name: &str, state: &CertState) {
        let key = self.keys.state(name);
        match serde_json::to_vec(state) {
            Ok(v) => {
                if let Err(e) = self.store.put(&key, &v).await {
                    tracing::error!(secret = name, error = %e, "cannot store certificate state");
                }
            }
            Err(e) => tracing::error!(secret = name, error = %e, "cannot encode certificate state"),
        }
    }

    /// One certificate's life: wait until due, order, store, publish; retry failures with backoff.
    async fn run_cert(
        self: Arc<Self>,
        cert: ManagedCert,
        mut current: Option<StoredCert>,
        mut state: CertState,
        shutdown: CancellationToken,
    ) {
        loop {
            let now = OffsetDateTime::now_utc();
            let due = match current.as_ref() {
                Some(c) if c.matches(&cert) => self.renewal_time(&cert, c).await,
                _ => now,
            };
            let retry_at = state
                .next_attempt_at
                .filter(|_| state.failures > 0)
                .and_then(|t| OffsetDateTime::from_unix_timestamp(t).ok());
            let at = match retry_at {
                Some(r) if r > due => r,
                _ => due,
            };
            let retrying = state.failures > 0;
            let error = state.last_error.clone();
            self.set_status(&cert.name, |s| {
                s.next_renewal = current.as_ref().map(|_| due);
                s.last_error = error.filter(|_| retrying);
                s.next_retry = retry_at.filter(|_| retrying);
            });
            if at > now {
                if current.is_some() && state.failures == 0 {
                    tracing::info!(secret = %cert.name, "next renewal at {} ({})", certs::format_time(at), schedule::describe_in(at - now));
                }
                let wait = (at - now).try_into().unwrap_or(Duration::ZERO);
                // Re-evaluate at least every 12 hours (ARI windows move; clocks jump).
                let wait = wait.min(Duration::from_secs(12 * 3600));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                if OffsetDateTime::now_utc() < at {
                    continue;
                }
            }
            let mut tokens = Vec::new();
            let result = tokio::select! {
                _ = shutdown.cancelled() => None,
                r = self.obtain(&cert, current.as_ref(), &mut tokens) => Some(r),
            };
            order::withdraw_challenges(&self.store, &tokens).await;
            let Some(result) = result else { return };
            match result {
                Ok((stored, pem)) => {
                    crate::metrics::count_order(&cert.name, "issued");
                    let content = SecretContent::TlsCertificate(pem.clone());
                    let v = self.registry.publish(&cert.name, &content);
                    tracing::info!(
                        secret = %cert.name,
                        version = v.version().version(),
                        serial = %pem.leaf.serial,
                        not_after = %certs::format_time(pem.leaf.not_after),
                        names = ?pem.leaf.dns_names,
                        "certificate issued and pushed to subscribers"
                    );
                    current = Some(stored);
                    state = CertState::default();
                    self.save_state(&cert.name, &state).await;
                }
                Err(e) => {
                    crate::metrics::count_order(&cert.name, "failed");
                    if e.account_gone() {
                        tracing::warn!(
                            "the CA no longer knows the stored ACME account; a new one will be created"
                        );
                        self.account.forget(&self.keys, &self.store).await;
                    }
                    state.failures = state.failures.saturating_add(1);
                    let delay = schedule::retry_delay(
                        state.failures,
                        self.config.retry_initial,
                        self.config.retry_max,
                        e.retry_after(),
                    );
                    let now = OffsetDateTime::now_utc();
                    let next = now + delay;
                    tracing::error!(
                        secret = %cert.name,
                        attempt = state.failures,
                        "certificate order failed: {e}; next attempt at {} ({}){}",
                        certs::format_time(next),
                        schedule::describe_in(next - now),
                        if current.is_some() { "; the current certificate keeps being served" } else { "" }
                    );
                    state.last_error = Some(e.to_string());
                    state.last_error_at = Some(now.unix_timestamp());
                    state.next_attempt_at = Some(next.unix_timestamp());
                    self.save_state(&cert.name, &state).await;
                }
            }
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
        schedule::lifetime_renewal(pem.leaf.not_before, pem.leaf.not_after)
    }

    async fn ari_time(&self, cert: &ManagedCert, stored: &StoredCert) -> Option<OffsetDateTime> {
        let account = self
            .account
            .get(&self.config, &self.keys, &self.store)
            .await
            .ok()?;
        let der = order::leaf_der(&stored.chain_pem)?;
        let id = instant_acme::CertificateIdentifier::try_from(&der).ok()?;
        match account.renewal_info(&id).await {
            Ok((info, _retry_after)) => {
                let at =
                    schedule::in_window(info.suggested_window.start, info.suggested_window.end);
                tracing::debug!(secret = %cert.name, "ARI renewal window {} .. {}", certs::format_time(info.suggested_window.start), certs::format_time(info.suggested_window.end));
                Some(at)
            }
            Err(instant_acme::Error::Unsupported(_)) => None,
            Err(e) => {
                tracing::debug!(secret = %cert.name, error = %e, "ARI unavailable; using the lifetime rule");
                None
            }
        }
    }

    async fn obtain(
        &self,
        cert: &ManagedCert,
        current: Option<&StoredCert>,
        tokens: &mut Vec<String>,
    ) -> Result<(StoredCert, CertifiedPem), OrderError> {
        let _permit = self
            .orders
            .acquire()
            .await
            .map_err(|_| OrderError::Other("order limiter closed".into()))?;
        let limit = self.config.request_timeout;
        let account = tokio::time::timeout(
            limit,
            self.account.get(&self.config, &self.keys, &self.store),
        )
        .await
        .map_err(|_| {
            OrderError::Other(format!(
                "the CA did not answer within {}s",
                limit.as_secs_f32()
            ))
        })??;
        let (chain_pem, key_pem) = tokio::time::timeout(
            limit * ORDER_TIMEOUTS,
            order::run(&account, cert, current, &self.store, tokens),
        )
        .await
        .map_err(|_| {
            OrderError::Other(format!(
                "the CA did not complete the order within {}s",
                (limit * ORDER_TIMEOUTS).as_secs_f32()
            ))
        })??;
        let pem = certs::certified_pem(chain_pem.as_bytes(), key_pem.as_bytes())?;
        let stored = StoredCert {
            domains: cert.domains.clone(),
            key_type: cert.key_type,
            chain_pem,
            key_pem: zeroize::Zeroizing::new(key_pem),
            issued_at: OffsetDateTime::now_utc().unix_timestamp(),
        };
        let value = zeroize::Zeroizing::new(
            serde_json::to_vec(&stored).map_err(|e| OrderError::Other(e.to_string()))?,
        );
        self.store.put(&self.keys.cert(&cert.name), &value).await?;
        Ok((stored, pem))
    }
}
