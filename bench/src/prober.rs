//! TLS handshakes against Envoy's listeners that report the certificate presented.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

/// TLS handshakes against Envoy's listeners, reporting the leaf certificate presented. It checks nothing
/// else (the caller compares the exact DER it expects), so a probe costs the client as little as possible and
/// probes can follow each other closely.
pub struct Prober(std::sync::Arc<rustls::ClientConfig>);

impl Prober {
    pub fn new() -> Result<Self> {
        Ok(Prober(testkit::envoy::probe_config()?))
    }

    pub fn presented(&self, port: u16) -> Result<Vec<u8>> {
        self.presented_as(port, "web.example.com")
    }

    /// The leaf certificate `port` presents for the server name `sni`.
    pub fn presented_as(&self, port: u16, sni: &str) -> Result<Vec<u8>> {
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned())?;
        let mut conn = rustls::ClientConnection::new(self.0.clone(), name)?;
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default())
    }

    /// Waits (bounded) until `port` presents `want`; returns how long it took from `t0`.
    pub fn until_presented(&self, port: u16, want: &[u8], t0: Instant) -> Result<Duration> {
        loop {
            if self.presented(port).is_ok_and(|d| d == want) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("Envoy did not present the new certificate within 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}
