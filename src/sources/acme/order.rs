//! One certificate's issuance: new order (or the stored one, resumed), challenges (HTTP-01 and TLS-ALPN-01 key
//! authorizations in the store, DNS-01 records in the zone), finalize with our own key, download.
//!
//! Each request to the CA is retried on its own when the failure is transient (badNonce past instant-acme's
//! own three tries, a 5xx, a reset connection, a timeout): a few attempts, 0.25 s doubling to 8 s with
//! jitter, or exactly the CA's `Retry-After` when it asks for 30 s or less. Only what is left after that
//! fails the order into the long backoff ([`super::schedule`]).
//!
//! The order's URL is stored the moment the CA creates it, and the certificate key before finalization
//! ([`OrderRecord`]), so an order survives a crash or a failed store write: the next attempt resumes it
//! where it stopped (a ready certificate is downloaded, not ordered again).

use std::sync::Arc;
use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeStatus, ChallengeType, Identifier, NewOrder,
    OrderStatus, RetryPolicy,
};
use rand::Rng;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use super::dns01::{Dns01, TxtRecord};
use super::{ManagedCert, StoredCert};
use crate::certs::MaterialError;
use crate::metrics::Metrics;
use crate::sources::keys;
use crate::sources::keys::AcmeKeys;
use crate::store::{Lock, SharedStore, StoreError};
use crate::values::{Challenge, KeyType, SecretId, same_names, to_strings};

