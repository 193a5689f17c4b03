//! The shape of the configuration file: which keys each table has and what kind of value each takes, said
//! in the configuration's own words.
//!
//! serde stops at the first unknown key or wrongly typed value, and says so in Rust's words (`invalid type:
//! string "101", expected i64`). Before serde reads the file, this pass walks the parsed document against
//! the shape below and reports *every* such problem, each with its line, its key path (`certificate[1].
//! domains[0]`) and what is expected (`a whole number, such as 100000`). When it finds none, serde's typed
//! reading cannot fail on shape, and the validator then checks the values themselves.

use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::{LineIndex, Locations, Problem};

/// What a key takes.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    /// A string; the text says which (and shows an example).
    Str(&'static str),
    /// A whole number.
    Int(&'static str),
    Bool,
    /// A list of strings.
    StrList(&'static str),
    /// A list of whole numbers.
    IntList(&'static str),
    /// A string or a whole number.
    StrOrInt(&'static str),
    /// A table: `[name]`.
    Table(&'static [(&'static str, Kind)]),
    /// A list of tables: `[[name]]`.
    Tables(&'static [(&'static str, Kind)]),
}

const PATH: &str = "a path in quotes";
const DURATION: &str = "a duration in quotes, such as \"30s\", \"10m\", \"6h\" or \"1d\"";
const COUNT: &str = "a whole number, such as 1000";
const GLOBS: &str = "a list of patterns in quotes, such as [\"edge-*\"]";

const SDS_TLS: &[(&str, Kind)] = &[
    ("cert_file", Kind::Str(PATH)),
    ("key_file", Kind::Str(PATH)),
    ("client_ca_file", Kind::Str(PATH)),
];

const SDS: &[(&str, Kind)] = &[
    (
        "listen",
        Kind::StrList(
            "a list of addresses in quotes, such as [\"unix:/run/acme-sds/sds.sock\", \"127.0.0.1:8234\"]",
        ),
    ),
    (
        "socket_mode",
        Kind::Str("octal permission bits in quotes, such as \"0660\""),
    ),
    (
        "socket_group",
        Kind::StrOrInt("a group name in quotes or a gid, such as \"envoy\" or 101"),
    ),
    (
        "allowed_uids",
        Kind::IntList("a list of uids, such as [101, 1337]"),
    ),
    ("allow_plaintext", Kind::Bool),
    ("stall_timeout", Kind::Str(DURATION)),
    ("handshake_timeout", Kind::Str(DURATION)),
    ("max_streams", Kind::Int(COUNT)),
    ("max_streams_per_peer", Kind::Int(COUNT)),
    ("max_names_per_peer", Kind::Int(COUNT)),
    ("max_connections", Kind::Int(COUNT)),
    ("max_connections_per_peer", Kind::Int(COUNT)),
    ("tls", Kind::Table(SDS_TLS)),
];

const ACME: &[(&str, Kind)] = &[
    (
        "directory",
        Kind::Str("\"letsencrypt\", \"letsencrypt-staging\" or an https:// URL in quotes"),
    ),
    (
        "contact",
        Kind::StrList("a list of mailto: URLs, such as [\"mailto:ops@example.com\"]"),
    ),
    ("accept_terms_of_service", Kind::Bool),
    ("directory_ca", Kind::Str(PATH)),
    ("eab_kid", Kind::Str("the key id the CA gave, in quotes")),
    (
        "eab_hmac_key",
        Kind::Str("the base64url key the CA gave, in quotes"),
    ),
    (
        "max_concurrent_orders",
        Kind::Int("a whole number, such as 8"),
    ),
    ("retry_initial", Kind::Str(DURATION)),
    ("retry_max", Kind::Str(DURATION)),
    ("request_timeout", Kind::Str(DURATION)),
    ("temporary_certificates", Kind::Bool),
];

const CERTIFICATE: &[(&str, Kind)] = &[
    (
        "name",
        Kind::Str("the secret name in quotes, such as \"web\""),
    ),
    ("cert_file", Kind::Str(PATH)),
    ("key_file", Kind::Str(PATH)),
    (
        "domains",
        Kind::StrList("a list of names in quotes, such as [\"www.example.com\"]"),
    ),
    (
        "key_type",
        Kind::Str("\"ecdsa-p256\", \"ecdsa-p384\", \"rsa-2048\", \"rsa-3072\" or \"rsa-4096\""),
    ),
    ("allow_duplicate_domains", Kind::Bool),
    ("allowed_nodes", Kind::StrList(GLOBS)),
    ("allowed_clients", Kind::StrList(GLOBS)),
    ("temporary_certificate", Kind::Bool),
    ("issuer", Kind::Str("\"acme\" or \"internal\"")),
    (
        "challenge",
        Kind::Str("\"http-01\", \"dns-01\" or \"tls-alpn-01\""),
    ),
];

