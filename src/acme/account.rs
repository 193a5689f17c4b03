//! The ACME account: created once per CA (with External Account Binding when configured), its credentials
//! stored (0600, never logged), and reused on every later start. It is obtained lazily, on the first order,
//! so the daemon starts and serves stored certificates even while the CA is unreachable.

use instant_acme::{Account, AccountCredentials, ExternalAccountKey, NewAccount};

use super::{Keys, OrderError};
use crate::config::AcmeConfig;
use crate::store::SharedStore;

#[derive(Default)]
pub(super) struct AccountSlot {
    account: tokio::sync::Mutex<Option<Account>>,
}

impl AccountSlot {
    /// The account, loading or creating it on first use.
    pub(super) async fn get(
        &self,
        config: &AcmeConfig,
        keys: &Keys,
        store: &SharedStore,
    ) -> Result<Account, OrderError> {
        let mut slot = self.account.lock().await;
        if let Some(a) = slot.as_ref() {
            return Ok(a.clone());
        }
        let account = load_or_create(config, keys, store).await?;
        *slot = Some(account.clone());
        Ok(account)
    }
}

impl AccountSlot {
    /// Forgets the account (the CA no longer knows it): the next order creates a new one.
    pub(super) async fn forget(&self, keys: &Keys, store: &SharedStore) {
        *self.account.lock().await = None;
        if let Err(e) = store.delete(&keys.account()).await {
            tracing::error!(error = %e, "cannot remove the stored ACME account");
        }
    }
}

fn builder(config: &AcmeConfig) -> Result<instant_acme::AccountBuilder, OrderError> {
    let b = match &config.directory_ca {
        Some(path) => Account::builder_with_root(path),
        None => Account::builder(),
    };
    b.map_err(|e| OrderError::acme("setting up the ACME HTTP client", e))
}

async fn load_or_create(
    config: &AcmeConfig,
    keys: &Keys,
    store: &SharedStore,
) -> Result<Account, OrderError> {
    let key = keys.account();
    if let Some(entry) = store.get(&key).await? {
        match serde_json::from_slice::<AccountCredentials>(&entry.value) {
            Ok(creds) => {
                let account = builder(config)?
                    .from_credentials(creds)
                    .await
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
        .map(|(kid, mac)| ExternalAccountKey::new(kid.clone(), mac));
    let started = std::time::Instant::now();
    let created = builder(config)?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: config.accept_terms_of_service,
                only_return_existing: false,
            },
            config.directory.clone(),
            eab.as_ref(),
        )
        .await;
    crate::metrics::observe_acme("account", super::order::outcome(&created), started);
    let (account, creds) = created.map_err(|e| OrderError::acme("creating the ACME account", e))?;
    let value = serde_json::to_vec(&creds).map_err(|e| OrderError::Other(e.to_string()))?;
    store.put(&key, &value).await?;
    tracing::info!(account = account.id(), directory = %config.directory, "ACME account created and stored");
    Ok(account)
}