/// Attempts per request to the CA.
const ATTEMPTS: u32 = 6;
/// Attempts per request when the CA does not answer at all within `request_timeout`: each costs the whole
/// timeout, and a CA that hangs once usually hangs again.
const ATTEMPTS_AFTER_TIMEOUT: u32 = 2;
/// Longest `Retry-After` waited for inside an order; a longer one fails the order into its backoff.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Why an order failed, in the terms a caller acts on: the CA said no ([`OrderError::Refused`]: a rate
/// limit, a gone account, a rejected request), the CA could not be heard from ([`OrderError::Unreachable`]),
/// the CA took too long ([`OrderError::TimedOut`]: the order may still complete, so it is resumed), a
/// name did not validate, or something on this side (key, storage, the certificate it sent) went wrong.
#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    /// The CA answered with a problem document (RFC 8555 section 6.7).
    #[error("{stage}: {source}")]
    Refused {
        /// What was being asked.
        stage: &'static str,
        #[source]
        /// The CA's answer.
        source: instant_acme::Error,
    },
    /// No answer from the CA: connection refused or reset, DNS, TLS, an HTTP error without a problem
    /// document.
    #[error("{stage}: {source}")]
    Unreachable {
        /// What was being asked.
        stage: &'static str,
        #[source]
        /// What went wrong on the way.
        source: instant_acme::Error,
    },
    /// A request to the CA, or the wait for it to validate or issue, ran past its deadline.
    #[error("{stage}: {source}")]
    TimedOut {
        /// What was being waited for.
        stage: &'static str,
        #[source]
        /// The timeout.
        source: instant_acme::Error,
    },
    /// The whole order ran past its deadline (20 request timeouts).
    #[error("the CA did not complete the order within {}s", .0.as_secs_f32())]
    OrderTimedOut(Duration),
    #[error("{domain}: validation failed: {detail}")]
    /// A name did not validate.
    Invalid {
        /// The name.
        domain: String,
        /// What the CA said.
        detail: String,
        /// The validation could not reach the name at all (the CA's `connection` problem).
        unreachable: bool,
    },
    #[error("generating the {0} key: {1}")]
    /// The certificate key could not be generated (key type, why).
    Key(&'static str, String),
    #[error("storage: {0}")]
    /// The store failed.
    Store(#[from] StoreError),
    #[error("the CA returned an unusable certificate: {0}")]
    /// The CA sent a certificate that does not check out.
    Material(#[from] MaterialError),
    /// Building the certificate signing request failed.
    #[error("CSR: {0}")]
    Csr(String),
    /// Adding, checking or removing a DNS-01 record failed (the order itself can be resumed).
    #[error("DNS-01: {0}")]
    Dns(#[from] super::dns01::DnsError),
    /// A certificate uses DNS-01 and `[dns01]` is not configured.
    #[error("challenge = \"dns-01\" needs a [dns01] table")]
    NoDns01,
    /// acme-sds is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    #[error("{0}")]
    /// Anything else (an order the CA left in an unexpected state).
    Other(String),
    /// Loading or creating the account failed (shared by every task that was waiting for it).
    #[error("{0}")]
    Account(std::sync::Arc<OrderError>),
}

impl OrderError {
    /// A failed request to the CA, sorted by what it means: refused, timed out, or not reached.
    pub(super) fn acme(stage: &'static str, source: instant_acme::Error) -> Self {
        use instant_acme::Error;
        match &source {
            Error::Api(_) => OrderError::Refused { stage, source },
            Error::Timeout(_) => OrderError::TimedOut { stage, source },
            Error::Other(inner) if inner.is::<super::http::CaTimeout>() => {
                OrderError::TimedOut { stage, source }
            }
            _ => OrderError::Unreachable { stage, source },
        }
    }

    /// The stage and the CA's error, for a failed request to the CA.
    fn ca_error(&self) -> Option<(&'static str, &instant_acme::Error)> {
        match self {
            OrderError::Refused { stage, source }
            | OrderError::Unreachable { stage, source }
            | OrderError::TimedOut { stage, source } => Some((stage, source)),
            _ => None,
        }
    }

    /// The error itself, through a shared account failure.
    fn root(&self) -> &OrderError {
        match self {
            OrderError::Account(inner) => inner.root(),
            other => other,
        }
    }

    /// The CA's problem type, without the `urn:ietf:params:acme:error:` prefix.
    fn problem(&self) -> Option<&str> {
        match self.root() {
            OrderError::Refused {
                source: instant_acme::Error::Api(p),
                ..
            } => p.r#type.as_deref().and_then(|t| t.rsplit(':').next()),
            _ => None,
        }
    }

    /// Whether the CA no longer knows our account (a reset test CA, a deactivated account).
    pub fn account_gone(&self) -> bool {
        self.problem() == Some("accountDoesNotExist")
    }

    /// Whether the CA refused a rate limit: the order waits at least an hour, or what the CA asked.
    pub fn rate_limited(&self) -> bool {
        self.problem() == Some("rateLimited")
    }

    /// Whether the validation could not connect to the name: typically Envoy (whose port 80 the CA
    /// validates through) not listening yet, when both were started at the same moment.
    pub fn unreachable(&self) -> bool {
        matches!(
            self.root(),
            OrderError::Invalid {
                unreachable: true,
                ..
            }
        ) || self.problem() == Some("connection")
    }

    /// Whether the order it ended can still be resumed: the CA or the path to it had trouble (or the store
    /// did), as opposed to the order itself failing (validation, a refusal, an unusable certificate), after
    /// which a new order is needed.
    pub fn resumable(&self) -> bool {
        match self.root() {
            // A CA slow to validate or to issue (our polling gave up) may still finish the order.
            OrderError::TimedOut { .. } | OrderError::OrderTimedOut(_) => true,
            OrderError::Refused { source, .. } | OrderError::Unreachable { source, .. } => {
                transient(source)
            }
            OrderError::Store(_) | OrderError::Other(_) | OrderError::ShuttingDown => true,
            // The CA was not asked to validate yet (or the record was served): the order is still good.
            OrderError::Dns(_) | OrderError::NoDns01 => true,
            OrderError::Account(_) => true,
            OrderError::Invalid { .. }
            | OrderError::Key(..)
            | OrderError::Material(_)
            | OrderError::Csr(_) => false,
        }
    }
}

/// Whether a failed request to the CA is worth repeating at once: the CA or the path to it had a hiccup.
pub(super) fn transient(e: &instant_acme::Error) -> bool {
    use instant_acme::Error;
    match e {
        Error::Api(p) => {
            matches!(
                p.r#type.as_deref().and_then(|t| t.rsplit(':').next()),
                Some("badNonce" | "serverInternal")
            ) || p.status.is_some_and(|s| s >= 500)
        }
        // Connections refused or reset, timeouts (ours: `http::CaTimeout`), a proxy's HTML error page,
        // a response missing a nonce.
        Error::Hyper(_) | Error::Http(_) | Error::Other(_) | Error::Json(_) | Error::Str(_) => true,
        _ => false,
    }
}

/// Whether to try again after attempt number `attempt` failed with `e`.
pub(super) fn again(e: &instant_acme::Error, attempt: u32) -> bool {
    let timed_out =
        matches!(e, instant_acme::Error::Other(inner) if inner.is::<super::http::CaTimeout>());
    let limit = if timed_out {
        ATTEMPTS_AFTER_TIMEOUT
    } else {
        ATTEMPTS
    };
    attempt < limit && transient(e)
}

/// The delay before attempt `attempt + 1`: 0.25 s doubling to 8 s, between 50% and 100% of it.
pub(super) fn backoff(attempt: u32) -> Duration {
    let ms = (250u64 << attempt.saturating_sub(1).min(5)).min(8_000);
    Duration::from_millis(rand::rng().random_range(ms / 2..=ms))
}

/// What is stored about an order in progress (`acme/<ca>/orders/<name>`), so that it can be resumed.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct OrderRecord {
    pub url: String,
    pub domains: Vec<String>,
    pub key_type: KeyType,
    /// The certificate key, PKCS#8 PEM, once made (before finalization: the certificate will be for it).
    #[serde(default)]
    pub key_pem: Option<zeroize::Zeroizing<String>>,
}

impl std::fmt::Debug for OrderRecord {
    // The key never appears in a debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrderRecord")
            .field("url", &self.url)
            .field("domains", &self.domains)
            .field("key_type", &self.key_type)
            .finish_non_exhaustive()
    }
}

impl OrderRecord {
    fn matches(&self, cert: &ManagedCert) -> bool {
        same_names(&self.domains, &cert.domains) && self.key_type == cert.key_type
    }
}

/// What an order works with: the store (written only under `lock`, the certificate's), its key layout,
/// the metrics, how long a published challenge may outlive a replica that crashed, and where DNS-01
/// records go.
pub(super) struct OrderCtx<'a> {
    pub store: &'a SharedStore,
    pub keys: &'a AcmeKeys,
    pub metrics: &'a Metrics,
    pub lock: &'a Lock,
    pub challenge_ttl: Duration,
    pub dns: Option<&'a Dns01>,
    pub alpn_turns: &'a AlpnTurns,
}

