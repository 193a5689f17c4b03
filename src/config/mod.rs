//! The configuration file: TOML parsed into typed, validated settings.
//!
//! Parsing is strict (`deny_unknown_fields`): a misspelt key is an error, not a silently ignored setting.
//! Validation collects *every* problem, each naming its key path (`certificate[1].name`) and, where the TOML
//! parser gives one, its line, so that `acme-sds check` can report a broken file in one go.
//! Relative paths in the file are resolved against the directory that holds the file, so a config behaves the
//! same whatever directory the daemon is started from.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::values::ListenAddr;

mod acme;
mod certificate;
mod dns01;
mod http01;
mod on_demand;
mod raw;
mod schema;
mod sds;
pub mod secret_files;
mod storage;
#[cfg(test)]
mod tests;

pub use acme::{AcmeConfig, EabKey, LETSENCRYPT, LETSENCRYPT_STAGING};
pub use certificate::{
    CertificateConfig, CertificateSource, ISSUER_ACME, ISSUER_INTERNAL, TrustBundleConfig,
};
pub use dns01::{DEFAULT_PROPAGATION_TIMEOUT, Dns01Config};
pub use http01::{DEFAULT_HTTP01_LISTEN, DEFAULT_TLS_ALPN01_LISTEN, Http01Config, TlsAlpn01Config};
pub use on_demand::{
    DEFAULT_ASK_TIMEOUT, DEFAULT_MAX_NEW_PER_HOUR, DEFAULT_MAX_PENDING, OnDemandConfig,
};
use raw::RawConfig;
pub use sds::{DEFAULT_SOCKET_MODE, SdsConfig};
pub use storage::{DEFAULT_ETCD_PREFIX, DEFAULT_LOCK_TTL, EtcdConfig, StorageConfig};

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from; for the built-in one, where `acme-sds.toml` would be.
    pub path: PathBuf,
    /// This is the built-in configuration ([`BUILT_IN`]): no file was named or found.
    pub built_in: bool,
    /// `[sds]`.
    pub sds: SdsConfig,
    /// `[storage]`.
    pub storage: StorageConfig,
    /// `[http01]`.
    pub http01: Http01Config,
    /// `[tls_alpn01]`.
    pub tls_alpn01: TlsAlpn01Config,
    /// `[dns01]`: how DNS-01 records are added; required when a certificate uses `dns-01`.
    pub dns01: Option<Dns01Config>,
    /// `[acme]`; `None` when the table is absent (then no certificate may have `domains`).
    pub acme: Option<AcmeConfig>,
    /// `[admin] listen`: health, readiness and status endpoints; off when absent.
    pub admin: Option<SocketAddr>,
    /// `[on_demand]`: certificates obtained for names Envoy asks for; off when absent.
    pub on_demand: Option<OnDemandConfig>,
    /// `[[certificate]]`, in file order.
    pub certificates: Vec<CertificateConfig>,
    /// `[[trust_bundle]]`, in file order.
    pub trust_bundles: Vec<TrustBundleConfig>,
    /// Where each key is in the file, for messages about what a source later finds wrong with a value
    /// ([`Config::error`]); the settings themselves carry no line numbers.
    locations: Locations,
}

/// The line of each key path (`certificate[1].cert_file`) in a configuration file.
#[derive(Debug, Clone, Default)]
pub struct Locations(HashMap<String, usize>);

impl Locations {
    /// The 1-based line of `key`, if the file has it.
    pub fn line(&self, key: &str) -> Option<usize> {
        self.0.get(key).copied()
    }
}

impl Config {
    /// What is allowed but probably not what was meant: printed by `check` and logged by `run` and reload.
    pub fn warnings(&self) -> Vec<Problem> {
        let rules = self
            .certificates
            .iter()
            .map(|c| (&c.access, &c.key))
            .chain(self.trust_bundles.iter().map(|b| (&b.access, &b.key)));
        let mut out: Vec<Problem> = rules
            .filter(|(access, _)| access.nodes.is_some() && access.clients.is_none())
            .map(|(_, key)| {
                Problem::new(
                    format!("{key}.allowed_nodes"),
                    self.locations.line(key),
                    "is the only rule on this secret, and a node id is whatever the client says it is: any caller that can reach a listener can claim a matching one. Add allowed_clients (mutual TLS), or admit only trusted callers to the listeners (allowed_uids, socket_mode)",
                )
            })
            .collect();
        out.extend(self.storage.warnings(&self.locations));
        if let Some(d) = &self.dns01 {
            out.extend(d.warnings(&self.locations));
        }
        if self.dns01.is_some() && !self.uses_challenge(crate::values::Challenge::Dns01) {
            out.push(Problem::new(
                "dns01",
                self.locations.line("dns01"),
                "is set, but no certificate has challenge = \"dns-01\": nothing uses it",
            ));
        }
        out
    }

