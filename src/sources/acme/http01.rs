//! The HTTP-01 challenge responder: `GET`/`HEAD /.well-known/acme-challenge/{token}` answers `200
//! text/plain` with the key authorization of a pending challenge, and 404 for anything else.
//!
//! It runs on its own listener; Envoy routes `/.well-known/acme-challenge/` to it (any Host header works),
//! and the CA may also reach it directly. It only reads pending challenges from the store under
//! `challenges/<token>`, which the ACME manager writes before telling the CA to validate and deletes when the
//! order ends; with a shared store every replica answers for every order.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::store::SharedStore;

/// The path prefix of HTTP-01 challenges (RFC 8555 section 8.3).
pub const CHALLENGE_PREFIX: &str = "/.well-known/acme-challenge/";

use crate::sources::keys;

/// ACME tokens are base64url (RFC 8555 §8.3: at least 128 bits of entropy); anything else is not looked up.
pub fn valid_token(token: &str) -> bool {
    (16..=256).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    resp
}

async fn respond(
    store: SharedStore,
    metrics: &Metrics,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let count_http01 = |result: &str| metrics.count_http01(result);
    let Some(token) = req.uri().path().strip_prefix(CHALLENGE_PREFIX) else {
        count_http01("not_found");
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if req.method() != Method::GET && req.method() != Method::HEAD {
        count_http01("method_not_allowed");
        let mut resp = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        resp.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    if !valid_token(token) {
        count_http01("invalid_token");
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    match store.get(&keys::challenge(token)).await {
        Ok(Some(entry)) => {
            count_http01("answered");
            tracing::info!(token, "HTTP-01 challenge answered");
            let len = entry.value.len();
            let body = if req.method() == Method::HEAD {
                Bytes::new()
            } else {
                Bytes::from(entry.value)
            };
            let mut resp = Response::new(Full::new(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain"),
            );
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
            resp
        }
        Ok(None) => {
            count_http01("unknown_token");
            tracing::debug!(token, "HTTP-01 request for an unknown token");
            plain(StatusCode::NOT_FOUND, "not found\n")
        }
        Err(e) => {
            count_http01("error");
            tracing::error!(error = %e, "HTTP-01 responder cannot read pending challenges");
            plain(StatusCode::SERVICE_UNAVAILABLE, "unavailable\n")
        }
    }
}

/// Binds the responder's listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves HTTP-01 on `listener` until `shutdown`, then drains open connections.
pub async fn serve(
    listener: TcpListener,
    store: SharedStore,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let make = move || {
        let (store, metrics) = (store.clone(), metrics.clone());
        hyper::service::service_fn(move |req| {
            let (store, metrics) = (store.clone(), metrics.clone());
            async move { Ok::<_, Infallible>(respond(store, &metrics, req).await) }
        })
    };
    crate::net::http1::serve(
        listener,
        "HTTP-01",
        crate::net::http1::HTTP01_CAPS,
        make,
        shutdown,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(valid_token("LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0"));
        assert!(!valid_token("short"));
        assert!(!valid_token("../../etc/passwd-aaaaaaaaaaaa"));
        assert!(!valid_token(&"a".repeat(257)));
    }
}
