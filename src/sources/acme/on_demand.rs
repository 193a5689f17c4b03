//! On-demand certificates (`[on_demand]`): a name nobody configured, obtained when Envoy first asks for it.
//!
//! Envoy's on-demand certificate selector (`envoy.tls.certificate_selectors.on_demand_secret`, with the SNI
//! mapper) pauses a handshake whose SNI it has no certificate for and subscribes to that name over SDS.
//! The SDS side resolves every requested name first: a configured secret in any spelling (its name, a
//! domain of a configured certificate, lower or upper case, trailing dot) is served as that secret, under
//! its rules, and never reaches this module. Only the rest is told here ([`Demand`]), as the DNS name it
//! folds to; the answer goes through the registry, at once: a certificate already obtained is served (under
//! every spelling asked, by the registry); a name being decided or obtained is *expected* (streams wait for
//! it); anything else is decided by the policy below, and a name refused is *refused* in the registry,
//! which a delta stream reports as removed: Envoy fails the waiting handshake within milliseconds, and
//! nothing reaches the CA.
//!
//! Policy for a new name, in order: the caller's node id against `allowed_nodes`; the name itself
//! (lower-cased, trailing dot removed; malformed names, IP literals and names over 253 bytes refused);
//! `allow`; the hourly cap on new certificates, *before* `ask` (a slot of the cap is held while `ask` is
//! asked, and given back on a denial, so no more names are ever asked about than could be obtained); `ask`
//! (Caddy's protocol: `GET ask?domain=NAME`, any 2xx allows; at most `ask_concurrency` requests in flight
//! and as many again waiting, more refused for now; answers read to 4 KiB at most; allows cached for an
//! hour, denials for ten minutes; no answer is a denial, so an `ask` outage stops new names only). Then
//! the certificate joins the ACME manager like a configured one (stored, renewed; renewals are not capped)
//! with at most `max_pending` first orders in flight (more wait their turn; a turn ends with the order's
//! outcome, with the certificate arriving from another replica, or after the order's time limit). A first
//! order that fails refuses the name (the handshake fails rather than hanging) and the name is not tried
//! again for `retry_initial`.
//!
//! Everything a caller can make this module remember is bounded: names being decided by the cap (and by
//! `ask_concurrency`), refusals by [`MAX_REFUSALS`] (past it the refusal ending soonest is forgotten, and
//! that name is decided again when asked), logged refusals likewise; admitted names by the hourly cap.
//!
//! Certificates obtained on demand live in a namespace of their own, in the registry and in the store
//! (`acme/<ca>/on-demand-certs/<name>` and siblings): they can never overwrite, or be served as, a
//! configured secret, and dropping one never touches a configured secret's records. Each is recorded under
//! `acme/<ca>/on-demand/<name>` (how it was allowed, when last requested), so a restart serves and renews it
//! again without asking anyone. With several replicas, `last_used` is written often enough for every
//! replica to see the others' use, and a certificate is dropped only under its lock, after reading that no
//! replica used it within `drop_unused_after`.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
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
use crate::sds::{Demand, Policy};
use crate::store::SharedStore;
use crate::values::{DnsName, SecretId};

/// Refusals remembered at most (and refusals remembered as logged): made-up names cannot grow memory
/// without bound. Past it, the refusal that ends soonest is forgotten (that name is decided again when
/// asked for, which the cap and `ask_concurrency` still bound).
pub const MAX_REFUSALS: usize = 10_000;

/// How long a name is refused after `ask` did not answer (an outage, not a denial).
const ASK_OUTAGE_FOR: Duration = Duration::from_secs(10);
/// How long an `ask` allow is trusted.
const ASK_ALLOW_FOR: Duration = Duration::from_secs(3600);
/// How long an `ask` denial (or a refusal by `allow`) is remembered, and logged once.
const DENY_FOR: Duration = Duration::from_secs(600);
/// How long a name refused by the hourly cap is refused before it is decided again.
const CAP_FOR: Duration = Duration::from_secs(60);
/// The most of an `ask` answer's body read (only its status counts).
const ASK_BODY_LIMIT: usize = 4096;
/// How often `last_used` is written to the store at most (and at least, for a name in use): other replicas
/// judge a certificate unused from it.
const USE_RECORDED_EVERY: Duration = Duration::from_secs(86_400);

