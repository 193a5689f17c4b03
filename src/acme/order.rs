//! One certificate's issuance: new order, HTTP-01 challenges, finalize with our own key, download.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus, RetryPolicy,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{ManagedCert, StoredCert};
use crate::certs::MaterialError;
use crate::config::KeyType;
use crate::http01::challenge_key;
use crate::store::{SharedStore, StoreError};

/// Why an order failed.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("{stage}: {source}")]
    Acme {
        stage: &'static str,
        #[source]
        source: instant_acme::Error,
    },
    #[error("{domain}: validation failed: {detail}")]
    Invalid { domain: String, detail: String },
    #[error("generating the {0} key: {1}")]
    Key(&'static str, String),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("the CA returned an unusable certificate: {0}")]
    Material(#[from] MaterialError),
    #[error("{0}")]
    Other(String),
}

impl OrderError {
    pub(super) fn acme(stage: &'static str, source: instant_acme::Error) -> Self {
        OrderError::Acme { stage, source }
    }

    /// Whether the CA no longer knows our account (a reset test CA, a deactivated account).
    pub fn account_gone(&self) -> bool {
        matches!(self, OrderError::Acme { source: instant_acme::Error::Api(p), .. }
            if p.r#type.as_deref().is_some_and(|t| t.ends_with(":accountDoesNotExist")))
    }

    /// A minimum wait the CA asked for. instant-acme does not surface Retry-After headers, so a rate-limit
    /// problem gets a conservative hour.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            OrderError::Acme {
                source: instant_acme::Error::Api(p),
                ..
            } if p
                .r#type
                .as_deref()
                .is_some_and(|t| t.ends_with(":rateLimited")) =>
            {
                Some(Duration::from_secs(3600))
            }
            _ => None,
        }
    }
}

/// The status label of an ACME action: `ok`, the problem type (`rateLimited`, `badNonce`, ...), or `error`.
pub(super) fn outcome<T>(r: &Result<T, instant_acme::Error>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(instant_acme::Error::Api(p)) => {
            match p.r#type.as_deref().and_then(|t| t.rsplit(':').next()) {
                Some("rateLimited") => "rateLimited",
                Some("badNonce") => "badNonce",
                Some("connection") => "connection",
                Some("unauthorized") => "unauthorized",
                Some("accountDoesNotExist") => "accountDoesNotExist",
                Some("serverInternal") => "serverInternal",
                _ => "problem",
            }
        }
        Err(_) => "error",
    }
}

/// Runs one ACME action, recording its duration and outcome.
async fn timed<T>(
    action: &'static str,
    fut: impl std::future::Future<Output = Result<T, instant_acme::Error>>,
) -> Result<T, instant_acme::Error> {
    let started = std::time::Instant::now();
    let r = fut.await;
    crate::metrics::observe_acme(action, outcome(&r), started);
    r
}

/// How long to wait for the CA to validate, and to issue: first look after 50 ms, then doubling (a CA that
/// answers fast is not kept waiting; a slow one sees a handful of polls, and its Retry-After is honoured).
const POLL: RetryPolicy = RetryPolicy::new()
    .initial_delay(Duration::from_millis(50))
    .backoff(2.0)
    .timeout(Duration::from_secs(120));

pub(super) fn leaf_der(chain_pem: &str) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()?
        .ok()
}

/// Removes published challenges from the store (after the order ends, however it ends).
pub(super) async fn withdraw_challenges(store: &SharedStore, tokens: &[String]) {
    for token in tokens {
        if let Err(e) = store.delete(&challenge_key(token)).await {
            tracing::warn!(token, error = %e, "cannot withdraw a pending challenge");
        }
    }
}

