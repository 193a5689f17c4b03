//! TLS material in PEM: parsing, checking and describing certificate chains, private keys and CA bundles.
//!
//! Everything that is served passes through here first, whatever its source (files, ACME): a chain must parse
//! as X.509, a key must be PKCS#8, SEC1 or PKCS#1 and must match the leaf's public key. What is served is
//! re-encoded from the parsed DER, so stray text, comments or a private key accidentally concatenated into a
//! certificate file never reach Envoy. Parsing uses `rustls-pki-types`' `PemObject` (the maintained successor
//! of `rustls-pemfile`).

use std::fmt;

use bytes::Bytes;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Why TLS material was rejected.
#[derive(Debug, thiserror::Error)]
pub enum MaterialError {
    #[error("no PEM certificate found")]
    /// The certificate file holds no certificate.
    NoCertificate,
    #[error(
        "no PEM private key found (PKCS#8 \"PRIVATE KEY\", SEC1 \"EC PRIVATE KEY\" or PKCS#1 \"RSA PRIVATE KEY\")"
    )]
    /// The key file holds no private key.
    NoKey,
    #[error("malformed PEM: {0}")]
    /// The certificate PEM cannot be read.
    Pem(String),
    #[error("malformed PEM private key: {0}")]
    /// The key PEM cannot be read.
    KeyPem(String),
    #[error("certificate {index} in the chain is not valid X.509: {reason}")]
    /// A certificate in the chain is not valid X.509.
    BadCertificate {
        /// Its position in the chain, 0 for the leaf.
        index: usize,
        /// What the X.509 parser said.
        reason: String,
    },
    #[error("unsupported private key: {0}")]
    /// A key of a kind Envoy (and rustls) cannot use.
    UnsupportedKey(String),
    #[error("the private key does not match the leaf certificate's public key")]
    /// The key is not the leaf's.
    KeyMismatch,
}

impl MaterialError {
    /// Whether the private key (rather than the certificates) is at fault.
    pub fn is_about_key(&self) -> bool {
        matches!(
            self,
            MaterialError::NoKey
                | MaterialError::KeyPem(_)
                | MaterialError::UnsupportedKey(_)
                | MaterialError::KeyMismatch
        )
    }
}

/// Generates a private key of `key_type` (the error says why not).
pub fn generate_key(key_type: crate::values::KeyType) -> Result<rcgen::KeyPair, String> {
    use crate::values::KeyType;
    let err = |e: &dyn std::fmt::Display| e.to_string();
    match key_type {
        KeyType::EcdsaP256 => {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| err(&e))
        }
        KeyType::EcdsaP384 => {
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).map_err(|e| err(&e))
        }
        KeyType::Rsa2048 | KeyType::Rsa3072 | KeyType::Rsa4096 => {
            use rsa::pkcs8::EncodePrivateKey;
            let bits = match key_type {
                KeyType::Rsa2048 => 2048,
                KeyType::Rsa3072 => 3072,
                _ => 4096,
            };
            // ring signs with RSA keys but cannot generate them; the `rsa` crate only generates here.
            let key =
                rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits).map_err(|e| err(&e))?;
            let der = key.to_pkcs8_der().map_err(|e| err(&e))?;
            let der = rustls_pki_types::PrivatePkcs8KeyDer::from(der.as_bytes().to_vec());
            rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
                .map_err(|e| err(&e))
        }
    }
}

fn pem_error(e: pem::Error) -> MaterialError {
    match e {
        pem::Error::NoItemsFound => MaterialError::Pem("no items found".into()),
        // The section bodies may be key material: name the problem, never the bytes.
        pem::Error::MissingSectionEnd { .. } => {
            MaterialError::Pem("a section has no END line (truncated or half-written file?)".into())
        }
        pem::Error::IllegalSectionStart { .. } => {
            MaterialError::Pem("a BEGIN line is malformed".into())
        }
        pem::Error::Base64Decode(_) => MaterialError::Pem("a section is not valid base64".into()),
        other => MaterialError::Pem(other.to_string()),
    }
}

