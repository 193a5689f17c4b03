//! Values that carry their own rules: secret names, DNS names, key types and listen addresses.
//!
//! Each is checked once, where it is made ([`SecretName::new`], [`DnsName::new`], ...), with an error that
//! says what is wrong in the words of the config file; a value in hand is valid, so the code that uses it
//! (the registry, the ACME client, the listeners) never checks again. The config builds them; every layer
//! below takes them. This module depends on nothing else in the crate.

use std::borrow::Borrow;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::path::{Path, PathBuf};

/// Istio's prefix for external SDS names (`credentialName: sds://NAME`): `sds://web` and `web` are one secret.
pub const ISTIO_PREFIX: &str = "sds://";

/// The secret a requested name refers to: the name without Istio's [`ISTIO_PREFIX`].
pub fn canonical_name(requested: &str) -> &str {
    requested.strip_prefix(ISTIO_PREFIX).unwrap_or(requested)
}

/// A requested name folded for comparison with configured names: lower-case, without trailing dots (DNS
/// names compare so; Envoy passes a client's SNI through as it was sent).
pub fn folded_name(requested: &str) -> String {
    canonical_name(requested)
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Where a secret is published and stored: under the name a source publishes it as (every configured
/// secret), or, for a certificate obtained on demand, in a namespace of its own keyed by its DNS name. The
/// two never meet: nothing obtained on demand can be published, stored, renewed or read as a configured
/// secret, whatever its name and however a caller spells it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretId {
    /// A secret under its name (a configured one, or a name nobody configured that is not a DNS name).
    Named(String),
    /// A certificate obtained on demand, by the DNS name it is for.
    OnDemand(DnsName),
}

impl SecretId {
    /// The secret published under `name`.
    pub fn named(name: impl Into<String>) -> Self {
        SecretId::Named(name.into())
    }

    /// The name (for logs, status and metrics).
    pub fn as_str(&self) -> &str {
        match self {
            SecretId::Named(n) => n,
            SecretId::OnDemand(n) => n,
        }
    }

    /// Whether it is a certificate obtained on demand.
    pub fn is_on_demand(&self) -> bool {
        matches!(self, SecretId::OnDemand(_))
    }
}

impl fmt::Display for SecretId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&SecretName> for SecretId {
    fn from(name: &SecretName) -> Self {
        SecretId::Named(name.to_string())
    }
}

/// Implements the read-only string views of a checked name.
macro_rules! name_type {
    ($name:ident) => {
        impl $name {
            /// The checked text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl From<$name> for String {
            fn from(name: $name) -> String {
                name.0
            }
        }
    };
}

/// The name of an SDS secret, as Envoy asks for it: not empty, at most 253 characters, no spaces or
/// control characters, and without the `sds://` prefix (requests with and without it are both served).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SecretName(String);

name_type!(SecretName);

impl SecretName {
    /// Checks `name`; the error says what is wrong with it.
    pub fn new(name: &str) -> Result<Self, String> {
        if name.is_empty() {
            return Err("empty: give the SDS resource name Envoy asks for".into());
        }
        if name.starts_with(ISTIO_PREFIX) {
            return Err(format!(
                "{name:?}: leave out the \"sds://\" prefix; requests with and without it are both served"
            ));
        }
        if name.len() > 253 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(format!(
                "{name:?}: a name is at most 253 characters, without spaces or control characters"
            ));
        }
        Ok(SecretName(name.to_owned()))
    }
}

