//! The configuration file: TOML parsed into typed, validated settings.
//!
//! Parsing is strict (`deny_unknown_fields`): a misspelt key is an error, not a silently ignored setting.
//! Validation collects *every* problem, each naming its key path (`certificate[1].name`) and, where the TOML
//! parser gives one, its line, so that `acme-sds check` can report a broken file in one go.
//! Relative paths in the file are resolved against the directory that holds the file, so a config behaves the
//! same whatever directory the daemon is started from.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

pub use crate::net::listen::TlsFiles;
pub use crate::values::{DnsName, KeyType, ListenAddr, SecretName, SubjectName};

mod schema;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from; for the built-in one, where `acme-sds.toml` would be.
    pub path: PathBuf,
    /// This is the built-in configuration ([`BUILT_IN`]): no file was named or found.
    pub built_in: bool,
    pub sds: SdsConfig,
    pub storage: StorageConfig,
    pub http01: Http01Config,
    /// `[acme]`; `None` when the table is absent (then no certificate may have `domains`).
    pub acme: Option<AcmeConfig>,
    /// `[admin] listen`: health, readiness and status endpoints; off when absent.
    pub admin: Option<SocketAddr>,
    pub certificates: Vec<CertificateConfig>,
    pub trust_bundles: Vec<TrustBundleConfig>,
}

impl Config {
    /// What is allowed but probably not what was meant: printed by `check` and logged by `run` and reload.
    pub fn warnings(&self) -> Vec<Problem> {
        let rules = self
            .certificates
            .iter()
            .map(|c| (&c.access, &c.origin))
            .chain(self.trust_bundles.iter().map(|b| (&b.access, &b.origin)));
        rules
            .filter(|(access, _)| access.nodes.is_some() && access.clients.is_none())
            .map(|(_, origin)| {
                Problem::new(
                    format!("{}.allowed_nodes", origin.key),
                    origin.line,
                    "is the only rule on this secret, and a node id is whatever the client says it is: any caller that can reach a listener can claim a matching one. Add allowed_clients (mutual TLS), or admit only trusted callers to the listeners (allowed_uids, socket_mode)",
                )
            })
            .collect()
    }

    /// Whether any certificate is obtained over ACME.
    pub fn has_acme_certificates(&self) -> bool {
        self.certificates
            .iter()
            .any(|c| matches!(c.source, CertificateSource::Acme { .. }))
    }
}

/// `[storage]`: where account, keys, certificates and ACME state are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub path: PathBuf,
}

/// `[http01]`: the HTTP-01 challenge responder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http01Config {
    pub listen: SocketAddr,
}

/// The default responder address: every interface, port 8089 (the port cert-manager's solver uses too).
pub const DEFAULT_HTTP01_LISTEN: &str = "0.0.0.0:8089";

/// `[acme]`: the ACME CA and account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcmeConfig {
    /// The directory URL.
    pub directory: String,
    pub contact: Vec<String>,
    pub accept_terms_of_service: bool,
    /// A PEM root to trust for the ACME server's own HTTPS (a private CA, or Pebble).
    pub directory_ca: Option<PathBuf>,
    /// External Account Binding.
    pub eab: Option<EabKey>,
    /// How many orders may run at once.
    pub max_concurrent_orders: usize,
    /// First retry delay after a failure; doubles (with jitter) up to `retry_max`.
    pub retry_initial: std::time::Duration,
    pub retry_max: std::time::Duration,
    /// How long the CA may take to answer (account lookups, ARI); a whole order may take 20 times that.
    pub request_timeout: std::time::Duration,
    /// Serve a temporary self-signed certificate for each ACME certificate until its first issuance
    /// (default true; `temporary_certificate` on a certificate overrides it).
    pub temporary_certificates: bool,
}

/// An External Account Binding: the key id and the decoded MAC key, which no `Debug` output shows.
#[derive(Clone, PartialEq, Eq)]
pub struct EabKey {
    pub kid: String,
    pub hmac_key: zeroize::Zeroizing<Vec<u8>>,
}

impl fmt::Debug for EabKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EabKey")
            .field("kid", &self.kid)
            .field("hmac_key", &"<redacted>")
            .finish()
    }
}

pub const LETSENCRYPT: &str = "https://acme-v02.api.letsencrypt.org/directory";
pub const LETSENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// `[sds]`: where the SDS gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    pub listen: Vec<ListenAddr>,
    /// Permission bits given to the Unix sockets acme-sds creates.
    pub socket_mode: u32,
    /// Group (gid) given to the Unix sockets, so that members may connect with mode 0660.
    pub socket_group: Option<u32>,
    /// Only peers running as these uids may use the Unix sockets (checked with SO_PEERCRED).
    pub allowed_uids: Option<Vec<u32>>,
    /// Mutual TLS for every TCP listener.
    pub tls: Option<TlsFiles>,
    /// Plain TCP beyond loopback was explicitly allowed.
    pub allow_plaintext: bool,
    /// A stream whose last push has gone unacknowledged this long is ended when a newer version is due.
    pub stall_timeout: std::time::Duration,
    /// Stream, name and connection limits, overall and per caller.
    pub quotas: crate::net::peer::Quotas,
    /// A new connection must finish its TLS handshake and send the HTTP/2 preface within this.
    pub handshake_timeout: std::time::Duration,
}

pub use crate::sds::access::Access;

/// Default permission bits of SDS Unix sockets: only the owner may connect, since the socket hands out
/// private keys.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// Where a config item came from, for error messages that point at the file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Key path, for example `certificate[0]`.
    pub key: String,
    /// 1-based line of the item in the config file.
    pub line: Option<usize>,
}

/// A `[[certificate]]`: a TLS certificate and key served as an SDS `tls_certificate` secret.
#[derive(Debug, Clone)]
pub struct CertificateConfig {
    pub name: SecretName,
    pub source: CertificateSource,
    pub access: Access,
    pub origin: Origin,
}

#[derive(Debug, Clone)]
pub enum CertificateSource {
    /// A PEM chain (leaf first) and a PEM private key on disk, watched for changes.
    Files {
        cert_file: PathBuf,
        key_file: PathBuf,
        cert_line: Option<usize>,
        key_line: Option<usize>,
    },
    /// Obtained and renewed over ACME for these (lower-cased, validated) domains.
    Acme {
        domains: Vec<DnsName>,
        key_type: KeyType,
        /// `temporary_certificate`: serve a temporary self-signed certificate until the first one is
        /// issued; `None` follows `[acme] temporary_certificates`.
        temporary_certificate: Option<bool>,
    },
    /// `issuer = "internal"`: signed and renewed by acme-sds's own local CA, for these names (DNS names,
    /// single labels such as `localhost`, IP addresses, wildcards), which no public CA would validate.
    Internal {
        domains: Vec<SubjectName>,
        key_type: KeyType,
    },
}

impl CertificateSource {
    /// The names a certificate is issued for, when acme-sds issues it (ACME or internal).
    pub fn issued_domains(&self) -> Option<Vec<&str>> {
        match self {
            CertificateSource::Acme { domains, .. } => {
                Some(domains.iter().map(DnsName::as_str).collect())
            }
            CertificateSource::Internal { domains, .. } => {
                Some(domains.iter().map(SubjectName::as_str).collect())
            }
            CertificateSource::Files { .. } => None,
        }
    }
}

