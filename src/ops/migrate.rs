//! `acme-sds storage migrate --from DIR`: copies a storage directory (a single-node daemon's) into the
//! etcd cluster of `[storage.etcd]`, so that a single node can grow into several replicas without ordering
//! its certificates again.
//!
//! The directory is opened as its daemon opens it, lock included: a daemon still running on it makes the
//! migration refuse (stop it first; its state would move on after the copy). Values are read through the
//! directory's seal (if `storage.encryption_key_file` was set there, the same file opens them) and written
//! through the cluster's, so private keys arrive sealed, each bound to its store key; keys the directory
//! holds in clear (a daemon that ran without the key file) are read as they are, and arrive sealed too
//! (the source is only read: nothing there is sealed in place). Nothing in etcd is
//! overwritten: a key already there is kept and reported (running the migration twice copies nothing
//! twice). Pending challenges and order locks are not copied: they belong to processes, not to the state.

use std::path::Path;
use std::sync::Arc;

use crate::config::StorageConfig;
use crate::sources::{OpenStoreError, keys, open_store};
use crate::store::sealed::{SealedStore, Sealer, Unsealed};
use crate::store::{FsStore, SharedStore, StoreError, is_quarantined};

/// What a migration did.
#[derive(Debug, Default)]
pub struct Migrated {
    /// Keys copied.
    pub copied: Vec<String>,
    /// Keys already in etcd, left as they were.
    pub kept: Vec<String>,
}

/// Why a migration could not run (or stopped: what was copied until then stays copied).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The configuration has no `[storage.etcd]` to copy into.
    #[error(
        "the configuration has no [storage.etcd]: migrate copies a storage directory into etcd"
    )]
    NoEtcd,
    /// The directory cannot be opened (missing, or in use by a running acme-sds).
    #[error("--from {}: {source}", .dir.display())]
    Source {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        source: StoreError,
    },
    /// The key file, or etcd, cannot be opened.
    #[error(transparent)]
    Target(#[from] OpenStoreError),
    /// A read or a write failed.
    #[error("copying {key}: {source}")]
    Copy {
        /// The store key.
        key: String,
        /// Why.
        source: StoreError,
    },
}

/// Copies the state under `dir` into the etcd cluster `config` names.
pub async fn from_directory(dir: &Path, config: &StorageConfig) -> Result<Migrated, MigrateError> {
    if config.etcd.is_none() {
        return Err(MigrateError::NoEtcd);
    }
    let source_error = |source| MigrateError::Source {
        dir: dir.to_owned(),
        source,
    };
    if !dir.is_dir() {
        return Err(source_error(StoreError::Io {
            op: "open",
            path: dir.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        }));
    }
    let sealer = match &config.encryption_key_file {
        Some(path) => Some(Arc::new(
            Sealer::load(path).map_err(OpenStoreError::KeyFile)?,
        )),
        None => None,
    };
    let source: SharedStore = Arc::new(
        SealedStore::new(
            Arc::new(FsStore::open(dir).map_err(source_error)?),
            sealer,
            keys::holds_private_key,
        )
        .with_unsealed(Unsealed::Read),
    );
    let target = open_store(config, false).await?;
    let mut done = Migrated::default();
    for prefix in ["acme", "internal"] {
        let listed = source.list(prefix).await.map_err(source_error)?;
        for key in listed.into_iter().filter(|k| !is_quarantined(k)) {
            let copy = |source| MigrateError::Copy {
                key: key.clone(),
                source,
            };
            let Some(entry) = source.get(&key).await.map_err(copy)? else {
                continue;
            };
            let value = zeroize::Zeroizing::new(entry.value);
            match target.compare_and_swap(&key, 0, &value).await {
                Ok(_) => done.copied.push(key),
                Err(StoreError::Conflict { .. }) => done.kept.push(key),
                Err(e) => return Err(copy(e)),
            }
        }
    }
    Ok(done)
}
