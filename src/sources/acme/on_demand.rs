//! On-demand certificates (`[on_demand]`): a name nobody configured, obtained when Envoy first asks for it.
//!
//! Envoy's on-demand certificate selector (`envoy.tls.certificate_selectors.on_demand_secret`, with the SNI
//! mapper) pauses a handshake whose SNI it has no certificate for and subscribes to that name over SDS.
//! The SDS side tells this module of every such name ([`Demand`]); the answer goes through the registry,
//! at once: a certificate already obtained is published under the name as Envoy spelled it; a name being
//! obtained is *expected* (streams wait for it); anything else is decided by the policy below, and a name
//! refused is *refused* in the registry, which a delta stream reports as removed: Envoy fails the waiting
//! handshake within milliseconds, and nothing reaches the CA.
//!
//! Policy for a new name, in order: the caller's node id against `allowed_nodes`; the name itself
//! (lower-cased, trailing dot removed; malformed names, IP literals and names over 253 bytes refused);
//! `allow`; `ask` (Caddy's protocol: `GET ask?domain=NAME`, any 2xx allows; allows cached for an hour,
//! denials for ten minutes; no answer is a denial, so an `ask` outage stops new names only); the hourly cap
//! on new certificates. Then the certificate joins the ACME manager like a configured one (stored,
//! renewed; renewals are not capped) with at most `max_pending` first orders in flight (more wait their
//! turn). A first order that fails refuses the name (the handshake fails rather than hanging) and the name
//! is not tried again for `retry_initial`. Every on-demand certificate is recorded under
//! `acme/<ca>/on-demand/<name>` (how it was allowed, when last requested), so a restart serves and renews
//! it again without asking anyone.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{AcmeManager, ManagedCert};
use crate::config::OnDemandConfig;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::sds::Demand;
use crate::store::{SharedStore, key_segment};
use crate::values::{DnsName, SecretName};

/// Names remembered as refused, and refusals remembered as logged, at most: made-up names cannot grow
/// memory without bound (past it, a refusal is decided again, and not logged).
const MAX_REMEMBERED: usize = 10_000;

/// How long a name is refused after `ask` did not answer (an outage, not a denial).
const ASK_OUTAGE_FOR: Duration = Duration::from_secs(10);

/// How long an `ask` allow is trusted.
const ASK_ALLOW_FOR: Duration = Duration::from_secs(3600);
/// How long an `ask` denial (or a refusal by `allow`) is remembered, and logged once.
const DENY_FOR: Duration = Duration::from_secs(600);

/// What is stored about an on-demand certificate (`acme/<ca>/on-demand/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnDemandRecord {
    /// The name (lower-case, no trailing dot).
    pub name: String,
    /// How it was allowed: `allow PATTERN`, or `allow PATTERN, ask URL`.
    pub allowed_by: String,
    /// Unix time it was first requested.
    pub first_requested: i64,
    /// Unix time an Envoy was last seen asking for it (updated at most daily).
    #[serde(default)]
    pub last_used: i64,
}

/// The on-demand certificates recorded in `store` for the CA of `keys`: (name, how it was allowed).
pub async fn recorded(
    store: &dyn crate::store::Store,
    keys: &crate::sources::keys::AcmeKeys,
) -> Vec<(String, String)> {
    let dir = format!("{}/on-demand", keys.dir());
    let mut out: Vec<(String, String)> = store
        .scan(&dir)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, e)| serde_json::from_slice::<OnDemandRecord>(&e.value).ok())
        .map(|r| (r.name, r.allowed_by))
        .collect();
    out.sort();
    out
}

/// Where one name stands.
enum Known {
    /// Its certificate is being obtained, or served (`stop` ends its renewals); last asked for at
    /// `last_used` (Unix time).
    Admitted {
        allowed_by: String,
        stop: CancellationToken,
        last_used: i64,
    },
    /// Refused until then (a denial by `ask`, a refusal by `allow`, a failed first order).
    Refused { until: Instant },
}

#[derive(Default)]
struct State {
    names: HashMap<DnsName, Known>,
    /// Spellings whose refusal was logged, until when (refusals that are not remembered as `Refused`).
    logged: HashMap<String, Instant>,
    /// `ask` allows, until when.
    ask_allowed: HashMap<DnsName, Instant>,
    /// Starts of new certificates in the last hour.
    new_in_last_hour: VecDeque<Instant>,
}

