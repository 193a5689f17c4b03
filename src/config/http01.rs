//! `[http01]`: the HTTP-01 challenge responder's listener.

use std::net::IpAddr;
use std::net::Ipv4Addr;
use std::net::SocketAddr;

use toml::Spanned;

use super::Validator;
use super::raw::RawHttp01;
use crate::values::ListenAddr;

/// `[http01]`: the HTTP-01 challenge responder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http01Config {
    /// Where the responder listens (default 0.0.0.0:8089).
    pub listen: SocketAddr,
}

/// The default responder address: every interface, port 8089 (the port cert-manager's solver uses too).
pub const DEFAULT_HTTP01_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8089);

impl Validator<'_> {
    pub(super) fn http01(&mut self, raw: Option<Spanned<RawHttp01>>) -> Http01Config {
        let default = Http01Config {
            listen: DEFAULT_HTTP01_LISTEN,
        };
        let Some(listen) = raw.and_then(|r| r.into_inner().listen) else {
            return default;
        };
        let line = self.line(&listen);
        match self.listen_addr(listen.get_ref()) {
            Ok(ListenAddr::Tcp(addr)) => Http01Config { listen: addr },
            _ => {
                self.problem(
                    "http01.listen",
                    line,
                    format!(
                        "{:?} is not \"IP:PORT\" (for example \"0.0.0.0:8089\")",
                        listen.get_ref()
                    ),
                );
                default
            }
        }
    }
}

/// `[tls_alpn01]`: where acme-sds answers TLS-ALPN-01 validations (RFC 8737), which Envoy forwards to it
/// from port 443 (ClientHellos offering ALPN `acme-tls/1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsAlpn01Config {
    /// Where the responder listens (default 127.0.0.1:8444).
    pub listen: SocketAddr,
}

/// The default TLS-ALPN-01 responder address: loopback (Envoy on the same host forwards to it), port 8444.
pub const DEFAULT_TLS_ALPN01_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8444);

impl Validator<'_> {
    pub(super) fn tls_alpn01(
        &mut self,
        raw: Option<Spanned<super::raw::RawTlsAlpn01>>,
    ) -> TlsAlpn01Config {
        let default = TlsAlpn01Config {
            listen: DEFAULT_TLS_ALPN01_LISTEN,
        };
        let Some(listen) = raw.and_then(|r| r.into_inner().listen) else {
            return default;
        };
        let line = self.line(&listen);
        match self.listen_addr(listen.get_ref()) {
            Ok(ListenAddr::Tcp(addr)) => TlsAlpn01Config { listen: addr },
            _ => {
                self.problem(
                    "tls_alpn01.listen",
                    line,
                    format!(
                        "{:?} is not \"IP:PORT\" (for example \"127.0.0.1:8444\")",
                        listen.get_ref()
                    ),
                );
                default
            }
        }
    }
}