/// One DNS label: letters, digits and hyphens, 1 to 63 of them, not starting or ending with a hyphen.
fn label_ok(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && !label.starts_with('-')
        && !label.ends_with('-')
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A DNS name a public CA validates: at least two labels, ASCII (punycode for IDNs), not an IP address;
/// stored lower-case without a trailing dot. A wildcard (`*.` and a name) only through
/// [`DnsName::wildcard_allowed`]: only DNS-01 can validate one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DnsName(String);

name_type!(DnsName);

impl DnsName {
    /// Checks and lower-cases `raw`; the error says what is wrong with it.
    pub fn new(raw: &str) -> Result<Self, String> {
        let d = raw.trim_end_matches('.').to_ascii_lowercase();
        if d.starts_with("*.") {
            return Err(format!(
                "{raw:?}: a wildcard name needs challenge = \"dns-01\" (the CA validates wildcards over DNS only)"
            ));
        }
        Self::plain(raw, d)
    }

    /// The same, and also a wildcard (`*.example.com`: `*.` before a name of at least two labels).
    pub fn wildcard_allowed(raw: &str) -> Result<Self, String> {
        let d = raw.trim_end_matches('.').to_ascii_lowercase();
        match d.strip_prefix("*.") {
            Some(base) => Self::plain(raw, base.to_owned()).map(|b| DnsName(format!("*.{}", b.0))),
            None => Self::plain(raw, d),
        }
    }

    fn plain(raw: &str, d: String) -> Result<Self, String> {
        if !d.is_ascii() {
            return Err(format!(
                "{raw:?}: write internationalised names in their ASCII (punycode, xn--) form"
            ));
        }
        if d.parse::<IpAddr>().is_ok() {
            return Err(format!(
                "{raw:?}: IP addresses are not supported, only DNS names"
            ));
        }
        let labels: Vec<&str> = d.split('.').collect();
        if d.len() > 253 || labels.len() < 2 || !labels.iter().all(|l| label_ok(l)) {
            return Err(format!(
                "{raw:?} is not a valid DNS name (letters, digits and hyphens in dot-separated labels of at most 63)"
            ));
        }
        Ok(DnsName(d))
    }
}

/// An `[on_demand] allow` entry: an exact DNS name, or `*.` and a DNS name, which matches names with exactly
/// one more label in front (`*.customers.example.com` matches `a.customers.example.com`, neither
/// `customers.example.com` nor `a.b.customers.example.com`), as a wildcard certificate would.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    /// The name, or what follows `*.`.
    base: DnsName,
    wildcard: bool,
}

impl DomainPattern {
    /// Checks `raw`; the error says what is wrong with it.
    pub fn new(raw: &str) -> Result<Self, String> {
        let (rest, wildcard) = match raw.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (raw, false),
        };
        if rest.contains('*') {
            return Err(format!(
                "{raw:?}: a pattern is a name, or \"*.\" and a name (one label, in front)"
            ));
        }
        let base = DnsName::new(rest).map_err(|e| format!("{raw:?}: {e}"))?;
        Ok(DomainPattern { base, wildcard })
    }

    /// Whether `name` is allowed by this pattern.
    pub fn matches(&self, name: &DnsName) -> bool {
        if !self.wildcard {
            return *name == self.base;
        }
        name.strip_suffix(self.base.as_str())
            .and_then(|front| front.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.'))
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.base)
    }
}

/// A name on a certificate of the internal CA: a DNS name as for ACME, and also a single label
/// (`localhost`, `db`), a wildcard (`*.svc.internal`) or an IP address (written canonically).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SubjectName(String);

name_type!(SubjectName);

impl SubjectName {
    /// Checks and lower-cases `raw`; the error says what is wrong with it.
    pub fn new(raw: &str) -> Result<Self, String> {
        if let Ok(ip) = raw.parse::<IpAddr>() {
            return Ok(SubjectName(ip.to_string()));
        }
        let d = raw.trim_end_matches('.').to_ascii_lowercase();
        let rest = d.strip_prefix("*.").unwrap_or(&d);
        if !rest.is_ascii() {
            return Err(format!(
                "{raw:?}: write internationalised names in their ASCII (punycode, xn--) form"
            ));
        }
        if d.len() > 253 || !rest.split('.').all(label_ok) {
            return Err(format!(
                "{raw:?} is not a DNS name (letters, digits and hyphens in dot-separated labels of at most 63, optionally after \"*.\") or an IP address"
            ));
        }
        Ok(SubjectName(d))
    }
}

/// Whether two lists hold the same names, in any order (a stored certificate against its configuration).
pub fn same_names<A: AsRef<str>, B: AsRef<str>>(a: &[A], b: &[B]) -> bool {
    let mut a: Vec<&str> = a.iter().map(AsRef::as_ref).collect();
    let mut b: Vec<&str> = b.iter().map(AsRef::as_ref).collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

/// The names as plain strings (for a stored record, or a library that takes `String`s).
pub fn to_strings<T: AsRef<str>>(names: &[T]) -> Vec<String> {
    names.iter().map(|n| n.as_ref().to_owned()).collect()
}

/// Key algorithm of a certificate acme-sds issues or orders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA on P-256 (the default): small and fast, what Let's Encrypt recommends.
    EcdsaP256,
    /// ECDSA on P-384.
    EcdsaP384,
    /// RSA, 2048 bits: for clients that cannot do ECDSA.
    Rsa2048,
    /// RSA, 3072 bits.
    Rsa3072,
    /// RSA, 4096 bits.
    Rsa4096,
}