/// What is stored about an on-demand certificate (`acme/<ca>/on-demand/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OnDemandRecord {
    /// The name (lower-case, no trailing dot).
    pub name: String,
    /// How it was allowed: `allow PATTERN`, or `allow PATTERN, ask URL`.
    pub allowed_by: String,
    /// Unix time it was first requested.
    pub first_requested: i64,
    /// Unix time an Envoy was last seen asking for it (written at most daily, more often with a short
    /// `drop_unused_after`).
    #[serde(default)]
    pub last_used: i64,
}

/// The on-demand certificates recorded in `store` for the CA of `keys`: (name, how it was allowed).
pub async fn recorded(
    store: &dyn crate::store::Store,
    keys: &crate::sources::keys::AcmeKeys,
) -> Vec<(DnsName, String)> {
    let mut out: Vec<(DnsName, String)> = store
        .scan(&keys.on_demand_dir())
        .await
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, e)| serde_json::from_slice::<OnDemandRecord>(&e.value).ok())
        .filter_map(|r| Some((DnsName::new(&r.name).ok()?, r.allowed_by)))
        .collect();
    out.sort();
    out
}

/// An `[on_demand]` configuration ready to start ([`OnDemand::prepare`]).
pub struct Prepared {
    config: OnDemandConfig,
    ask: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
}

/// Where one name stands.
enum Known {
    /// Its certificate is being obtained, or served (`stop` ends its renewals); last asked for at
    /// `last_used` (Unix time), which the store has as of `recorded_use`.
    Admitted {
        allowed_by: String,
        stop: CancellationToken,
        last_used: i64,
        recorded_use: i64,
    },
    /// Being decided (the cap, `ask`, a turn for its first order): requests for it wait for the decision.
    Deciding,
    /// Refused until then (a denial by `ask`, a refusal by `allow` or the cap, a failed first order).
    Refused { until: Instant },
}

/// Everything remembered about names, with its bounds kept by the methods that change it.
#[derive(Default)]
struct State {
    names: HashMap<DnsName, Known>,
    /// The refusals in `names`, by when they end: the first is forgotten when [`MAX_REFUSALS`] is reached.
    refusals: BTreeSet<(Instant, DnsName)>,
    /// Names in `names` that are `Deciding`.
    deciding: usize,
    /// Names waiting for, or holding, an `ask` request.
    asking: usize,
    /// Spellings whose refusal was logged, until when (bounded by [`MAX_REFUSALS`]).
    logged: HashMap<String, Instant>,
    /// `ask` allows, until when (one per name that took a slot of the cap: bounded by it).
    ask_allowed: HashMap<DnsName, Instant>,
    /// Starts of new certificates in the last hour.
    new_in_last_hour: VecDeque<Instant>,
    /// Slots of the hourly cap held by names being decided.
    reserved: u32,
}

impl State {
    /// Sets what is known of `name`, keeping the refusal index and the counts.
    fn set(&mut self, name: &DnsName, known: Known) {
        self.forget(name);
        match &known {
            Known::Refused { until } => {
                self.prune_refusals();
                if self.refusals.len() >= MAX_REFUSALS
                    && let Some(first) = self.refusals.pop_first()
                {
                    self.names.remove(&first.1);
                }
                self.refusals.insert((*until, name.clone()));
            }
            Known::Deciding => self.deciding += 1,
            Known::Admitted { .. } => {}
        }
        self.names.insert(name.clone(), known);
    }

    /// Forgets `name`; returns what was known.
    fn forget(&mut self, name: &DnsName) -> Option<Known> {
        let old = self.names.remove(name)?;
        match &old {
            Known::Refused { until } => {
                self.refusals.remove(&(*until, name.clone()));
            }
            Known::Deciding => self.deciding = self.deciding.saturating_sub(1),
            Known::Admitted { .. } => {}
        }
        Some(old)
    }

    /// Forgets refusals that have ended.
    fn prune_refusals(&mut self) {
        let now = Instant::now();
        while let Some((until, _)) = self.refusals.first()
            && *until <= now
        {
            if let Some((_, name)) = self.refusals.pop_first() {
                self.names.remove(&name);
            }
        }
    }