/// What an order published, to take back however it ends: store keys (HTTP-01 and TLS-ALPN-01 key
/// authorizations) and DNS-01 records; and the TLS-ALPN-01 turns it holds until then.
#[derive(Default)]
pub(super) struct Published {
    pub keys: Vec<String>,
    pub txt: Vec<TxtRecord>,
    pub turns: Vec<tokio::sync::OwnedMutexGuard<()>>,
}

/// Turns per domain for TLS-ALPN-01 orders in this process. The CA's validation connection names only
/// the domain (its SNI), so the responder cannot tell two orders for one domain apart (two certificates
/// sharing a name): one order validates a domain at a time, the other waits for its turn instead of
/// failing. An order takes the turns of all its domains at once, in order, so two orders never wait for
/// each other.
#[derive(Default)]
pub(super) struct AlpnTurns(
    std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
);

impl AlpnTurns {
    /// Waits for the turns of `domains` (held until the guards are dropped).
    async fn take(
        &self,
        domains: &[crate::values::DnsName],
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut sorted: Vec<&str> = domains.iter().map(|d| d.as_str()).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let turns: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            // Turns nobody holds or waits for are forgotten.
            map.retain(|_, m| Arc::strong_count(m) > 1);
            sorted
                .iter()
                .map(|d| map.entry((*d).to_owned()).or_default().clone())
                .collect()
        };
        let mut held = Vec::with_capacity(turns.len());
        for t in turns {
            held.push(t.lock_owned().await);
        }
        held
    }
}