    /// `problems` (a source's, found after parsing) as an error about this file, each given the line of
    /// its key where it has none.
    pub fn error(&self, problems: Vec<Problem>) -> ConfigError {
        let problems = problems
            .into_iter()
            .map(|mut p| {
                if p.line.is_none() {
                    p.line = self.locations.line(&p.key);
                }
                p
            })
            .collect();
        ConfigError {
            path: self.path.clone(),
            problems,
        }
    }

    /// Whether some certificate is validated with `challenge` (TLS-ALPN-01 starts its responder, DNS-01 needs
    /// `[dns01]`).
    pub fn uses_challenge(&self, challenge: crate::values::Challenge) -> bool {
        self.certificates.iter().any(|c| {
            matches!(&c.source, CertificateSource::Acme { challenge: used, .. } if *used == challenge)
        })
    }

    /// Whether any certificate is obtained over ACME.
    pub fn has_acme_certificates(&self) -> bool {
        self.on_demand.is_some()
            || self
                .certificates
                .iter()
                .any(|c| matches!(c.source, CertificateSource::Acme { .. }))
    }
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path such as `sds.listen[0]`; empty when the file as a whole is at fault.
    pub key: String,
    /// Its 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong, in the config's words.
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

    /// A problem with `key` (at `line`, when known).
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
    /// The file.
    pub path: PathBuf,
    /// Every problem found, in file order.
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

/// The file acme-sds looks for in the current directory when no configuration is named.
pub const DEFAULT_FILE: &str = "acme-sds.toml";

/// The built-in configuration, used when no file is named and there is no [`DEFAULT_FILE`]: SDS on a Unix
/// socket and a `localhost` certificate from the internal CA, both in the current directory.
pub const BUILT_IN: &str = include_str!("../built_in.toml");

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
    let mut locations = Locations::default();
    let shape = schema::check(doc.get_ref(), &lines, &mut locations);
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
        locations: &locations,
        base: &base,
        problems: Vec::new(),
    };
    let sds = v.sds(raw.sds);
    let storage = v.storage(raw.storage);
    let http01 = v.http01(raw.http01);
    let tls_alpn01 = v.tls_alpn01(raw.tls_alpn01);
    let dns01 = raw.dns01.and_then(|d| v.dns01(d));
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
    let on_demand_line = raw.on_demand.as_ref().map(|a| v.lines.line(a.span().start));
    let on_demand = raw.on_demand.map(|o| v.on_demand(o));
    if on_demand.is_some() {
        match &acme {
            None => v.problem(
                "on_demand",
                on_demand_line,
                "on-demand certificates need an [acme] table (directory, contact, accept_terms_of_service)",
            ),
            Some(a) if !a.accept_terms_of_service => v.problem(
                "acme.accept_terms_of_service",
                acme_line,
                "must be true before any certificate is ordered: read the CA's terms of service, then set it",
            ),
            Some(_) => {}
        }
    }
    let (certificates, dup_allowed) = v.certificates(raw.certificate);
    let trust_bundles = v.trust_bundles(raw.trust_bundle);
    v.unique_names(&certificates, &trust_bundles);
    v.unique_domains(&certificates, &dup_allowed);
    v.acme_requirements(&certificates, acme.as_ref(), acme_line);
    if dns01.is_none() {
        for c in &certificates {
            if let CertificateSource::Acme {
                challenge: crate::values::Challenge::Dns01,
                ..
            } = c.source
            {
                v.problem(
                    format!("{}.challenge", c.key),
                    locations.line(&format!("{}.challenge", c.key)),
                    "\"dns-01\" needs a [dns01] table: the zone's primary `server` and a `tsig_key_file`",
                );
            }
        }
    }
    if sds.tls.is_none() {
        let restricted = certificates
            .iter()
            .map(|c| (&c.access, &c.key))
            .chain(trust_bundles.iter().map(|b| (&b.access, &b.key)));
        for (access, key) in restricted {
            if access.clients.is_some() {
                v.problem(
                    format!("{key}.allowed_clients"),
                    locations.line(key),
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
            tls_alpn01,
            dns01,
            acme,
            admin,
            on_demand,
            certificates,
            trust_bundles,
            locations,
        })
    } else {
        Err(fail(v.problems))
    }
}

struct Validator<'a> {
    lines: &'a LineIndex,
    locations: &'a Locations,
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