const TRUST_BUNDLE: &[(&str, Kind)] = &[
    (
        "name",
        Kind::Str("the secret name in quotes, such as \"client-ca\""),
    ),
    ("file", Kind::Str(PATH)),
    ("allowed_nodes", Kind::StrList(GLOBS)),
    ("allowed_clients", Kind::StrList(GLOBS)),
];

const ON_DEMAND: &[(&str, Kind)] = &[
    (
        "allow",
        Kind::StrList(
            "a list of names or \"*.\" patterns in quotes, such as [\"*.customers.example.com\"]",
        ),
    ),
    (
        "ask",
        Kind::Str("a URL in quotes, such as \"http://127.0.0.1:9123/allowed\""),
    ),
    ("ask_timeout", Kind::Str(DURATION)),
    ("ask_concurrency", Kind::Int("a whole number, such as 32")),
    ("max_new_per_hour", Kind::Int("a whole number, such as 100")),
    ("max_pending", Kind::Int("a whole number, such as 16")),
    (
        "key_type",
        Kind::Str("\"ecdsa-p256\", \"ecdsa-p384\", \"rsa-2048\", \"rsa-3072\" or \"rsa-4096\""),
    ),
    ("allowed_nodes", Kind::StrList(GLOBS)),
    ("drop_unused_after", Kind::Str(DURATION)),
];

const DNS01: &[(&str, Kind)] = &[
    (
        "server",
        Kind::Str("\"HOST:PORT\" in quotes, such as \"ns1.example.com:53\""),
    ),
    ("tsig_key_file", Kind::Str(PATH)),
    (
        "zone",
        Kind::Str("a zone name in quotes, such as \"example.com\""),
    ),
    ("propagation_timeout", Kind::Str(DURATION)),
    (
        "check_nameservers",
        Kind::StrList("a list of \"HOST:PORT\" in quotes, such as [\"ns2.example.com:53\"]"),
    ),
];

const ETCD: &[(&str, Kind)] = &[
    (
        "endpoints",
        Kind::StrList("a list of URLs in quotes, such as [\"http://127.0.0.1:2379\"]"),
    ),
    (
        "prefix",
        Kind::Str("a key prefix in quotes, such as \"/acme-sds\""),
    ),
    ("ca_file", Kind::Str(PATH)),
    ("cert_file", Kind::Str(PATH)),
    ("key_file", Kind::Str(PATH)),
    ("username", Kind::Str("an etcd user name in quotes")),
    ("password_file", Kind::Str(PATH)),
    ("lock_ttl", Kind::Str(DURATION)),
];

/// The whole file.
pub(super) const ROOT: &[(&str, Kind)] = &[
    ("sds", Kind::Table(SDS)),
    (
        "storage",
        Kind::Table(&[
            ("path", Kind::Str(PATH)),
            ("encryption_key_file", Kind::Str(PATH)),
            ("accept_unsealed", Kind::Bool),
            ("etcd", Kind::Table(ETCD)),
        ]),
    ),
    (
        "http01",
        Kind::Table(&[("listen", Kind::Str("\"IP:PORT\", such as \"0.0.0.0:8089\""))]),
    ),
    ("acme", Kind::Table(ACME)),
    ("on_demand", Kind::Table(ON_DEMAND)),
    ("dns01", Kind::Table(DNS01)),
    (
        "tls_alpn01",
        Kind::Table(&[(
            "listen",
            Kind::Str("\"IP:PORT\", such as \"127.0.0.1:8444\""),
        )]),
    ),
    (
        "admin",
        Kind::Table(&[(
            "listen",
            Kind::Str("\"IP:PORT\", such as \"127.0.0.1:9901\""),
        )]),
    ),
    ("certificate", Kind::Tables(CERTIFICATE)),
    ("trust_bundle", Kind::Tables(TRUST_BUNDLE)),
];

/// Every unknown key and every value of the wrong kind in `doc`, in file order; and where each key is
/// (`locations`), for messages about the values later on.
pub(super) fn check(
    doc: &DeTable<'_>,
    lines: &LineIndex,
    locations: &mut Locations,
) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut walk = Walk {
        lines,
        out: &mut out,
        locations,
    };
    walk.table(doc, ROOT, "");
    out.sort_by_key(|p| p.line);
    out
}