/// Stores the order record; a failure is logged and the order goes on (it just cannot be resumed).
async fn save_record(ctx: &OrderCtx<'_>, name: &SecretId, record: &OrderRecord) {
    let written = match serde_json::to_vec(record) {
        Ok(v) => ctx
            .store
            .put_locked(ctx.lock, &ctx.keys.order(name), &zeroize::Zeroizing::new(v))
            .await
            .map(|_| ()),
        Err(e) => {
            tracing::error!(secret = %name, error = %e, "cannot encode the order record");
            return;
        }
    };
    if let Err(e) = written {
        tracing::warn!(secret = %name, error = %e, "cannot store the order in progress; it cannot be resumed after a restart");
    }
}

/// The stored order record for `cert`, if there is one for its current domains and key type.
pub(super) async fn load_record(
    store: &SharedStore,
    keys: &AcmeKeys,
    cert: &ManagedCert,
) -> Option<OrderRecord> {
    let entry = store.get(&keys.order(&cert.id)).await.ok()??;
    let record: OrderRecord = serde_json::from_slice(&entry.value).ok()?;
    record.matches(cert).then_some(record)
}

/// Whether `value` is an order record for `cert`'s current domains and key type.
pub(super) fn record_matches(value: &[u8], cert: &ManagedCert) -> bool {
    serde_json::from_slice::<OrderRecord>(value).is_ok_and(|r| r.matches(cert))
}

