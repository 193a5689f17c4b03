//! The admin listener (`[admin] listen`, off by default): `/metrics` (Prometheus), `/healthz` (the process
//! is alive), `/readyz`
//! (listeners bound, stored state loaded) and `/status` (JSON: per certificate its source, domains, serial,
//! validity, next renewal, last error and next retry, and how many SDS streams are subscribed).
//!
//! It is meant for loopback or a cluster-internal port: it shows no key material, but it does show which
//! names are served.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, NameLabel};
use crate::ops::status::StatusView;

/// The admin listener's state: the status view and the counters.
#[derive(Clone)]
pub struct Admin {
    /// The secrets' status.
    pub status: StatusView,
    /// The counters and histograms.
    pub metrics: Metrics,
}

/// The Prometheus exposition: the counters, plus per-certificate gauges (expiry, next renewal, readiness)
/// made from the status at scrape time, so that they can never disagree with `/status`.
pub fn metrics_text(
    metrics: &Metrics,
    secrets: &[crate::ops::status::SecretStatus],
    storage: Option<&crate::store::StoreHealth>,
) -> String {
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use std::sync::atomic::AtomicU64;
    let mut registry = prometheus_client::registry::Registry::default();
    metrics.register(&mut registry);
    let not_after = Family::<NameLabel, Gauge<f64, AtomicU64>>::default();
    let renewal = Family::<NameLabel, Gauge<f64, AtomicU64>>::default();
    let ready = Family::<NameLabel, Gauge>::default();
    let ts = |t: Option<time::OffsetDateTime>| t.map(|t| t.unix_timestamp() as f64);
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    for s in secrets.iter().filter(|s| s.source.is_certificate()) {
        let label = NameLabel {
            name: s.name.clone(),
        };
        // A temporary stand-in is not the certificate: neither its expiry nor readiness is reported.
        let expiry = ts(s.not_after).filter(|_| !s.temporary);
        if let Some(t) = expiry {
            not_after.get_or_create(&label).set(t);
        }
        if let Some(t) = ts(s.next_renewal) {
            renewal.get_or_create(&label).set(t);
        }
        let valid = s.serving && !s.temporary && expiry.is_some_and(|t| t > now);
        ready.get_or_create(&label).set(i64::from(valid));
    }
    registry.register(
        "acme_sds_certificate_not_after_timestamp_seconds",
        "Expiry (not-after) of the certificate being served, as a Unix time",
        not_after,
    );
    registry.register(
        "acme_sds_certificate_renewal_timestamp_seconds",
        "Next planned renewal of an ACME or internal certificate, as a Unix time",
        renewal,
    );
    registry.register(
        "acme_sds_certificate_ready",
        "1 when a valid (unexpired) certificate is being served",
        ready,
    );
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        let tasks = Gauge::<i64>::default();
        tasks.set(i64::try_from(runtime.metrics().num_alive_tasks()).unwrap_or(i64::MAX));
        registry.register(
            "acme_sds_runtime_tasks",
            "Tasks alive in the daemon now (streams are not tasks; certificate tasks, decisions and connections are)",
            tasks,
        );
    }
    if let Some(h) = storage {
        let available = Gauge::<i64>::default();
        available.set(i64::from(h.unavailable.is_none()));
        registry.register(
            "acme_sds_store_available",
            "1 while the store can be written (etcd: the watch is up, so there is a quorum), else 0",
            available,
        );
        if let Some(at) = h.last_error_at {
            let last = Gauge::<f64, AtomicU64>::default();
            last.set(at as f64);
            registry.register(
                "acme_sds_store_last_error_timestamp_seconds",
                "When a store request last failed (after its retries), as a Unix time",
                last,
            );
        }
    }
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

fn respond_text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

fn route(admin: &Admin, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let view = &admin.status;
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond_text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => respond_text(StatusCode::OK, "ok\n"),
        // The admin listener starts after storage was loaded and every SDS listener bound. Readiness does
        // not wait for certificates to be issued: the CA validates through Envoy, which needs acme-sds
        // reachable (a central acme-sds behind a Service must be ready for its own HTTP-01 to pass). The
        // body says how many certificates are issued and how many are temporary stand-ins.
        // Not ready while the store is unavailable (etcd without quorum or unreachable): what is loaded
        // is still served, but nothing can be issued or stored, and the reason says why.
        "/readyz" if view.storage().is_some_and(|h| h.unavailable.is_some()) => {
            let why = view
                .storage()
                .and_then(|h| h.unavailable)
                .unwrap_or_default();
            let mut r = Response::new(Full::new(Bytes::from(format!(
                "not ready: storage unavailable: {why}\n(certificates already loaded are still served; nothing is issued until the store is back)\n"
            ))));
            *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            r
        }
        "/readyz" => {
            let secrets = view.secrets();
            let temporary = secrets.iter().filter(|s| s.temporary).count();
            let waiting = secrets.iter().filter(|s| !s.serving).count();
            let body = format!(
                "ready\ncertificates: {} serving, {temporary} of them temporary (not issued yet), {waiting} not available yet\n",
                secrets.iter().filter(|s| s.serving).count()
            );
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            r
        }
        "/metrics" => {
            let mut r = Response::new(Full::new(Bytes::from(metrics_text(
                &admin.metrics,
                &view.secrets(),
                view.storage().as_ref(),
            ))));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/status" => {
            let body = serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "sds_streams": view.open_streams(),
                "storage": view.storage(),
                "secrets": view.secrets(),
            });
            let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => respond_text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves the admin endpoints on `listener` until `shutdown`, then drains open connections.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: CancellationToken) {
    let make = move || {
        let admin = admin.clone();
        hyper::service::service_fn(move |req| {
            let resp = route(&admin, &req);
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    crate::net::http1::serve(
        listener,
        "admin",
        crate::net::http1::ADMIN_CAPS,
        make,
        shutdown,
    )
    .await;
}
