//! Certificate sources: where secrets come from before the registry publishes them. Each source checks its
//! material (through [`crate::certs`]) and publishes only what is good: [`files`] (PEM files, watched),
//! [`acme`] (an RFC 8555 CA, with its HTTP-01 responder), [`internal`] (acme-sds's own local CA). What
//! they keep in the store is laid out in [`keys`].

use crate::certs;
use crate::registry::SecretContent;

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