/// Forgets the order record (the order ended, or cannot be resumed), while `lock` is held.
pub(super) async fn drop_record(
    store: &SharedStore,
    keys: &AcmeKeys,
    lock: &Lock,
    name: &SecretId,
) {
    if let Err(e) = store.delete_locked(lock, &keys.order(name)).await {
        tracing::warn!(secret = %name, error = %e, "cannot remove the finished order's record");
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
pub(super) async fn timed<T>(
    metrics: &Metrics,
    action: &'static str,
    fut: impl std::future::Future<Output = Result<T, instant_acme::Error>>,
) -> Result<T, instant_acme::Error> {
    let started = std::time::Instant::now();
    let r = fut.await;
    metrics.observe_acme(action, outcome(&r), started);
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

/// Removes published challenges (their store keys) from the store (after the order ends, however it ends).
pub(super) async fn withdraw_challenges(store: &SharedStore, published: &[String]) {
    for key in published {
        if let Err(e) = store.delete(key).await {
            tracing::warn!(key, error = %e, "cannot withdraw a pending challenge");
        }
    }
}

/// Generates the certificate key.
fn generate_key(key_type: KeyType) -> Result<rcgen::KeyPair, OrderError> {
    crate::certs::generate_key(key_type).map_err(|e| OrderError::Key(key_type.as_str(), e))
}

/// Runs one order to completion: the stored one for `cert` when there is one (resumed where it stopped),
/// else a new one. Every token published is pushed onto `tokens` so the caller can withdraw them whatever
/// happens (also when this future is dropped). Returns (chain PEM, key PEM).
pub(super) async fn run(
    account: &Account,
    cert: &ManagedCert,
    current: Option<&StoredCert>,
    ctx: &OrderCtx<'_>,
    published: &mut Published,
) -> Result<(String, String), OrderError> {
    let (store, keys, metrics) = (ctx.store, ctx.keys, ctx.metrics);
    let mut record = load_record(store, keys, cert).await;
    let mut order = None;
    if let Some(r) = &record {
        match retrying!(metrics, "order", account.order(r.url.clone())) {
            Ok(mut o) => {
                if o.state().status == OrderStatus::Invalid {
                    // It failed while nobody was watching (a crash before the failure was recorded): that is
                    // this attempt's failure, with its backoff. Placing a new order at once would let a crash
                    // loop order as fast as it restarts.
                    tracing::info!(secret = %cert.id, order = r.url, "the stored order has failed");
                    drop_record(store, keys, ctx.lock, &cert.id).await;
                    return Err(invalid_detail(&mut o).await);
                }
                tracing::info!(secret = %cert.id, order = r.url, "resuming the order in progress");
                order = Some(o);
            }
            Err(e) => {
                tracing::info!(secret = %cert.id, order = r.url, error = %e, "the stored order cannot be resumed; placing a new one");
                drop_record(store, keys, ctx.lock, &cert.id).await;
                record = None;
            }
        }
    }
    let mut order = match order {
        Some(o) => o,
        None => {
            let o = new_order(account, cert, current, metrics).await?;
            let r = OrderRecord {
                url: o.url().to_owned(),
                domains: to_strings(&cert.domains),
                key_type: cert.key_type,
                key_pem: None,
            };
            save_record(ctx, &cert.id, &r).await;
            record = Some(r);
            tracing::info!(secret = %cert.id, domains = ?cert.domains, order = o.url(), "order created");
            o
        }
    };
    let mut record = record.ok_or_else(|| OrderError::Other("order record missing".into()))?;

    let mut status = order.state().status;
    if status == OrderStatus::Pending {
        if cert.challenge == Challenge::TlsAlpn01 && published.turns.is_empty() {
            published.turns = ctx.alpn_turns.take(&cert.domains).await;
        }
        authorize(&mut order, cert, ctx, published).await?;
        status = retrying!(metrics, "validation", order.poll_ready(&POLL))
            .map_err(|e| OrderError::acme("waiting for validation", e))?;
        if status == OrderStatus::Ready {
            tracing::info!(secret = %cert.id, domains = ?cert.domains, "domains validated");
        }
    }
    match status {
        OrderStatus::Invalid => {
            drop_record(store, keys, ctx.lock, &cert.id).await;
            return Err(invalid_detail(&mut order).await);
        }
        OrderStatus::Ready => {
            let key_type = cert.key_type;
            let key = tokio::task::spawn_blocking(move || generate_key(key_type))
                .await
                .map_err(|e| OrderError::Other(e.to_string()))??;
            let mut params = rcgen::CertificateParams::new(to_strings(&cert.domains))
                .map_err(|e| OrderError::Csr(e.to_string()))?;
            params.distinguished_name = rcgen::DistinguishedName::new();
            let csr = params
                .serialize_request(&key)
                .map_err(|e| OrderError::Csr(e.to_string()))?;
            // The certificate will be for this key: it is stored before the CA is asked for it.
            record.key_pem = Some(zeroize::Zeroizing::new(key.serialize_pem()));
            save_record(ctx, &cert.id, &record).await;
            if let Err(e) = retrying!(metrics, "finalize", order.finalize_csr(csr.der())) {
                // An earlier attempt may have reached the CA with its answer lost on the way back.
                let state = retrying!(metrics, "order", order.refresh())
                    .map_err(|_| OrderError::acme("finalizing the order", e))?;
                if !matches!(state.status, OrderStatus::Processing | OrderStatus::Valid) {
                    return Err(OrderError::Other(format!(
                        "finalizing the order: the order is {:?}",
                        state.status
                    )));
                }
            }
        }
        _ => {} // processing or valid: finalized before; the certificate is on its way.
    }
    let key_pem = record.key_pem.clone().ok_or_else(|| {
        OrderError::Other(
            "the stored order was finalized with a key that was not stored; ordering again".into(),
        )
    })?;
    let chain = retrying!(metrics, "certificate", order.poll_certificate(&POLL))
        .map_err(|e| OrderError::acme("downloading the certificate", e))?;
    Ok((chain, key_pem.to_string()))
}

/// Places a new order, naming the certificate it replaces when the CA supports ARI (exempt from Let's
/// Encrypt's rate limits). A CA that refuses `replaces` (already replaced, unknown to it) gets the order
/// without it rather than failing every renewal until expiry.
async fn new_order(
    account: &Account,
    cert: &ManagedCert,
    current: Option<&StoredCert>,
    metrics: &Metrics,
) -> Result<instant_acme::Order, OrderError> {
    let ids: Vec<Identifier> = cert
        .domains
        .iter()
        .map(|d| Identifier::Dns(d.to_string()))
        .collect();
    let replaced = current
        .filter(|c| c.matches(cert))
        .and_then(|c| leaf_der(&c.chain_pem));
    let replaces = replaced
        .as_ref()
        .and_then(|der| instant_acme::CertificateIdentifier::try_from(der).ok());
    if let Some(id) = replaces {
        let with = NewOrder::new(&ids).replaces(id);
        match retrying!(metrics, "new_order", account.new_order(&with)) {
            Ok(order) => return Ok(order),
            Err(instant_acme::Error::Unsupported(_)) => {}
            Err(e @ instant_acme::Error::Api(_)) if !transient(&e) && !is_rate_limit(&e) => {
                tracing::warn!(secret = %cert.id, error = %e, "the CA refused the order as a replacement (ARI); ordering without `replaces`");
            }
            Err(e) => return Err(OrderError::acme("creating the order", e)),
        }
    }
    retrying!(
        metrics,
        "new_order",
        account.new_order(&NewOrder::new(&ids))
    )
    .map_err(|e| OrderError::acme("creating the order", e))
}

fn is_rate_limit(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p) if p.r#type.as_deref().is_some_and(|t| t.ends_with(":rateLimited")))
}

/// Publishes every pending authorization's key authorization and asks the CA to validate it. A
/// transient failure starts the pass over (authorizations already fetched are not fetched again, and those
/// already answered are skipped).
async fn authorize(
    order: &mut instant_acme::Order,
    cert: &ManagedCert,
    ctx: &OrderCtx<'_>,
    published: &mut Published,
) -> Result<(), OrderError> {
    let mut done = std::collections::HashSet::new();
    let mut attempt = 1u32;
    loop {
        let Err(e) = authorize_pass(order, cert, ctx, published, &mut done).await else {
            return Ok(());
        };
        match e.ca_error() {
            Some((stage, source)) if again(source, attempt) => {
                let wait = backoff(attempt);
                tracing::info!(attempt, error = %source, "{stage} failed; retrying in {:.2} s", wait.as_secs_f32());
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
            _ => return Err(e),
        }
    }
}

async fn authorize_pass(
    order: &mut instant_acme::Order,
    cert: &ManagedCert,
    ctx: &OrderCtx<'_>,
    published: &mut Published,
    done: &mut std::collections::HashSet<String>,
) -> Result<(), OrderError> {
    let kind = match cert.challenge {
        Challenge::Http01 => ChallengeType::Http01,
        Challenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
        Challenge::Dns01 => ChallengeType::Dns01,
    };
    // DNS-01 records are all added first, and the CA asked once the zone serves them all: an apex and its
    // wildcard share one name, and each lookup by the CA must find its value.
    let mut added = Vec::new();
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| OrderError::acme("fetching an authorization", e))?;
        let domain = authz.identifier().to_string();
        if done.contains(&domain) {
            continue;
        }
        match authz.status {
            AuthorizationStatus::Valid => {
                done.insert(domain);
                continue;
            }
            AuthorizationStatus::Pending => {}
            other => {
                return Err(OrderError::Invalid {
                    domain,
                    detail: format!("authorization is {other:?}"),
                    unreachable: false,
                });
            }
        }
        let mut challenge = authz
            .challenge(kind.clone())
            .ok_or_else(|| OrderError::Invalid {
                domain: domain.clone(),
                detail: format!("the CA offers no {} challenge", cert.challenge.as_str()),
                unreachable: false,
            })?;
        let token = challenge.token.clone();
        let key_auth = challenge.key_authorization();
        // HTTP-01 is looked up by token, TLS-ALPN-01 by the name the CA connects with (its SNI), DNS-01 in the
        // zone.
        let key = match cert.challenge {
            Challenge::Http01 => keys::challenge(&token),
            Challenge::TlsAlpn01 => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos();
                keys::tls_alpn_challenge(&domain, u128::try_from(now).unwrap_or(0), &token)
            }
            Challenge::Dns01 => {
                // `*.example.com`'s record is `_acme-challenge.example.com` (`record_for` drops the `*.`).
                added.push(publish_txt(ctx, cert, published, &domain, key_auth.dns_value()).await?);
                tracing::info!(secret = %cert.id, domain, challenge = "dns-01", "challenge published");
                continue;
            }
        };
        // On a lease: a replica that crashes mid-order leaves nothing behind for long.
        ctx.store
            .put_expiring(&key, key_auth.as_str().as_bytes(), ctx.challenge_ttl)
            .await?;
        if !published.keys.contains(&key) {
            published.keys.push(key);
        }
        tracing::info!(secret = %cert.id, domain, token, challenge = cert.challenge.as_str(), "challenge published");
        // A resumed order's challenge may already be on its way: asking again is not needed.
        if challenge.status == ChallengeStatus::Pending {
            retrying!(ctx.metrics, "challenge", challenge.set_ready())
                .map_err(|e| OrderError::acme("asking the CA to validate", e))?;
        }
        done.insert(domain);
    }
    if added.is_empty() {
        return Ok(());
    }
    let dns = ctx.dns.ok_or(OrderError::NoDns01)?;
    let started = std::time::Instant::now();
    dns.wait_served(&added).await?;
    tracing::info!(secret = %cert.id, records = added.len(), waited_ms = started.elapsed().as_millis() as u64, "DNS-01 records served");
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(|e| OrderError::acme("fetching an authorization", e))?;
        let domain = authz.identifier().to_string();
        if done.contains(&domain) || authz.status != AuthorizationStatus::Pending {
            continue;
        }
        let Some(mut challenge) = authz.challenge(kind.clone()) else {
            continue;
        };
        if challenge.status == ChallengeStatus::Pending {
            retrying!(ctx.metrics, "challenge", challenge.set_ready())
                .map_err(|e| OrderError::acme("asking the CA to validate", e))?;
        }
        done.insert(domain);
    }
    Ok(())
}

