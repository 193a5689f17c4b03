//! The admin listener (`[admin] listen`, off by default): `/metrics` (Prometheus), `/healthz` (the process
//! is alive), `/readyz`
//! (listeners bound, stored state loaded) and `/status` (JSON: per certificate its source, domains, serial,
//! validity, next renewal, last error and next retry, and how many SDS streams are subscribed).
//!
//! It is meant for loopback or a cluster-internal port: it shows no key material, but it does show which
//! names are served.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::acme::AcmeManager;
use crate::certs::format_time;
use crate::config::{CertificateSource, Config};
use crate::peer::Limits;
use crate::registry::Registry;
use crate::sources::internal::InternalIssuer;

/// What `/status` reports about one secret.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct SecretStatus {
    pub name: String,
    /// "acme", "internal", "files" or "trust_bundle".
    pub source: String,
    pub domains: Vec<String>,
    pub serving: bool,
    /// What is served is a temporary self-signed stand-in: the certificate has not been issued yet.
    #[serde(default)]
    pub temporary: bool,
    pub version: Option<String>,
    pub serial: Option<String>,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub next_renewal: Option<String>,
    pub last_error: Option<String>,
    pub next_retry: Option<String>,
    /// SDS streams subscribed to this secret now; `None` when no daemon was asked (`acme-sds status` reading
    /// the files), which is not the same as nobody asking.
    pub subscribed_streams: Option<usize>,
}

/// What the view reads: the configuration and the issuers that keep schedules.
#[derive(Clone)]
pub struct Sources {
    pub config: Arc<Config>,
    pub acme: Option<Arc<AcmeManager>>,
    pub internal: Option<Arc<InternalIssuer>>,
}

/// Everything `/status` reads; cheap to clone. A configuration reload swaps what it looks at.
#[derive(Clone)]
pub struct StatusView {
    sources: Arc<std::sync::RwLock<Sources>>,
    registry: Arc<Registry>,
    limits: Limits,
    metrics: crate::metrics::Metrics,
}

impl StatusView {
    pub fn new(
        sources: Sources,
        registry: Arc<Registry>,
        limits: Limits,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        StatusView {
            metrics,
            sources: Arc::new(std::sync::RwLock::new(sources)),
            registry,
            limits,
        }
    }

    /// Looks at a reloaded configuration from now on.
    pub fn update(&self, sources: Sources) {
        *self.sources.write().unwrap_or_else(|e| e.into_inner()) = sources;
    }

    pub fn secrets(&self) -> Vec<SecretStatus> {
        let Sources {
            config,
            acme,
            internal,
        } = self
            .sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut schedules = acme.as_ref().map(|a| a.status()).unwrap_or_default();
        schedules.extend(internal.as_ref().map(|i| i.status()).unwrap_or_default());
        let mut out = Vec::new();
        let entries = config
            .certificates
            .iter()
            .map(|c| match &c.source {
                CertificateSource::Acme { domains, .. } => {
                    (c.name.clone(), "acme", domains.clone())
                }
                CertificateSource::Internal { domains, .. } => {
                    (c.name.clone(), "internal", domains.clone())
                }
                CertificateSource::Files { .. } => (c.name.clone(), "files", Vec::new()),
            })
            .chain(
                config
                    .trust_bundles
                    .iter()
                    .map(|b| (b.name.clone(), "trust_bundle", Vec::new())),
            );
        for (name, source, domains) in entries {
            let current = self.registry.get(&name);
            let summary = current.as_ref().map(|v| v.summary().clone());
            let a = schedules.get(&name);
            out.push(SecretStatus {
                source: source.to_owned(),
                domains,
                serving: current.is_some(),
                temporary: summary.as_ref().is_some_and(|s| s.temporary),
                version: current.as_ref().map(|v| v.version().to_owned()),
                serial: summary.as_ref().and_then(|s| s.serial.clone()),
                not_before: summary.as_ref().and_then(|s| s.not_before).map(format_time),
                not_after: summary.as_ref().and_then(|s| s.not_after).map(format_time),
                next_renewal: a.and_then(|a| a.next_renewal).map(format_time),
                last_error: a.and_then(|a| a.last_error.clone()),
                next_retry: a.and_then(|a| a.next_retry).map(format_time),
                subscribed_streams: Some(self.registry.subscribers(&name)),
                name,
            });
        }
        out
    }
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

fn route(view: &StatusView, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond_text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match req.uri().path() {
        "/healthz" => respond_text(StatusCode::OK, "ok\n"),
        // The admin listener starts after storage was loaded and every SDS listener bound. Readiness does
        // not wait for certificates to be issued: the CA validates through Envoy, which needs acme-sds
        // reachable (a central acme-sds behind a Service must be ready for its own HTTP-01 to pass). The
        // body says how many certificates are issued and how many are temporary stand-ins.
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
            let mut r = Response::new(Full::new(Bytes::from(view.metrics.render(&view.secrets()))));
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
                "sds_streams": view.limits.open_streams(),
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
pub async fn serve(listener: TcpListener, view: StatusView, shutdown: CancellationToken) {
    let make = move || {
        let view = view.clone();
        hyper::service::service_fn(move |req| {
            let resp = route(&view, &req);
            async move { Ok::<_, Infallible>(resp) }
        })
    };
    crate::server::http1::serve(
        listener,
        "admin",
        crate::server::http1::ADMIN_CAPS,
        make,
        shutdown,
    )
    .await;
}
