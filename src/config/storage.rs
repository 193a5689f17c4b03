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
}

impl Validator<'_> {
    pub(super) fn storage(&mut self, raw: Option<Spanned<RawStorage>>) -> StorageConfig {
        let path = raw
            .and_then(|r| r.into_inner().path)
            .map(|p| p.into_inner())
            .unwrap_or_else(|| "acme-sds-data".to_owned());
        StorageConfig {
            path: self.path(&path),
        }
    }
}
