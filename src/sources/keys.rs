//! The store's key layout, all of it, so that what each source keeps where is read in one place (and a
//! second store backend, or a migration, has one file to follow). Keys are `/`-separated; a secret name
//! becomes one safe segment ([`key_segment`]).
//!
//! ```text
//! acme/<ca>/account            the ACME account (key and URL) at one CA
//! acme/<ca>/certs/<name>       an issued certificate: chain, key, names, key type
//! acme/<ca>/state/<name>       its renewal plan and failure backoff
//! acme/<ca>/orders/<name>      an order in progress (URL, certificate key), to resume after a restart
//! acme/<ca>/dns-01/<name>      DNS-01 TXT records added for it and not yet deleted (deleted after a crash)
//! acme/<ca>/on-demand/<name>   a certificate obtained on demand: how it was allowed, when last used
//! acme/<ca>/on-demand-certs/<name>, -state/<name>, -orders/<name>, -dns-01/<name>
//!                              the same four for certificates obtained on demand, apart from the configured
//!                              ones: an on-demand name can never overwrite or delete a configured secret's
//! challenges/<token>           a pending HTTP-01 key authorization, read by the responder
//! challenges/tls-alpn-01/<name>/<time>-<token>
//!                              a pending TLS-ALPN-01 key authorization, one per order, read by the TLS-ALPN
//!                              responder (the newest of a name's, should two orders validate it at once)
//! internal/ca                  the internal CA's certificate and key
//! internal/root.crt            its root certificate alone, as PEM: what clients trust
//! internal/certs/<name>        a leaf the internal CA signed
//! locks/<key>                  etcd only: the replica working on `<key>` (a lease; writes fenced by it)
//! ```

use crate::store::key_segment;
use crate::values::{DnsName, SecretId};

/// Where one ACME CA's records are kept: a directory per CA (host and a short hash of the directory
/// URL), so that switching CAs (staging to production) keeps both accounts and certificates apart.
#[derive(Debug, Clone)]
pub struct AcmeKeys {
    ca: String,
}

impl AcmeKeys {
    /// The keys of the CA at `directory`.
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
        AcmeKeys {
            ca: format!("{}-{short}", host.trim_start_matches('.')),
        }
    }

    /// The ACME account (key and URL).
    pub fn account(&self) -> String {
        format!("acme/{}/account", self.ca)
    }

    /// Everything kept for this CA (account, certificates, plans, orders).
    pub fn dir(&self) -> String {
        format!("acme/{}", self.ca)
    }

    /// A record of `kind` (`certs`, `state`, ...) for the certificate `id`: configured certificates and
    /// those obtained on demand each in their own directories.
    fn of(&self, kind: &str, id: &SecretId) -> String {
        match id {
            SecretId::Named(name) => format!("acme/{}/{kind}/{}", self.ca, key_segment(name)),
            SecretId::OnDemand(name) => {
                format!("acme/{}/on-demand-{kind}/{}", self.ca, key_segment(name))
            }
        }
    }

    /// An issued certificate.
    pub fn cert(&self, id: &SecretId) -> String {
        self.of("certs", id)
    }

    /// A certificate's renewal plan and failure backoff.
    pub fn state(&self, id: &SecretId) -> String {
        self.of("state", id)
    }

    /// The order in progress (its URL, and the certificate key once made), for resuming it.
    pub fn order(&self, id: &SecretId) -> String {
        self.of("orders", id)
    }

    /// The DNS-01 records added for a certificate's order and not yet deleted from the zone.
    pub fn dns_records(&self, id: &SecretId) -> String {
        self.of("dns-01", id)
    }

    /// Where the records of certificates obtained on demand are (how each was allowed, when last used).
    pub fn on_demand_dir(&self) -> String {
        format!("acme/{}/on-demand", self.ca)
    }

    /// The record of a certificate obtained on demand.
    pub fn on_demand(&self, name: &DnsName) -> String {
        format!("acme/{}/on-demand/{}", self.ca, key_segment(name))
    }

    /// Where a certificate obtained on demand by an earlier version was stored: among the configured
    /// ones (read once, to move it where it belongs).
    pub fn legacy_on_demand(&self, name: &DnsName, kind: &str) -> String {
        format!("acme/{}/{kind}/{}", self.ca, key_segment(name))
    }
}

/// Whether the value at `key` holds a private key (the ACME account key, a certificate's key, an order's
/// key, the internal CA's key): what `storage.encryption_key_file` seals. Certificates, renewal plans,
/// challenges and the root certificate stay in clear.
pub fn holds_private_key(key: &str) -> bool {
    let acme = |kind: &str| {
        key.strip_prefix("acme/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(_, rest)| rest == kind || rest.starts_with(&format!("{kind}/")))
    };
    acme("account")
        || acme("certs")
        || acme("orders")
        || acme("on-demand-certs")
        || acme("on-demand-orders")
        || key == INTERNAL_CA
        || key.starts_with("internal/certs/")
}

/// A pending HTTP-01 challenge's key authorization, by token.
pub fn challenge(token: &str) -> String {
    format!("challenges/{token}")
}

/// Where the pending TLS-ALPN-01 key authorizations for `domain` are (one per order), read by the
/// `[tls_alpn01]` responder.
pub fn tls_alpn_challenges(domain: &str) -> String {
    format!("challenges/tls-alpn-01/{}", key_segment(domain))
}

/// One order's pending TLS-ALPN-01 key authorization for `domain` (challenge `token`), published at
/// `unix_nanos`: keys sort by publication, so the newest of a domain's is its last.
pub fn tls_alpn_challenge(domain: &str, unix_nanos: u128, token: &str) -> String {
    format!(
        "{}/{unix_nanos:020}-{}",
        tls_alpn_challenges(domain),
        key_segment(token)
    )
}

/// The internal CA (certificate and key).
pub const INTERNAL_CA: &str = "internal/ca";

/// The internal CA's root certificate alone, as PEM: what clients trust.
pub const INTERNAL_ROOT_CERT: &str = "internal/root.crt";

/// A leaf of the internal CA.
pub fn internal_cert(name: &str) -> String {
    format!("internal/certs/{}", key_segment(name))
}