/// Bytes holding key material: zeroed when the last reference is dropped.
pub fn secret_bytes(v: Vec<u8>) -> Bytes {
    struct Wiped(zeroize::Zeroizing<Vec<u8>>);
    impl AsRef<[u8]> for Wiped {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    Bytes::from_owner(Wiped(zeroize::Zeroizing::new(v)))
}

/// What logs, `check` and status views say about a certificate: never key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Serial number, colon-separated hex.
    pub serial: String,
    /// The subject, as X.509 prints it.
    pub subject: String,
    /// DNS names from the subjectAltName extension.
    pub dns_names: Vec<String>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    fn from_der(index: usize, der: &[u8]) -> Result<Self, MaterialError> {
        let bad = |reason: String| MaterialError::BadCertificate { index, reason };
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| bad(e.to_string()))?;
        if !rest.is_empty() {
            return Err(bad("trailing bytes after the certificate".into()));
        }
        let dns_names = san_names(&cert)
            .map_err(|e| bad(format!("subjectAltName: {e}")))?
            .dns;
        Ok(CertInfo {
            serial: cert.raw_serial_as_string(),
            subject: cert.subject().to_string(),
            dns_names,
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        })
    }

    /// "expires 2027-02-01 12:00:00 UTC (in 68 days)" / "EXPIRED 2024-..."
    pub fn expiry(&self) -> String {
        describe_expiry(self.not_after)
    }
}

/// The names a client certificate carries, kept apart by kind: access rules match DNS patterns against DNS
/// names only and URI patterns (SPIFFE IDs) against URIs only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientIdentities {
    /// DNS subjectAltNames.
    pub dns: Vec<String>,
    /// URI subjectAltNames (SPIFFE IDs).
    pub uris: Vec<String>,
}

impl ClientIdentities {
    /// Whether the certificate carries no name an access rule could match.
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.uris.is_empty()
    }
}

/// The identities a client certificate asserts: its DNS and URI (for example SPIFFE ID) subjectAltNames,
/// kept apart.
pub fn identities(der: &[u8]) -> ClientIdentities {
    X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, cert)| san_names(&cert).ok())
        .unwrap_or_default()
}

/// The DNS names and URIs of a certificate's subjectAltName.
fn san_names(
    cert: &X509Certificate<'_>,
) -> Result<ClientIdentities, x509_parser::error::X509Error> {
    let mut ids = ClientIdentities::default();
    if let Some(san) = cert.subject_alternative_name()? {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(d) => ids.dns.push(d.to_string()),
                GeneralName::URI(u) => ids.uris.push(u.to_string()),
                _ => {}
            }
        }
    }
    Ok(ids)
}

/// Human wording for an expiry instant relative to now.
pub fn describe_expiry(not_after: OffsetDateTime) -> String {
    let now = OffsetDateTime::now_utc();
    let when = format_time(not_after);
    let left = not_after - now;
    if left.is_negative() {
        format!("EXPIRED {when} ({} days ago)", (-left).whole_days())
    } else if left.whole_days() >= 1 {
        format!("expires {when} (in {} days)", left.whole_days())
    } else {
        format!("expires {when} (in {} hours)", left.whole_hours())
    }
}

/// RFC 3339 in UTC, the one time format of logs and summaries.
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A checked certificate chain and its matching private key, as canonical PEM.
#[derive(Clone)]
pub struct CertifiedPem {
    /// The chain, leaf first, one CERTIFICATE block each.
    pub chain_pem: Bytes,
    /// The private key, in the PEM form it was given in.
    pub key_pem: Bytes,
    /// What the leaf says.
    pub leaf: CertInfo,
    /// How many certificates the chain holds, leaf included.
    pub chain_len: usize,
}

impl fmt::Debug for CertifiedPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("CertifiedPem")
            .field("leaf", &self.leaf)
            .field("chain_len", &self.chain_len)
            .finish_non_exhaustive()
    }
}

/// A checked set of CA certificates, as canonical PEM.
#[derive(Debug, Clone)]
pub struct TrustBundlePem {
    /// The bundle as canonical PEM.
    pub pem: Bytes,
    /// What each CA certificate in it says.
    pub certs: Vec<CertInfo>,
}

impl TrustBundlePem {
    /// The earliest `not_after` among the bundle's certificates.
    pub fn earliest_expiry(&self) -> Option<OffsetDateTime> {
        self.certs.iter().map(|c| c.not_after).min()
    }
}

