//! Certificate sources: where secrets come from before the registry publishes them. Each source checks its
//! material (through [`crate::certs`]) and publishes only what is good: [`files`] (PEM files, watched),
//! [`acme`] (an RFC 8555 CA, with its HTTP-01 responder), [`internal`] (acme-sds's own local CA). What
//! they keep in the store is laid out in [`keys`].

use std::sync::Arc;

use crate::certs;
use crate::config::{EtcdConfig, StorageConfig};
use crate::registry::SecretContent;
use crate::store::etcd::{EtcdSettings, EtcdStore};
use crate::store::sealed::{KeyFileError, SealedStore, Sealer};
use crate::store::{FsStore, SharedStore, StoreError};

/// Why the configured store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenStoreError {
    /// The storage directory (`storage.path`), or the etcd cluster.
    #[error("{}: {source}", if *.etcd { "storage.etcd" } else { "storage.path" })]
    Store {
        /// Whether the store is etcd.
        etcd: bool,
        /// What failed.
        source: StoreError,
    },
    /// A file `[storage.etcd]` names (`ca_file`, `password_file`, ...) cannot be read.
    #[error("storage.etcd.{key}: {}: {source}", .path.display())]
    EtcdFile {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
    /// The key file (`storage.encryption_key_file`).
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
}

/// How to reach the configured etcd cluster: its settings with the files they name read (`check` uses it
/// to say which file cannot be read).
pub fn etcd_settings(config: &EtcdConfig) -> Result<EtcdSettings, OpenStoreError> {
    let read = |key: &'static str, path: &std::path::Path| {
        std::fs::read(path).map_err(|source| OpenStoreError::EtcdFile {
            key,
            path: path.to_owned(),
            source,
        })
    };
    let ca_pem = config
        .ca_file
        .as_deref()
        .map(|p| read("ca_file", p))
        .transpose()?;
    let identity = match &config.client_cert {
        Some((cert, key)) => Some((
            read("cert_file", cert)?,
            zeroize::Zeroizing::new(read("key_file", key)?),
        )),
        None => None,
    };
    let user = match &config.user {
        Some((name, file)) => {
            let bytes = zeroize::Zeroizing::new(read("password_file", file)?);
            let text = String::from_utf8_lossy(&bytes);
            Some((
                name.clone(),
                zeroize::Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_owned()),
            ))
        }
        None => None,
    };
    Ok(EtcdSettings {
        endpoints: config.endpoints.clone(),
        prefix: config.prefix.clone(),
        ca_pem,
        identity,
        user,
    })
}

/// The configured store: the storage directory (locked; or read-only, taking no lock, for
/// `acme-sds status`) or the etcd cluster of `[storage.etcd]`, with the values that hold private keys
/// ([`keys::holds_private_key`]) sealed when `storage.encryption_key_file` is set. A daemon refuses to
/// start when a stored private key does not open with the configured keys (or none is configured):
/// ordering afresh would overwrite it.
pub async fn open_store(
    config: &StorageConfig,
    read_only: bool,
) -> Result<SharedStore, OpenStoreError> {
    let sealer = match &config.encryption_key_file {
        Some(path) => Some(Arc::new(Sealer::load(path)?)),
        None => None,
    };
    let backend: SharedStore = match &config.etcd {
        Some(etcd) => {
            let store = EtcdStore::connect_with(&etcd_settings(etcd)?)
                .await
                .map_err(|source| OpenStoreError::Store { etcd: true, source })?;
            Arc::new(store)
        }
        None => {
            let fs = if read_only {
                FsStore::open_read_only(&config.path)
            } else {
                FsStore::open(&config.path)
            };
            Arc::new(fs.map_err(|source| OpenStoreError::Store {
                etcd: false,
                source,
            })?)
        }
    };
    if let Some(s) = &sealer
        && !read_only
    {
        tracing::info!(key = %s.key_id(), "stored private keys are sealed (storage.encryption_key_file)");
    }
    let store: SharedStore = Arc::new(SealedStore::new(backend, sealer, keys::holds_private_key));
    if !read_only {
        for prefix in ["acme", "internal"] {
            store
                .scan(prefix)
                .await
                .map_err(|source| OpenStoreError::Store {
                    etcd: config.etcd.is_some(),
                    source,
                })?;
        }
    }
    Ok(store)
}

pub mod acme;
pub mod files;
pub mod internal;
pub mod keys;

/// A certificate's schedule and last failure, as an issuing source (ACME, the internal CA) reports them.
#[derive(Debug, Clone, Default)]
pub struct IssuerStatus {
    /// When the certificate is planned to be renewed.
    pub next_renewal: Option<time::OffsetDateTime>,
    /// The last failure, if the latest attempt failed.
    pub last_error: Option<String>,
    /// When the next attempt is due after that failure.
    pub next_retry: Option<time::OffsetDateTime>,
}

/// Logs a secret a source published (`how`: loaded, reloaded, issued, ...): name, serial and expiry;
/// never key material. One line format for every source.
pub fn log_loaded(name: &str, content: &SecretContent, version: &str, how: &str) {
    match content {
        SecretContent::TlsCertificate(c) => {
            let expired = c.leaf.not_after < time::OffsetDateTime::now_utc();
            let expiry = c.leaf.expiry();
            if expired {
                tracing::warn!(secret = name, version, serial = %c.leaf.serial, names = ?c.leaf.dns_names, "{how} certificate: {expiry}");
            } else {
                tracing::info!(secret = name, version, serial = %c.leaf.serial, names = ?c.leaf.dns_names, "{how} certificate: {expiry}");
            }
        }
        SecretContent::TrustBundle(b) => {
            let expiry = b
                .earliest_expiry()
                .map(certs::describe_expiry)
                .unwrap_or_default();
            tracing::info!(
                secret = name,
                version,
                certificates = b.certs.len(),
                "{how} trust bundle: earliest {expiry}"
            );
        }
    }
}
