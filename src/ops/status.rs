//! The status of every configured secret, typed: its source, names, serial, validity, next renewal, last
//! error, next retry and subscribed streams.
//!
//! [`collect`] makes it from what a registry serves and what the issuers (ACME, the internal CA) plan. The
//! running daemon calls it on its own registry ([`StatusView`], behind `/status` and the metrics); `acme-sds
//! status` without a daemon calls it through [`offline`], which publishes what the files and the store hold
//! into a registry of its own first. One path, so the two views agree.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::{CertificateSource, Config};
use crate::net::peer::Limits;
use crate::registry::{Registry, SecretContent};
use crate::sources::IssuerStatus;
use crate::sources::acme::AcmeManager;
use crate::sources::files::FileSource;
use crate::sources::internal::InternalIssuer;
use crate::values::{DnsName, SecretId};

/// Where a secret comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Ordered from the `[acme]` CA.
    Acme,
    /// Issued by acme-sds's internal CA.
    Internal,
    /// Read from `cert_file` and `key_file`.
    Files,
    /// A `[[trust_bundle]]`.
    TrustBundle,
    /// Obtained from the `[acme]` CA for a name Envoy asked for (`[on_demand]`).
    OnDemand,
}

impl Source {
    /// As `/status` and `acme-sds status` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Acme => "acme",
            Source::Internal => "internal",
            Source::Files => "files",
            Source::TrustBundle => "trust_bundle",
            Source::OnDemand => "on_demand",
        }
    }

    /// Whether this source is a certificate (with an expiry and readiness), not a CA bundle.
    pub fn is_certificate(self) -> bool {
        self != Source::TrustBundle
    }
}

/// What `/status` reports about one secret. Instants are RFC 3339 in UTC.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SecretStatus {
    /// The secret name.
    pub name: String,
    /// Where it comes from.
    pub source: Source,
    /// The names the certificate is for: the configured `domains`, or the served leaf's DNS names.
    pub domains: Vec<String>,
    /// Whether a version is served.
    pub serving: bool,
    /// What is served is a temporary self-signed stand-in: the certificate has not been issued yet.
    #[serde(default)]
    pub temporary: bool,
    /// The version served.
    pub version: Option<String>,
    /// The leaf's serial (hex).
    pub serial: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    /// Start of the leaf's validity.
    pub not_before: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    /// End of the leaf's validity (for a trust bundle, the earliest in it).
    pub not_after: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    /// When it is planned to be renewed.
    pub next_renewal: Option<OffsetDateTime>,
    /// The last failure to obtain it, if the latest attempt failed.
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    /// When the next attempt is due after that failure.
    pub next_retry: Option<OffsetDateTime>,
    /// SDS streams subscribed to this secret now; `None` when no daemon was asked (`acme-sds status` reading
    /// the files), which is not the same as nobody asking.
    pub subscribed_streams: Option<usize>,
    /// For an on-demand certificate: how its name was allowed (`allow PATTERN`, `, ask URL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_by: Option<String>,
    /// For a configured ACME certificate: how the CA validates its names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub challenge: Option<crate::values::Challenge>,
}

/// The issuers' plans, by secret.
pub type Schedules = HashMap<SecretId, IssuerStatus>;