/// `issuer = "internal"`: the certificate is signed by acme-sds's local CA.
pub const ISSUER_INTERNAL: &str = "internal";
/// `issuer = "acme"` (the default with `domains`): the certificate is obtained from the `[acme]` CA.
pub const ISSUER_ACME: &str = "acme";

/// A `[[trust_bundle]]`: CA certificates served as an SDS `validation_context` secret (`trusted_ca`).
#[derive(Debug, Clone)]
pub struct TrustBundleConfig {
    pub name: SecretName,
    pub file: PathBuf,
    pub file_line: Option<usize>,
    pub access: Access,
    pub origin: Origin,
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `sds.listen[0]`; empty when the file as a whole is at fault.
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl Problem {
    /// `FILE:LINE: KEY: MESSAGE`, as every problem is printed.
    pub fn located(&self, path: &Path) -> String {
        let mut out = path.display().to_string();
        if let Some(line) = self.line {
            out.push_str(&format!(":{line}"));
        }
        if !self.key.is_empty() {
            out.push_str(&format!(": {}", self.key));
        }
        out.push_str(&format!(": {}", self.message));
        out
    }

    pub fn new(key: impl Into<String>, line: Option<usize>, message: impl Into<String>) -> Self {
        Problem {
            key: key.into(),
            line,
            message: message.into(),
        }
    }
}

/// Everything wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub path: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "{}: {n} problem{}",
            self.path.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {}", p.located(&self.path))?;
        }
        Ok(())
    }
}