    /// New certificates started in the last hour, plus slots held by names being decided.
    fn cap_used(&mut self) -> usize {
        let hour_ago = Instant::now().checked_sub(Duration::from_secs(3600));
        while self
            .new_in_last_hour
            .front()
            .is_some_and(|t| hour_ago.is_some_and(|h| *t < h))
        {
            self.new_in_last_hour.pop_front();
        }
        self.new_in_last_hour.len() + self.reserved as usize
    }

    fn admitted(&self) -> usize {
        self.names.len() - self.deciding - self.refusals.len()
    }
}

/// [`OnDemand`]'s state while locked: what is remembered is counted in the gauges when it is released.
struct Locked<'a> {
    state: std::sync::MutexGuard<'a, State>,
    on_demand: &'a OnDemand,
}

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        self.on_demand.count(&self.state);
    }
}

/// The on-demand issuer of one configuration; see the module docs.
pub struct OnDemand {
    config: OnDemandConfig,
    manager: Arc<AcmeManager>,
    registry: Arc<Registry>,
    /// The SDS access rules: which names the configuration claims (those are never obtained here).
    policy: Arc<Policy>,
    store: SharedStore,
    metrics: Metrics,
    state: Mutex<State>,
    first_orders: Arc<Semaphore>,
    asks: Arc<Semaphore>,
    /// Refusal log lines, at most ten a second whatever a flood of names asks.
    log_throttle: crate::net::throttle::Throttle,
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
    AskBusy,
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
            Refusal::AskBusy => "ask_busy",
            Refusal::HourlyCap => "hourly_cap",
            Refusal::OrderFailed => "order_failed",
            Refusal::Recently => "refused_recently",
        }
    }
}

impl OnDemand {
    /// Checks `config` and makes what it needs that can fail (the `ask` client: it fails only when no TLS
    /// client can be made, without system roots), so that a reload can fail before it changes anything.
    pub fn prepare(config: OnDemandConfig) -> Result<Prepared, rustls::Error> {
        Ok(Prepared {
            ask: Client::builder(TokioExecutor::new()).build(ask_connector()?),
            config,
        })
    }

    /// Starts the issuer `prepared`, adding its certificates to `manager` (started already); it stops with
    /// `shutdown`. With `previous` (the issuer of the configuration before a reload, on the same manager),
    /// the certificates it serves go on as they are, unless `allow` no longer matches them; then
    /// certificates obtained before (recorded in the store) are served and renewed again at once, if `allow`
    /// matches them and the configuration (as `policy` has it) does not claim them.
    pub async fn start(
        prepared: Prepared,
        manager: Arc<AcmeManager>,
        registry: Arc<Registry>,
        policy: Arc<Policy>,
        metrics: Metrics,
        shutdown: CancellationToken,
        previous: Option<Arc<OnDemand>>,
    ) -> Arc<OnDemand> {
        let Prepared { config, ask } = prepared;
        let retry_after_failure = manager.config.retry_initial;
        let on_demand = Arc::new(OnDemand {
            first_orders: Arc::new(Semaphore::new(config.max_pending)),
            asks: Arc::new(Semaphore::new(config.ask_concurrency)),
            log_throttle: crate::net::throttle::Throttle::new(Duration::from_millis(100)),
            store: manager.store.clone(),
            config,
            manager,
            registry,
            policy,
            metrics,
            state: Mutex::default(),
            ask,
            retry_after_failure,
            shutdown,
        });
        if let Some(previous) = previous {
            on_demand.take_over(&previous);
        }
        on_demand.load_recorded().await;
        tokio::spawn(on_demand.clone().sweep());
        on_demand
    }

    /// Stops deciding and sweeping; with `certificates`, also stops serving and renewing every certificate
    /// it serves (else a successor takes them over: [`OnDemand::start`]). Names still being decided are
    /// refused (streams waiting for them report them missing).
    pub fn stop(&self, certificates: bool) {
        self.shutdown.cancel();
        if certificates {
            let mut state = self.lock();
            let names: Vec<DnsName> = state.names.keys().cloned().collect();
            for name in names {
                if let Some(known) = state.forget(&name) {
                    self.retire(name, known);
                }
            }
        }
    }