impl KeyType {
    /// Every key type, with the name the config file gives it.
    pub const ALL: [(&'static str, KeyType); 5] = [
        ("ecdsa-p256", KeyType::EcdsaP256),
        ("ecdsa-p384", KeyType::EcdsaP384),
        ("rsa-2048", KeyType::Rsa2048),
        ("rsa-3072", KeyType::Rsa3072),
        ("rsa-4096", KeyType::Rsa4096),
    ];

    /// The name the config file gives this key type.
    pub fn as_str(self) -> &'static str {
        KeyType::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map(|(s, _)| *s)
            .unwrap_or("ecdsa-p256")
    }

    /// The key type the config file calls `name`; the error lists the choices.
    pub fn from_name(name: &str) -> Result<Self, String> {
        KeyType::ALL
            .iter()
            .find(|(s, _)| *s == name)
            .map(|(_, k)| *k)
            .ok_or_else(|| {
                let names: Vec<&str> = KeyType::ALL.iter().map(|(s, _)| *s).collect();
                format!("{name:?} is not one of {}", names.join(", "))
            })
    }
}

/// How the CA validates an ACME certificate's names (`challenge`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum Challenge {
    /// HTTP-01 (default): the CA fetches `/.well-known/acme-challenge/TOKEN` on port 80.
    #[default]
    #[serde(rename = "http-01")]
    Http01,
    /// TLS-ALPN-01 (RFC 8737): the CA opens TLS on port 443 with ALPN `acme-tls/1`, which Envoy forwards
    /// to acme-sds's `[tls_alpn01]` listener.
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// DNS-01: the CA looks up TXT `_acme-challenge.NAME`, which acme-sds adds to the zone with an RFC 2136
    /// update (`[dns01]`). The only one that validates wildcards.
    #[serde(rename = "dns-01")]
    Dns01,
}

impl Challenge {
    /// The challenge the config file calls `name`; the error lists the choices.
    pub fn from_name(name: &str) -> Result<Self, String> {
        match name {
            "http-01" => Ok(Challenge::Http01),
            "tls-alpn-01" => Ok(Challenge::TlsAlpn01),
            "dns-01" => Ok(Challenge::Dns01),
            other => Err(format!(
                "{other:?} is not one of http-01, dns-01, tls-alpn-01"
            )),
        }
    }

    /// As the config file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Challenge::Http01 => "http-01",
            Challenge::TlsAlpn01 => "tls-alpn-01",
            Challenge::Dns01 => "dns-01",
        }
    }
}

/// Where an SDS listener listens: a Unix socket (`unix:PATH`) or a TCP address (`IP:PORT`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl ListenAddr {
    /// Parses `unix:PATH` (a relative path is taken from `base`, the config file's directory), `IP:PORT`
    /// or `localhost:PORT` (IPv4 loopback); the error shows the accepted forms.
    pub fn parse(s: &str, base: &Path) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "\"unix:\" needs a socket path, as in \"unix:/run/acme-sds/sds.sock\"".into(),
                );
            }
            return Ok(ListenAddr::Unix(base.join(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(ListenAddr::Tcp(addr));
        }
        if let Some(port) = s.strip_prefix("localhost:")
            && let Ok(port) = port.parse::<u16>()
        {
            return Ok(ListenAddr::Tcp(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                port,
            )));
        }
        Err(format!(
            "{s:?} is not \"unix:PATH\" or \"IP:PORT\" (for example \"127.0.0.1:8234\" or \"[::1]:8234\")"
        ))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

/// A server acme-sds connects to, as `HOST:PORT`, `HOST` (the default port), `IP:PORT` or `[IPv6]:PORT`: a
/// name server for DNS-01. A host name is looked up at each use (a moved server is followed).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServerAddr {
    host: String,
    port: u16,
}