/// Generates the certificate key; returns it as PKCS#8 PEM, with the rcgen key pair that signs the CSR.
fn generate_key(key_type: KeyType) -> Result<rcgen::KeyPair, OrderError> {
    let name = key_type.as_str();
    let err = |e: &dyn std::fmt::Display| OrderError::Key(name, e.to_string());
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

/// Runs one order to completion. Every token published is pushed onto `tokens` so the caller can withdraw
/// them whatever happens (also when this future is dropped). Returns (chain PEM, key PEM).
pub(super) async fn run(
    account: &Account,
    cert: &ManagedCert,
    current: Option<&StoredCert>,
    store: &SharedStore,
    tokens: &mut Vec<String>,
) -> Result<(String, String), OrderError> {
    let ids: Vec<Identifier> = cert
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.clone()))
        .collect();
    // ARI: name the certificate this order replaces, when the CA supports it (exempt from rate limits).
    let replaced = current
        .filter(|c| c.matches(cert))
        .and_then(|c| leaf_der(&c.chain_pem));
    let replaces = replaced
        .as_ref()
        .and_then(|der| instant_acme::CertificateIdentifier::try_from(der).ok());
    let mut order = match replaces {
        Some(id) => {
            match timed(
                "new_order",
                account.new_order(&NewOrder::new(&ids).replaces(id)),
            )
            .await
            {
                Err(instant_acme::Error::Unsupported(_)) => {
                    timed("new_order", account.new_order(&NewOrder::new(&ids))).await
                }
                other => other,
            }
        }
        None => timed("new_order", account.new_order(&NewOrder::new(&ids))).await,
    }
    .map_err(|e| OrderError::acme("creating the order", e))?;
    tracing::info!(secret = %cert.name, domains = ?cert.domains, order = order.url(), "order created");

    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| OrderError::acme("fetching an authorization", e))?;
        let domain = authz.identifier().to_string();
        match authz.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(OrderError::Invalid {
                    domain,
                    detail: format!("authorization is {other:?}"),
                });
            }
        }
        let mut challenge =
            authz
                .challenge(ChallengeType::Http01)
                .ok_or_else(|| OrderError::Invalid {
                    domain: domain.clone(),
                    detail: "the CA offers no http-01 challenge".into(),
                })?;
        let token = challenge.token.clone();
        let key_auth = challenge.key_authorization();
        store
            .put(&challenge_key(&token), key_auth.as_str().as_bytes())
            .await?;
        tokens.push(token.clone());
        tracing::info!(secret = %cert.name, domain, token, "HTTP-01 challenge published");
        timed("challenge", challenge.set_ready())
            .await
            .map_err(|e| OrderError::acme("asking the CA to validate", e))?;
    }

    let status = timed("validation", order.poll_ready(&POLL))
        .await
        .map_err(|e| OrderError::acme("waiting for validation", e))?;
    if status == OrderStatus::Invalid {
        return Err(invalid_detail(&mut order).await);
    }
    tracing::info!(secret = %cert.name, domains = ?cert.domains, "domains validated");

    let key_type = cert.key_type;
    let key = tokio::task::spawn_blocking(move || generate_key(key_type))
        .await
        .map_err(|e| OrderError::Other(e.to_string()))??;
    let mut params = rcgen::CertificateParams::new(cert.domains.clone())
        .map_err(|e| OrderError::Other(format!("CSR: {e}")))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| OrderError::Other(format!("CSR: {e}")))?;
    timed("finalize", order.finalize_csr(csr.der()))
        .await
        .map_err(|e| OrderError::acme("finalizing the order", e))?;
    let chain = timed("certificate", order.poll_certificate(&POLL))
        .await
        .map_err(|e| OrderError::acme("downloading the certificate", e))?;
    Ok((chain, key.serialize_pem()))
}

/// The most useful reason an invalid order gives: the first failed challenge's error.
async fn invalid_detail(order: &mut instant_acme::Order) -> OrderError {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let domain = authz.identifier().to_string();
        if let Ok(state) = authz.refresh().await
            && state.status == AuthorizationStatus::Invalid
        {
            let detail = state
                .challenges
                .iter()
                .find_map(|c| c.error.as_ref().map(|p| p.to_string()))
                .unwrap_or_else(|| "authorization invalid".into());
            return OrderError::Invalid { domain, detail };
        }
    }
    OrderError::Invalid {
        domain: "order".into(),
        detail: "the CA marked the order invalid".into(),
    }
}