/// Adds the DNS-01 record holding `value` for `domain` (once per order: a retried pass finds it in
/// `published`) and returns it.
async fn publish_txt(
    ctx: &OrderCtx<'_>,
    cert: &ManagedCert,
    published: &mut Published,
    domain: &str,
    value: String,
) -> Result<TxtRecord, OrderError> {
    if let Some(r) = published.txt.iter().find(|r| r.value == value) {
        return Ok(r.clone());
    }
    let dns = ctx.dns.ok_or(OrderError::NoDns01)?;
    let record = dns.record_for(domain, &value).await?;
    // Listed in the store before it is added: a crash in between leaves a listed record that is not there
    // (deleting it is harmless), never one in the zone that nobody deletes.
    published.txt.push(record.clone());
    store_dns_records(ctx.store, ctx.keys, ctx.lock, &cert.id, &published.txt).await;
    if let Err(e) = dns.add(&record).await {
        // Refused (or never sent): it is not in the zone. Without an answer, it may be.
        if !matches!(e, super::dns01::DnsError::Unreachable { .. }) {
            published.txt.pop();
            store_dns_records(ctx.store, ctx.keys, ctx.lock, &cert.id, &published.txt).await;
        }
        return Err(e.into());
    }
    Ok(record)
}

/// Stores the list of DNS-01 records added for `name` and not yet deleted (none: the list is deleted), so
/// that a crash does not leave them in the zone for good (the next attempt, here or on another replica,
/// deletes them). A failure is logged.
async fn store_dns_records(
    store: &SharedStore,
    keys: &AcmeKeys,
    lock: &Lock,
    name: &SecretId,
    records: &[TxtRecord],
) {
    let key = keys.dns_records(name);
    let written = if records.is_empty() {
        store.delete_locked(lock, &key).await
    } else {
        let value = serde_json::to_vec(records).unwrap_or_default();
        store.put_locked(lock, &key, &value).await.map(|_| ())
    };
    if let Err(e) = written {
        tracing::warn!(secret = %name, error = %e, "cannot store the list of DNS-01 records to delete; a crash now could leave them in the zone");
    }
}