impl ServerAddr {
    /// Parses `raw`, with `default_port` when it names none; the error shows the accepted forms.
    pub fn new(raw: &str, default_port: u16) -> Result<Self, String> {
        let bad = || {
            format!(
                "{raw:?} is not \"HOST:PORT\" or \"HOST\" (for example \"ns1.example.com:53\", \"192.0.2.1\" or \"[2001:db8::1]:53\")"
            )
        };
        if let Ok(a) = raw.parse::<SocketAddr>() {
            return Ok(ServerAddr {
                host: a.ip().to_string(),
                port: a.port(),
            });
        }
        if let Ok(ip) = raw
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            return Ok(ServerAddr {
                host: ip.to_string(),
                port: default_port,
            });
        }
        let (host, port) = match raw.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().map_err(|_| bad())?),
            None => (raw, default_port),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if port == 0 || host.is_empty() || !host.split('.').all(label_ok) {
            return Err(bad());
        }
        Ok(ServerAddr { host, port })
    }

    /// The host: a name, or an IP address without brackets.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_take_a_name_or_an_address_and_a_default_port() {
        for (raw, shown) in [
            ("ns1.example.com:5353", "ns1.example.com:5353"),
            ("NS1.Example.com.", "ns1.example.com:53"),
            ("127.0.0.1:8053", "127.0.0.1:8053"),
            ("192.0.2.1", "192.0.2.1:53"),
            ("[::1]:53", "[::1]:53"),
            ("::1", "[::1]:53"),
            ("localhost", "localhost:53"),
        ] {
            assert_eq!(
                ServerAddr::new(raw, 53).unwrap().to_string(),
                shown,
                "{raw}"
            );
        }
        for bad in [
            "",
            "ns1.example.com:0",
            "ns1.example.com:x",
            "a b:53",
            ":53",
        ] {
            assert!(ServerAddr::new(bad, 53).is_err(), "{bad}");
        }
    }

    #[test]
    fn allow_patterns_match_a_name_or_one_label_in_front() {
        let name = |n: &str| DnsName::new(n).unwrap();
        let star = DomainPattern::new("*.customers.example.com").unwrap();
        assert!(star.matches(&name("a.customers.example.com")));
        assert!(star.matches(&name("A.Customers.Example.com.")));
        assert!(!star.matches(&name("customers.example.com")));
        assert!(!star.matches(&name("a.b.customers.example.com")));
        assert!(!star.matches(&name("evilcustomers.example.com")));
        let exact = DomainPattern::new("Shop.Example.org").unwrap();
        assert!(exact.matches(&name("shop.example.org")));
        assert!(!exact.matches(&name("www.shop.example.org")));
        for bad in [
            "*",
            "*.com.*",
            "a.*.example.com",
            "**.example.com",
            "*.1.2.3.4",
            "not a name",
        ] {
            assert!(DomainPattern::new(bad).is_err(), "{bad}");
        }
        assert_eq!(star.to_string(), "*.customers.example.com");
    }

    #[test]
    fn names_check_themselves() {
        assert_eq!(
            &*DnsName::new("WWW.Example.COM.").unwrap(),
            "www.example.com"
        );
        for bad in [
            "*.example.com",
            "localhost",
            "10.0.0.1",
            "-a.example.com",
            "bücher.de",
        ] {
            assert!(DnsName::new(bad).is_err(), "{bad}");
        }
        let wild = DnsName::wildcard_allowed("*.Example.COM.").unwrap();
        assert_eq!(&*wild, "*.example.com");
        assert_eq!(
            &*DnsName::wildcard_allowed("example.com").unwrap(),
            "example.com"
        );
        for bad in ["*.com", "*.*.example.com", "a.*.example.com", "*"] {
            assert!(DnsName::wildcard_allowed(bad).is_err(), "{bad}");
        }
        for good in ["localhost", "*.svc.internal", "db"] {
            assert_eq!(&*SubjectName::new(good).unwrap(), good);
        }
        assert_eq!(&*SubjectName::new("::0001").unwrap(), "::1");
        assert!(SubjectName::new("a b").is_err());
        assert!(SecretName::new("web").is_ok());
        for bad in ["", "sds://web", "a b", &"x".repeat(254)] {
            assert!(SecretName::new(bad).is_err(), "{bad}");
        }
        assert_eq!(canonical_name("sds://web"), "web");
        assert_eq!(KeyType::from_name("rsa-2048"), Ok(KeyType::Rsa2048));
        assert!(
            KeyType::from_name("rsa-1024")
                .unwrap_err()
                .contains("ecdsa-p256")
        );
    }
}
