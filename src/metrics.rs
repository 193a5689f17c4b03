//! Prometheus metrics, through the Prometheus project's own `prometheus-client` crate.
//!
//! Counters and histograms live in a [`Metrics`] handle that the daemon creates and passes down to the code
//! paths that update them (two daemons in one process count apart); the per-certificate gauges (expiry,
//! next renewal, readiness) are derived from the status view at scrape time, so they can never disagree with
//! `/status`. Names follow Prometheus conventions: base units
//! (seconds), `_total` for counters, `_timestamp_seconds` for instants.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// The `name` label: a configured secret.
pub struct NameLabel {
    /// The secret name (without Istio's prefix).
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// The labels of an ACME order.
pub struct OrderLabels {
    /// The secret name.
    pub name: String,
    /// How it ended (`issued`, `failed`, ...).
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// The labels of a request to the CA.
pub struct RequestLabels {
    /// What was asked (`new_order`, `finalize`, ...).
    pub action: String,
    /// The HTTP status, or `error` when there was none.
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// The `rpc` label.
pub struct RpcLabel {
    /// `StreamSecrets`, `DeltaSecrets` or `FetchSecrets`.
    pub rpc: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// The `state` label.
pub struct StateLabel {
    /// The state.
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// The `result` label.
pub struct ResultLabel {
    /// The outcome.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
/// The `action` and `result` labels of DNS-01 updates.
pub struct DnsUpdateLabels {
    /// `add` or `remove`.
    pub action: String,
    /// `ok`, `refused`, `unreachable`, `untrusted`, `no_zone`, `not_served`, `key`.
    pub result: String,
}

type Timings = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    // 10 ms .. ~40 s
    Histogram::new(exponential_buckets(0.01, 2.0, 13))
}

/// One daemon's counters and histograms: a cheap handle, whose clones update the same series.
#[derive(Clone)]
pub struct Metrics {
    acme_orders: Family<OrderLabels, Counter>,
    acme_request_duration: Timings,
    sds_streams: Family<RpcLabel, Gauge>,
    sds_pushes: Counter,
    /// Per configured secret only: a caller can name anything, and must not be able to create series.
    sds_nacks: Family<NameLabel, Counter>,
    /// Everything about names that are not configured, in one series.
    sds_unconfigured_names: Counter,
    http01_requests: Family<ResultLabel, Counter>,
    store_locks_held: Gauge,
    store_lock_wait: Histogram,
    store_watch_lag: Gauge<f64, std::sync::atomic::AtomicU64>,
    on_demand: Family<ResultLabel, Counter>,
    on_demand_names: Family<StateLabel, Gauge>,
    on_demand_asks: Gauge,
    tls_alpn01: Family<ResultLabel, Counter>,
    dns01_updates: Family<DnsUpdateLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            acme_orders: Family::default(),
            acme_request_duration: Family::new_with_constructor(request_histogram),
            sds_streams: Family::default(),
            sds_pushes: Counter::default(),
            sds_nacks: Family::default(),
            sds_unconfigured_names: Counter::default(),
            http01_requests: Family::default(),
            store_locks_held: Gauge::default(),
            // 1 ms .. ~65 s
            store_lock_wait: Histogram::new(exponential_buckets(0.001, 4.0, 9)),
            store_watch_lag: Gauge::default(),
            on_demand: Family::default(),
            on_demand_names: Family::default(),
            on_demand_asks: Gauge::default(),
            tls_alpn01: Family::default(),
            dns01_updates: Family::default(),
        }
    }
}

impl Metrics {
    /// Records one ACME action's duration and outcome.
    pub fn observe_acme(&self, action: &str, status: &str, started: Instant) {
        self.acme_request_duration
            .get_or_create(&RequestLabels {
                action: action.to_owned(),
                status: status.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }

    /// Counts an ended order of `name` by result.
    pub fn count_order(&self, name: &str, result: &str) {
        self.acme_orders
            .get_or_create(&OrderLabels {
                name: name.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts an HTTP-01 request by result (`answered`, `unknown_token`, `not_found`, ...).
    pub fn count_http01(&self, result: &str) {
        self.http01_requests
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a NACK of a configured secret (callers check; see [`Metrics::sds_nacks`]).
    pub fn count_nack(&self, name: &str) {
        self.sds_nacks
            .get_or_create(&NameLabel {
                name: crate::values::canonical_name(name).to_owned(),
            })
            .inc();
    }

    /// Counts names that are not configured, subscribed to, fetched or NACKed.
    pub fn count_unconfigured(&self, n: u64) {
        self.sds_unconfigured_names.inc_by(n);
    }

    /// Counts one SDS response sent.
    pub fn count_push(&self) {
        self.sds_pushes.inc();
    }

    /// An SDS stream of `rpc` opened (`delta` 1) or closed (-1).
    pub fn stream_opened(&self, rpc: &str, delta: i64) {
        self.sds_streams
            .get_or_create(&RpcLabel {
                rpc: rpc.to_owned(),
            })
            .inc_by(delta);
    }

    /// A certificate's lock in the store was taken after waiting since `started`.
    pub fn lock_taken(&self, started: Instant) {
        self.store_lock_wait
            .observe(started.elapsed().as_secs_f64());
        self.store_locks_held.inc();
    }

    /// A lock taken with [`Metrics::lock_taken`] was given up.
    pub fn lock_released(&self) {
        self.store_locks_held.dec();
    }

    /// How long a certificate another replica stored took to reach this one (from its issuance).
    pub fn watch_lag(&self, seconds: f64) {
        self.store_watch_lag.set(seconds);
    }

    /// Counts a TLS-ALPN-01 responder connection by outcome (`answered`, `unknown_name`, `not_acme_tls`, ...).
    pub fn count_tls_alpn01(&self, result: &str) {
        self.tls_alpn01
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts a DNS-01 update (`add` or `remove`) by result.
    pub fn count_dns01_update(&self, action: &str, result: &str) {
        self.dns01_updates
            .get_or_create(&DnsUpdateLabels {
                action: action.to_owned(),
                result: result.to_owned(),
            })
            .inc();
    }

    /// Counts an on-demand decision: `admitted`, or the reason of a refusal.
    pub fn count_on_demand(&self, result: &str) {
        self.on_demand
            .get_or_create(&ResultLabel {
                result: result.to_owned(),
            })
            .inc();
    }

    /// Sets how many on-demand names are remembered in `state` (`admitted`, `deciding`, `refused`).
    pub fn on_demand_names(&self, state: &str, n: usize) {
        self.on_demand_names
            .get_or_create(&StateLabel {
                state: state.to_owned(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Sets how many `ask` requests are in flight.
    pub fn on_demand_asks(&self, n: usize) {
        self.on_demand_asks
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Registers every counter and histogram in `registry`, for an exposition (the admin listener adds the
    /// per-certificate gauges).
    pub fn register(&self, registry: &mut Registry) {
        let m = self;
        registry.register(
            "acme_sds_acme_orders",
            "ACME orders finished, by certificate and result (issued, failed)",
            m.acme_orders.clone(),
        );
        registry.register(
        "acme_sds_acme_request_duration_seconds",
        "Duration of ACME actions (account, new_order, challenge, validation, finalize, certificate, renewal_info), by action and status",
        m.acme_request_duration.clone(),
    );
        registry.register(
            "acme_sds_sds_streams",
            "Open SDS streams, by RPC (sotw, delta, fetch)",
            m.sds_streams.clone(),
        );
        registry.register(
            "acme_sds_sds_pushes",
            "SDS responses sent",
            m.sds_pushes.clone(),
        );
        registry.register(
            "acme_sds_sds_nacks",
            "Secrets Envoy rejected (NACKed), by configured secret",
            m.sds_nacks.clone(),
        );
        registry.register(
        "acme_sds_sds_unconfigured_names",
        "Names that are not configured, in SDS subscriptions, fetches and NACKs (all in one series)",
        m.sds_unconfigured_names.clone(),
    );
        registry.register(
            "acme_sds_http01_requests",
            "HTTP-01 responder requests, by result",
            m.http01_requests.clone(),
        );
        registry.register(
            "acme_sds_tls_alpn01_connections",
            "TLS-ALPN-01 responder connections, by outcome (answered, unknown_name, not_acme_tls, no_server_name, not_tls, timeout, ...)",
            m.tls_alpn01.clone(),
        );
        registry.register(
            "acme_sds_dns01_updates",
            "DNS-01 record updates sent to the zone's primary, by action (add, remove) and result (ok, refused, unreachable, untrusted, no_zone, key)",
            m.dns01_updates.clone(),
        );
        registry.register(
            "acme_sds_on_demand_decisions",
            "On-demand names decided: admitted (a new certificate), or refused by reason (not_in_allow, ask_denied, ask_busy, hourly_cap, malformed, node_not_allowed, order_failed, refused_recently)",
            m.on_demand.clone(),
        );
        registry.register(
            "acme_sds_on_demand_names",
            "On-demand names remembered now, by state (admitted: served and renewed; deciding: ask or cap pending; refused: refusals remembered, bounded)",
            m.on_demand_names.clone(),
        );
        registry.register(
            "acme_sds_on_demand_ask_requests_in_flight",
            "Requests to the on_demand.ask endpoint in flight now (at most on_demand.ask_concurrency)",
            m.on_demand_asks.clone(),
        );
        registry.register(
            "acme_sds_store_locks_held",
            "Certificate locks this replica holds in the store now (one per order in progress)",
            m.store_locks_held.clone(),
        );
        registry.register(
            "acme_sds_store_lock_wait_seconds",
            "Time waited to take a certificate's lock (another replica was ordering it), per lock taken",
            m.store_lock_wait.clone(),
        );
        registry.register(
            "acme_sds_store_watch_lag_seconds",
            "For the last certificate another replica stored: seconds from its issuance there to its push here",
            m.store_watch_lag.clone(),
        );
    }
}