/// The on-demand issuer of one configuration; see the module docs.
pub struct OnDemand {
    config: OnDemandConfig,
    manager: Arc<AcmeManager>,
    registry: Arc<Registry>,
    store: SharedStore,
    metrics: Metrics,
    state: Mutex<State>,
    first_orders: Arc<Semaphore>,
    ask: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
    /// How long a name whose first order failed is refused.
    retry_after_failure: Duration,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for OnDemand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnDemand")
            .field("allow", &self.config.allow)
            .finish_non_exhaustive()
    }
}

/// Why a name was refused, as the metric's `reason` label says it.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    Node,
    Malformed,
    NotAllowed,
    Ask,
    HourlyCap,
    OrderFailed,
    Recently,
}

impl Refusal {
    fn label(self) -> &'static str {
        match self {
            Refusal::Node => "node_not_allowed",
            Refusal::Malformed => "malformed",
            Refusal::NotAllowed => "not_in_allow",
            Refusal::Ask => "ask_denied",
            Refusal::HourlyCap => "hourly_cap",
            Refusal::OrderFailed => "order_failed",
            Refusal::Recently => "refused_recently",
        }
    }
}

impl OnDemand {
    /// The issuer for `config`, adding its certificates to `manager` (started already). Certificates
    /// obtained before (recorded in the store) are served and renewed again at once, if `allow` still
    /// matches them. Fails only when no TLS client can be made for `ask` (no system roots).
    pub async fn start(
        config: OnDemandConfig,
        manager: Arc<AcmeManager>,
        registry: Arc<Registry>,
        store: SharedStore,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Result<Arc<OnDemand>, rustls::Error> {
        let retry_after_failure = manager.config.retry_initial;
        let on_demand = Arc::new(OnDemand {
            first_orders: Arc::new(Semaphore::new(config.max_pending)),
            config,
            manager,
            registry,
            store,
            metrics,
            state: Mutex::default(),
            ask: Client::builder(TokioExecutor::new()).build(ask_connector()?),
            retry_after_failure,
            shutdown,
        });
        on_demand.load_recorded().await;
        tokio::spawn(on_demand.clone().sweep());
        Ok(on_demand)
    }

    /// Forgets certificates no Envoy has asked for during `drop_unused_after` (default: their lifetime),
    /// checking every tenth of that period (at least every second, at most every hour), until shutdown.
    /// A certificate is in use while an Envoy subscribes to it (the on-demand selector keeps its
    /// subscription while the certificate is cached).
    async fn sweep(self: Arc<Self>) {
        let period = self
            .config
            .drop_unused_after
            .map_or(Duration::from_secs(3600), |d| d / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            let now = now_unix();
            let mut used = Vec::new();
            let mut unused = Vec::new();
            {
                let mut state = self.lock();
                for (name, known) in state.names.iter_mut() {
                    let Known::Admitted {
                        last_used, stop, ..
                    } = known
                    else {
                        continue;
                    };
                    let asked = std::iter::once(name.to_string())
                        .chain(self.registry.spellings(name))
                        .any(|s| self.registry.subscribers(&s) > 0);
                    if asked {
                        if now - *last_used > 86_400 {
                            used.push(name.clone());
                        }
                        *last_used = now;
                        continue;
                    }
                    let Some(version) = self.registry.get(name) else {
                        continue; // not obtained yet
                    };
                    let summary = version.summary();
                    let lifetime = match (summary.not_before, summary.not_after) {
                        (Some(a), Some(b)) => Duration::try_from(b - a).unwrap_or_default(),
                        _ => continue,
                    };
                    let limit = self.config.drop_unused_after.unwrap_or(lifetime);
                    let idle = Duration::from_secs(u64::try_from(now - *last_used).unwrap_or(0));
                    if idle > limit {
                        stop.cancel();
                        unused.push((name.clone(), limit));
                    }
                }
                for (name, _) in &unused {
                    state.names.remove(name);
                }
                let now_i = Instant::now();
                state
                    .names
                    .retain(|_, k| !matches!(k, Known::Refused { until } if *until <= now_i));
                state.ask_allowed.retain(|_, until| *until > now_i);
            }
            for name in used {
                self.record_use(&name, now).await;
            }
            for (name, limit) in unused {
                self.drop_certificate(&name, limit).await;
            }
        }
    }

    /// Notes in the store that `name` is in use (so that a restart does not take it for unused).
    async fn record_use(&self, name: &DnsName, now: i64) {
        let key = self.record_key(name);
        if let Ok(Some(entry)) = self.store.get(&key).await
            && let Ok(mut record) = serde_json::from_slice::<OnDemandRecord>(&entry.value)
        {
            record.last_used = now;
            if let Ok(value) = serde_json::to_vec(&record) {
                let _ = self.store.put(&key, &value).await;
            }
        }
    }

    /// Stops serving and renewing `name` and forgets it (record, certificate, plan, order): asked for
    /// again, it is a new name.
    async fn drop_certificate(&self, name: &DnsName, limit: Duration) {
        for spelling in std::iter::once(name.to_string()).chain(self.registry.spellings(name)) {
            self.registry.withdraw(&spelling);
        }
        let keys = &self.manager.keys;
        for key in [
            self.record_key(name),
            keys.cert(name),
            keys.state(name),
            keys.order(name),
        ] {
            if let Err(e) = self.store.delete(&key).await {
                tracing::warn!(name = %name, key, error = %e, "cannot forget an unused on-demand certificate");
            }
        }
        self.metrics.count_on_demand("dropped");
        tracing::info!(
            name = %name,
            unused_for_secs = limit.as_secs(),
            "on-demand certificate not asked for within on_demand.drop_unused_after: no longer renewed, and forgotten"
        );
    }

    fn record_key(&self, name: &DnsName) -> String {
        format!(
            "{}/on-demand/{}",
            self.manager.keys.dir(),
            key_segment(name)
        )
    }

    /// Serves and renews every certificate obtained on demand before.
    async fn load_recorded(self: &Arc<Self>) {
        let dir = format!("{}/on-demand", self.manager.keys.dir());
        let Ok(records) = self.store.scan(&dir).await else {
            tracing::warn!(
                "cannot read the on-demand certificates obtained before; they are obtained again when requested"
            );
            return;
        };
        for (_, entry) in records {
            let Ok(record) = serde_json::from_slice::<OnDemandRecord>(&entry.value) else {
                continue;
            };
            let Ok(name) = DnsName::new(&record.name) else {
                continue;
            };
            if self.allowed_by(&name).is_none() {
                tracing::info!(name = %name, "on-demand certificate no longer matches [on_demand] allow: not served or renewed");
                continue;
            }
            let last_used = record.last_used.max(record.first_requested);
            self.admit(name, record.allowed_by, last_used, false).await;
        }
    }

    /// The `allow` pattern `name` matches, if any.
    fn allowed_by(&self, name: &DnsName) -> Option<String> {
        self.config
            .allow
            .iter()
            .find(|p| p.matches(name))
            .map(|p| format!("allow {p}"))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses `spelling` (and, for a known name, every spelling it was asked under), with one log line per
    /// name and refusal period.
    fn refuse(&self, spelling: &str, name: Option<&DnsName>, why: Refusal, detail: &str) {
        self.metrics.count_on_demand(why.label());
        self.registry.refuse(spelling);
        if let Some(name) = name {
            self.registry.refuse(name);
            for s in self.registry.spellings(name) {
                self.registry.refuse(&s);
            }
            self.registry.forget_aliases(name);
        }
        // Logged once per spelling and refusal period, whatever a client sends how often (and the
        // memory of what was logged is bounded: past its size, nothing more is logged until it empties).
        let log = {
            let mut state = self.lock();
            let now = Instant::now();
            state.logged.retain(|_, until| *until > now);
            let fresh = !state.logged.contains_key(spelling) && state.logged.len() < MAX_REMEMBERED;
            if fresh {
                state.logged.insert(spelling.to_owned(), now + DENY_FOR);
            }
            fresh
        };
        if log {
            tracing::warn!(
                name = spelling,
                reason = why.label(),
                "on-demand certificate refused: {detail}"
            );
        }
    }

    /// Starts serving (and, when needed, obtaining) `name`'s certificate.
    async fn admit(self: &Arc<Self>, name: DnsName, allowed_by: String, last_used: i64, new: bool) {
        let Ok(secret) = SecretName::new(&name) else {
            return;
        };
        // Followed before the manager publishes anything, so that every spelling gets the certificate.
        self.registry.follow_aliases(&name);
        if new {
            self.metrics.count_on_demand("admitted");
            let record = OnDemandRecord {
                name: name.to_string(),
                allowed_by: allowed_by.clone(),
                first_requested: last_used,
                last_used,
            };
            if let Ok(value) = serde_json::to_vec(&record)
                && let Err(e) = self.store.put(&self.record_key(&name), &value).await
            {
                tracing::warn!(name = %name, error = %e, "cannot record the on-demand certificate; after a restart it is obtained again when requested");
            }
        }
        let cert = ManagedCert {
            name: secret,
            domains: vec![name.clone()],
            key_type: self.config.key_type,
            temporary: false,
            challenge: crate::values::Challenge::Http01,
        };
        let Some(stop) = self.manager.add(cert).await else {
            return;
        };
        self.lock().names.insert(
            name,
            Known::Admitted {
                allowed_by,
                stop,
                last_used,
            },
        );
    }

    /// Decides a name that passed `allow` (ask, hourly cap), then obtains it.
    async fn decide(self: Arc<Self>, spelling: String, name: DnsName, allowed_by: String) {
        let mut allowed_by = allowed_by;
        if let Some(url) = self.config.ask.clone() {
            let cached = self
                .lock()
                .ask_allowed
                .get(&name)
                .is_some_and(|until| *until > Instant::now());
            if !cached {
                match self.ask(&url, &name).await {
                    Ok(()) => {
                        self.lock()
                            .ask_allowed
                            .insert(name.clone(), Instant::now() + ASK_ALLOW_FOR);
                    }
                    Err((why, answered)) => {
                        // A denial is remembered ten minutes; an outage only briefly, so that names
                        // are admitted again soon after `ask` is back.
                        let hold = if answered { DENY_FOR } else { ASK_OUTAGE_FOR };
                        self.lock().names.insert(
                            name.clone(),
                            Known::Refused {
                                until: Instant::now() + hold,
                            },
                        );
                        self.refuse(&spelling, Some(&name), Refusal::Ask, &why);
                        return;
                    }
                }
            }
            allowed_by = format!("{allowed_by}, ask {url}");
        }
        {
            let mut state = self.lock();
            let hour_ago = Instant::now().checked_sub(Duration::from_secs(3600));
            while state
                .new_in_last_hour
                .front()
                .is_some_and(|t| hour_ago.is_some_and(|h| *t < h))
            {
                state.new_in_last_hour.pop_front();
            }
            if state.new_in_last_hour.len() >= self.config.max_new_per_hour as usize {
                // Refused for a minute (then decided again: the hour moves on).
                state.names.insert(
                    name.clone(),
                    Known::Refused {
                        until: Instant::now() + Duration::from_secs(60),
                    },
                );
                drop(state);
                self.refuse(
                    &spelling,
                    Some(&name),
                    Refusal::HourlyCap,
                    &format!(
                        "{} new certificates in the last hour already (on_demand.max_new_per_hour)",
                        self.config.max_new_per_hour
                    ),
                );
                return;
            }
            state.new_in_last_hour.push_back(Instant::now());
        }
        // At most max_pending first orders at once; the permit is held until the first outcome.
        let Ok(_permit) = self.first_orders.clone().acquire_owned().await else {
            return;
        };
        let mut outcomes = self.manager.outcomes();
        tracing::info!(name = %name, requested_as = spelling, allowed_by, "obtaining an on-demand certificate");
        self.admit(name.clone(), allowed_by, now_unix(), true).await;
        if self.registry.get(&name).is_some() {
            return; // stored already (another replica obtained it): served at once.
        }
        loop {
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                o = outcomes.recv() => o,
            };
            match outcome {
                Ok((n, Ok(()))) if n == name.as_str() => return,
                Ok((n, Err(e))) if n == name.as_str() => {
                    // The handshake fails now rather than waiting for the retry; the name is not ordered
                    // again for a while.
                    let stop = {
                        let mut state = self.lock();
                        let old = state.names.insert(
                            name.clone(),
                            Known::Refused {
                                until: Instant::now() + self.retry_after_failure,
                            },
                        );
                        match old {
                            Some(Known::Admitted { stop, .. }) => Some(stop),
                            _ => None,
                        }
                    };
                    if let Some(stop) = stop {
                        stop.cancel();
                    }
                    let _ = self.store.delete(&self.record_key(&name)).await;
                    self.refuse(
                        &spelling,
                        Some(&name),
                        Refusal::OrderFailed,
                        &format!("the first order failed: {e}"),
                    );
                    return;
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if self.registry.get(&name).is_some() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Asks the `ask` endpoint about `name`: `Ok` for a 2xx answer within `ask_timeout`.
    /// `Err((why, answered))`: `answered` when `ask` said no (rather than not answering).
    async fn ask(&self, url: &str, name: &DnsName) -> Result<(), (String, bool)> {
        let sep = if url.contains('?') { '&' } else { '?' };
        let uri: hyper::Uri = format!("{url}{sep}domain={name}")
            .parse()
            .map_err(|e| (format!("ask URL: {e}"), false))?;
        let request = hyper::Request::get(uri)
            .body(Empty::<Bytes>::new())
            .map_err(|e| (e.to_string(), false))?;
        let answer = tokio::time::timeout(self.config.ask_timeout, async {
            let resp = self.ask.request(request).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            Ok::<_, String>(status)
        })
        .await;
        match answer {
            Ok(Ok(status)) if status.is_success() => Ok(()),
            Ok(Ok(status)) => Err((format!("ask answered {status}"), true)),
            Ok(Err(e)) => Err((format!("ask failed: {e}"), false)),
            Err(_) => Err((
                format!(
                    "ask did not answer within {:?} (on_demand.ask_timeout)",
                    self.config.ask_timeout
                ),
                false,
            )),
        }
    }

    /// The on-demand certificates and how each was allowed.
    pub fn admitted(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .lock()
            .names
            .iter()
            .filter_map(|(name, k)| match k {
                Known::Admitted { allowed_by, .. } => Some((name.to_string(), allowed_by.clone())),
                Known::Refused { .. } => None,
            })
            .collect();
        out.sort();
        out
    }
}

impl Demand for Arc<OnDemand> {
    fn requested(&self, spelling: &str, node_id: Option<&str>) {
        if let Some(nodes) = &self.config.allowed_nodes
            && !node_id.is_some_and(|n| nodes.iter().any(|p| p.matches(n)))
        {
            self.refuse(
                spelling,
                None,
                Refusal::Node,
                "the Envoy's node id does not match on_demand.allowed_nodes",
            );
            return;
        }
        let name = match DnsName::new(spelling) {
            Ok(n) => n,
            Err(why) => {
                self.refuse(spelling, None, Refusal::Malformed, &why);
                return;
            }
        };
        let mut state = self.lock();
        match state.names.get_mut(&name) {
            Some(Known::Admitted { last_used, .. }) => {
                *last_used = now_unix();
                self.registry.expect_soon(spelling);
                self.registry.alias(spelling, &name);
                return;
            }
            Some(Known::Refused { until }) if *until > Instant::now() => {
                drop(state);
                self.refuse(spelling, None, Refusal::Recently, "refused recently");
                return;
            }
            _ => {}
        }
        let Some(allowed_by) = self.allowed_by(&name) else {
            if state.names.len() < MAX_REMEMBERED {
                state.names.insert(
                    name.clone(),
                    Known::Refused {
                        until: Instant::now() + DENY_FOR,
                    },
                );
            }
            drop(state);
            self.refuse(
                spelling,
                Some(&name),
                Refusal::NotAllowed,
                "the name matches nothing in on_demand.allow",
            );
            return;
        };
        // Admitted for now (so that concurrent requests wait for this decision rather than repeat it);
        // `decide` refuses it if `ask` or the cap says no.
        state.names.insert(
            name.clone(),
            Known::Admitted {
                allowed_by: allowed_by.clone(),
                stop: CancellationToken::new(),
                last_used: now_unix(),
            },
        );
        drop(state);
        self.registry.expect_soon(spelling);
        self.registry.alias(spelling, &name);
        tokio::spawn(self.clone().decide(spelling.to_owned(), name, allowed_by));
    }
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The `ask` client: `http://`, or `https://` verified with the system's roots.
fn ask_connector() -> Result<hyper_rustls::HttpsConnector<HttpConnector>, rustls::Error> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_platform_verifier()?
        .with_no_client_auth();
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build())
}
