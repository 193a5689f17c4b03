//! `[storage]`: where the account, keys, certificates and ACME state are kept.

use std::path::PathBuf;

use toml::Spanned;

use super::Validator;
use super::raw::RawStorage;

/// `[storage]`: where account, keys, certificates and ACME state are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The storage directory (created if missing; 0700).
    pub path: PathBuf,
    /// `encryption_key_file`: the keys that seal the stored private keys (`store::sealed`); off when absent.
    pub encryption_key_file: Option<PathBuf>,
}

impl Validator<'_> {
    pub(super) fn storage(&mut self, raw: Option<Spanned<RawStorage>>) -> StorageConfig {
        let raw = raw.map(|r| r.into_inner());
        let (path, key_file) = match raw {
            Some(r) => (r.path, r.encryption_key_file),
            None => (None, None),
        };
        let path = path
            .map(|p| p.into_inner())
            .unwrap_or_else(|| "acme-sds-data".to_owned());
        StorageConfig {
            path: self.path(&path),
            encryption_key_file: key_file.map(|f| self.path(f.get_ref())),
        }
    }
}