    /// Ends what is known of `name` here: a certificate served stops being renewed and offered (a stream
    /// that holds it keeps it; a new request is decided again), a decision cut short is refused.
    fn retire(&self, name: DnsName, known: Known) {
        let id = SecretId::OnDemand(name);
        match known {
            Known::Admitted { stop, .. } => {
                stop.cancel();
                self.registry.withdraw(&id);
            }
            Known::Deciding => self.registry.refuse(&id),
            Known::Refused { .. } => {}
        }
    }

    /// Takes the certificates `previous` serves (it is stopped): those `allow` still matches go on as
    /// they are; the others stop being renewed.
    fn take_over(&self, previous: &OnDemand) {
        previous.stop(false);
        let taken: Vec<(DnsName, Known)> = {
            let mut old = previous.lock();
            let names: Vec<DnsName> = old.names.keys().cloned().collect();
            names
                .into_iter()
                .filter_map(|n| old.forget(&n).map(|k| (n, k)))
                .collect()
        };
        let mut state = self.lock();
        for (name, known) in taken {
            // A decision cut short is refused (the next request is decided here); a certificate `allow`
            // no longer matches is retired (`load_recorded` says why, as it reads the name's record).
            let keep = matches!(known, Known::Admitted { .. })
                && self.allowed_by(&name).is_some()
                && !self.claimed(&name);
            if keep {
                state.set(&name, known);
            } else {
                self.retire(name, known);
            }
        }
    }

    /// Whether the configuration claims `name` (a configured secret's name or domain, in any spelling).
    fn claimed(&self, name: &DnsName) -> bool {
        self.policy.is_configured(name)
    }

    /// Stops renewing every certificate whose name the configuration now claims (after a reload): its
    /// records stay, and it is served again if the configured secret goes away.
    pub fn release_claimed(&self) {
        let mut state = self.lock();
        let claimed: Vec<DnsName> = state
            .names
            .keys()
            .filter(|n| self.claimed(n))
            .cloned()
            .collect();
        for name in claimed {
            if let Some(known) = state.forget(&name) {
                if matches!(known, Known::Admitted { .. }) {
                    tracing::info!(name = %name, "on-demand certificate now configured: served as the configured secret; the on-demand one is no longer renewed");
                }
                self.retire(name, known);
            }
        }
    }

