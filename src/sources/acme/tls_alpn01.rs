//! The TLS-ALPN-01 responder (RFC 8737): answers the CA's validation handshakes, which Envoy forwards from
//! port 443 (a filter chain matching ALPN `acme-tls/1`, `tcp_proxy` to `[tls_alpn01] listen`).
//!
//! Each connection's ClientHello is read first: only a hello that offers `acme-tls/1` and names (SNI) a
//! domain with a pending TLS-ALPN-01 challenge in the store is answered, with a self-signed certificate for
//! that name carrying the `acmeIdentifier` extension (the SHA-256 of the key authorization), made for that
//! handshake and negotiating `acme-tls/1`; every other handshake is dropped before the server says anything.
//! The challenge is read from the store, so any replica answers for any order. Every connection has a
//! deadline and their number is bounded: the listener is reachable by whatever reaches Envoy's port 443.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::net::accept::AcceptBackoff;
use crate::sources::keys;
use crate::store::SharedStore;
use crate::values::DnsName;

/// The ALPN protocol of TLS-ALPN-01.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// How long one validation connection may take, hello to close.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Connections handled at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 256;

/// Answers validation handshakes on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    store: SharedStore,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = AcceptBackoff::new("TLS-ALPN-01");
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(c) => {
                    backoff.accepted();
                    c
                }
                Err(e) => {
                    backoff.failed(&e, &shutdown).await;
                    continue;
                }
            },
        };
        let (store, metrics) = (store.clone(), metrics.clone());
        tokio::spawn(async move {
            let result = tokio::time::timeout(CONNECTION_DEADLINE, answer(tcp, &store)).await;
            let outcome = match result {
                Ok(Ok(name)) => {
                    tracing::info!(domain = name, "TLS-ALPN-01 challenge answered");
                    "answered"
                }
                Ok(Err(why)) => {
                    tracing::debug!(why, "TLS-ALPN-01 handshake refused");
                    why
                }
                Err(_) => "timeout",
            };
            metrics.count_tls_alpn01(outcome);
            drop(permit);
        });
    }
}

/// One connection: the domain answered for, or why the handshake was refused (a metric label).
async fn answer(tcp: tokio::net::TcpStream, store: &SharedStore) -> Result<String, &'static str> {
    let start = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp)
        .await
        .map_err(|_| "not_tls")?;
    let hello = start.client_hello();
    let offers_acme = hello
        .alpn()
        .is_some_and(|mut protocols| protocols.any(|p| p == ACME_TLS_ALPN));
    if !offers_acme {
        return Err("not_acme_tls");
    }
    let name = hello
        .server_name()
        .and_then(|n| DnsName::new(n).ok())
        .ok_or("no_server_name")?;
    // One per order: the newest, should two orders (two certificates sharing the name, on two replicas)
    // validate it at once; one replica's orders take turns.
    let pending = store
        .scan(&keys::tls_alpn_challenges(&name))
        .await
        .map_err(|_| "store_error")?;
    let (_, key_auth) = pending.into_iter().last().ok_or("unknown_name")?;
    let config = validation_config(&name, &key_auth.value).map_err(|_| "certificate_error")?;
    let mut tls = start
        .into_stream(Arc::new(config))
        .await
        .map_err(|_| "handshake_failed")?;
    use tokio::io::AsyncWriteExt;
    let _ = tls.shutdown().await;
    Ok(name.to_string())
}

/// A server configuration for one validation: the RFC 8737 certificate for `name` (its `acmeIdentifier`
/// extension holds the SHA-256 of `key_authorization`), negotiating only `acme-tls/1`.
fn validation_config(
    name: &DnsName,
    key_authorization: &[u8],
) -> Result<rustls::ServerConfig, Box<dyn std::error::Error + Send + Sync>> {
    let (cert, key) = validation_certificate(name, key_authorization)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key_der = rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing_key = provider.key_provider.load_private_key(key_der)?;
    // Served as it is: rustls's own checks (`with_single_cert`) refuse the critical acmeIdentifier
    // extension, which only the CA's validator has to understand.
    let certified = Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signing_key,
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(OneCertificate(certified)));
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    Ok(config)
}

/// The RFC 8737 certificate for `name`: self-signed, with the critical `acmeIdentifier` extension holding
/// the SHA-256 of `key_authorization`.
fn validation_certificate(
    name: &DnsName,
    key_authorization: &[u8],
) -> Result<(rcgen::Certificate, rcgen::KeyPair), rcgen::Error> {
    let digest = ring::digest::digest(&ring::digest::SHA256, key_authorization);
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest.as_ref())];
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

/// Serves one certificate to every hello.
#[derive(Debug)]
struct OneCertificate(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCertificate {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_validation_certificate_carries_the_key_authorization_digest() {
        let name = DnsName::new("site.example.com").unwrap();
        let config = validation_config(&name, b"token.thumbprint").unwrap();
        assert_eq!(config.alpn_protocols, vec![ACME_TLS_ALPN.to_vec()]);
        let (cert, _) = validation_certificate(&name, b"token.thumbprint").unwrap();
        let der = cert.der().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, b"token.thumbprint");
        // id-pe-acmeIdentifier (1.3.6.1.5.5.7.1.31), then the digest as an OCTET STRING.
        let oid = [0x06, 0x08, 0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x01, 0x1f];
        assert!(der.windows(oid.len()).any(|w| w == oid));
        assert!(der.windows(32).any(|w| w == digest.as_ref()));
        assert!(der.windows(16).any(|w| w == b"site.example.com"));
    }
}
