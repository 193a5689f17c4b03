//! The internal issuer (`issuer = "internal"`): acme-sds's own local CA, which signs certificates for names
//! no public CA validates (`localhost`, single-label and internal names, IP addresses), as Caddy's
//! `tls internal` does. It serves development and internal services on its own, and it is what the built-in
//! configuration uses, so that `acme-sds run` serves a certificate with no file to write first.
//!
//! The CA is a self-signed ECDSA P-256 root, valid ten years, created at the first start and kept in the
//! store: certificate and key as one value under `internal/ca`, and the certificate alone, as PEM, under
//! `internal/root.crt`: the file clients are told to trust. The root signs leaves directly (no
//! intermediate), so Envoy serves a one-certificate chain; its key never leaves the store (0700/0600).
//! Leaves live [`LEAF_LIFETIME`] and are renewed when a third of that is left, so a client that caches one
//! never holds an expired certificate. Each leaf is stored under `internal/certs/<name>` (chain, key, names,
//! key type and the root it was signed by), so that a restart serves the same certificate; a stored leaf
//! whose names, key type or root no longer match is signed again at start.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::certs::{self, CertifiedPem};
use crate::config::{CertificateSource, Config};
use crate::registry::{Registry, SecretContent};
use crate::sources::IssuerStatus;
use crate::store::{SharedStore, Store, StoreError};
use crate::values::{KeyType, SecretName, SubjectName, same_names, to_strings};

/// How long a leaf is valid.
pub const LEAF_LIFETIME: time::Duration = time::Duration::days(7);
/// How long the root is valid.
const ROOT_LIFETIME: time::Duration = time::Duration::days(3650);
/// A root with less than this left is replaced (its leaves could not outlive it).
const ROOT_MIN_LEFT: time::Duration = time::Duration::days(30);
/// After a failure (signing, storing), the next attempt.
const RETRY: Duration = Duration::from_secs(60);

use crate::sources::keys;

#[derive(Debug, thiserror::Error)]
/// Why the internal CA could not issue.
pub enum InternalError {
    #[error(transparent)]
    /// The store failed.
    Store(#[from] StoreError),
    #[error("cannot sign a certificate for {name}: {reason}")]
    /// A leaf could not be signed.
    Sign {
        /// The secret whose certificate was being signed.
        name: String,
        /// What failed (key generation, signing, the task running it).
        reason: String,
    },
    #[error("cannot create the local CA: {0}")]
    /// The CA could not be created.
    CreateCa(String),
}

/// One certificate of the internal CA, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalCert {
    /// The secret name.
    pub name: SecretName,
    /// The names on the certificate.
    pub domains: Vec<SubjectName>,
    /// The key type.
    pub key_type: KeyType,
}

impl InternalCert {
    /// The internal CA's certificates of `config`.
    pub fn from_config(config: &Config) -> Vec<InternalCert> {
        config
            .certificates
            .iter()
            .filter_map(|c| match &c.source {
                CertificateSource::Internal { domains, key_type } => Some(InternalCert {
                    name: c.name.clone(),
                    domains: domains.clone(),
                    key_type: *key_type,
                }),
                _ => None,
            })
            .collect()
    }
}

/// The CA as stored.
#[derive(Serialize, Deserialize)]
struct StoredCa {
    cert_pem: String,
    key_pem: zeroize::Zeroizing<String>,
}

/// A leaf as stored: chain and key in one value, so they can never be half-replaced.
#[derive(Clone, Serialize, Deserialize)]
struct StoredLeaf {
    domains: Vec<String>,
    key_type: KeyType,
    /// SHA-256 of the root's DER, hex: the root that signed it.
    root: String,
    chain_pem: String,
    key_pem: zeroize::Zeroizing<String>,
}

impl StoredLeaf {
    fn matches(&self, cert: &InternalCert, root: &str) -> bool {
        same_names(&self.domains, &cert.domains)
            && self.key_type == cert.key_type
            && self.root == root
    }
}

/// When a leaf is renewed: a third of its lifetime before it expires.
pub fn renewal_time(leaf: &certs::CertInfo) -> OffsetDateTime {
    leaf.not_after - (leaf.not_after - leaf.not_before) / 3_i32
}