/// Deletes the DNS-01 records `name`'s orders added (`extra`, and those the store lists from an earlier
/// attempt that did not finish), then forgets them. What cannot be deleted now stays listed for the next
/// attempt.
pub(super) async fn withdraw_dns_records(
    store: &SharedStore,
    keys: &AcmeKeys,
    lock: &Lock,
    dns: Option<&Dns01>,
    name: &SecretId,
    extra: &[TxtRecord],
) {
    let stored = store.get(&keys.dns_records(name)).await.ok().flatten();
    let mut records: Vec<TxtRecord> = stored
        .as_ref()
        .and_then(|e| serde_json::from_slice(&e.value).ok())
        .unwrap_or_default();
    for r in extra {
        if !records.contains(r) {
            records.push(r.clone());
        }
    }
    if records.is_empty() {
        if stored.is_some() {
            store_dns_records(store, keys, lock, name, &[]).await;
        }
        return;
    }
    let Some(dns) = dns else {
        tracing::warn!(secret = %name, records = ?records, "DNS-01 records were left in the zone by an earlier order and [dns01] is no longer configured: delete them by hand");
        return;
    };
    let mut left = Vec::new();
    for r in records {
        if let Err(e) = dns.remove(&r).await {
            tracing::warn!(secret = %name, name = r.name, error = %e, "cannot delete a DNS-01 record; trying again at the next attempt");
            left.push(r);
        }
    }
    store_dns_records(store, keys, lock, name, &left).await;
}

