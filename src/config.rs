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

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this configuration was read from.
    pub path: PathBuf,
    pub sds: SdsConfig,
    pub certificates: Vec<CertificateConfig>,
    pub trust_bundles: Vec<TrustBundleConfig>,
}

/// `[sds]`: where the SDS gRPC server listens.
#[derive(Debug, Clone)]
pub struct SdsConfig {
    pub listen: Vec<ListenAddr>,
    /// Permission bits given to the Unix sockets acme-sds creates.
    pub socket_mode: u32,
}

/// Default permission bits of SDS Unix sockets: only the owner may connect, since the socket hands out
/// private keys.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

/// One SDS listen address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ListenAddr {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
        }
    }
}

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
    pub name: String,
    pub source: CertificateSource,
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
}

/// A `[[trust_bundle]]`: CA certificates served as an SDS `validation_context` secret (`trusted_ca`).
#[derive(Debug, Clone)]
pub struct TrustBundleConfig {
    pub name: String,
    pub file: PathBuf,
    pub file_line: Option<usize>,
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
            write!(f, "\n  {}", self.path.display())?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
            }
            if p.key.is_empty() {
                write!(f, ": {}", p.message)?;
            } else {
                write!(f, ": {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

// ---- raw, as written in the file ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    sds: Option<Spanned<RawSds>>,
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    name: Option<Spanned<String>>,
    cert_file: Option<Spanned<String>>,
    key_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrustBundle {
    name: Option<Spanned<String>>,
    file: Option<Spanned<String>>,
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
    let raw: RawConfig = toml::from_str(text).map_err(|e| {
        let line = e.span().map(|s| lines.line(s.start));
        fail(vec![Problem::new(
            "",
            line,
            e.message().trim_end().to_owned(),
        )])
    })?;
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
    let certificates = v.certificates(raw.certificate);
    let trust_bundles = v.trust_bundles(raw.trust_bundle);
    v.unique_names(&certificates, &trust_bundles);
    if v.problems.is_empty() {
        Ok(Config {
            path: path.to_owned(),
            sds,
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
        out
    }

    fn listen_addr(&self, s: &str) -> Result<ListenAddr, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(
                    "\"unix:\" needs a socket path, as in \"unix:/run/acme-sds/sds.sock\"".into(),
                );
            }
            return Ok(ListenAddr::Unix(self.path(path)));
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

    fn name(&mut self, key: &str, line: Option<usize>, name: Option<Spanned<String>>) -> String {
        let Some(name) = name else {
            self.problem(
                format!("{key}.name"),
                line,
                "missing: the SDS resource name Envoy asks for",
            );
            return String::new();
        };
        let l = self.line(&name);
        let name = name.into_inner();
        if let Err(msg) = check_secret_name(&name) {
            self.problem(format!("{key}.name"), l, msg);
        }
        name
    }

    fn certificates(&mut self, raw: Vec<Spanned<RawCertificate>>) -> Vec<CertificateConfig> {
        let mut out = Vec::new();
        for (i, entry) in raw.into_iter().enumerate() {
            let key = format!("certificate[{i}]");
            let line = self.line(&entry);
            let entry = entry.into_inner();
            let name = self.name(&key, line, entry.name);
            let source = match (entry.cert_file, entry.key_file) {
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
                        "no certificate source: give `cert_file` and `key_file`",
                    );
                    continue;
                }
            };
            out.push(CertificateConfig {
                name,
                source,
                origin: Origin { key, line },
            });
        }
        out
    }

    fn trust_bundles(&mut self, raw: Vec<Spanned<RawTrustBundle>>) -> Vec<TrustBundleConfig> {
        let mut out = Vec::new();
        for (i, entry) in raw.into_iter().enumerate() {
            let key = format!("trust_bundle[{i}]");
            let line = self.line(&entry);
            let entry = entry.into_inner();
            let name = self.name(&key, line, entry.name);
            let Some(file) = entry.file else {
                self.problem(
                    format!("{key}.file"),
                    line,
                    "missing: the PEM file of CA certificates",
                );
                continue;
            };
            out.push(TrustBundleConfig {
                name,
                file_line: self.line(&file),
                file: self.path(file.get_ref()),
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

/// The rules for a secret name: what Envoy can ask for, without the `sds://` prefix Istio may add.
pub fn check_secret_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty: give the SDS resource name Envoy asks for".into());
    }
    if name.starts_with(crate::registry::ISTIO_PREFIX) {
        return Err(format!(
            "{name:?}: leave out the \"sds://\" prefix; requests with and without it are both served"
        ));
    }
    if name.len() > 253 || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(format!(
            "{name:?}: a name is at most 253 characters, without spaces or control characters"
        ));
    }
    Ok(())
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
        let CertificateSource::Files { key_file, .. } = &cfg.certificates[0].source;
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
    fn syntax_error_has_line() {
        let err = parse_str("[sds]\nlisten = [\n\"a\"\n=\n").unwrap_err();
        assert!(err.problems[0].line.is_some());
    }
}