/// The loaded CA.
struct LocalCa {
    cert_pem: String,
    key: rcgen::KeyPair,
    /// SHA-256 of the root's DER, hex.
    fingerprint: String,
}

impl LocalCa {
    fn create() -> Result<(LocalCa, StoredCa), String> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| e.to_string())?;
        let mut params =
            rcgen::CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        let mut dn = rcgen::DistinguishedName::new();
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        // Unique per CA, so that two machines' roots are told apart in a trust store.
        let id: String = {
            let mut b = [0u8; 4];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
            b.iter().map(|x| format!("{x:02x}")).collect()
        };
        dn.push(
            rcgen::DnType::CommonName,
            format!(
                "acme-sds local CA {id} {}",
                host.chars().take(24).collect::<String>()
            )
            .trim_end()
            .to_owned(),
        );
        dn.push(rcgen::DnType::OrganizationName, "acme-sds");
        params.distinguished_name = dn;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + ROOT_LIFETIME;
        let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
        let stored = StoredCa {
            cert_pem: cert.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        };
        Ok((LocalCa::from_stored(&stored)?, stored))
    }

    fn from_stored(s: &StoredCa) -> Result<LocalCa, String> {
        let key = rcgen::KeyPair::from_pem(&s.key_pem).map_err(|e| format!("key: {e}"))?;
        let ca = certs::certified_pem(s.cert_pem.as_bytes(), s.key_pem.as_bytes())
            .map_err(|e| e.to_string())?;
        if ca.leaf.not_after - OffsetDateTime::now_utc() < ROOT_MIN_LEFT {
            return Err(format!("the root {}", ca.leaf.expiry()));
        }
        // Checks that rcgen can sign with it (the certificate parses as a CA).
        rcgen::Issuer::from_ca_cert_pem(&s.cert_pem, &key).map_err(|e| e.to_string())?;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(s.cert_pem.as_bytes())
            .map(|d: rustls_pki_types::CertificateDer<'static>| d)
            .map_err(|e| format!("{e:?}"))?;
        let digest = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
        Ok(LocalCa {
            cert_pem: s.cert_pem.clone(),
            key,
            fingerprint: digest.as_ref().iter().map(|b| format!("{b:02x}")).collect(),
        })
    }

    /// Signs a new leaf for `cert`.
    fn sign(&self, cert: &InternalCert) -> Result<StoredLeaf, InternalError> {
        let fail = |reason: String| InternalError::Sign {
            name: cert.name.to_string(),
            reason,
        };
        let key = certs::generate_key(cert.key_type).map_err(fail)?;
        let mut params = rcgen::CertificateParams::new(to_strings(&cert.domains))
            .map_err(|e| fail(e.to_string()))?;
        let mut dn = rcgen::DistinguishedName::new();
        if let Some(first) = cert.domains.first() {
            dn.push(
                rcgen::DnType::CommonName,
                first.chars().take(64).collect::<String>(),
            );
        }
        params.distinguished_name = dn;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = OffsetDateTime::now_utc();
        // A little in the past, for clients whose clock runs slow.
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + LEAF_LIFETIME;
        let issuer = rcgen::Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(|e| fail(e.to_string()))?;
        let leaf = params
            .signed_by(&key, &issuer)
            .map_err(|e| fail(e.to_string()))?;
        Ok(StoredLeaf {
            domains: to_strings(&cert.domains),
            key_type: cert.key_type,
            root: self.fingerprint.clone(),
            chain_pem: leaf.pem(),
            key_pem: zeroize::Zeroizing::new(key.serialize_pem()),
        })
    }
}

/// A leaf being served, and whether the store has it yet.
struct Current {
    leaf: StoredLeaf,
    renew_at: OffsetDateTime,
    saved: bool,
}

/// The local CA and the certificates it keeps current.
pub struct InternalIssuer {
    ca: LocalCa,
    store: SharedStore,
    registry: Arc<Registry>,
    status: std::sync::Mutex<HashMap<String, IssuerStatus>>,
}

