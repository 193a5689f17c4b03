//! `[acme]`: the ACME CA and account, and what ACME certificates need of the rest of the file.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::CertificateConfig;
use super::CertificateSource;
use super::Validator;
use super::parse_duration;
use super::raw::RawAcme;

/// `[acme]`: the ACME CA and account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The directory URL.
    pub directory: String,
    /// Contact URLs for the account (`mailto:...`).
    pub contact: Vec<String>,
    /// The operator has read and accepts the CA's terms of service.
    pub accept_terms_of_service: bool,
    /// A PEM root to trust for the ACME server's own HTTPS (a private CA, or Pebble).
    pub directory_ca: Option<PathBuf>,
    /// External Account Binding.
    pub eab: Option<EabKey>,
    /// How many orders may run at once.
    pub max_concurrent_orders: usize,
    /// First retry delay after a failure; doubles (with jitter) up to `retry_max`.
    pub retry_initial: std::time::Duration,
    /// The longest retry delay.
    pub retry_max: std::time::Duration,
    /// How long the CA may take to answer (account lookups, ARI); a whole order may take 20 times that.
    pub request_timeout: std::time::Duration,
    /// Serve a temporary self-signed certificate for each ACME certificate until its first issuance
    /// (default true; `temporary_certificate` on a certificate overrides it).
    pub temporary_certificates: bool,
}

/// An External Account Binding: the key id and the decoded MAC key, which no `Debug` output shows.
#[derive(Clone, PartialEq, Eq)]
pub struct EabKey {
    /// The key id the CA gave.
    pub kid: String,
    /// The MAC key, decoded from base64url.
    pub hmac_key: zeroize::Zeroizing<Vec<u8>>,
}

impl fmt::Debug for EabKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EabKey")
            .field("kid", &self.kid)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

/// Let's Encrypt's production directory (`directory = "letsencrypt"`).
pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";

/// Let's Encrypt's staging directory (`directory = "letsencrypt-staging"`).
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// Orders that may run at once, unless `max_concurrent_orders` says otherwise.
pub const DEFAULT_MAX_CONCURRENT_ORDERS: usize = 8;
/// The first retry after a failure (`retry_initial`).
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(60);
/// The longest retry delay (`retry_max`).
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(24 * 3600);
/// How long the CA may take to answer (`request_timeout`).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Validator<'_> {
    pub(super) fn acme_requirements(
        &mut self,
        certs: &[CertificateConfig],
        acme: Option<&AcmeConfig>,
        acme_line: Option<usize>,
    ) {
        let Some(first) = certs
            .iter()
            .find(|c| matches!(c.source, CertificateSource::Acme { .. }))
        else {
            return;
        };
        match acme {
            None => self.problem(
                format!("{}.domains", first.key),
                self.locations.line(&first.key),
                "ACME certificates need an [acme] table (directory, contact, accept_terms_of_service)",
            ),
            Some(a) if !a.accept_terms_of_service => self.problem(
                "acme.accept_terms_of_service",
                acme_line,
                "must be true before any certificate is ordered: read the CA's terms of service, then set it",
            ),
            Some(_) => {}
        }
    }

    pub(super) fn acme(&mut self, raw: RawAcme, table_line: Option<usize>) -> AcmeConfig {
        let directory = match raw.directory {
            None => LETSENCRYPT_STAGING.to_owned(),
            Some(d) => {
                let l = self.line(&d);
                match d.get_ref().as_str() {
                    "letsencrypt" => LETSENCRYPT.to_owned(),
                    "letsencrypt-staging" => LETSENCRYPT_STAGING.to_owned(),
                    url if url.starts_with("https://") && url.len() > "https://".len() => {
                        url.to_owned()
                    }
                    other => {
                        self.problem(
                            "acme.directory",
                            l,
                            format!("{other:?} is not \"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL"),
                        );
                        String::new()
                    }
                }
            }
        };
        let mut contact = Vec::new();
        for (i, c) in raw.contact.into_iter().enumerate() {
            let l = self.line(&c);
            let c = c.into_inner();
            if c.starts_with("mailto:") && c.len() > "mailto:".len() && !c.contains(',') {
                contact.push(c);
            } else {
                self.problem(
                    format!("acme.contact[{i}]"),
                    l,
                    format!("{c:?} is not a \"mailto:ADDRESS\" URL"),
                );
            }
        }
        let directory_ca = raw.directory_ca.map(|p| self.path(p.get_ref()));
        let eab = match (raw.eab_kid, raw.eab_hmac_key) {
            (None, None) => None,
            (Some(kid), Some(key)) => {
                use base64::Engine;
                let l = self.line(&key);
                let trimmed = key.get_ref().trim_end_matches('=');
                match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed) {
                    Ok(bytes) if !bytes.is_empty() => Some(EabKey {
                        kid: kid.into_inner(),
                        hmac_key: zeroize::Zeroizing::new(bytes),
                    }),
                    _ => {
                        self.problem(
                            "acme.eab_hmac_key",
                            l,
                            "not base64url (as the CA hands it out)",
                        );
                        None
                    }
                }
            }
            (Some(_), None) => {
                self.problem(
                    "acme.eab_hmac_key",
                    table_line,
                    "missing: `eab_kid` needs its `eab_hmac_key`",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    "acme.eab_kid",
                    table_line,
                    "missing: `eab_hmac_key` needs its `eab_kid`",
                );
                None
            }
        };
        let max_concurrent_orders = match raw.max_concurrent_orders {
            None => DEFAULT_MAX_CONCURRENT_ORDERS,
            Some(n) => {
                let l = self.line(&n);
                match usize::try_from(*n.get_ref()) {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => {
                        self.problem(
                            "acme.max_concurrent_orders",
                            l,
                            "must be between 1 and 1000",
                        );
                        DEFAULT_MAX_CONCURRENT_ORDERS
                    }
                }
            }
        };
        let mut duration = |key: &str, raw: Option<Spanned<String>>, default: Duration| match raw {
            None => default,
            Some(d) => {
                let l = self.line(&d);
                match parse_duration(d.get_ref()) {
                    Ok(v) if !v.is_zero() => v,
                    Ok(_) => {
                        self.problem(format!("acme.{key}"), l, "must be longer than zero");
                        default
                    }
                    Err(msg) => {
                        self.problem(format!("acme.{key}"), l, msg);
                        default
                    }
                }
            }
        };
        let retry_initial = duration("retry_initial", raw.retry_initial, DEFAULT_RETRY_INITIAL);
        let retry_max = duration("retry_max", raw.retry_max, DEFAULT_RETRY_MAX);
        let request_timeout = duration(
            "request_timeout",
            raw.request_timeout,
            DEFAULT_REQUEST_TIMEOUT,
        );
        AcmeConfig {
            directory,
            contact,
            accept_terms_of_service: raw.accept_terms_of_service.is_some_and(|b| *b.get_ref()),
            directory_ca,
            eab,
            max_concurrent_orders,
            retry_initial,
            retry_max: retry_max.max(retry_initial),
            request_timeout,
            temporary_certificates: raw.temporary_certificates.unwrap_or(true),
        }
    }
}