    /// Every period (a tenth of `drop_unused_after`, between a second and an hour): forgets refusals that
    /// ended, notes in the store which certificates are in use here, and drops certificates no replica
    /// used during `drop_unused_after` (default: their lifetime), until shutdown. A certificate is in use
    /// while an Envoy subscribes to it (the on-demand selector keeps its subscription while it is cached).
    async fn sweep(self: Arc<Self>) {
        let period = self
            .config
            .drop_unused_after
            .map_or(Duration::from_secs(3600), |d| d / 10)
            .clamp(Duration::from_secs(1), Duration::from_secs(3600));
        let record_every = self
            .config
            .drop_unused_after
            .map_or(USE_RECORDED_EVERY, |d| (d / 4).min(USE_RECORDED_EVERY));
        let record_every = i64::try_from(record_every.as_secs()).unwrap_or(i64::MAX);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            self.release_claimed();
            let now = now_unix();
            let mut used = Vec::new();
            let mut unused = Vec::new();
            {
                let mut state = self.lock();
                state.prune_refusals();
                let now_i = Instant::now();
                state.ask_allowed.retain(|_, until| *until > now_i);
                state.logged.retain(|_, until| *until > now_i);
                for (name, known) in state.names.iter_mut() {
                    let Known::Admitted {
                        last_used,
                        recorded_use,
                        ..
                    } = known
                    else {
                        continue;
                    };
                    let id = SecretId::OnDemand(name.clone());
                    if self.registry.subscribers(&id) > 0 {
                        *last_used = now;
                        if now - *recorded_use >= record_every {
                            *recorded_use = now;
                            used.push(name.clone());
                        }
                        continue;
                    }
                    let Some(version) = self.registry.get(&id) else {
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
                        unused.push((name.clone(), limit));
                    }
                }
            }
            for name in used {
                self.record_use(&name, now).await;
            }
            for (name, limit) in unused {
                self.drop_if_unused(&name, limit).await;
            }
        }
    }

    /// Sets the gauges of what is remembered.
    fn count(&self, state: &State) {
        self.metrics.on_demand_names("admitted", state.admitted());
        self.metrics.on_demand_names("deciding", state.deciding);
        self.metrics
            .on_demand_names("refused", state.refusals.len());
        self.metrics.on_demand_asks(
            self.config
                .ask_concurrency
                .saturating_sub(self.asks.available_permits()),
        );
    }

    /// The stored record of `name`.
    async fn read_record(&self, name: &DnsName) -> Option<OnDemandRecord> {
        let entry = self
            .store
            .get(&self.manager.keys.on_demand(name))
            .await
            .ok()??;
        serde_json::from_slice(&entry.value).ok()
    }

    /// Notes in the store that `name` is in use (so that a restart, or another replica, does not take it
    /// for unused).
    async fn record_use(&self, name: &DnsName, now: i64) {
        if let Some(mut record) = self.read_record(name).await
            && record.last_used < now
        {
            record.last_used = now;
            if let Ok(value) = serde_json::to_vec(&record) {
                let _ = self
                    .store
                    .put(&self.manager.keys.on_demand(name), &value)
                    .await;
            }
        }
    }

    /// Drops `name` (idle here for longer than `limit`) unless another replica used it within `limit`:
    /// under the certificate's lock, the stored `last_used` is read again, and only a certificate no
    /// replica used is forgotten (record, certificate, plan, order); asked for again, it is a new name.
    async fn drop_if_unused(&self, name: &DnsName, limit: Duration) {
        let id = SecretId::OnDemand(name.clone());
        let Some(lock) = self.manager.acquire(&id, &self.shutdown).await else {
            return; // the store is unavailable (logged), or shutting down: try again next time
        };
        let now = now_unix();
        let limit_secs = i64::try_from(limit.as_secs()).unwrap_or(i64::MAX);
        let stored_use = self
            .read_record(name)
            .await
            .map(|r| r.last_used.max(r.first_requested));
        if let Some(used) = stored_use
            && now.saturating_sub(used) <= limit_secs
        {
            // Another replica serves it: keep it, and judge from that use.
            if let Some(Known::Admitted { last_used, .. }) = self.lock().names.get_mut(name) {
                *last_used = (*last_used).max(used);
            }
            tracing::info!(name = %name, "on-demand certificate unused here, but another replica served it within on_demand.drop_unused_after: kept");
            self.manager.release(lock).await;
            return;
        }
        let stop = match self.lock().forget(name) {
            Some(Known::Admitted { stop, .. }) => Some(stop),
            _ => None,
        };
        if let Some(stop) = stop {
            stop.cancel();
        }
        self.registry.withdraw(&id);
        self.manager.forget(&id, &lock).await;
        if let Err(e) = self
            .store
            .delete_locked(&lock, &self.manager.keys.on_demand(name))
            .await
        {
            tracing::warn!(name = %name, error = %e, "cannot forget an unused on-demand certificate's record");
        }
        self.manager.release(lock).await;
        self.metrics.count_on_demand("dropped");
        tracing::info!(
            name = %name,
            unused_for_secs = limit.as_secs(),
            "on-demand certificate not asked for within on_demand.drop_unused_after (by any replica): no longer renewed, and forgotten"
        );
    }

    /// Serves and renews every certificate obtained on demand before (moving those an earlier version
    /// stored among the configured certificates to the on-demand namespace first).
    async fn load_recorded(self: &Arc<Self>) {
        let Ok(records) = self.store.scan(&self.manager.keys.on_demand_dir()).await else {
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
            if self.lock().names.contains_key(&name) {
                continue; // taken over from the issuer before a reload
            }
            if self.claimed(&name) {
                tracing::info!(name = %name, "on-demand certificate now configured: served as the configured secret, not obtained on demand");
                continue;
            }
            if self.allowed_by(&name).is_none() {
                tracing::info!(name = %name, "on-demand certificate no longer matches [on_demand] allow: not served or renewed");
                continue;
            }
            self.move_legacy(&name).await;
            let last_used = record.last_used.max(record.first_requested);
            let _ = self.admit(name, record.allowed_by, last_used, false).await;
        }
    }

    /// An earlier version stored on-demand certificates with the configured ones: moves `name`'s (not
    /// claimed by the configuration, so they are the on-demand certificate's) to the on-demand namespace.
    async fn move_legacy(&self, name: &DnsName) {
        let keys = &self.manager.keys;
        let id = SecretId::OnDemand(name.clone());
        if matches!(self.store.get(&keys.cert(&id)).await, Ok(Some(_))) {
            return;
        }
        for (kind, new) in [
            ("certs", keys.cert(&id)),
            ("state", keys.state(&id)),
            ("orders", keys.order(&id)),
        ] {
            let old = keys.legacy_on_demand(name, kind);
            let Ok(Some(entry)) = self.store.get(&old).await else {
                continue;
            };
            match self.store.put(&new, &entry.value).await {
                Ok(_) => {
                    let _ = self.store.delete(&old).await;
                    tracing::info!(name = %name, from = old, to = new, "on-demand certificate moved to the on-demand namespace");
                }
                Err(e) => {
                    tracing::warn!(name = %name, key = old, error = %e, "cannot move an on-demand certificate to the on-demand namespace; it is obtained again");
                }
            }
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

    /// The state, locked; the gauges are set from it when the guard goes.
    fn lock(&self) -> Locked<'_> {
        Locked {
            state: self.state.lock().unwrap_or_else(|e| e.into_inner()),
            on_demand: self,
        }
    }

    /// Refuses `id` (requested as `spelling`), remembering the refusal until `until` when given, with one
    /// log line per spelling and refusal period.
    fn refuse(
        &self,
        spelling: &str,
        id: &SecretId,
        why: Refusal,
        until: Option<Instant>,
        detail: &str,
    ) {
        self.metrics.count_on_demand(why.label());
        let log = {
            let mut state = self.lock();
            if let (Some(until), SecretId::OnDemand(name)) = (until, id) {
                state.set(name, Known::Refused { until });
            }
            let now = Instant::now();
            if state.logged.len() >= MAX_REFUSALS {
                state.logged.retain(|_, until| *until > now);
            }
            let fresh = !state.logged.contains_key(spelling) && state.logged.len() < MAX_REFUSALS;
            if fresh {
                state.logged.insert(spelling.to_owned(), now + DENY_FOR);
            }
            fresh
        };
        // Logged once per spelling and refusal period, whatever a client sends how often (and the
        // memory of what was logged is bounded: past its size, nothing more is logged until the sweep
        // forgets what ended), and ten lines a second at most (the metric counts every refusal); before
        // the waiting streams hear of it.
        if log && let Some(held_back) = self.log_throttle.allow() {
            tracing::warn!(
                name = spelling,
                reason = why.label(),
                held_back,
                "on-demand certificate refused: {detail}"
            );
        }
        self.registry.refuse(id);
    }

    /// Starts serving (and, when needed, obtaining) `name`'s certificate; `Err` says why not (the manager
    /// runs it already, or this issuer was replaced).
    async fn admit(
        self: &Arc<Self>,
        name: DnsName,
        allowed_by: String,
        last_used: i64,
        new: bool,
    ) -> Result<(), String> {
        if new {
            self.metrics.count_on_demand("admitted");
            let record = OnDemandRecord {
                name: name.to_string(),
                allowed_by: allowed_by.clone(),
                first_requested: last_used,
                last_used,
            };
            if let Ok(value) = serde_json::to_vec(&record)
                && let Err(e) = self
                    .store
                    .put(&self.manager.keys.on_demand(&name), &value)
                    .await
            {
                tracing::warn!(name = %name, error = %e, "cannot record the on-demand certificate; after a restart it is obtained again when requested");
            }
        }
        let id = SecretId::OnDemand(name.clone());
        let cert = ManagedCert {
            id: id.clone(),
            domains: vec![name.clone()],
            key_type: self.config.key_type,
            temporary: false,
            challenge: crate::values::Challenge::Http01,
        };
        match self.manager.add(cert).await {
            Ok(stop) => {
                // Stopped since (a reload replaced this issuer): its successor serves the name.
                if self.shutdown.is_cancelled() {
                    stop.cancel();
                    return Err("the on-demand issuer was replaced".into());
                }
                self.registry.offer(&id);
                self.lock().set(
                    &name,
                    Known::Admitted {
                        allowed_by,
                        stop,
                        last_used,
                        recorded_use: last_used,
                    },
                );
                Ok(())
            }
            Err(e) => {
                tracing::warn!(name = %name, error = %e, "on-demand certificate not started");
                Err(e.to_string())
            }
        }
    }

    /// Decides a name that passed `allow` and holds a slot of the hourly cap (`ask`), then obtains it.
    async fn decide(self: Arc<Self>, spelling: String, name: DnsName, allowed_by: String) {
        let id = SecretId::OnDemand(name.clone());
        let mut allowed_by = allowed_by;
        if let Some(url) = self.config.ask.clone() {
            let cached = self
                .lock()
                .ask_allowed
                .get(&name)
                .is_some_and(|until| *until > Instant::now());
            if !cached {
                let answer = self.ask_bounded(&url, &name).await;
                self.lock().asking -= 1;
                match answer {
                    Ok(()) => {
                        self.lock()
                            .ask_allowed
                            .insert(name.clone(), Instant::now() + ASK_ALLOW_FOR);
                    }
                    Err((why, answered)) => {
                        self.lock().reserved -= 1;
                        // A denial is remembered ten minutes; an outage only briefly, so that names
                        // are admitted again soon after `ask` is back.
                        let hold = if answered { DENY_FOR } else { ASK_OUTAGE_FOR };
                        self.refuse(
                            &spelling,
                            &id,
                            Refusal::Ask,
                            Some(Instant::now() + hold),
                            &why,
                        );
                        return;
                    }
                }
            } else {
                self.lock().asking -= 1;
            }
            allowed_by = format!("{allowed_by}, ask {url}");
        }
        {
            let mut state = self.lock();
            state.reserved -= 1;
            state.new_in_last_hour.push_back(Instant::now());
        }
        // At most max_pending first orders at once; the turn lasts until the first outcome. An issuer
        // stopped meanwhile (a reload replaced it) admits nothing more: its successor decides again.
        let permit = tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => return,
            p = self.first_orders.clone().acquire_owned() => p,
        };
        let Ok(_permit) = permit else {
            return;
        };
        let mut outcomes = self.manager.outcomes();
        tracing::info!(name = %name, requested_as = spelling, allowed_by, "obtaining an on-demand certificate");
        if self.shutdown.is_cancelled() {
            return;
        }
        if let Err(why) = self.admit(name.clone(), allowed_by, now_unix(), true).await {
            let _ = self.store.delete(&self.manager.keys.on_demand(&name)).await;
            self.refuse(
                &spelling,
                &id,
                Refusal::Recently,
                Some(Instant::now() + self.retry_after_failure),
                &format!("not started: {why}"),
            );
            return;
        }
        // The turn ends with the order's outcome, with the certificate stored by another replica (no
        // outcome here), or after the order's time limit (another replica's backoff, a store outage).
        let mut served = self.registry.watch(&id, id.as_str());
        let limit = tokio::time::sleep(self.manager.lock_wait_limit());
        tokio::pin!(limit);
        loop {
            if served.current().is_some() {
                return;
            }
            let outcome = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = &mut limit => {
                    tracing::info!(name = %name, "no outcome of the on-demand certificate's first order within its time limit; its turn goes to the next name (the certificate keeps being obtained)");
                    return;
                }
                _ = served.changed() => continue,
                o = outcomes.recv() => o,
            };
            match outcome {
                Ok((n, Ok(()))) if n == id => return,
                Ok((n, Err(e))) if n == id => {
                    // The handshake fails now rather than waiting for the retry; the name is not ordered
                    // again for a while.
                    let stop = match self.lock().forget(&name) {
                        Some(Known::Admitted { stop, .. }) => Some(stop),
                        _ => None,
                    };
                    if let Some(stop) = stop {
                        stop.cancel();
                    }
                    let _ = self.store.delete(&self.manager.keys.on_demand(&name)).await;
                    self.refuse(
                        &spelling,
                        &id,
                        Refusal::OrderFailed,
                        Some(Instant::now() + self.retry_after_failure),
                        &format!("the first order failed: {e}"),
                    );
                    return;
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Asks `ask` about `name`, waiting for one of the `ask_concurrency` requests in flight.
    async fn ask_bounded(&self, url: &str, name: &DnsName) -> Result<(), (String, bool)> {
        let Ok(_permit) = self.asks.acquire().await else {
            return Err(("shutting down".into(), false));
        };
        self.metrics.on_demand_asks(
            self.config
                .ask_concurrency
                .saturating_sub(self.asks.available_permits()),
        );
        let answer = self.ask(url, name).await;
        self.metrics.on_demand_asks(
            self.config
                .ask_concurrency
                .saturating_sub(self.asks.available_permits() + 1),
        );
        answer
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
            // Only the status counts; a body is read (to reuse the connection) up to a small limit.
            let _ = Limited::new(resp.into_body(), ASK_BODY_LIMIT)
                .collect()
                .await;
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
    pub fn admitted(&self) -> Vec<(DnsName, String)> {
        let mut out: Vec<(DnsName, String)> = self
            .lock()
            .names
            .iter()
            .filter_map(|(name, k)| match k {
                Known::Admitted { allowed_by, .. } => Some((name.clone(), allowed_by.clone())),
                Known::Deciding | Known::Refused { .. } => None,
            })
            .collect();
        out.sort();
        out
    }
}

impl Demand for Arc<OnDemand> {
    fn requested(&self, spelling: &str, id: &SecretId, node_id: Option<&str>) {
        if let Some(nodes) = &self.config.allowed_nodes
            && !node_id.is_some_and(|n| nodes.iter().any(|p| p.matches(n)))
        {
            self.refuse(
                spelling,
                id,
                Refusal::Node,
                None,
                "the Envoy's node id does not match on_demand.allowed_nodes",
            );
            return;
        }
        let SecretId::OnDemand(name) = id else {
            let why = crate::values::DnsName::new(crate::values::canonical_name(spelling))
                .err()
                .unwrap_or_else(|| "not a DNS name".into());
            self.refuse(spelling, id, Refusal::Malformed, None, &why);
            return;
        };
        let mut state = self.lock();
        match state.names.get_mut(name) {
            Some(Known::Admitted { last_used, .. }) => {
                *last_used = now_unix();
                drop(state);
                if self.registry.get(id).is_none() {
                    self.registry.expect_soon(id);
                }
                return;
            }
            Some(Known::Deciding) => {
                drop(state);
                self.registry.expect_soon(id);
                return;
            }
            Some(Known::Refused { until }) if *until > Instant::now() => {
                drop(state);
                self.refuse(spelling, id, Refusal::Recently, None, "refused recently");
                return;
            }
            _ => {}
        }
        let Some(allowed_by) = self.allowed_by(name) else {
            drop(state);
            self.refuse(
                spelling,
                id,
                Refusal::NotAllowed,
                Some(Instant::now() + DENY_FOR),
                "the name matches nothing in on_demand.allow",
            );
            return;
        };
        // The cap first: a name that could not be obtained this hour is not asked about.
        let used = state.cap_used();
        if used >= self.config.max_new_per_hour as usize {
            drop(state);
            self.refuse(
                spelling,
                id,
                Refusal::HourlyCap,
                Some(Instant::now() + CAP_FOR),
                &format!(
                    "{} new certificates in the last hour already, or being decided (on_demand.max_new_per_hour)",
                    self.config.max_new_per_hour
                ),
            );
            return;
        }
        let cached = state
            .ask_allowed
            .get(name)
            .is_some_and(|until| *until > Instant::now());
        let asks = self.config.ask.is_some() && !cached;
        if asks && state.asking >= 2 * self.config.ask_concurrency {
            drop(state);
            // Not remembered: asked again, the name is decided again.
            self.refuse(
                spelling,
                id,
                Refusal::AskBusy,
                None,
                &format!(
                    "{} names are waiting for on_demand.ask already (on_demand.ask_concurrency in flight, as many queued)",
                    2 * self.config.ask_concurrency
                ),
            );
            return;
        }
        // Being decided (so that concurrent requests wait for this decision rather than repeat it); it
        // holds a slot of the cap until `ask` answers.
        state.reserved += 1;
        if self.config.ask.is_some() {
            state.asking += 1;
        }
        state.set(name, Known::Deciding);
        drop(state);
        self.registry.expect_soon(id);
        tokio::spawn(
            self.clone()
                .decide(spelling.to_owned(), name.clone(), allowed_by),
        );
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