impl InternalIssuer {
    /// Loads the CA from the store, creating it at the first start (or when the stored one is unusable or
    /// near its end, with an error log: clients must then trust the new root).
    pub async fn open(
        store: SharedStore,
        registry: Arc<Registry>,
    ) -> Result<Arc<InternalIssuer>, InternalError> {
        let existing = match store.get(keys::INTERNAL_CA).await? {
            None => None,
            Some(e) => {
                let parsed = serde_json::from_slice::<StoredCa>(&e.value)
                    .map_err(|e| e.to_string())
                    .and_then(|s| LocalCa::from_stored(&s));
                match parsed {
                    Ok(ca) => Some(ca),
                    Err(why) => {
                        let aside = store.quarantine(keys::INTERNAL_CA).await?;
                        tracing::error!(key = keys::INTERNAL_CA, moved_to = aside, error = %why, "the stored local CA is unusable: moved aside; creating a new one (clients must trust the new root)");
                        None
                    }
                }
            }
        };
        let ca = match existing {
            Some(ca) => ca,
            None => {
                let (ca, stored) = tokio::task::spawn_blocking(LocalCa::create)
                    .await
                    .map_err(|e| InternalError::CreateCa(e.to_string()))?
                    .map_err(InternalError::CreateCa)?;
                let value = zeroize::Zeroizing::new(
                    serde_json::to_vec(&stored)
                        .map_err(|e| InternalError::CreateCa(e.to_string()))?,
                );
                // Only if there is none: in a shared store another replica may have just created one,
                // and every replica must sign with the same CA.
                match store.compare_and_swap(keys::INTERNAL_CA, 0, &value).await {
                    Ok(_) => {
                        tracing::info!(root = keys::INTERNAL_ROOT_CERT, "created the local CA");
                        ca
                    }
                    Err(StoreError::Conflict { .. }) => {
                        let theirs = store.get(keys::INTERNAL_CA).await?.ok_or_else(|| {
                            InternalError::CreateCa(
                                "the local CA another replica created is gone".into(),
                            )
                        })?;
                        let stored = serde_json::from_slice::<StoredCa>(&theirs.value)
                            .map_err(|e| InternalError::CreateCa(e.to_string()))?;
                        LocalCa::from_stored(&stored).map_err(InternalError::CreateCa)?
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        };
        // Always rewritten, so that it is there (and current) whatever happened to it.
        let root_now = store.get(keys::INTERNAL_ROOT_CERT).await?;
        if root_now.as_ref().map(|e| e.value.as_slice()) != Some(ca.cert_pem.as_bytes()) {
            store
                .put(keys::INTERNAL_ROOT_CERT, ca.cert_pem.as_bytes())
                .await?;
        }
        Ok(Arc::new(InternalIssuer {
            ca,
            store,
            registry,
            status: Default::default(),
        }))
    }

    /// The root certificate (PEM) that clients trust.
    pub fn root_pem(&self) -> &str {
        &self.ca.cert_pem
    }

    /// Each certificate's next renewal and last error.
    pub fn status(&self) -> HashMap<String, IssuerStatus> {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn set_status(&self, name: &str, f: impl FnOnce(&mut IssuerStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(s.entry(name.to_owned()).or_default());
        }
    }

    /// Publishes every certificate at once (the stored one when it still matches, else a new one), then
    /// starts the task that renews them until `shutdown`.
    pub async fn start(
        self: &Arc<Self>,
        certs: Vec<InternalCert>,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let mut current = Vec::new();
        for cert in certs {
            let stored = self.load(&cert).await;
            let served = match stored {
                Some(c) => {
                    self.publish(&cert, &c, "stored");
                    Some(c)
                }
                None => self.issue(&cert).await,
            };
            current.push((cert, served));
        }
        let me = self.clone();
        tokio::spawn(async move { me.run(current, shutdown).await })
    }

    /// The stored leaf for `cert`, when it matches and is not due yet.
    async fn load(&self, cert: &InternalCert) -> Option<Current> {
        let key = keys::internal_cert(&cert.name);
        let entry = match self.store.get(&key).await {
            Ok(e) => e?,
            Err(e) => {
                tracing::warn!(secret = %cert.name, error = %e, "cannot read the stored certificate; signing a new one");
                return None;
            }
        };
        let leaf = match serde_json::from_slice::<StoredLeaf>(&entry.value) {
            Ok(l) => l,
            Err(e) => {
                let aside = self.store.quarantine(&key).await;
                tracing::error!(secret = %cert.name, key, moved_to = ?aside.ok(), error = %e, "the stored certificate is unusable: moved aside; signing a new one");
                return None;
            }
        };
        if !leaf.matches(cert, &self.ca.fingerprint) {
            tracing::info!(secret = %cert.name, "the stored certificate was made for other names, another key type or another root: signing a new one");
            return None;
        }
        let pem = certs::certified_pem(leaf.chain_pem.as_bytes(), leaf.key_pem.as_bytes()).ok()?;
        let renew_at = renewal_time(&pem.leaf);
        (renew_at > OffsetDateTime::now_utc()).then_some(Current {
            leaf,
            renew_at,
            saved: true,
        })
    }

    fn publish(&self, cert: &InternalCert, current: &Current, how: &str) {
        match certs::certified_pem(
            current.leaf.chain_pem.as_bytes(),
            current.leaf.key_pem.as_bytes(),
        ) {
            Ok(pem) => {
                let content = SecretContent::TlsCertificate(pem);
                let v = self.registry.publish(&cert.name, &content);
                crate::sources::log_loaded(&cert.name, &content, v.version().version(), how);
                self.set_status(&cert.name, |s| {
                    s.next_renewal = Some(current.renew_at);
                    s.last_error = None;
                    s.next_retry = None;
                });
            }
            Err(e) => {
                tracing::error!(secret = %cert.name, error = %e, "a certificate of the local CA does not check")
            }
        }
    }

    /// Signs, publishes and stores a new leaf; `None` (with the error in the status) when signing failed.
    async fn issue(self: &Arc<Self>, cert: &InternalCert) -> Option<Current> {
        let me = self.clone();
        let c = cert.clone();
        let signed = tokio::task::spawn_blocking(move || me.ca.sign(&c))
            .await
            .map_err(|e| InternalError::Sign {
                name: cert.name.to_string(),
                reason: e.to_string(),
            })
            .and_then(|r| r);
        let leaf = match signed {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(secret = %cert.name, error = %e, "cannot sign the certificate; retrying in {} s", RETRY.as_secs());
                self.failed(&cert.name, &e);
                return None;
            }
        };
        // From the certificate's own dates, as a restart (and `acme-sds status`) will read them.
        let renew_at = certs::certified_pem(leaf.chain_pem.as_bytes(), leaf.key_pem.as_bytes())
            .map(|p| renewal_time(&p.leaf))
            .unwrap_or_else(|_| OffsetDateTime::now_utc() + LEAF_LIFETIME * 2 / 3);
        let mut current = Current {
            leaf,
            renew_at,
            saved: false,
        };
        self.publish(cert, &current, "signed by the local CA");
        current.saved = self.save(cert, &current.leaf).await;
        Some(current)
    }

    fn failed(&self, name: &str, e: &dyn std::fmt::Display) {
        let retry = OffsetDateTime::now_utc() + RETRY;
        self.set_status(name, |s| {
            s.last_error = Some(e.to_string());
            s.next_retry = Some(retry);
        });
    }

    async fn save(&self, cert: &InternalCert, leaf: &StoredLeaf) -> bool {
        let value = match serde_json::to_vec(leaf) {
            Ok(v) => zeroize::Zeroizing::new(v),
            Err(e) => {
                tracing::error!(secret = %cert.name, error = %e, "cannot encode the certificate");
                return false;
            }
        };
        match self
            .store
            .put(&keys::internal_cert(&cert.name), &value)
            .await
        {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(secret = %cert.name, error = %e, "cannot store the certificate: it is served from memory, and storing it is retried in {} s", RETRY.as_secs());
                self.failed(&cert.name, &e);
                false
            }
        }
    }

    /// Renews each certificate when due, and retries what failed, until `shutdown`.
    async fn run(
        self: Arc<Self>,
        mut certs: Vec<(InternalCert, Option<Current>)>,
        shutdown: CancellationToken,
    ) {
        loop {
            let now = OffsetDateTime::now_utc();
            let next = certs
                .iter()
                .map(|(_, c)| match c {
                    Some(c) if c.saved => c.renew_at,
                    _ => now + RETRY,
                })
                .min();
            let Some(next) = next else { return };
            let wait = Duration::try_from(next - now).unwrap_or(Duration::ZERO);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let now = OffsetDateTime::now_utc();
            for (cert, current) in &mut certs {
                match current {
                    Some(c) if c.renew_at <= now => {
                        *current = self.issue(cert).await.or(current.take())
                    }
                    Some(c) if !c.saved => c.saved = self.save(cert, &c.leaf).await,
                    Some(_) => {}
                    None => *current = self.issue(cert).await,
                }
            }
        }
    }
}

/// A certificate's stored leaf, read without changing anything (for `acme-sds status` when no daemon runs).
pub async fn stored_status(store: &dyn Store, name: &str) -> Option<CertifiedPem> {
    let entry = store.get(&keys::internal_cert(name)).await.ok()??;
    let leaf: StoredLeaf = serde_json::from_slice(&entry.value).ok()?;
    certs::certified_pem(leaf.chain_pem.as_bytes(), leaf.key_pem.as_bytes()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::FsStore;
    use rustls::client::danger::ServerCertVerifier;

    fn cert(name: &str, domains: &[&str]) -> InternalCert {
        InternalCert {
            name: SecretName::new(name).unwrap(),
            domains: domains
                .iter()
                .map(|d| SubjectName::new(d).unwrap())
                .collect(),
            key_type: KeyType::EcdsaP256,
        }
    }

    /// The leaf verifies against the root for its names (DNS and IP), as a TLS client checks it.
    #[tokio::test]
    async fn leaves_chain_to_the_persisted_root_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store: SharedStore = Arc::new(FsStore::open(dir.path()).unwrap());
        let registry = Registry::new();
        let issuer = InternalIssuer::open(store.clone(), registry.clone())
            .await
            .unwrap();
        let token = CancellationToken::new();
        let c = cert("localhost", &["localhost", "127.0.0.1", "::1"]);
        let task = issuer.start(vec![c.clone()], token.clone()).await;
        let served = registry.get("localhost").unwrap();
        let first_serial = served.summary().serial.clone();

        let root = store
            .get(keys::INTERNAL_ROOT_CERT)
            .await
            .unwrap()
            .unwrap()
            .value;
        let root_der: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(&root).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(root_der).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let pem = stored_status(store.as_ref(), "localhost").await.unwrap();
        let leaf: rustls_pki_types::CertificateDer<'static> =
            rustls_pki_types::pem::PemObject::from_pem_slice(&pem.chain_pem).unwrap();
        for name in ["localhost", "127.0.0.1", "::1"] {
            let server = rustls_pki_types::ServerName::try_from(name).unwrap();
            verifier
                .verify_server_cert(&leaf, &[], &server, &[], rustls_pki_types::UnixTime::now())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let left = pem.leaf.not_after - OffsetDateTime::now_utc();
        assert!(left <= LEAF_LIFETIME && left > LEAF_LIFETIME - time::Duration::minutes(1));
        assert!(issuer.status()["localhost"].next_renewal.is_some());
        token.cancel();
        task.await.unwrap();

        // Same CA, same leaf after a restart; a changed name list gets a new leaf from the same root.
        drop(issuer);
        let registry2 = Registry::new();
        let again = InternalIssuer::open(store.clone(), registry2.clone())
            .await
            .unwrap();
        assert_eq!(again.root_pem().as_bytes(), root.as_slice());
        let token = CancellationToken::new();
        again.start(vec![c], token.clone()).await;
        assert_eq!(
            registry2.get("localhost").unwrap().summary().serial,
            first_serial
        );
        again
            .start(vec![cert("localhost", &["localhost"])], token.clone())
            .await;
        assert_ne!(
            registry2.get("localhost").unwrap().summary().serial,
            first_serial
        );
        token.cancel();
    }
}
