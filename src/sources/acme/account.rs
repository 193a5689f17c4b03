//! The ACME account: created once per CA (with External Account Binding when configured), its credentials
//! stored (0600, never logged), and reused on every later start. It is obtained lazily, on the first order,
//! so the daemon starts and serves stored certificates even while the CA is unreachable; every request it
//! makes has a deadline ([`super::http`]).

use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};

use super::OrderError;
use crate::config::AcmeConfig;
use crate::metrics::Metrics;
use crate::sources::keys::AcmeKeys;
use crate::store::SharedStore;

type Loading = Shared<BoxFuture<'static, Result<Account, Arc<OrderError>>>>;

/// The account, loaded (or created) once and shared by every certificate's task. Callers that arrive while
/// it loads wait for that one load rather than queueing on a lock held across the CA's I/O: every caller
/// awaits the same shared future, each within its own deadline, and a failed load is forgotten so that
/// the next caller tries again.
#[derive(Default)]
pub(super) struct AccountSlot {
    slot: std::sync::Mutex<Option<Loading>>,
}

impl AccountSlot {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Loading>> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The account, loading or creating it on first use.
    pub(super) async fn get(
        &self,
        config: &AcmeConfig,
        keys: &AcmeKeys,
        store: &SharedStore,
        metrics: &Metrics,
    ) -> Result<Account, OrderError> {
        let loading = {
            let mut slot = self.lock();
            match slot.as_ref() {
                Some(f) => f.clone(),
                None => {
                    let (config, keys, store) = (config.clone(), keys.clone(), store.clone());
                    let metrics = metrics.clone();
                    let f = async move {
                        load_or_create(&config, &keys, &store, &metrics)
                            .await
                            .map_err(Arc::new)
                    }
                    .boxed()
                    .shared();
                    *slot = Some(f.clone());
                    f
                }
            }
        };
        match loading.clone().await {
            Ok(account) => Ok(account),
            Err(e) => {
                let mut slot = self.lock();
                if slot.as_ref().is_some_and(|f| f.ptr_eq(&loading)) {
                    *slot = None;
                }
                Err(OrderError::Account(e))
            }
        }
    }

    /// Forgets the account (the CA no longer knows it): the next order creates a new one.
    pub(super) async fn forget(&self, keys: &AcmeKeys, store: &SharedStore) {
        *self.lock() = None;
        if let Err(e) = store.delete(&keys.account()).await {
            tracing::error!(error = %e, "cannot remove the stored ACME account");
        }
    }
}

fn builder(config: &AcmeConfig) -> Result<instant_acme::AccountBuilder, OrderError> {
    let client = super::http::CaClient::new(config)
        .map_err(|e| OrderError::acme("setting up the ACME HTTP client", e))?;
    Ok(Account::builder_with_http(Box::new(client)))
}

/// The stored account, or a new one. In a shared store one replica creates it while the others wait on
/// its lock, then read it: every replica uses the same account.
async fn load_or_create(
    config: &AcmeConfig,
    keys: &AcmeKeys,
    store: &SharedStore,
    metrics: &Metrics,
) -> Result<Account, OrderError> {
    let key = keys.account();
    let lock = store.lock(&key, crate::config::DEFAULT_LOCK_TTL).await?;
    let result = load_or_create_locked(config, &key, store, &lock, metrics).await;
    if let Err(e) = store.unlock(lock).await {
        tracing::debug!(error = %e, "cannot release the account's lock; it lapses with its lease");
    }
    result
}

async fn load_or_create_locked(
    config: &AcmeConfig,
    key: &str,
    store: &SharedStore,
    lock: &crate::store::Lock,
    metrics: &Metrics,
) -> Result<Account, OrderError> {
    let key = key.to_owned();
    if let Some(entry) = store.get(&key).await? {
        match serde_json::from_slice::<AccountCredentials>(&entry.value) {
            Ok(_) => {
                // Re-read for every attempt: the credentials are consumed, and they parse (just checked).
                let creds = || serde_json::from_slice::<AccountCredentials>(&entry.value);
                let account = retrying!(
                    metrics,
                    "account",
                    builder(config)?
                        .from_credentials(creds().map_err(|e| OrderError::Other(e.to_string()))?)
                )
                .map_err(|e| OrderError::acme("loading the stored ACME account", e))?;
                tracing::debug!(account = account.id(), "using the stored ACME account");
                return Ok(account);
            }
            Err(e) => match store.quarantine(&key).await {
                Ok(aside) => {
                    tracing::error!(key, moved_to = aside, error = %e, "stored ACME account credentials are unreadable: moved aside; creating a new account")
                }
                Err(q) => {
                    tracing::error!(key, error = %e, quarantine_error = %q, "stored ACME account credentials are unreadable; creating a new account")
                }
            },
        }
    }
    let contact: Vec<&str> = config.contact.iter().map(String::as_str).collect();
    let eab = config
        .eab
        .as_ref()
        .map(|e| ExternalAccountKey::new(e.kid.clone(), &e.hmac_key));
    let new = NewAccount {
        contact: &contact,
        terms_of_service_agreed: config.accept_terms_of_service,
        only_return_existing: false,
    };
    let (account, creds) = retrying!(
        metrics,
        "account",
        builder(config)?.create(&new, config.directory.clone(), eab.as_ref())
    )
    .map_err(|e| OrderError::acme("creating the ACME account", e))?;
    let value = serde_json::to_vec(&creds).map_err(|e| OrderError::Other(e.to_string()))?;
    store.put_locked(lock, &key, &value).await?;
    tracing::info!(account = account.id(), directory = %config.directory, "ACME account created and stored");
    Ok(account)
}
