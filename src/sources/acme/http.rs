//! The HTTP client under instant-acme.
//!
//! instant-acme takes any [`HttpClient`]; this one is built like its default (hyper over rustls, the
//! system's roots or `acme.directory_ca`) with two differences that matter for never hanging on, nor
//! hammering, a CA:
//! - every request has a deadline (`acme.request_timeout`) covering the whole response, body included (read
//!   into memory, at most 16 MiB): a CA that accepts the connection and then says nothing, or stops halfway
//!   through a body, costs one timeout, whatever the request (directory, nonce, account, order, ARI);
//! - the CA's `Retry-After` is recorded for the certificate task that made the request
//!   ([`with_retry_after`], [`take_retry_after`]), so that a 429 or a 503 is honoured exactly rather than
//!   guessed (instant-acme reads the header only while polling).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, Error, HttpClient};

use crate::config::AcmeConfig;

/// Largest response body accepted from the CA (a certificate chain is a few KiB).
const MAX_BODY: usize = 16 * 1024 * 1024;

tokio::task_local! {
    /// The latest `Retry-After` the CA sent to this task, as an instant.
    static RETRY_AFTER: Cell<Option<SystemTime>>;
}

/// Runs `f` with its own `Retry-After` record (one per certificate task).
pub(super) async fn with_retry_after<F: Future>(f: F) -> F::Output {
    RETRY_AFTER.scope(Cell::new(None), f).await
}

/// How long the CA last asked this task to wait (from now), forgetting it.
pub(super) fn take_retry_after() -> Option<Duration> {
    RETRY_AFTER
        .try_with(|c| c.take())
        .ok()
        .flatten()
        .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// How long the CA last asked this task to wait (from now), keeping it for [`take_retry_after`].
pub(super) fn peek_retry_after() -> Option<Duration> {
    RETRY_AFTER
        .try_with(|c| c.get())
        .ok()
        .flatten()
        .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default())
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return SystemTime::now().checked_add(Duration::from_secs(secs.min(86_400 * 366)));
    }
    httpdate::parse_http_date(value).ok()
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector>;

/// See the module docs.
pub(super) struct CaClient {
    inner: Client<Connector, BodyWrapper<Bytes>>,
    deadline: Duration,
}

/// The CA did not answer within the deadline.
#[derive(Debug, thiserror::Error)]
#[error("the CA did not answer {request} within {deadline:?}")]
pub struct CaTimeout {
    /// Method and URL.
    pub request: String,
    pub deadline: Duration,
}

/// The request never reached the CA, or its answer never arrived: the URL, and why in words a person can
/// act on (DNS, connection refused, TLS, ...).
#[derive(Debug, thiserror::Error)]
#[error("cannot reach the CA ({request}): {cause}")]
pub struct CaUnreachable {
    /// Method and URL.
    pub request: String,
    pub cause: String,
}