/// The status of every secret `config` names, and of the certificates obtained on demand (`on_demand`:
/// name and how it was allowed), as `registry` serves them and `schedules` plan them; `subscribers` counts
/// the streams of a running daemon.
pub fn collect(
    config: &Config,
    registry: &Registry,
    schedules: &Schedules,
    subscribers: Option<&dyn Fn(&SecretId) -> usize>,
    on_demand: &[(DnsName, String)],
) -> Vec<SecretStatus> {
    let configured = config
        .certificates
        .iter()
        .map(|c| {
            let (source, challenge) = match &c.source {
                CertificateSource::Acme { challenge, .. } => (Source::Acme, Some(*challenge)),
                CertificateSource::Internal { .. } => (Source::Internal, None),
                CertificateSource::Files { .. } => (Source::Files, None),
            };
            let domains = c
                .source
                .issued_domains()
                .map(|d| d.into_iter().map(str::to_owned).collect());
            (SecretId::from(&c.name), source, domains, None, challenge)
        })
        .chain(config.trust_bundles.iter().map(|b| {
            (
                SecretId::from(&b.name),
                Source::TrustBundle,
                None,
                None,
                None,
            )
        }));
    let obtained = on_demand.iter().map(|(name, how)| {
        (
            SecretId::OnDemand(name.clone()),
            Source::OnDemand,
            Some(vec![name.to_string()]),
            Some(how.clone()),
            None,
        )
    });
    configured
        .chain(obtained)
        .map(|(id, source, domains, allowed_by, challenge)| {
            let current = registry.get(&id);
            let summary = current.as_ref().map(|v| v.summary().clone());
            let plan = schedules.get(&id);
            let domains = match (domains, &summary) {
                (Some(d), _) => d,
                (None, Some(s)) => s.dns_names.clone(),
                (None, None) => Vec::new(),
            };
            SecretStatus {
                serving: current.is_some(),
                temporary: summary.as_ref().is_some_and(|s| s.temporary),
                version: current.as_ref().map(|v| v.version().to_owned()),
                serial: summary.as_ref().and_then(|s| s.serial.clone()),
                not_before: summary.as_ref().and_then(|s| s.not_before),
                not_after: summary.as_ref().and_then(|s| s.not_after),
                next_renewal: plan.and_then(|p| p.next_renewal),
                last_error: plan.and_then(|p| p.last_error.clone()),
                next_retry: plan.and_then(|p| p.next_retry),
                subscribed_streams: subscribers.map(|count| count(&id)),
                name: id.to_string(),
                source,
                domains,
                allowed_by,
                challenge,
            }
        })
        .collect()
}

/// The sources a running daemon's view reads: the configuration and the issuers that keep schedules.
#[derive(Clone)]
pub struct Sources {
    /// The configuration in force.
    pub config: Arc<Config>,
    /// The ACME manager, when certificates are ordered.
    pub acme: Option<Arc<AcmeManager>>,
    /// The internal CA, when certificates are issued by it.
    pub internal: Option<Arc<InternalIssuer>>,
    /// The on-demand issuer, with `[on_demand]`.
    pub on_demand: Option<Arc<crate::sources::acme::on_demand::OnDemand>>,
    /// The store, once a source opened it: its health is the daemon's readiness.
    pub store: Option<crate::store::SharedStore>,
}

/// A running daemon's status; cheap to clone. A configuration reload swaps what it looks at.
#[derive(Clone)]
pub struct StatusView {
    sources: Arc<std::sync::RwLock<Sources>>,
    registry: Arc<Registry>,
    limits: Limits,
}

impl StatusView {
    /// A view of `sources` and what `registry` serves.
    pub fn new(sources: Sources, registry: Arc<Registry>, limits: Limits) -> Self {
        StatusView {
            sources: Arc::new(std::sync::RwLock::new(sources)),
            registry,
            limits,
        }
    }

    /// Looks at a reloaded configuration from now on.
    pub fn update(&self, sources: Sources) {
        *self.sources.write().unwrap_or_else(|e| e.into_inner()) = sources;
    }

    /// The store's health, when one is open (`None`: no source uses the store).
    pub fn storage(&self) -> Option<crate::store::StoreHealth> {
        let sources = self.sources.read().unwrap_or_else(|e| e.into_inner());
        sources.store.as_ref().map(|s| s.health())
    }

    /// SDS streams open now, all callers together.
    pub fn open_streams(&self) -> usize {
        self.limits.open_streams()
    }

