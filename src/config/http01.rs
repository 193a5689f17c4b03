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