/// Why a request failed before any answer, from the error and its sources: the kind first (DNS lookup,
/// connection refused, TLS), then each distinct message down the chain, without the HTTP client's own
/// generic wrapper (`client error (Connect)`).
fn connect_failure(e: &(dyn std::error::Error + 'static)) -> String {
    use std::io::ErrorKind;
    let mut kind = None;
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        // An io::Error's source() skips the error it wraps: look inside (TLS errors come wrapped twice).
        let mut inner: Option<&(dyn std::error::Error + 'static)> = Some(err);
        let mut tls = false;
        while let Some(e) = inner {
            tls |= e.is::<rustls::Error>();
            inner = e
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|i| i as &(dyn std::error::Error + 'static));
        }
        if tls {
            kind = Some("TLS handshake failed");
        } else if text.starts_with("dns error") {
            kind = kind.or(Some("DNS lookup failed"));
        } else if let Some(io) = err.downcast_ref::<std::io::Error>() {
            kind = kind.or(match io.kind() {
                ErrorKind::ConnectionRefused => Some("connection refused"),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => {
                    Some("connection reset")
                }
                ErrorKind::TimedOut => Some("connection timed out"),
                ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable => {
                    Some("no route to the CA")
                }
                _ => None,
            });
        }
        if !text.starts_with("client error") && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    let detail = parts.join(": ");
    match kind {
        Some(k) if detail.is_empty() => k.to_owned(),
        Some(k) => format!("{k} ({detail})"),
        None if detail.is_empty() => e.to_string(),
        None => detail,
    }
}

impl CaClient {
    pub(super) fn new(config: &AcmeConfig) -> Result<Self, Error> {
        // The provider is named here rather than taken from the process default, so that the library
        // works the same whoever embeds it (main.rs installs ring as the default for everything else).
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Other(e.into()))?;
        let tls = match &config.directory_ca {
            Some(path) => {
                use rustls_pki_types::CertificateDer;
                use rustls_pki_types::pem::PemObject;
                let mut roots = rustls::RootCertStore::empty();
                for cert in
                    CertificateDer::pem_file_iter(path).map_err(|e| Error::Other(e.into()))?
                {
                    roots
                        .add(cert.map_err(|e| Error::Other(e.into()))?)
                        .map_err(|e| Error::Other(e.into()))?;
                }
                tls.with_root_certificates(roots).with_no_client_auth()
            }
            None => {
                use rustls_platform_verifier::BuilderVerifierExt;
                tls.with_platform_verifier()
                    .map_err(|e| Error::Other(e.into()))?
                    .with_no_client_auth()
            }
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .build();
        Ok(CaClient {
            inner: Client::builder(TokioExecutor::new()).build(connector),
            deadline: config.request_timeout,
        })
    }
}

impl HttpClient for CaClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, Error>> + Send>> {
        let request = format!("{} {}", req.method(), req.uri());
        let response = self.inner.request(req);
        let deadline = self.deadline;
        Box::pin(async move {
            let whole = async {
                let rsp = response.await.map_err(|e| {
                    Error::Other(Box::new(CaUnreachable {
                        request: request.clone(),
                        cause: connect_failure(&e),
                    }))
                })?;
                let (parts, body) = rsp.into_parts();
                let body = http_body_util::Limited::new(body, MAX_BODY)
                    .collect()
                    .await
                    .map_err(Error::Other)?
                    .to_bytes();
                Ok::<_, Error>((parts, body))
            };
            let (parts, body) = tokio::time::timeout(deadline, whole).await.map_err(|_| {
                Error::Other(Box::new(CaTimeout {
                    request: request.clone(),
                    deadline,
                }))
            })??;
            if let Some(at) = parts
                .headers
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after)
            {
                let _ = RETRY_AFTER.try_with(|c| c.set(Some(at)));
            }
            Ok(BytesResponse {
                parts,
                body: Box::new(body),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_to_connect_says_what_kind_and_why() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(connect_failure(&refused).starts_with("connection refused ("));
        // As hyper-rustls hands it over: an io::Error around an io::Error around the rustls error.
        let tls = std::io::Error::other(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let said = connect_failure(&tls);
        assert!(said.starts_with("TLS handshake failed ("), "{said}");
        assert!(said.contains("UnknownIssuer"), "{said}");
    }

    #[test]
    fn retry_after_as_seconds_or_a_date() {
        let soon = parse_retry_after("30").unwrap();
        let d = soon.duration_since(SystemTime::now()).unwrap();
        assert!(d <= Duration::from_secs(30) && d >= Duration::from_secs(29));
        let date = parse_retry_after("Fri, 31 Dec 1999 23:59:59 GMT").unwrap();
        assert_eq!(
            date.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
            946_684_799
        );
        assert!(parse_retry_after("soon").is_none());
    }

    #[tokio::test]
    async fn the_record_belongs_to_the_task_that_made_the_request() {
        assert_eq!(
            take_retry_after(),
            None,
            "outside a scope: nothing, no panic"
        );
        with_retry_after(async {
            RETRY_AFTER.with(|c| c.set(parse_retry_after("60")));
            let d = take_retry_after().unwrap();
            assert!(d > Duration::from_secs(58));
            assert_eq!(take_retry_after(), None, "taken");
        })
        .await;
    }
}