    /// The status of every configured secret, in config order.
    pub fn secrets(&self) -> Vec<SecretStatus> {
        let Sources {
            config,
            acme,
            internal,
            on_demand,
            ..
        } = self
            .sources
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut schedules = acme.as_ref().map(|a| a.status()).unwrap_or_default();
        schedules.extend(
            internal
                .as_ref()
                .map(|i| i.status())
                .unwrap_or_default()
                .into_iter()
                .map(|(name, plan)| (SecretId::named(name), plan)),
        );
        let subscribers = |id: &SecretId| self.registry.subscribers(id);
        let obtained = on_demand.map(|o| o.admitted()).unwrap_or_default();
        collect(
            &config,
            &self.registry,
            &schedules,
            Some(&subscribers),
            &obtained,
        )
    }
}

/// Why the stored state could not be read.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The store could not be opened.
    #[error(transparent)]
    Open(#[from] crate::sources::OpenStoreError),
    /// The store was opened but cannot be read (etcd without quorum, unreachable).
    #[error("reading the store: {0}")]
    Read(#[from] crate::store::StoreError),
}

/// The status read from the files and the store, for when no daemon answers: what a daemon started now
/// would serve (temporary certificates aside) and what it had planned. The store is opened read-only and
/// unlocked, so a running daemon is not disturbed.
pub async fn offline(config: &Config) -> Result<Vec<SecretStatus>, OfflineError> {
    let registry = Registry::new();
    let mut obtained = Vec::new();
    let mut schedules = Schedules::new();
    match FileSource::from_config(config).load_all() {
        Ok(loaded) => {
            for (name, content) in &loaded {
                registry.publish(name, content);
            }
        }
        Err(_) => {
            for c in &config.certificates {
                if matches!(c.source, CertificateSource::Files { .. }) {
                    schedules.insert(
                        SecretId::from(&c.name),
                        IssuerStatus {
                            last_error: Some(
                                "the files cannot be loaded (run `acme-sds check`)".into(),
                            ),
                            ..IssuerStatus::default()
                        },
                    );
                }
            }
        }
    }
    if config.storage.etcd.is_some() || config.storage.path.is_dir() {
        let store = crate::sources::open_store(&config.storage, true).await?;
        // A store that cannot be read says so, rather than every certificate looking never issued.
        store.list("acme").await?;
        let keys = config
            .acme
            .as_ref()
            .map(|a| crate::sources::keys::AcmeKeys::for_directory(&a.directory));
        for c in &config.certificates {
            match &c.source {
                CertificateSource::Acme { .. } => {
                    let Some(keys) = &keys else { continue };
                    let id = SecretId::from(&c.name);
                    let (cert, plan) =
                        crate::sources::acme::stored_status(store.as_ref(), keys, &id).await;
                    if let Some(pem) = cert {
                        registry.publish(&c.name, &SecretContent::TlsCertificate(pem));
                    }
                    schedules.insert(id, plan);
                }
                CertificateSource::Internal { .. } => {
                    if let Some(pem) =
                        crate::sources::internal::stored_status(store.as_ref(), &c.name).await
                    {
                        let plan = IssuerStatus {
                            next_renewal: Some(crate::sources::internal::renewal_time(&pem.leaf)),
                            ..IssuerStatus::default()
                        };
                        registry.publish(&c.name, &SecretContent::TlsCertificate(pem));
                        schedules.insert(SecretId::from(&c.name), plan);
                    }
                }
                CertificateSource::Files { .. } => {}
            }
        }
        if let (Some(keys), Some(_)) = (&keys, &config.on_demand) {
            for (name, how) in crate::sources::acme::on_demand::recorded(store.as_ref(), keys).await
            {
                let id = SecretId::OnDemand(name.clone());
                let (cert, plan) =
                    crate::sources::acme::stored_status(store.as_ref(), keys, &id).await;
                if let Some(pem) = cert {
                    registry.publish(&id, &SecretContent::TlsCertificate(pem));
                }
                schedules.insert(id, plan);
                obtained.push((name, how));
            }
        }
    }
    Ok(collect(config, &registry, &schedules, None, &obtained))
}