fn parse_chain(pem_bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, MaterialError> {
    let chain = CertificateDer::pem_slice_iter(pem_bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if chain.is_empty() {
        return Err(MaterialError::NoCertificate);
    }
    Ok(chain)
}

/// PEM with Unix line endings, as every other tool writes it.
fn pem_block(label: &str, der: &[u8]) -> String {
    let config = ::pem::EncodeConfig::new().set_line_ending(::pem::LineEnding::LF);
    ::pem::encode_config(&::pem::Pem::new(label, der), config)
}

fn encode_certs(chain: &[CertificateDer<'_>]) -> Bytes {
    let mut out = String::new();
    for c in chain {
        out.push_str(&pem_block("CERTIFICATE", c.as_ref()));
    }
    Bytes::from(out)
}

/// Parses and checks a certificate chain (leaf first) and its private key.
pub fn certified_pem(chain_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedPem, MaterialError> {
    let chain = parse_chain(chain_pem)?;
    let mut infos = chain
        .iter()
        .enumerate()
        .map(|(i, c)| CertInfo::from_der(i, c))
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        pem::Error::NoItemsFound => MaterialError::NoKey,
        other => match pem_error(other) {
            MaterialError::Pem(msg) => MaterialError::KeyPem(msg),
            e => e,
        },
    })?;
    let label = match &key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let signing_key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| MaterialError::UnsupportedKey(e.to_string()))?;
    let leaf_only = vec![chain[0].clone()];
    match CertifiedKey::new(leaf_only, signing_key).keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(MaterialError::KeyMismatch);
        }
        Err(e) => return Err(MaterialError::UnsupportedKey(e.to_string())),
    }
    let key_pem = secret_bytes(pem_block(label, key.secret_der()).into_bytes());
    Ok(CertifiedPem {
        chain_pem: encode_certs(&chain),
        key_pem,
        leaf: infos.swap_remove(0),
        chain_len: chain.len(),
    })
}

/// Parses and checks a PEM bundle of CA certificates.
pub fn trust_bundle_pem(pem_bytes: &[u8]) -> Result<TrustBundlePem, MaterialError> {
    let certs = parse_chain(pem_bytes)?;
    let infos = certs
        .iter()
        .enumerate()
        .map(|(i, c)| CertInfo::from_der(i, c))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TrustBundlePem {
        pem: encode_certs(&certs),
        certs: infos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn matching_pair_is_accepted_and_described() {
        let (cert, key) = self_signed(&["www.example.com", "example.com"]);
        let junk = format!("Bag Attributes: junk\n{cert}\n");
        let c = certified_pem(junk.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(c.leaf.dns_names, ["www.example.com", "example.com"]);
        assert_eq!(c.chain_len, 1);
        assert!(c.chain_pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert!(!String::from_utf8_lossy(&c.chain_pem).contains("Bag"));
        assert!(c.key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----"));
        assert!(c.leaf.expiry().starts_with("expires "));
        assert!(!format!("{c:?}").contains("PRIVATE"));
    }

    #[test]
    fn mismatched_key_is_rejected() {
        let (cert, _) = self_signed(&["a.example"]);
        let (_, other_key) = self_signed(&["b.example"]);
        let err = certified_pem(cert.as_bytes(), other_key.as_bytes()).unwrap_err();
        assert!(matches!(err, MaterialError::KeyMismatch), "{err}");
    }

    #[test]
    fn p384_key_is_accepted() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["p384.example".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        certified_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
    }

    #[test]
    fn truncated_and_empty_inputs_are_errors_not_panics() {
        let (cert, key) = self_signed(&["a.example"]);
        let half = &cert.as_bytes()[..cert.len() / 2];
        assert!(matches!(
            certified_pem(half, key.as_bytes()),
            Err(MaterialError::Pem(_))
        ));
        assert!(matches!(
            certified_pem(b"", key.as_bytes()),
            Err(MaterialError::NoCertificate)
        ));
        assert!(matches!(
            certified_pem(cert.as_bytes(), b""),
            Err(MaterialError::NoKey)
        ));
        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(
            certified_pem(garbage.as_bytes(), key.as_bytes()),
            Err(MaterialError::BadCertificate { index: 0, .. })
        ));
    }

    #[test]
    fn bundle_of_two() {
        let (a, _) = self_signed(&["ca1"]);
        let (b, _) = self_signed(&["ca2"]);
        let bundle = trust_bundle_pem(format!("{a}{b}").as_bytes()).unwrap();
        assert_eq!(bundle.certs.len(), 2);
        assert!(bundle.earliest_expiry().is_some());
    }
}
