//! `[[certificate]]` and `[[trust_bundle]]`: the secrets, their sources and access rules, and the rules
//! across entries (unique names, domains listed once).

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;

use toml::Spanned;

use super::Problem;
use super::Validator;
use super::raw::RawCertificate;
use super::raw::RawTrustBundle;
use crate::sds::access::Access;
use crate::values::Challenge;
use crate::values::DnsName;
use crate::values::KeyType;
use crate::values::SecretName;
use crate::values::SubjectName;

/// A `[[certificate]]`: a TLS certificate and key served as an SDS `tls_certificate` secret.
#[derive(Debug, Clone)]
pub struct CertificateConfig {
    /// The SDS resource name Envoy asks for.
    pub name: SecretName,
    /// Where the certificate comes from.
    pub source: CertificateSource,
    /// Who may read it (`allowed_nodes`, `allowed_clients`).
    pub access: Access,
    /// Its key path in the file (`certificate[0]`), for messages.
    pub key: String,
}

#[derive(Debug, Clone)]
/// Where a `[[certificate]]` comes from.
pub enum CertificateSource {
    /// A PEM chain (leaf first) and a PEM private key on disk, watched for changes.
    Files {
        /// `cert_file`: the chain, leaf first.
        cert_file: PathBuf,
        /// `key_file`: the private key (may be `cert_file` itself, for a combined PEM).
        key_file: PathBuf,
    },
    /// Obtained and renewed over ACME for these (lower-cased, validated) domains.
    Acme {
        /// The names, checked and lower-cased.
        domains: Vec<DnsName>,
        /// `key_type` (default ECDSA P-256).
        key_type: KeyType,
        /// `temporary_certificate`: serve a temporary self-signed certificate until the first one is
        /// issued; `None` follows `[acme] temporary_certificates`.
        temporary_certificate: Option<bool>,
        /// `challenge`: how the CA validates the names (default HTTP-01).
        challenge: Challenge,
    },
    /// `issuer = "internal"`: signed and renewed by acme-sds's own local CA, for these names (DNS names,
    /// single labels such as `localhost`, IP addresses, wildcards), which no public CA would validate.
    Internal {
        /// The names, checked and lower-cased.
        domains: Vec<SubjectName>,
        /// `key_type` (default ECDSA P-256).
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
    /// The SDS resource name Envoy asks for.
    pub name: SecretName,
    /// `file`: the PEM file of CA certificates, watched for changes.
    pub file: PathBuf,
    /// Who may read it (`allowed_nodes`, `allowed_clients`).
    pub access: Access,
    /// Its key path in the file (`certificate[0]`), for messages.
    pub key: String,
}

impl Validator<'_> {
    pub(super) fn access(
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

    /// The entry's secret name; `None` (with the problem noted) when it is missing or breaks the rules, and
    /// then the rest of the entry is still checked, so that every problem is reported at once.
    pub(super) fn name(
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
    pub(super) fn domain_names<T: PartialEq + fmt::Debug + std::ops::Deref<Target = str>>(
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

    pub(super) fn certificates(
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
                    if internal && let Some(c) = &entry.challenge {
                        let l = self.line(c);
                        self.problem(
                            format!("{key}.challenge"),
                            l,
                            "an internal certificate is not validated by a CA: `challenge` applies to ACME certificates only",
                        );
                    }
                    if internal {
                        CertificateSource::Internal {
                            domains: self.domain_names(&key, &domains, SubjectName::new),
                            key_type,
                        }
                    } else {
                        let challenge = match &entry.challenge {
                            None => Challenge::Http01,
                            Some(c) => {
                                let l = self.line(c);
                                Challenge::from_name(c.get_ref()).unwrap_or_else(|msg| {
                                    self.problem(format!("{key}.challenge"), l, msg);
                                    Challenge::Http01
                                })
                            }
                        };
                        // Only DNS-01 validates a wildcard.
                        let make = if challenge == Challenge::Dns01 {
                            DnsName::wildcard_allowed
                        } else {
                            DnsName::new
                        };
                        CertificateSource::Acme {
                            domains: self.domain_names(&key, &domains, make),
                            key_type,
                            temporary_certificate: entry
                                .temporary_certificate
                                .map(|t| *t.get_ref()),
                            challenge,
                        }
                    }
                }
                (None, _) => {
                    if let Some(c) = &entry.challenge {
                        let l = self.line(c);
                        self.problem(
                            format!("{key}.challenge"),
                            l,
                            "`challenge` applies to ACME certificates (with `domains`) only",
                        );
                    }
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
                key,
            });
            dup_allowed.push(entry.allow_duplicate_domains);
        }
        (out, dup_allowed)
    }

    pub(super) fn unique_domains(&mut self, certs: &[CertificateConfig], dup_allowed: &[bool]) {
        let mut seen: HashMap<&str, (usize, &str)> = HashMap::new();
        let mut problems = Vec::new();
        for (i, c) in certs.iter().enumerate() {
            let CertificateSource::Acme { domains, .. } = &c.source else {
                continue;
            };
            for d in domains {
                match seen.get(d.as_str()) {
                    Some((j, first)) if !(dup_allowed[i] || dup_allowed[*j]) => {
                        problems.push(Problem::new(
                            format!("{}.domains", c.key),
                            self.locations.line(&c.key),
                            format!(
                                "\"{d}\" is also in {first}: set `allow_duplicate_domains = true` if two certificates for it are intended",
                            ),
                        ));
                    }
                    Some(_) => {}
                    None => {
                        seen.insert(d, (i, &c.key));
                    }
                }
            }
        }
        self.problems.extend(problems);
    }

    pub(super) fn trust_bundles(
        &mut self,
        raw: Vec<Spanned<RawTrustBundle>>,
    ) -> Vec<TrustBundleConfig> {
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
                file: self.path(file.get_ref()),
                access,
                key,
            });
        }
        out
    }

    pub(super) fn unique_names(
        &mut self,
        certs: &[CertificateConfig],
        bundles: &[TrustBundleConfig],
    ) {
        let mut seen: HashMap<&str, &str> = HashMap::new();
        let all = certs
            .iter()
            .map(|c| (c.name.as_str(), c.key.as_str()))
            .chain(bundles.iter().map(|b| (b.name.as_str(), b.key.as_str())));
        let mut dups = Vec::new();
        for (name, key) in all {
            if name.is_empty() {
                continue;
            }
            if let Some(first) = seen.get(name) {
                dups.push(Problem::new(
                    format!("{key}.name"),
                    self.locations.line(key),
                    format!("duplicate secret name {name:?}: already used by {first}"),
                ));
            } else {
                seen.insert(name, key);
            }
        }
        self.problems.extend(dups);
    }
}