/// The most useful reason an invalid order gives: the first failed challenge's error.
async fn invalid_detail(order: &mut instant_acme::Order) -> OrderError {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authz)) = authorizations.next().await {
        let domain = authz.identifier().to_string();
        if let Ok(state) = authz.refresh().await
            && state.status == AuthorizationStatus::Invalid
        {
            let problem = state.challenges.iter().find_map(|c| c.error.as_ref());
            return OrderError::Invalid {
                domain,
                detail: problem
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "authorization invalid".into()),
                unreachable: problem
                    .and_then(|p| p.r#type.as_deref())
                    .is_some_and(|t| t.ends_with(":connection")),
            };
        }
    }
    OrderError::Invalid {
        domain: "order".into(),
        detail: "the CA marked the order invalid".into(),
        unreachable: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(kind: &str) -> instant_acme::Error {
        let doc = format!(
            r#"{{"type": "urn:ietf:params:acme:error:{kind}", "detail": "x", "status": 400}}"#
        );
        instant_acme::Error::Api(serde_json::from_str(&doc).unwrap())
    }

    /// What each kind of failure means for the order: a refusal by the CA is told apart from a CA that
    /// timed out (the order is resumed: the CA may still complete it) and from one that was not reached.
    #[test]
    fn failures_are_sorted_by_what_the_caller_does_next() {
        let cases: Vec<(OrderError, &str, bool)> = vec![
            (
                OrderError::acme("creating the order", problem("rateLimited")),
                "refused",
                false,
            ),
            (
                OrderError::acme("finalizing", problem("serverInternal")),
                "refused",
                true,
            ),
            (
                OrderError::acme("waiting for validation", instant_acme::Error::Timeout(None)),
                "timed out",
                true,
            ),
            (
                OrderError::acme(
                    "creating the order",
                    instant_acme::Error::Other(Box::new(super::super::http::CaTimeout {
                        request: "POST https://ca/new-order".into(),
                        deadline: Duration::from_secs(30),
                    })),
                ),
                "timed out",
                true,
            ),
            (
                OrderError::acme(
                    "fetching the directory",
                    instant_acme::Error::Str("connection refused"),
                ),
                "unreachable",
                true,
            ),
            (
                OrderError::OrderTimedOut(Duration::from_secs(600)),
                "timed out",
                true,
            ),
            (OrderError::Csr("bad name".into()), "ours", false),
        ];
        for (e, kind, resumable) in cases {
            let got = match &e {
                OrderError::Refused { .. } => "refused",
                OrderError::TimedOut { .. } | OrderError::OrderTimedOut(_) => "timed out",
                OrderError::Unreachable { .. } => "unreachable",
                _ => "ours",
            };
            assert_eq!(got, kind, "{e}");
            assert_eq!(e.resumable(), resumable, "{e}");
        }
        assert!(OrderError::acme("x", problem("rateLimited")).rate_limited());
        assert!(OrderError::acme("x", problem("accountDoesNotExist")).account_gone());
        assert!(!OrderError::acme("x", instant_acme::Error::Timeout(None)).rate_limited());
    }
}