/// One pass over the document: what it found wrong, and where each key is.
struct Walk<'a> {
    lines: &'a LineIndex,
    out: &'a mut Vec<Problem>,
    locations: &'a mut Locations,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_owned()
    } else {
        format!("{prefix}.{key}")
    }
}

/// What a value is, as the message says it was found.
fn found(v: &DeValue<'_>) -> String {
    match v {
        DeValue::String(s) => {
            let clipped: String = s.chars().take(40).collect();
            let more = if s.chars().count() > 40 { "..." } else { "" };
            format!("the string {:?}", format!("{clipped}{more}"))
        }
        DeValue::Integer(i) => format!("the number {}", i.as_str()),
        DeValue::Float(f) => format!("the number {}", f.as_str()),
        DeValue::Boolean(b) => format!("{b}"),
        DeValue::Datetime(d) => format!("the date {d}"),
        DeValue::Array(_) => "a list".into(),
        DeValue::Table(_) => "a table".into(),
    }
}

impl Walk<'_> {
    fn table(&mut self, t: &DeTable<'_>, fields: &[(&str, Kind)], prefix: &str) {
        for (key, value) in t.iter() {
            let name: &str = key.get_ref();
            let path = join(prefix, name);
            let at = self.lines.line(key.span().start);
            self.locations.0.insert(path.clone(), at);
            let line = Some(at);
            match fields.iter().find(|(k, _)| *k == name) {
                Some((_, kind)) => self.check_value(value, *kind, &path),
                None => {
                    let known: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
                    let msg = match (close_match(name, &known), prefix.is_empty()) {
                    (Some(k), true) => format!("unknown table (did you mean [{k}]?)"),
                    (Some(k), false) => format!("unknown key (did you mean `{k}`?)"),
                    (None, true) => "unknown table; the file has [sds], [storage], [http01], [tls_alpn01], [dns01], [acme], [on_demand], [admin], [[certificate]] and [[trust_bundle]]".to_owned(),
                    (None, false) => format!("unknown key; {prefix} has {}", known.join(", ")),
                };
                    self.out.push(Problem::new(path, line, msg));
                }
            }
        }
    }

    fn check_value(&mut self, v: &Spanned<DeValue<'_>>, kind: Kind, path: &str) {
        let lines = self.lines;
        let out = &mut *self.out;
        let line = Some(lines.line(v.span().start));
        let wrong = |expected: &str, out: &mut Vec<Problem>| {
            out.push(Problem::new(
                path,
                line,
                format!("expected {expected}, found {}", found(v.get_ref())),
            ));
        };
        // `what` says what the list is; `item` what each of its items must be.
        let list = |elem: &dyn Fn(&DeValue<'_>) -> bool,
                    what: &str,
                    item_what: &str,
                    out: &mut Vec<Problem>| match v.get_ref() {
            DeValue::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    if !elem(item.get_ref()) {
                        out.push(Problem::new(
                            format!("{path}[{i}]"),
                            Some(lines.line(item.span().start)),
                            format!("expected {item_what}, found {}", found(item.get_ref())),
                        ));
                    }
                }
            }
            _ => wrong(what, out),
        };
        match kind {
            Kind::Str(what) if !v.get_ref().is_str() => wrong(what, out),
            Kind::Int(what) if !v.get_ref().is_integer() => wrong(what, out),
            Kind::Bool if !v.get_ref().is_bool() => wrong("true or false", out),
            Kind::StrOrInt(what) if !(v.get_ref().is_str() || v.get_ref().is_integer()) => {
                wrong(what, out)
            }
            Kind::StrList(what) => list(&|v| v.is_str(), what, "a string in quotes", out),
            Kind::IntList(what) => list(&|v| v.is_integer(), what, "a whole number", out),
            Kind::Table(fields) => match v.get_ref() {
                DeValue::Table(t) => self.table(t, fields, path),
                _ => wrong(&format!("a table, [{path}]"), out),
            },
            Kind::Tables(fields) => match v.get_ref() {
                DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let at = format!("{path}[{i}]");
                        self.locations
                            .0
                            .insert(at.clone(), lines.line(item.span().start));
                        match item.get_ref() {
                            DeValue::Table(t) => self.table(t, fields, &at),
                            other => self.out.push(Problem::new(
                                format!("{path}[{i}]"),
                                Some(lines.line(item.span().start)),
                                format!("expected a [[{path}]] table, found {}", found(other)),
                            )),
                        }
                    }
                }
                _ => wrong(&format!("[[{path}]] tables (one per {path})"), out),
            },
            _ => {}
        }
    }
}

/// A known key that `name` is probably a misspelling of.
fn close_match<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}