// ---- raw, as written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    sds: Option<Spanned<RawSds>>,
    storage: Option<Spanned<RawStorage>>,
    http01: Option<Spanned<RawHttp01>>,
    acme: Option<Spanned<RawAcme>>,
    admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    certificate: Vec<Spanned<RawCertificate>>,
    #[serde(default)]
    trust_bundle: Vec<Spanned<RawTrustBundle>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSds {
    listen: Option<Spanned<Vec<Spanned<String>>>>,
    socket_mode: Option<Spanned<String>>,
    socket_group: Option<Spanned<toml::Value>>,
    allowed_uids: Option<Spanned<Vec<Spanned<i64>>>>,
    allow_plaintext: Option<bool>,
    stall_timeout: Option<Spanned<String>>,
    handshake_timeout: Option<Spanned<String>>,
    max_streams: Option<Spanned<i64>>,
    max_streams_per_peer: Option<Spanned<i64>>,
    max_names_per_peer: Option<Spanned<i64>>,
    max_connections: Option<Spanned<i64>>,
    max_connections_per_peer: Option<Spanned<i64>>,
    tls: Option<Spanned<RawSdsTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSdsTls {
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    client_ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    name: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
    domains: Option<Spanned<Vec<Spanned<String>>>>,
    key_type: Option<Spanned<String>>,
    /// Lets this certificate name domains that another certificate names too (say, an RSA and an ECDSA
    /// certificate for the same site).
    #[serde(default)]
    allow_duplicate_domains: bool,
    allowed_nodes: Option<Spanned<Vec<String>>>,
    allowed_clients: Option<Spanned<Vec<String>>>,
    temporary_certificate: Option<Spanned<bool>>,
    issuer: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStorage {
    path: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp01 {
    listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAcme {
    directory: Option<Spanned<String>>,
    #[serde(default)]
    contact: Vec<Spanned<String>>,
    #[serde(default)]
    accept_terms_of_service: Option<Spanned<bool>>,
    directory_ca: Option<Spanned<String>>,
    eab_kid: Option<Spanned<String>>,
    eab_hmac_key: Option<Spanned<String>>,
    max_concurrent_orders: Option<Spanned<i64>>,
    retry_initial: Option<Spanned<String>>,
    retry_max: Option<Spanned<String>>,
    request_timeout: Option<Spanned<String>>,
    temporary_certificates: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustBundle {
    name: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
    allowed_nodes: Option<Spanned<Vec<String>>>,
    allowed_clients: Option<Spanned<Vec<String>>>,
}

/// The file acme-sds looks for in the current directory when no configuration is named.
pub const DEFAULT_FILE: &str = "acme-sds.toml";

/// The built-in configuration, used when no file is named and there is no [`DEFAULT_FILE`]: SDS on a Unix
/// socket and a `localhost` certificate from the internal CA, both in the current directory.
pub const BUILT_IN: &str = include_str!("built_in.toml");

/// The configuration to use: the file at `path` when one is named; else [`DEFAULT_FILE`] in the current
/// directory when it exists; else [`BUILT_IN`], with paths relative to the current directory.
pub fn load_or_built_in(path: Option<&Path>) -> Result<Config, ConfigError> {
    if let Some(p) = path {
        return load(p);
    }
    let default = Path::new(DEFAULT_FILE);
    if default.exists() {
        return load(default);
    }
    let cwd = std::env::current_dir().map_err(|e| ConfigError {
        path: default.to_owned(),
        problems: vec![Problem::new(
            "",
            None,
            format!("cannot find the current directory, where the built-in configuration keeps its files: {e}"),
        )],
    })?;
    let mut config = parse(BUILT_IN, &cwd.join(DEFAULT_FILE))?;
    config.built_in = true;
    Ok(config)
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        path: path.to_owned(),
        problems: vec![Problem::new("", None, format!("cannot read the file: {e}"))],
    })?;
    parse(&text, path)
}

/// Parses and validates configuration text; `path` names the file in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let lines = LineIndex::new(text);
    let fail = |problems| ConfigError {
        path: path.to_owned(),
        problems,
    };
    let syntax = |e: toml::de::Error| {
        let line = e.span().map(|s| lines.line(s.start));
        fail(vec![Problem::new(
            "",
            line,
            e.message().trim_end().to_owned(),
        )])
    };
    // Shape first (every unknown key and wrongly typed value at once), then the typed reading.
    let doc = toml::de::DeTable::parse(text).map_err(syntax)?;
    let shape = schema::check(doc.get_ref(), &lines);
    if !shape.is_empty() {
        return Err(fail(shape));
    }
    let raw = RawConfig::deserialize(toml::de::Deserializer::from(doc)).map_err(syntax)?;
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut v = Validator {
        lines: &lines,
        base: &base,
        problems: Vec::new(),
    };
    let sds = v.sds(raw.sds);
    let storage = v.storage(raw.storage);
    let http01 = v.http01(raw.http01);
    let admin = raw.admin.and_then(|a| {
        let line = v.line(&a);
        match a.into_inner().listen {
            None => {
                v.problem(
                    "admin.listen",
                    line,
                    "missing: the admin listener's \"IP:PORT\"",
                );
                None
            }
            Some(l) => {
                let line = v.line(&l);
                match v.listen_addr(l.get_ref()) {
                    Ok(ListenAddr::Tcp(a)) => Some(a),
                    _ => {
                        v.problem(
                            "admin.listen",
                            line,
                            format!(
                                "{:?} is not \"IP:PORT\" (for example \"127.0.0.1:9901\")",
                                l.get_ref()
                            ),
                        );
                        None
                    }
                }
            }
        }
    });
    let acme_line = raw.acme.as_ref().map(|a| v.lines.line(a.span().start));
    let acme = raw.acme.map(|a| v.acme(a.into_inner(), acme_line));
    let (certificates, dup_allowed) = v.certificates(raw.certificate);
    let trust_bundles = v.trust_bundles(raw.trust_bundle);
    v.unique_names(&certificates, &trust_bundles);
    v.unique_domains(&certificates, &dup_allowed);
    v.acme_requirements(&certificates, acme.as_ref(), acme_line);
    if sds.tls.is_none() {
        let restricted = certificates
            .iter()
            .map(|c| (&c.access, &c.origin))
            .chain(trust_bundles.iter().map(|b| (&b.access, &b.origin)));
        for (access, origin) in restricted {
            if access.clients.is_some() {
                v.problem(
                    format!("{}.allowed_clients", origin.key),
                    origin.line,
                    "needs [sds.tls]: without client certificates a caller has no identity to match",
                );
            }
        }
    }
    if v.problems.is_empty() {
        Ok(Config {
            path: path.to_owned(),
            built_in: false,
            sds,
            storage,
            http01,
            acme,
            admin,
            certificates,
            trust_bundles,
        })
    } else {
        Err(fail(v.problems))
    }
}

struct Validator<'a> {
    lines: &'a LineIndex,
    base: &'a Path,
    problems: Vec<Problem>,
}

impl Validator<'_> {
    fn line<T>(&self, s: &Spanned<T>) -> Option<usize> {
        Some(self.lines.line(s.span().start))
    }

    fn problem(&mut self, key: impl Into<String>, line: Option<usize>, msg: impl Into<String>) {
        self.problems.push(Problem::new(key, line, msg));
    }

    fn path(&self, value: &str) -> PathBuf {
        let p = Path::new(value);
        if p.is_absolute() {
            p.to_owned()
        } else {
            self.base.join(p)
        }
    }

    fn sds(&mut self, raw: Option<Spanned<RawSds>>) -> SdsConfig {
        let mut out = SdsConfig {
            listen: Vec::new(),
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            allowed_uids: None,
            tls: None,
            allow_plaintext: false,
            stall_timeout: std::time::Duration::from_secs(300),
            quotas: crate::net::peer::Quotas::default(),
            handshake_timeout: std::time::Duration::from_secs(10),
        };
        let Some(raw) = raw else {
            self.problem(
                "sds",
                None,
                "missing [sds] table: acme-sds needs at least one `listen` address",
            );
            return out;
        };
        let table_line = self.line(&raw);
        let raw = raw.into_inner();
        match raw.listen {
            None => self.problem(
                "sds.listen",
                table_line,
                "missing: give one or more addresses, \"unix:PATH\" or \"HOST:PORT\"",
            ),
            Some(list) => {
                let list_line = self.line(&list);
                let list = list.into_inner();
                if list.is_empty() {
                    self.problem("sds.listen", list_line, "empty: give at least one address");
                }
                for (i, entry) in list.iter().enumerate() {
                    let key = format!("sds.listen[{i}]");
                    let line = self.line(entry);
                    match self.listen_addr(entry.get_ref()) {
                        Ok(addr) if out.listen.contains(&addr) => {
                            self.problem(key, line, format!("{addr} is listed twice"))
                        }
                        Ok(addr) => out.listen.push(addr),
                        Err(msg) => self.problem(key, line, msg),
                    }
                }
            }
        }
        if let Some(mode) = raw.socket_mode {
            let line = self.line(&mode);
            match parse_mode(mode.get_ref()) {
                Ok(m) => out.socket_mode = m,
                Err(msg) => self.problem("sds.socket_mode", line, msg),
            }
        }
        if let Some(group) = raw.socket_group {
            let line = self.line(&group);
            match resolve_group(group.get_ref()) {
                Ok(gid) => out.socket_group = Some(gid),
                Err(msg) => self.problem("sds.socket_group", line, msg),
            }
        }
        if let Some(uids) = raw.allowed_uids {
            let mut list = Vec::new();
            for (i, uid) in uids.into_inner().into_iter().enumerate() {
                let line = self.line(&uid);
                match u32::try_from(*uid.get_ref()) {
                    Ok(u) => list.push(u),
                    Err(_) => self.problem(format!("sds.allowed_uids[{i}]"), line, "not a user id"),
                }
            }
            out.allowed_uids = Some(list);
        }
        out.allow_plaintext = raw.allow_plaintext.unwrap_or(false);
        for (key, raw, slot) in [
            ("stall_timeout", raw.stall_timeout, &mut out.stall_timeout),
            (
                "handshake_timeout",
                raw.handshake_timeout,
                &mut out.handshake_timeout,
            ),
        ] {
            let Some(t) = raw else { continue };
            let line = self.line(&t);
            match parse_duration(t.get_ref()) {
                Ok(d) if !d.is_zero() => *slot = d,
                Ok(_) => self.problem(format!("sds.{key}"), line, "must be longer than zero"),
                Err(msg) => self.problem(format!("sds.{key}"), line, msg),
            }
        }
        let q = &mut out.quotas;
        for (key, raw, slot) in [
            ("max_streams", raw.max_streams, &mut q.max_streams),
            (
                "max_streams_per_peer",
                raw.max_streams_per_peer,
                &mut q.max_streams_per_peer,
            ),
            (
                "max_names_per_peer",
                raw.max_names_per_peer,
                &mut q.max_names_per_peer,
            ),
            (
                "max_connections",
                raw.max_connections,
                &mut q.max_connections,
            ),
            (
                "max_connections_per_peer",
                raw.max_connections_per_peer,
                &mut q.max_connections_per_peer,
            ),
        ] {
            if let Some(v) = raw {
                let line = self.line(&v);
                match usize::try_from(*v.get_ref()) {
                    Ok(n) if n > 0 => *slot = n,
                    _ => self.problem(
                        format!("sds.{key}"),
                        line,
                        format!("{} is not a positive number", v.get_ref()),
                    ),
                }
            }
        }
        if let Some(tls) = raw.tls {
            let line = self.line(&tls);
            let tls = tls.into_inner();
            let mut file = |key: &str, v: Option<Spanned<String>>| match v {
                Some(v) => Some(self.path(v.get_ref())),
                None => {
                    self.problem(format!("sds.tls.{key}"), line, "missing");
                    None
                }
            };
            let cert_file = file("cert_file", tls.cert_file);
            let key_file = file("key_file", tls.key_file);
            let client_ca_file = file("client_ca_file", tls.client_ca_file);
            if let (Some(cert_file), Some(key_file), Some(client_ca_file)) =
                (cert_file, key_file, client_ca_file)
            {
                out.tls = Some(TlsFiles {
                    cert_file,
                    key_file,
                    client_ca_file,
                });
            }
        }
        if out.tls.is_none() && !out.allow_plaintext {
            for (i, addr) in out.listen.iter().enumerate() {
                if let ListenAddr::Tcp(a) = addr
                    && !a.ip().is_loopback()
                {
                    self.problem(
                        format!("sds.listen[{i}]"),
                        table_line,
                        format!(
                            "{a}: plain TCP beyond loopback would hand out private keys unencrypted; configure [sds.tls] (mutual TLS), or set allow_plaintext = true if the network is otherwise protected"
                        ),
                    );
                }
            }
        }
        out
    }

    fn access(
        &mut self,
        key: &str,
        nodes: Option<Spanned<Vec<String>>>,
        clients: Option<Spanned<Vec<String>>>,
    ) -> Access {
        fn patterns<T>(
            v: &mut Validator<'_>,
            key: String,
            list: Option<Spanned<Vec<String>>>,
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> Option<Vec<T>> {
            let list = list?;
            let line = v.line(&list);
            let mut out = Vec::new();
            for (i, p) in list.into_inner().iter().enumerate() {
                match parse(p) {
                    Ok(p) => out.push(p),
                    Err(msg) => v.problem(format!("{key}[{i}]"), line, msg),
                }
            }
            Some(out)
        }
        Access {
            nodes: patterns(
                self,
                format!("{key}.allowed_nodes"),
                nodes,
                crate::sds::access::NodePattern::new,
            ),
            clients: patterns(
                self,
                format!("{key}.allowed_clients"),
                clients,
                crate::sds::access::ClientPattern::new,
            ),
        }
    }

    fn listen_addr(&self, s: &str) -> Result<ListenAddr, String> {
        ListenAddr::parse(s, self.base)
    }

    /// The entry's secret name; `None` (with the problem noted) when it is missing or breaks the rules, and
    /// then the rest of the entry is still checked, so that every problem is reported at once.
    fn name(
        &mut self,
        key: &str,
        line: Option<usize>,
        name: Option<Spanned<String>>,
    ) -> Option<SecretName> {
        let Some(name) = name else {
            self.problem(
                format!("{key}.name"),
                line,
                "missing: the SDS resource name Envoy asks for",
            );
            return None;
        };
        let l = self.line(&name);
        SecretName::new(name.get_ref())
            .map_err(|msg| self.problem(format!("{key}.name"), l, msg))
            .ok()
    }

    /// The names of a certificate acme-sds issues, each checked by `make` and listed once.
    fn domain_names<T: PartialEq + fmt::Debug + std::ops::Deref<Target = str>>(
        &mut self,
        key: &str,
        domains: &[Spanned<String>],
        make: fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let mut names: Vec<T> = Vec::new();
        for (j, d) in domains.iter().enumerate() {
            let l = self.line(d);
            match make(d.get_ref()) {
                Ok(n) if names.contains(&n) => self.problem(
                    format!("{key}.domains[{j}]"),
                    l,
                    format!("{:?} is listed twice", &*n),
                ),
                Ok(n) => names.push(n),
                Err(msg) => self.problem(format!("{key}.domains[{j}]"), l, msg),
            }
        }
        names
    }

    fn certificates(
        &mut self,
        raw: Vec<Spanned<RawCertificate>>,
    ) -> (Vec<CertificateConfig>, Vec<bool>) {
        let mut out = Vec::new();
        let mut dup_allowed = Vec::new();
        for (i, entry) in raw.into_iter().enumerate() {
            let key = format!("certificate[{i}]");
            let line = self.line(&entry);
            let entry = entry.into_inner();
            let name = self.name(&key, line, entry.name);
            let access = self.access(&key, entry.allowed_nodes, entry.allowed_clients);
            let files = entry.cert_file.is_some() || entry.key_file.is_some();
            let internal = match &entry.issuer {
                None => false,
                Some(i) if i.get_ref() == ISSUER_ACME => false,
                Some(i) if i.get_ref() == ISSUER_INTERNAL => true,
                Some(i) => {
                    let l = self.line(i);
                    self.problem(
                        format!("{key}.issuer"),
                        l,
                        format!(
                            "{:?} is not an issuer: \"{ISSUER_ACME}\" (the [acme] CA, the default) or \"{ISSUER_INTERNAL}\" (acme-sds's own local CA)",
                            i.get_ref()
                        ),
                    );
                    continue;
                }
            };
            if let (Some(i), None) = (&entry.issuer, &entry.domains) {
                let l = self.line(i);
                self.problem(
                    format!("{key}.issuer"),
                    l,
                    "`issuer` applies to certificates acme-sds obtains (with `domains`) only",
                );
                continue;
            }
            let source = match (entry.domains, files) {
                (Some(domains), true) => {
                    let l = self.line(&domains);
                    self.problem(
                        format!("{key}.domains"),
                        l,
                        "a certificate has either `domains` (ACME) or `cert_file`/`key_file`, never both",
                    );
                    continue;
                }
                (Some(domains), false) => {
                    if internal && let Some(t) = &entry.temporary_certificate {
                        let l = self.line(t);
                        self.problem(
                            format!("{key}.temporary_certificate"),
                            l,
                            "an internal certificate is issued at once: `temporary_certificate` applies to ACME certificates only",
                        );
                    }
                    // The name becomes a file name in the storage directory.
                    if let Some(Err(msg)) = name.as_deref().map(crate::store::name_segment) {
                        self.problem(format!("{key}.name"), line, msg);
                    }
                    let key_type = match entry.key_type {
                        None => KeyType::EcdsaP256,
                        Some(kt) => {
                            let l = self.line(&kt);
                            match KeyType::from_name(kt.get_ref()) {
                                Ok(k) => k,
                                Err(msg) => {
                                    self.problem(format!("{key}.key_type"), l, msg);
                                    continue;
                                }
                            }
                        }
                    };
                    let list_line = self.line(&domains);
                    let domains = domains.into_inner();
                    if domains.is_empty() {
                        self.problem(
                            format!("{key}.domains"),
                            list_line,
                            "empty: list at least one domain",
                        );
                    }
                    if internal {
                        CertificateSource::Internal {
                            domains: self.domain_names(&key, &domains, SubjectName::new),
                            key_type,
                        }
                    } else {
                        CertificateSource::Acme {
                            domains: self.domain_names(&key, &domains, DnsName::new),
                            key_type,
                            temporary_certificate: entry
                                .temporary_certificate
                                .map(|t| *t.get_ref()),
                        }
                    }
                }
                (None, _) => {
                    if let Some(t) = &entry.temporary_certificate {
                        let l = self.line(t);
                        self.problem(
                            format!("{key}.temporary_certificate"),
                            l,
                            "`temporary_certificate` applies to ACME certificates (with `domains`) only",
                        );
                    }
                    if let Some(kt) = &entry.key_type {
                        let l = self.line(kt);
                        self.problem(
                            format!("{key}.key_type"),
                            l,
                            "`key_type` applies to ACME certificates (with `domains`) only",
                        );
                    }
                    match (entry.cert_file, entry.key_file) {
                        (Some(cert), Some(keyf)) => CertificateSource::Files {
                            cert_line: self.line(&cert),
                            key_line: self.line(&keyf),
                            cert_file: self.path(cert.get_ref()),
                            key_file: self.path(keyf.get_ref()),
                        },
                        (Some(_), None) => {
                            self.problem(
                                format!("{key}.key_file"),
                                line,
                                "missing: `cert_file` needs its `key_file`",
                            );
                            continue;
                        }
                        (None, Some(_)) => {
                            self.problem(
                                format!("{key}.cert_file"),
                                line,
                                "missing: `key_file` needs its `cert_file`",
                            );
                            continue;
                        }
                        (None, None) => {
                            self.problem(
                                key.clone(),
                                line,
                                "no certificate source: give `domains` (ACME) or `cert_file` and `key_file`",
                            );
                            continue;
                        }
                    }
                }
            };
            let Some(name) = name else { continue };
            out.push(CertificateConfig {
                name,
                source,
                access,
                origin: Origin { key, line },
            });
            dup_allowed.push(entry.allow_duplicate_domains);
        }
        (out, dup_allowed)
    }

    fn unique_domains(&mut self, certs: &[CertificateConfig], dup_allowed: &[bool]) {
        let mut seen: HashMap<&str, (usize, &Origin)> = HashMap::new();
        let mut problems = Vec::new();
        for (i, c) in certs.iter().enumerate() {
            let CertificateSource::Acme { domains, .. } = &c.source else {
                continue;
            };
            for d in domains {
                match seen.get(d.as_str()) {
                    Some((j, first)) if !(dup_allowed[i] || dup_allowed[*j]) => {
                        problems.push(Problem::new(
                            format!("{}.domains", c.origin.key),
                            c.origin.line,
                            format!(
                                "{d:?} is also in {}: set `allow_duplicate_domains = true` if two certificates for it are intended",
                                first.key
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(d, (i, &c.origin));
                    }
                }
            }
        }
        self.problems.extend(problems);
    }

    fn acme_requirements(
        &mut self,
        certs: &[CertificateConfig],
        acme: Option<&AcmeConfig>,
        acme_line: Option<usize>,
    ) {
        let Some(first) = certs
            .iter()
            .find(|c| matches!(c.source, CertificateSource::Acme { .. }))
        else {
            return;
        };
        match acme {
            None => self.problem(
                format!("{}.domains", first.origin.key),
                first.origin.line,
                "ACME certificates need an [acme] table (directory, contact, accept_terms_of_service)",
            ),
            Some(a) if !a.accept_terms_of_service => self.problem(
                "acme.accept_terms_of_service",
                acme_line,
                "must be true before any certificate is ordered: read the CA's terms of service, then set it",
            ),
            Some(_) => {}
        }
    }

    fn storage(&mut self, raw: Option<Spanned<RawStorage>>) -> StorageConfig {
        let path = raw
            .and_then(|r| r.into_inner().path)
            .map(|p| p.into_inner())
            .unwrap_or_else(|| "acme-sds-data".to_owned());
        StorageConfig {
            path: self.path(&path),
        }
    }

    fn http01(&mut self, raw: Option<Spanned<RawHttp01>>) -> Http01Config {
        let default = || {
            DEFAULT_HTTP01_LISTEN
                .parse()
                .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8089))
        };
        let Some(listen) = raw.and_then(|r| r.into_inner().listen) else {
            return Http01Config { listen: default() };
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
                Http01Config { listen: default() }
            }
        }
    }

    fn acme(&mut self, raw: RawAcme, table_line: Option<usize>) -> AcmeConfig {
        let directory = match raw.directory {
            None => LETSENCRYPT_STAGING.to_owned(),
            Some(d) => {
                let l = self.line(&d);
                match d.get_ref().as_str() {
                    "letsencrypt" => LETSENCRYPT.to_owned(),
                    "letsencrypt-staging" => LETSENCRYPT_STAGING.to_owned(),
                    url if url.starts_with("https://") && url.len() > "https://".len() => {
                        url.to_owned()
                    }
                    other => {
                        self.problem(
                            "acme.directory",
                            l,
                            format!("{other:?} is not \"letsencrypt\", \"letsencrypt-staging\" or an https:// directory URL"),
                        );
                        String::new()
                    }
                }
            }
        };
        let mut contact = Vec::new();
        for (i, c) in raw.contact.into_iter().enumerate() {
            let l = self.line(&c);
            let c = c.into_inner();
            if c.starts_with("mailto:") && c.len() > "mailto:".len() && !c.contains(',') {
                contact.push(c);
            } else {
                self.problem(
                    format!("acme.contact[{i}]"),
                    l,
                    format!("{c:?} is not a \"mailto:ADDRESS\" URL"),
                );
            }
        }
        let directory_ca = raw.directory_ca.map(|p| self.path(p.get_ref()));
        let eab = match (raw.eab_kid, raw.eab_hmac_key) {
            (None, None) => None,
            (Some(kid), Some(key)) => {
                use base64::Engine;
                let l = self.line(&key);
                let trimmed = key.get_ref().trim_end_matches('=');
                match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed) {
                    Ok(bytes) if !bytes.is_empty() => Some(EabKey {
                        kid: kid.into_inner(),
                        hmac_key: zeroize::Zeroizing::new(bytes),
                    }),
                    _ => {
                        self.problem(
                            "acme.eab_hmac_key",
                            l,
                            "not base64url (as the CA hands it out)",
                        );
                        None
                    }
                }
            }
            (Some(_), None) => {
                self.problem(
                    "acme.eab_hmac_key",
                    table_line,
                    "missing: `eab_kid` needs its `eab_hmac_key`",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    "acme.eab_kid",
                    table_line,
                    "missing: `eab_hmac_key` needs its `eab_kid`",
                );
                None
            }
        };
        let max_concurrent_orders = match raw.max_concurrent_orders {
            None => 8,
            Some(n) => {
                let l = self.line(&n);
                match usize::try_from(*n.get_ref()) {
                    Ok(n) if (1..=1000).contains(&n) => n,
                    _ => {
                        self.problem(
                            "acme.max_concurrent_orders",
                            l,
                            "must be between 1 and 1000",
                        );
                        8
                    }
                }
            }
        };
        let mut duration = |key: &str, raw: Option<Spanned<String>>, default: u64| match raw {
            None => std::time::Duration::from_secs(default),
            Some(d) => {
                let l = self.line(&d);
                match parse_duration(d.get_ref()) {
                    Ok(v) if !v.is_zero() => v,
                    Ok(_) => {
                        self.problem(format!("acme.{key}"), l, "must be longer than zero");
                        std::time::Duration::from_secs(default)
                    }
                    Err(msg) => {
                        self.problem(format!("acme.{key}"), l, msg);
                        std::time::Duration::from_secs(default)
                    }
                }
            }
        };
        let retry_initial = duration("retry_initial", raw.retry_initial, 60);
        let retry_max = duration("retry_max", raw.retry_max, 24 * 3600);
        let request_timeout = duration("request_timeout", raw.request_timeout, 30);
        AcmeConfig {
            directory,
            contact,
            accept_terms_of_service: raw.accept_terms_of_service.is_some_and(|b| *b.get_ref()),
            directory_ca,
            eab,
            max_concurrent_orders,
            retry_initial,
            retry_max: retry_max.max(retry_initial),
            request_timeout,
            temporary_certificates: raw.temporary_certificates.unwrap_or(true),
        }
    }

    fn trust_bundles(&mut self, raw: Vec<Spanned<RawTrustBundle>>) -> Vec<TrustBundleConfig> {
        let mut out = Vec::new();
        for (i, entry) in raw.into_iter().enumerate() {
            let key = format!("trust_bundle[{i}]");
            let line = self.line(&entry);
            let entry = entry.into_inner();
            let name = self.name(&key, line, entry.name);
            let access = self.access(&key, entry.allowed_nodes, entry.allowed_clients);
            let Some(file) = entry.file else {
                self.problem(
                    format!("{key}.file"),
                    line,
                    "missing: the PEM file of CA certificates",
                );
                continue;
            };
            let Some(name) = name else { continue };
            out.push(TrustBundleConfig {
                name,
                file_line: self.line(&file),
                file: self.path(file.get_ref()),
                access,
                origin: Origin { key, line },
            });
        }
        out
    }

    fn unique_names(&mut self, certs: &[CertificateConfig], bundles: &[TrustBundleConfig]) {
        let mut seen: HashMap<&str, &Origin> = HashMap::new();
        let all = certs
            .iter()
            .map(|c| (c.name.as_str(), &c.origin))
            .chain(bundles.iter().map(|b| (b.name.as_str(), &b.origin)));
        let mut dups = Vec::new();
        for (name, origin) in all {
            if name.is_empty() {
                continue;
            }
            if let Some(first) = seen.get(name) {
                dups.push(Problem::new(
                    format!("{}.name", origin.key),
                    origin.line,
                    format!(
                        "duplicate secret name {name:?}: already used by {}",
                        first.key
                    ),
                ));
            } else {
                seen.insert(name, origin);
            }
        }
        self.problems.extend(dups);
    }
}

