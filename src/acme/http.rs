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
#[error("the CA did not answer within {0:?}")]
pub struct CaTimeout(pub Duration);

impl CaClient {
    pub(super) fn new(config: &AcmeConfig) -> Result<Self, Error> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match &config.directory_ca {
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
                let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
                let tls = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| Error::Other(e.into()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(tls)
            }
            None => builder
                .try_with_platform_verifier()
                .map_err(|e| Error::Other(e.into()))?,
        };
        let connector = builder.https_only().enable_http1().enable_http2().build();
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
        let response = self.inner.request(req);
        let deadline = self.deadline;
        Box::pin(async move {
            let whole = async {
                let rsp = response.await.map_err(|e| Error::Other(Box::new(e)))?;
                let (parts, body) = rsp.into_parts();
                let body = http_body_util::Limited::new(body, MAX_BODY)
                    .collect()
                    .await
                    .map_err(Error::Other)?
                    .to_bytes();
                Ok::<_, Error>((parts, body))
            };
            let (parts, body) = tokio::time::timeout(deadline, whole)
                .await
                .map_err(|_| Error::Other(Box::new(CaTimeout(deadline))))??;
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