/// The longest duration any setting accepts: far beyond any sensible timeout or retry delay, and far from
/// what would overflow the date arithmetic it feeds.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(10 * 365 * 86400);

/// Parses "90", "30s", "10m", "6h", "1d" (at most [`MAX_DURATION`]); the error says what is wrong.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let bad = || format!("{s:?} is not a duration such as \"30s\", \"10m\", \"6h\" or \"1d\"");
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let mult: u64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(bad()),
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| {
            format!("{s:?} is longer than 10 years, the most any duration setting accepts")
        })
}

/// A group name or a numeric gid. Names are resolved through the system's group database (NSS: files,
/// LDAP, sssd, systemd's dynamic groups, whatever `/etc/nsswitch.conf` lists), as `chgrp` would.
fn resolve_group(v: &toml::Value) -> Result<u32, String> {
    match v {
        toml::Value::Integer(n) => u32::try_from(*n).map_err(|_| format!("{n} is not a group id")),
        toml::Value::String(name) => {
            if let Ok(n) = name.parse::<u32>() {
                return Ok(n);
            }
            match nix::unistd::Group::from_name(name) {
                Ok(Some(g)) => Ok(g.gid.as_raw()),
                Ok(None) => Err(format!("no group named {name:?}")),
                Err(e) => Err(format!("cannot look up group {name:?}: {e}")),
            }
        }
        _ => Err("a group name or id".into()),
    }
}

fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!(
            "{s:?} is not an octal permission mode such as \"0660\""
        )),
    }
}

/// Maps byte offsets to 1-based line numbers.
struct LineIndex {
    starts: Vec<usize>,
}

impl LineIndex {
    fn new(text: &str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        LineIndex { starts }
    }

    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&s| s <= offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/acme-sds/acme-sds.toml"))
    }

    #[test]
    fn full_contract_parses() {
        let cfg = parse_str(
            r#"
[sds]
listen = ["unix:/run/acme-sds/sds.sock", "127.0.0.1:8234"]
socket_mode = "0660"

[[certificate]]
name = "web"
cert_file = "/etc/acme-sds/web.crt"
key_file = "web.key"

[[trust_bundle]]
name = "client-ca"
file = "/etc/acme-sds/ca.pem"
"#,
        )
        .unwrap();
        assert_eq!(
            cfg.sds.listen,
            vec![
                ListenAddr::Unix("/run/acme-sds/sds.sock".into()),
                ListenAddr::Tcp("127.0.0.1:8234".parse().unwrap())
            ]
        );
        assert_eq!(cfg.sds.socket_mode, 0o660);
        let CertificateSource::Files { key_file, .. } = &cfg.certificates[0].source else {
            panic!("expected files");
        };
        assert_eq!(
            key_file,
            Path::new("/etc/acme-sds/web.key"),
            "relative to the config file"
        );
        assert_eq!(cfg.trust_bundles[0].name, "client-ca");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse_str("[sds]\nlisten = [\"127.0.0.1:1\"]\n\n[[certificate]]\nname = \"a\"\ncert_fil = \"x\"\n")
            .unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].line, Some(6));
        assert!(err.problems[0].message.contains("cert_fil"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = parse_str(
            r#"
[sds]
listen = ["nonsense", "unix:"]
socket_mode = "999"

[[certificate]]
name = "web"
cert_file = "a.crt"

[[certificate]]
name = "web"
cert_file = "b.crt"
key_file = "b.key"

[[trust_bundle]]
name = "sds://ca"
"#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "sds.listen[0]",
                "sds.listen[1]",
                "sds.socket_mode",
                "certificate[0].key_file",
                "trust_bundle[0].name",
                "trust_bundle[0].file",
            ]
        );
        assert_eq!(err.problems[0].line, Some(3));
        let text = err.to_string();
        assert!(text.contains("acme-sds.toml:4: sds.socket_mode"), "{text}");
    }

    #[test]
    fn duplicate_names_across_kinds() {
        let err = parse_str(
            "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"x\"\ncert_file=\"a\"\nkey_file=\"b\"\n[[trust_bundle]]\nname=\"x\"\nfile=\"c\"\n",
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].key, "trust_bundle[0].name");
        assert_eq!(err.problems[0].line, Some(7));
        assert!(err.problems[0].message.contains("certificate[0]"));
    }

    #[test]
    fn missing_sds_and_duplicate_listen() {
        let err = parse_str("").unwrap_err();
        assert_eq!(err.problems[0].key, "sds");
        let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\", \"127.0.0.1:1\"]").unwrap_err();
        assert_eq!(err.problems[0].key, "sds.listen[1]");
    }

    #[test]
    fn acme_contract_parses() {
        let cfg = parse_str(
            r#"
[sds]
listen = ["unix:/run/acme-sds/sds.sock"]

[storage]
path = "/var/lib/acme-sds"

[http01]
listen = "0.0.0.0:8089"

[acme]
directory = "letsencrypt"
contact = ["mailto:ops@example.com"]
accept_terms_of_service = true
directory_ca = "root.pem"
eab_kid = "kid-1"
eab_hmac_key = "c2VjcmV0LWtleQ"
retry_initial = "2s"

[[certificate]]
name = "mydomain"
domains = ["WWW.mydomain.com", "mobile.mydomain.com."]
key_type = "ecdsa-p384"
"#,
        )
        .unwrap();
        let acme = cfg.acme.as_ref().unwrap();
        assert_eq!(acme.directory, LETSENCRYPT);
        let eab = acme.eab.as_ref().unwrap();
        assert_eq!(eab.hmac_key.as_slice(), b"secret-key");
        assert!(
            !format!("{acme:?}").contains("secret-key"),
            "the key never shows in Debug"
        );
        assert_eq!(
            acme.directory_ca.as_deref(),
            Some(Path::new("/etc/acme-sds/root.pem"))
        );
        assert_eq!(acme.retry_initial, std::time::Duration::from_secs(2));
        assert_eq!(cfg.storage.path, Path::new("/var/lib/acme-sds"));
        assert_eq!(cfg.http01.listen.port(), 8089);
        let CertificateSource::Acme {
            domains, key_type, ..
        } = &cfg.certificates[0].source
        else {
            panic!("expected ACME");
        };
        assert_eq!(domains, &["www.mydomain.com", "mobile.mydomain.com"]);
        assert_eq!(*key_type, KeyType::EcdsaP384);
        assert!(cfg.has_acme_certificates());
    }

    #[test]
    fn acme_mistakes_are_named() {
        let err = parse_str(
            r#"
[sds]
listen = ["127.0.0.1:1"]
[acme]
directory = "http://insecure.example/dir"
contact = ["ops@example.com"]
eab_kid = "x"
[[certificate]]
name = "a"
domains = ["*.example.com", "a.example.com", "a.example.com", "bad_name.example.com"]
key_type = "dsa"
[[certificate]]
name = "b"
domains = ["x.example.com"]
cert_file = "x.crt"
[[certificate]]
name = "c"
domains = ["c.example.com"]
[[certificate]]
name = "d"
domains = ["c.example.com"]
"#,
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "acme.directory",
                "acme.contact[0]",
                "acme.eab_hmac_key",
                "certificate[0].key_type",
                "certificate[1].domains",
                "certificate[3].domains",
                "acme.accept_terms_of_service",
            ],
            "{err}"
        );
        let err = parse_str(
            "[sds]\nlisten=[\"127.0.0.1:1\"]\n[acme]\naccept_terms_of_service=true\n[[certificate]]\nname=\"a\"\ndomains=[\"*.example.com\", \"a.example.com\", \"A.example.com\", \"bad_name.example.com\", \"localhost\"]\n",
        )
        .unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "certificate[0].domains[0]",
                "certificate[0].domains[2]",
                "certificate[0].domains[3]",
                "certificate[0].domains[4]",
            ],
            "{err}"
        );
        assert!(err.problems[0].message.contains("DNS-01"));
    }

    #[test]
    fn duplicate_domains_can_be_intended() {
        let text = "[sds]\nlisten=[\"127.0.0.1:1\"]\n[acme]\naccept_terms_of_service=true\n[[certificate]]\nname=\"ec\"\ndomains=[\"a.example.com\"]\n[[certificate]]\nname=\"rsa\"\ndomains=[\"a.example.com\"]\nkey_type=\"rsa-2048\"\nallow_duplicate_domains=true\n";
        parse_str(text).unwrap();
        let err = parse_str(&text.replace("allow_duplicate_domains=true\n", "")).unwrap_err();
        assert_eq!(err.problems[0].key, "certificate[1].domains");
        let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"a\"\ndomains=[\"a.example.com\"]\n").unwrap_err();
        assert!(err.problems[0].message.contains("[acme]"), "{err}");
    }

    #[test]
    fn bad_patterns_and_quotas_are_named() {
        let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\nmax_streams_per_peer=0\n[[certificate]]\nname=\"a\"\ncert_file=\"a\"\nkey_file=\"b\"\nallowed_nodes=[\"edge-*\", \"edge-[\"]\n").unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "sds.max_streams_per_peer",
                "certificate[0].allowed_nodes[1]"
            ],
            "{err}"
        );
        assert_eq!(err.problems[1].line, Some(8));
        let cfg = parse_str(
            "[sds]\nlisten=[\"127.0.0.1:1\"]\nmax_streams=50\nmax_connections_per_peer=3\n",
        )
        .unwrap();
        assert_eq!(cfg.sds.quotas.max_streams, 50);
        assert_eq!(cfg.sds.quotas.max_connections_per_peer, 3);
        assert_eq!(
            cfg.sds.quotas.max_streams_per_peer,
            crate::net::peer::Quotas::default().max_streams_per_peer
        );
    }

    #[test]
    fn security_settings() {
        let err = parse_str("[sds]\nlisten=[\"0.0.0.0:8234\", \"127.0.0.1:1\"]\n[[trust_bundle]]\nname=\"a\"\nfile=\"a\"\nallowed_clients=[\"x\"]\n").unwrap_err();
        let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["sds.listen[0]", "trust_bundle[0].allowed_clients"],
            "{err}"
        );
        assert!(err.problems[0].message.contains("allow_plaintext"));
        let cfg = parse_str("[sds]\nlisten=[\"0.0.0.0:8234\"]\nallow_plaintext=true\nsocket_group=\"root\"\nallowed_uids=[0, 1337]\n[[certificate]]\nname=\"a\"\ncert_file=\"a\"\nkey_file=\"b\"\nallowed_nodes=[\"edge-*\"]\n").unwrap();
        assert_eq!(cfg.sds.socket_group, Some(0));
        assert_eq!(cfg.sds.allowed_uids.as_deref(), Some(&[0, 1337][..]));
        assert_eq!(
            cfg.certificates[0].access.nodes.as_deref(),
            Some(&[crate::sds::access::NodePattern::new("edge-*").unwrap()][..])
        );
        let cfg = parse_str("[sds]\nlisten=[\"[::]:8234\"]\n[sds.tls]\ncert_file=\"s.crt\"\nkey_file=\"s.key\"\nclient_ca_file=\"ca.pem\"\n").unwrap();
        assert_eq!(
            cfg.sds.tls.unwrap().client_ca_file,
            Path::new("/etc/acme-sds/ca.pem")
        );
        let err =
            parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\nsocket_group=\"no-such-group-here\"\n")
                .unwrap_err();
        assert_eq!(err.problems[0].key, "sds.socket_group");
    }

    #[test]
    fn every_unknown_key_and_wrong_type_is_reported_in_config_words() {
        let text = "[sds]\nlisten = \"unix:/tmp/x.sock\"\nmax_streams = \"101\"\nallowed_uids = [101, \"1337\"]\nsokcet_mode = \"0660\"\n\n[storag]\npath = \"/tmp/x\"\n\n[acme]\naccept_terms_of_service = \"yes\"\n\n[[certificate]]\nname = \"web\"\ndomains = [\"www.example.com\", 5]\ncolour = \"blue\"\n\n[[certificate]]\nname = 7\n";
        let err = parse_str(text).unwrap_err();
        let got: Vec<(Option<usize>, &str)> = err
            .problems
            .iter()
            .map(|p| (p.line, p.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Some(2), "sds.listen"),
                (Some(3), "sds.max_streams"),
                (Some(4), "sds.allowed_uids[1]"),
                (Some(5), "sds.sokcet_mode"),
                (Some(7), "storag"),
                (Some(11), "acme.accept_terms_of_service"),
                (Some(15), "certificate[0].domains[1]"),
                (Some(16), "certificate[0].colour"),
                (Some(19), "certificate[1].name"),
            ],
            "{err}"
        );
        let text = err.to_string();
        for words in [
            "expected a whole number, such as 1000, found the string \"101\"",
            "did you mean `socket_mode`?",
            "did you mean [storage]?",
            "expected true or false, found the string \"yes\"",
            "certificate[0] has name, cert_file",
        ] {
            assert!(text.contains(words), "{words}: {text}");
        }
        assert!(!text.contains("invalid type"), "serde's words: {text}");
    }

    /// The shape check and the typed reading agree: every key the shape knows, with a value of its kind, is
    /// read by serde (a key added to one and not the other fails here or in the tests that use it).
    #[test]
    fn the_shape_matches_the_typed_reading() {
        fn value(kind: schema::Kind) -> String {
            use schema::Kind;
            let table = |fields: &[(&str, Kind)]| {
                let items: Vec<String> = fields
                    .iter()
                    .map(|(k, kind)| format!("{k} = {}", value(*kind)))
                    .collect();
                format!("{{ {} }}", items.join(", "))
            };
            match kind {
                Kind::Str(_) | Kind::StrOrInt(_) => "\"x\"".into(),
                Kind::Int(_) => "1".into(),
                Kind::Bool => "true".into(),
                Kind::StrList(_) => "[\"x\"]".into(),
                Kind::IntList(_) => "[1]".into(),
                Kind::Table(fields) => table(fields),
                Kind::Tables(fields) => format!("[{}]", table(fields)),
            }
        }
        let doc: String = schema::ROOT
            .iter()
            .map(|(k, kind)| format!("{k} = {}\n", value(*kind)))
            .collect();
        let de = toml::de::Deserializer::parse(&doc).unwrap();
        if let Err(e) = RawConfig::deserialize(de) {
            panic!("{e}\n{doc}");
        }
        let lines = LineIndex::new(&doc);
        let table = toml::de::DeTable::parse(&doc).unwrap();
        assert!(schema::check(table.get_ref(), &lines).is_empty());
    }

    #[test]
    fn the_built_in_configuration_parses_and_needs_no_acme() {
        let c = parse(BUILT_IN, Path::new("/home/me/acme-sds.toml")).unwrap();
        assert_eq!(
            c.sds.listen,
            [ListenAddr::Unix(PathBuf::from("/home/me/acme-sds.sock"))]
        );
        assert_eq!(c.storage.path, Path::new("/home/me/acme-sds-data"));
        assert!(c.acme.is_none() && !c.has_acme_certificates());
        match &c.certificates[0].source {
            CertificateSource::Internal { domains, key_type } => {
                assert_eq!(domains, &["localhost", "127.0.0.1", "::1"]);
                assert_eq!(*key_type, KeyType::EcdsaP256);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn internal_names_and_issuer_mistakes() {
        let ok = "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"dev\"\nissuer=\"internal\"\nkey_type=\"rsa-2048\"\ndomains=[\"db\", \"*.svc.internal\", \"10.0.0.1\", \"0:0::1\", \"Web.Local.\"]\n";
        let c = parse_str(ok).unwrap();
        let CertificateSource::Internal { domains, .. } = &c.certificates[0].source else {
            panic!()
        };
        assert_eq!(
            domains,
            &["db", "*.svc.internal", "10.0.0.1", "::1", "web.local"]
        );
        // The same names are not for ACME.
        let acme = ok.replace("issuer=\"internal\"\n", "");
        let err = parse_str(&acme).unwrap_err().to_string();
        assert!(err.contains("certificate[0].domains[0]"), "{err}");
        for (text, key, words) in [
            (
                ok.replace("\"internal\"", "\"letsencrypt\""),
                "certificate[0].issuer",
                "\"acme\" (the [acme] CA, the default) or \"internal\"",
            ),
            (
                ok.replace("\"db\"", "\"bad name\""),
                "certificate[0].domains[0]",
                "or an IP address",
            ),
            (
                ok.replace("domains=", "temporary_certificate=true\ndomains="),
                "certificate[0].temporary_certificate",
                "issued at once",
            ),
            (
                "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"f\"\nissuer=\"internal\"\ncert_file=\"a\"\nkey_file=\"b\"\n".to_owned(),
                "certificate[0].issuer",
                "with `domains`",
            ),
        ] {
            let err = parse_str(&text).unwrap_err();
            assert!(
                err.problems
                    .iter()
                    .any(|p| p.key == key && p.message.contains(words)),
                "{key}: {err}"
            );
        }
    }

    #[test]
    fn acme_names_must_fit_a_file_name_in_the_store() {
        let long = "a".repeat(201);
        let text = format!(
            "[sds]\nlisten=[\"127.0.0.1:1\"]\n[acme]\naccept_terms_of_service=true\n[[certificate]]\nname=\"{long}\"\ndomains=[\"a.example.com\"]\n[[certificate]]\nname=\"ok\"\ndomains=[\"b.example.com\"]\n"
        );
        let err = parse_str(&text).unwrap_err();
        assert_eq!(err.problems.len(), 1, "{err}");
        assert_eq!(err.problems[0].key, "certificate[0].name");
        assert_eq!(err.problems[0].line, Some(5));
        assert!(err.problems[0].message.contains("201 bytes"), "{err}");
        // File certificates are not stored: any valid secret name will do.
        let files = format!(
            "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"{long}\"\ncert_file=\"a\"\nkey_file=\"b\"\n"
        );
        assert!(parse_str(&files).is_ok());
    }

    #[test]
    fn durations() {
        let secs = std::time::Duration::from_secs;
        assert_eq!(parse_duration("90"), Ok(secs(90)));
        assert_eq!(parse_duration("10m"), Ok(secs(600)));
        assert_eq!(parse_duration("1d"), Ok(secs(86400)));
        assert_eq!(parse_duration("3650d"), Ok(MAX_DURATION));
        assert!(parse_duration("1w").unwrap_err().contains("not a duration"));
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("3651d").unwrap_err().contains("10 years"));
        assert!(parse_duration("3650000d").unwrap_err().contains("10 years"));
        assert!(parse_duration("99999999999999999999d").is_err());
        // In a file: the key and the line, never a panic later.
        let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\nstall_timeout=\"3650000d\"\n[acme]\nretry_max = \"3650000d\"\n").unwrap_err();
        let found: Vec<_> = err
            .problems
            .iter()
            .map(|p| (p.key.as_str(), p.line))
            .collect();
        assert_eq!(
            found,
            [("sds.stall_timeout", Some(3)), ("acme.retry_max", Some(5))],
            "{err}"
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let err = parse_str("[sds]\nlisten = [\n\"a\"\n=\n").unwrap_err();
        assert!(err.problems[0].line.is_some());
    }
}
