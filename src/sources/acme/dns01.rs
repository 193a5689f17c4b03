//! DNS-01 (RFC 8555 section 8.4) by RFC 2136 dynamic update: the TXT record `_acme-challenge.NAME` is added to
//! the zone on its primary server, with the update signed by a TSIG key (RFC 8945, hmac-sha256/384/512), the
//! primary (and any `check_nameservers`) polled until it serves the value, and the record deleted by value when
//! the order ends.
//!
//! A CNAME at `_acme-challenge.NAME` (delegating the records to another zone) is followed on the primary, as
//! the CA follows it. Records are appended, never replaced: an apex and its wildcard (`example.com`, `*.example.com`) need two
//! values under the same name at once, and another certificate's order may have one there too. Deleting by
//! value removes only ours.
//!
//! The wire format and TSIG are hickory-proto's. The exchange itself is a plain DNS-over-TCP request written
//! here (length, message; answer, its length): hickory-net's client checks the TSIG of the answer inside its
//! transport and turns a server's unsigned refusal (NOTAUTH with BADSIG, BADKEY or BADTIME) into a bare
//! verification failure, and that answer is what the operator needs to read. TCP also takes the update's
//! size and the server's retransmission handling out of the picture. The answer to a signed update is
//! taken only when it answers an update and carries a signature that verifies with the same key: an
//! unsigned NOERROR could come from anyone on the path, and would have a record counted as added that
//! never was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode, update_message};
use hickory_proto::rr::rdata::TXT;
use hickory_proto::rr::rdata::tsig::{TsigAlgorithm, TsigError};
use hickory_proto::rr::{Name, RData, Record, RecordSet, RecordType, TSigner};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::Dns01Config;
use crate::metrics::Metrics;
use crate::values::ServerAddr;

/// TTL of the TXT records: short, so that a resolver that cached an earlier value (a retried order) asks
/// again soon. cert-manager uses 60 too.
const TXT_TTL: u32 = 60;
/// How long one exchange with a name server may take.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// Clock difference a server accepts in a signed update (RFC 8945 recommends 300 s).
const FUDGE: u16 = 300;

/// What went wrong with DNS-01, in terms an operator acts on.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The TSIG key file cannot be read or is not a key this client can use.
    #[error("dns01.tsig_key_file {}: {why}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The server could not be reached, or its answer could not be read.
    #[error("name server {server}: {why}")]
    Unreachable {
        /// The server.
        server: String,
        /// What happened.
        why: String,
    },
    /// The answer to a signed update is not the server's word: unsigned, signed with another key, or the
    /// answer to another kind of request. Something other than the server (or a server without the key)
    /// answered, and whether the record changed is unknown.
    #[error("name server {server}: the answer to the update cannot be trusted: {why}")]
    Untrusted {
        /// The server.
        server: String,
        /// What is wrong with the answer.
        why: String,
    },
    /// The server answered the update with an error (wrong key, not allowed, not its zone).
    #[error("zone {zone}: {server} refused the update: {answer}")]
    Refused {
        /// The zone updated.
        zone: String,
        /// The server.
        server: String,
        /// Its answer (`NOTAUTH (BADSIG)`, `REFUSED`, ...) and what it usually means.
        answer: String,
    },
    /// No zone containing the name was found at the server.
    #[error("{name}: {why}")]
    NoZone {
        /// The record's name.
        name: String,
        /// Why not.
        why: String,
    },
    /// A server did not serve the value within the propagation timeout.
    #[error("{name}: {server} did not serve the TXT value within {}s (dns01.propagation_timeout); last answer: {last}", timeout.as_secs())]
    NotServed {
        /// The record's name.
        name: String,
        /// The server that did not.
        server: String,
        /// How long it was given.
        timeout: Duration,
        /// What the server said the last time it was asked (no such record, other values only, an error
        /// code, or why it could not be asked): where to look next.
        last: String,
    },
}

/// A TSIG key as BIND (`tsig-keygen`) or Knot (`keymgr -t`) writes it: its name, algorithm and secret.
pub struct TsigKey {
    signer: TSigner,
}

impl std::fmt::Debug for TsigKey {
    // The secret never appears in a debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TsigKey")
            .field("name", &self.signer.signer_name().to_string())
            .field("algorithm", self.signer.algorithm())
            .finish_non_exhaustive()
    }
}

impl TsigKey {
    /// The key's name, as the servers' configurations write it (no final dot).
    pub fn name(&self) -> String {
        let name = self.signer.signer_name().to_string();
        name.trim_end_matches('.').to_owned()
    }

    /// Reads the key file at `path` (see [`TsigKey::parse`]); one every user of the host may open is
    /// refused ([`crate::config::secret_files`]).
    pub fn read(path: &Path) -> Result<TsigKey, DnsError> {
        let err = |why: String| DnsError::Key {
            path: path.to_owned(),
            why,
        };
        // Checked at every read: a rotated key written with the wrong mode is caught at the next order.
        if let Some(why) = crate::config::secret_files::world_access(path) {
            return Err(err(why));
        }
        let text =
            std::fs::read_to_string(path).map_err(|e| err(format!("cannot read it: {e}")))?;
        let text = zeroize::Zeroizing::new(text);
        TsigKey::parse(&text).map_err(err)
    }

    /// Parses a key file in BIND's format (`tsig-keygen`, `ddns-confgen`: the first `key "name" { algorithm
    /// ...; secret "..."; };`, comments `#`, `//` and `/* */` allowed) or Knot's (`keymgr -t NAME`: a YAML
    /// `key:` list with `id`, `algorithm` and `secret`). The error says what is wrong and on which line
    /// (`line 3: ...`), and never quotes the secret, nor any text that might be it (a word out of place).
    pub fn parse(text: &str) -> Result<TsigKey, String> {
        let tokens = tokenize(text)?;
        let fields = match bind_key(&tokens)? {
            Some(key) => key,
            None => knot_key(text)?.ok_or(
                "no `key \"name\" { algorithm hmac-sha256; secret \"...\"; };` statement (BIND, `tsig-keygen`) or `key:` list with `id`, `algorithm` and `secret` (Knot, `keymgr -t`)",
            )?,
        };
        let KeyFields {
            name,
            line,
            algorithm: (algorithm, algorithm_line),
            secret: (secret, secret_line),
        } = fields;
        let algorithm = match algorithm.to_ascii_lowercase().as_str() {
            "hmac-sha256" => TsigAlgorithm::HmacSha256,
            "hmac-sha384" => TsigAlgorithm::HmacSha384,
            "hmac-sha512" => TsigAlgorithm::HmacSha512,
            other => {
                // Named when it looks like an algorithm; anything else in its place might be the secret.
                let which = if other.starts_with("hmac-") {
                    format!("algorithm {other} is not supported")
                } else {
                    "the algorithm is not one this client knows".to_owned()
                };
                return Err(format!(
                    "line {algorithm_line}: key {name:?}: {which}: use hmac-sha256, hmac-sha384 or hmac-sha512 (`tsig-keygen -a hmac-sha256 NAME`, `keymgr -t NAME hmac-sha256`)"
                ));
            }
        };
        use base64::Engine;
        let secret = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(secret)
                .map_err(|_| {
                    format!("line {secret_line}: key {name:?}: the secret is not base64")
                })?,
        );
        if secret.is_empty() {
            return Err(format!(
                "line {secret_line}: key {name:?}: the secret is empty"
            ));
        }
        let key_name = Name::from_ascii(name)
            .map_err(|e| format!("line {line}: key name {name:?} is not a DNS name: {e}"))?;
        let signer = TSigner::new(secret.to_vec(), algorithm, key_name, FUDGE)
            .map_err(|e| format!("line {line}: key {name:?}: {e}"))?;
        Ok(TsigKey { signer })
    }
}

/// A key's fields as the file has them, each with its line (1-based) for errors.
struct KeyFields<'a> {
    name: &'a str,
    /// Where the key begins.
    line: usize,
    algorithm: (&'a str, usize),
    secret: (&'a str, usize),
}

/// The name, algorithm and secret of BIND's first `key` statement, `None` when there is none.
fn bind_key(tokens: &[Token]) -> Result<Option<KeyFields<'_>>, String> {
    let mut it = tokens.iter();
    while let Some(t) = it.next() {
        if t.text.as_str() != "key" {
            continue;
        }
        let line = t.line;
        let name = it
            .next()
            .ok_or_else(|| format!("line {line}: `key` without a name"))?;
        let name = name.text.as_str();
        let open = it.next();
        if open.map(|t| t.text.as_str()) != Some("{") {
            let at = open.map_or(line, |t| t.line);
            return Err(format!("line {at}: expected `{{` after key {name:?}"));
        }
        let (mut algorithm, mut secret) = (None, None);
        loop {
            let Some(field) = it.next() else {
                return Err(format!(
                    "line {line}: key {name:?} is not closed with `}};`"
                ));
            };
            match field.text.as_str() {
                "}" => break,
                "algorithm" => algorithm = field_value(&mut it),
                "secret" => secret = field_value(&mut it),
                ";" => continue,
                // Not quoted: it could be the secret, out of place.
                _ => {
                    return Err(format!(
                        "line {}: unexpected word in key {name:?}: only `algorithm NAME;` and `secret \"...\";` belong there",
                        field.line
                    ));
                }
            }
            match it.next() {
                Some(t) if t.text.as_str() == ";" => {}
                other => {
                    let at = other.map_or(field.line, |t| t.line);
                    return Err(format!("line {at}: expected `;` in key {name:?}"));
                }
            }
        }
        let algorithm =
            algorithm.ok_or_else(|| format!("line {line}: key {name:?} has no `algorithm`"))?;
        let secret = secret.ok_or_else(|| format!("line {line}: key {name:?} has no `secret`"))?;
        return Ok(Some(KeyFields {
            name,
            line,
            algorithm,
            secret,
        }));
    }
    Ok(None)
}

/// The value after a field's name in a BIND `key` statement, and its line.
fn field_value<'a>(it: &mut std::slice::Iter<'a, Token>) -> Option<(&'a str, usize)> {
    it.next()
        .filter(|v| !matches!(v.text.as_str(), ";" | "{" | "}"))
        .map(|v| (v.text.as_str(), v.line))
}

/// The first key of Knot's `key:` list as `keymgr -t` writes it (`  - id: NAME`, then `algorithm:` and
/// `secret:` lines), `None` when there is none. Only that shape is read, not YAML at large.
fn knot_key(text: &str) -> Result<Option<KeyFields<'_>>, String> {
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            (
                i + 1,
                l.split_once('#').map_or(l, |(code, _)| code).trim_end(),
            )
        })
        .filter(|(_, l)| !l.is_empty())
        .skip_while(|(_, l)| *l != "key:");
    let Some((list_line, _)) = lines.next() else {
        return Ok(None);
    };
    let (mut name, mut algorithm, mut secret) = (None, None, None);
    for (n, line) in lines {
        if !line.starts_with([' ', '\t', '-']) {
            break; // the next section
        }
        let mut field = line.trim_start();
        if let Some(rest) = field.strip_prefix('-') {
            if name.is_some() {
                break; // the next key
            }
            field = rest.trim_start();
        }
        let Some((k, v)) = field.split_once(':') else {
            // Not quoted: the line could be the secret, out of place.
            return Err(format!(
                "line {n}: expected `field: value` in Knot's `key:` list"
            ));
        };
        let v = v.trim().trim_matches(['"', '\'']);
        match k.trim() {
            "id" => name = Some((v, n)),
            "algorithm" => algorithm = Some((v, n)),
            "secret" => secret = Some((v, n)),
            _ => {}
        }
    }
    let (name, line) = name.ok_or(format!(
        "line {list_line}: Knot's `key:` list has no `- id:`"
    ))?;
    let algorithm =
        algorithm.ok_or_else(|| format!("line {line}: key {name:?} has no `algorithm`"))?;
    let secret = secret.ok_or_else(|| format!("line {line}: key {name:?} has no `secret`"))?;
    Ok(Some(KeyFields {
        name,
        line,
        algorithm,
        secret,
    }))
}

/// A word, a quoted string or one of `{`, `}`, `;` of a BIND configuration text, and its line. Wiped when
/// dropped: one of them is the secret.
struct Token {
    text: zeroize::Zeroizing<String>,
    line: usize,
}

/// The tokens of a BIND configuration text, comments dropped.
fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let mut out = Vec::new();
    let mut line = 1;
    let mut chars = text.chars().peekable();
    let token = |text: String, line| Token {
        text: zeroize::Zeroizing::new(text),
        line,
    };
    while let Some(c) = chars.next() {
        match c {
            '\n' => line += 1,
            c if c.is_whitespace() => {}
            '#' => while chars.next_if(|&c| c != '\n').is_some() {},
            '/' if chars.peek() == Some(&'/') => while chars.next_if(|&c| c != '\n').is_some() {},
            '/' if chars.peek() == Some(&'*') => {
                let start = line;
                chars.next();
                let mut last = ' ';
                loop {
                    match chars.next() {
                        Some('/') if last == '*' => break,
                        Some(c) => {
                            line += usize::from(c == '\n');
                            last = c;
                        }
                        None => return Err(format!("line {start}: a `/*` comment is not closed")),
                    }
                }
            }
            '{' | '}' | ';' => out.push(token(c.to_string(), line)),
            '"' => {
                let start = line;
                let mut s = String::new();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some(c) => {
                            line += usize::from(c == '\n');
                            s.push(c);
                        }
                        None => {
                            zeroize::Zeroize::zeroize(&mut s);
                            return Err(format!("line {start}: a quoted string is not closed"));
                        }
                    }
                }
                out.push(token(s, start));
            }
            c => {
                let mut s = c.to_string();
                while let Some(c) =
                    chars.next_if(|c| !c.is_whitespace() && !matches!(c, '{' | '}' | ';' | '"'))
                {
                    s.push(c);
                }
                out.push(token(s, line));
            }
        }
    }
    Ok(out)
}

/// One TXT value acme-sds added: what is deleted when the order ends (also after a crash, from the store).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxtRecord {
    /// The zone it was added to.
    pub zone: String,
    /// `_acme-challenge.NAME.`
    pub name: String,
    /// The value (the key authorization's digest; not a secret).
    pub value: String,
}

/// Adds, watches and removes DNS-01 records as `[dns01]` says, counting each update in the metrics.
#[derive(Clone)]
pub struct Dns01 {
    config: Dns01Config,
    metrics: Metrics,
}

impl DnsError {
    /// The `result` label of a failed update.
    fn label(&self) -> &'static str {
        match self {
            DnsError::Key { .. } => "key",
            DnsError::Unreachable { .. } => "unreachable",
            DnsError::Untrusted { .. } => "untrusted",
            DnsError::Refused { .. } => "refused",
            DnsError::NoZone { .. } => "no_zone",
            DnsError::NotServed { .. } => "not_served",
        }
    }
}

impl Dns01 {
    /// For `config`. Nothing is read or contacted until used.
    pub fn new(config: Dns01Config, metrics: Metrics) -> Self {
        Dns01 { config, metrics }
    }

    /// The record that holds `value` for the name `domain` (`*.` is dropped): its name (`_acme-challenge.NAME`,
    /// or where a CNAME there leads), and the zone to update (the configured one, or found with an SOA query
    /// to the primary).
    pub async fn record_for(&self, domain: &str, value: &str) -> Result<TxtRecord, DnsError> {
        let found = async {
            let name = self.follow_cname(challenge_name(domain)?).await?;
            let zone = self.zone_for(&name).await?;
            Ok::<_, DnsError>((name, zone))
        };
        let (name, zone) = found.await.inspect_err(|e| {
            self.metrics.count_dns01_update("add", e.label());
        })?;
        Ok(TxtRecord {
            zone: zone.to_ascii(),
            name: name.to_ascii(),
            value: value.to_owned(),
        })
    }

    /// Adds `record` to its zone (appended: other values under the name stay).
    pub async fn add(&self, record: &TxtRecord) -> Result<(), DnsError> {
        self.change(record, true).await
    }

    /// Deletes `record` (by value: other values under the name stay).
    pub async fn remove(&self, record: &TxtRecord) -> Result<(), DnsError> {
        self.change(record, false).await
    }

    /// How long the zone's servers may take to serve a new record (`propagation_timeout`).
    pub fn propagation_timeout(&self) -> Duration {
        self.config.propagation_timeout
    }

    /// Reads the key file: what `check` and the start of the ACME side do, so that a bad key is reported then
    /// rather than at the first order.
    pub fn check_key(&self) -> Result<(), DnsError> {
        TsigKey::read(&self.config.tsig_key_file).map(|_| ())
    }

    /// Adds (`add`) or deletes `record` with one signed update, counted in the metrics.
    async fn change(&self, record: &TxtRecord, add: bool) -> Result<(), DnsError> {
        let action = if add { "add" } else { "remove" };
        let sent = async {
            let key = TsigKey::read(&self.config.tsig_key_file)?;
            let (name, zone) = parse_record(record)?;
            let message = if add {
                update_message::append(txt_rrset(&name, &record.value, TXT_TTL), zone, false, false)
            } else {
                update_message::delete_by_rdata(txt_rrset(&name, &record.value, 0), zone, false)
            };
            self.update(&key, &record.zone, message).await
        };
        let r = sent.await;
        self.metrics
            .count_dns01_update(action, r.as_ref().map_or_else(DnsError::label, |_| "ok"));
        if r.is_ok() {
            let done = if add { "added" } else { "removed" };
            tracing::info!(zone = record.zone, name = record.name, server = %self.config.server, "DNS-01 record {done}");
        }
        r
    }

    /// Waits until the primary and every `check_nameservers` entry serve every value of `records`, polling
    /// (50 ms, doubling to 2 s) up to `propagation_timeout`.
    pub async fn wait_served(&self, records: &[TxtRecord]) -> Result<(), DnsError> {
        let timeout = self.config.propagation_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let servers = std::iter::once(&self.config.server).chain(&self.config.check_nameservers);
        for server in servers {
            for record in records {
                let mut pause = Duration::from_millis(50);
                loop {
                    let last = match self.txt_values(server, &record.name).await {
                        Ok((_, values)) if values.contains(&record.value) => break,
                        Ok((code, _))
                            if !matches!(code, ResponseCode::NoError | ResponseCode::NXDomain) =>
                        {
                            format!("{} (not serving the zone?)", mnemonic(code))
                        }
                        Ok((_, values)) if values.is_empty() => "no TXT record there".to_owned(),
                        Ok((_, values)) => {
                            format!("{} other value(s), not this one", values.len())
                        }
                        Err(e) => e.to_string(),
                    };
                    tracing::debug!(server = %server, name = record.name, last, "DNS-01 record not served yet");
                    if tokio::time::Instant::now() + pause > deadline {
                        return Err(DnsError::NotServed {
                            name: record.name.clone(),
                            server: server.to_string(),
                            timeout,
                            last,
                        });
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                }
            }
        }
        Ok(())
    }

    /// Where the record for `name` goes: `name` itself, or where its CNAME chain ends (at most 8 links), as
    /// the primary serves it. A site that delegates `_acme-challenge.NAME` to another zone with a CNAME (to
    /// keep the update key away from its main zone) gets the record there; the CA follows the CNAME too.
    async fn follow_cname(&self, mut name: Name) -> Result<Name, DnsError> {
        for _ in 0..8 {
            let answer = self
                .exchange(
                    &self.config.server,
                    question(name.clone(), RecordType::CNAME),
                    None,
                )
                .await?;
            let target = answer.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(t) if r.name == name => Some(t.0.clone()),
                _ => None,
            });
            match target {
                Some(t) => {
                    tracing::debug!(from = %name, to = %t, "the DNS-01 record's name is a CNAME; following it");
                    name = t;
                }
                None => return Ok(name),
            }
        }
        Err(DnsError::NoZone {
            name: name.to_ascii(),
            why: "a CNAME chain longer than 8 links".into(),
        })
    }

    /// The zone to update for `name`: the configured one, or the one the primary's SOA answer names.
    async fn zone_for(&self, name: &Name) -> Result<Name, DnsError> {
        if let Some(zone) = &self.config.zone {
            let zone = Name::from_ascii(format!("{zone}.")).map_err(|e| DnsError::NoZone {
                name: name.to_ascii(),
                why: e.to_string(),
            })?;
            if !zone.zone_of(name) {
                return Err(DnsError::NoZone {
                    name: name.to_ascii(),
                    why: format!("not in dns01.zone {zone}"),
                });
            }
            return Ok(zone);
        }
        let answer = self
            .exchange(
                &self.config.server,
                question(name.clone(), RecordType::SOA),
                None,
            )
            .await?;
        let soa = answer
            .answers
            .iter()
            .chain(&answer.authorities)
            .find(|r| matches!(r.data, RData::SOA(_)) && r.name.zone_of(name));
        match soa {
            Some(r) => Ok(r.name.clone()),
            None => Err(DnsError::NoZone {
                name: name.to_ascii(),
                why: format!(
                    "{} named no zone for it (answer {}): is it the zone's primary? Set dns01.zone to say which zone to update",
                    self.config.server,
                    mnemonic(answer.metadata.response_code)
                ),
            }),
        }
    }

    /// The response code and the TXT values of `server`'s answer for `name`.
    async fn txt_values(
        &self,
        server: &ServerAddr,
        name: &str,
    ) -> Result<(ResponseCode, Vec<String>), DnsError> {
        let name = Name::from_ascii(name).map_err(|e| DnsError::NoZone {
            name: name.to_owned(),
            why: e.to_string(),
        })?;
        let answer = self
            .exchange(server, question(name, RecordType::TXT), None)
            .await?;
        let values = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::TXT(t) => Some(
                    t.txt_data
                        .iter()
                        .map(|s| String::from_utf8_lossy(s))
                        .collect::<String>(),
                ),
                _ => None,
            })
            .collect();
        Ok((answer.metadata.response_code, values))
    }

    /// Sends a signed update to the primary; an answer other than NOERROR is [`DnsError::Refused`].
    async fn update(&self, key: &TsigKey, zone: &str, message: Message) -> Result<(), DnsError> {
        let answer = self
            .exchange(&self.config.server, message, Some(key))
            .await?;
        let code = answer.metadata.response_code;
        let tsig_error = answer.signature.as_ref().and_then(|s| s.data.error);
        if code == ResponseCode::NoError && tsig_error.is_none() {
            return Ok(());
        }
        Err(DnsError::Refused {
            zone: zone.trim_end_matches('.').to_owned(),
            server: self.config.server.to_string(),
            answer: explain(code, tsig_error, key),
        })
    }

    /// One request and its answer over TCP, signed with `key` when given. The answer must be a response to
    /// this request (its id and opcode), and to a signed request, signed with the same key (RFC 8945): an
    /// unsigned NOERROR, or a signature that does not verify, is [`DnsError::Untrusted`]. Unsigned
    /// refusals are let through to be explained (RFC 8945 has BADSIG and BADKEY answered unsigned; a
    /// forged refusal only fails what an attacker on the path could fail anyway).
    async fn exchange(
        &self,
        server: &ServerAddr,
        mut message: Message,
        key: Option<&TsigKey>,
    ) -> Result<Message, DnsError> {
        let unreachable = |why: String| DnsError::Unreachable {
            server: server.to_string(),
            why,
        };
        let untrusted = |why: String| DnsError::Untrusted {
            server: server.to_string(),
            why,
        };
        message.metadata.id = rand::random();
        let verifier = match key {
            Some(k) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                message
                    .finalize(&k.signer, now)
                    .map_err(|e| unreachable(format!("signing the update: {e}")))?
            }
            None => None,
        };
        let bytes = message
            .to_vec()
            .map_err(|e| unreachable(format!("encoding the request: {e}")))?;
        let len =
            u16::try_from(bytes.len()).map_err(|_| unreachable("request too large".into()))?;
        let talk = async {
            let mut stream = tokio::net::TcpStream::connect((server.host(), server.port())).await?;
            let mut framed = Vec::with_capacity(bytes.len() + 2);
            framed.extend_from_slice(&len.to_be_bytes());
            framed.extend_from_slice(&bytes);
            stream.write_all(&framed).await?;
            let n = stream.read_u16().await?;
            let mut answer = vec![0u8; usize::from(n)];
            stream.read_exact(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        };
        let raw = tokio::time::timeout(EXCHANGE_TIMEOUT, talk)
            .await
            .map_err(|_| unreachable(format!("no answer within {}s", EXCHANGE_TIMEOUT.as_secs())))?
            .map_err(|e| unreachable(e.to_string()))?;
        let answer =
            Message::from_vec(&raw).map_err(|e| unreachable(format!("unreadable answer: {e}")))?;
        if answer.metadata.id != message.metadata.id
            || answer.metadata.message_type != MessageType::Response
        {
            return Err(unreachable("an answer to another request".into()));
        }
        if answer.metadata.op_code != message.metadata.op_code {
            return Err(untrusted(format!(
                "its opcode is {}, not {} as the request's: it answers another kind of request",
                answer.metadata.op_code, message.metadata.op_code,
            )));
        }
        let Some(mut verifier) = verifier else {
            return Ok(answer);
        };
        match answer.signature.as_ref() {
            // A TSIG error (BADSIG, BADKEY: sent unsigned): `update` explains the refusal.
            Some(tsig) if tsig.data.error.is_some() => {}
            Some(_) => {
                verifier.verify(&raw).map_err(|e| {
                    untrusted(format!(
                        "its TSIG signature does not check out with the key {:?}: {e}",
                        key.map(TsigKey::name).unwrap_or_default()
                    ))
                })?;
            }
            None if answer.metadata.response_code != ResponseCode::NoError => {}
            None => {
                return Err(untrusted(
                    "the answer is not signed (a server that has the key signs its answers to a signed update)"
                        .into(),
                ));
            }
        }
        Ok(answer)
    }
}

/// The record's name and zone, checked to nest (hickory's update builders assert that they do).
fn parse_record(record: &TxtRecord) -> Result<(Name, Name), DnsError> {
    let bad = |why: String| DnsError::NoZone {
        name: record.name.clone(),
        why,
    };
    let name = Name::from_ascii(&record.name).map_err(|e| bad(e.to_string()))?;
    let zone = Name::from_ascii(&record.zone).map_err(|e| bad(e.to_string()))?;
    if !zone.zone_of(&name) {
        return Err(bad(format!("not in zone {}", record.zone)));
    }
    Ok((name, zone))
}

/// A query for `name`'s `kind` records, not asking the server to recurse (the answer is its own data).
fn question(name: Name, kind: RecordType) -> Message {
    let mut query = Message::query();
    query.metadata.recursion_desired = false;
    query.add_query(Query::query(name, kind));
    query
}

/// `_acme-challenge.DOMAIN.`
fn challenge_name(domain: &str) -> Result<Name, DnsError> {
    Name::from_ascii(format!(
        "_acme-challenge.{}.",
        domain.trim_start_matches("*.").trim_end_matches('.')
    ))
    .map_err(|e| DnsError::NoZone {
        name: domain.to_owned(),
        why: e.to_string(),
    })
}

fn txt_rrset(name: &Name, value: &str, ttl: u32) -> RecordSet {
    RecordSet::from(Record::from_rdata(
        name.clone(),
        ttl,
        RData::TXT(TXT::new(vec![value.to_owned()])),
    ))
}

/// A response code as name servers' logs and `nsupdate` write it (RFC 6895's mnemonics).
fn mnemonic(code: ResponseCode) -> String {
    match code {
        ResponseCode::NoError => "NOERROR".into(),
        ResponseCode::FormErr => "FORMERR".into(),
        ResponseCode::ServFail => "SERVFAIL".into(),
        ResponseCode::NXDomain => "NXDOMAIN".into(),
        ResponseCode::NotImp => "NOTIMP".into(),
        ResponseCode::Refused => "REFUSED".into(),
        ResponseCode::YXDomain => "YXDOMAIN".into(),
        ResponseCode::YXRRSet => "YXRRSET".into(),
        ResponseCode::NXRRSet => "NXRRSET".into(),
        ResponseCode::NotAuth => "NOTAUTH".into(),
        ResponseCode::NotZone => "NOTZONE".into(),
        other => format!("RCODE {}", u16::from(other)),
    }
}

/// A server's refusal, with what it usually means.
fn explain(code: ResponseCode, tsig: Option<TsigError>, key: &TsigKey) -> String {
    let code = mnemonic(code);
    let key_name = key.name();
    match tsig {
        Some(TsigError::BadSig) => format!(
            "{code} (BADSIG): the server has a key named {key_name:?} with another secret or algorithm"
        ),
        Some(TsigError::BadKey) => {
            format!("{code} (BADKEY): the server knows no key named {key_name:?}")
        }
        Some(TsigError::BadTime) => format!(
            "{code} (BADTIME): this host's clock and the server's differ by more than {FUDGE}s"
        ),
        Some(other) => format!("{code} (TSIG error {})", u16::from(other)),
        None => match code.as_str() {
            "REFUSED" => format!(
                "REFUSED: the key {key_name:?} is not allowed to change TXT records there (update-policy or allow-update)"
            ),
            "NOTAUTH" => format!(
                "NOTAUTH: the server is not authoritative for the zone, or does not accept the key {key_name:?}"
            ),
            "NOTZONE" => "NOTZONE: the name is not in the zone".to_owned(),
            _ => code,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_and_knot_key_files_are_read_and_bad_ones_named() {
        let good = "# made by tsig-keygen\nkey \"acme-sds\" {\n\talgorithm hmac-sha256;\n\tsecret \"c2VjcmV0LXNlY3JldC1zZWNyZXQ=\";\n};\n";
        let key = TsigKey::parse(good).unwrap();
        assert_eq!(key.signer.signer_name().to_ascii(), "acme-sds.");
        assert_eq!(*key.signer.algorithm(), TsigAlgorithm::HmacSha256);
        assert!(
            !format!("{key:?}").contains("c2Vj"),
            "the secret is not shown"
        );
        // What `ddns-confgen -k mykey -z example.com` prints: the key between its instructions.
        let confgen = "# To activate this key, place the following in named.conf, and\n# in a separate keyfile:\nkey \"mykey\" {\n\talgorithm hmac-sha384;\n\tsecret \"YWJjZGVm\";\n};\n\n# ... place an \"update-policy\" statement like this one:\nupdate-policy {\n\t  grant mykey zonesub ANY;\n};\nnsupdate -k <keyfile>\n";
        let key = TsigKey::parse(confgen).unwrap();
        assert_eq!(key.signer.signer_name().to_ascii(), "mykey.");
        assert_eq!(*key.signer.algorithm(), TsigAlgorithm::HmacSha384);
        // What Knot's `keymgr -t acme-sds hmac-sha512` prints, after another section.
        let keymgr = "server:\n    listen: 0.0.0.0@53\n# hmac-sha512:acme-sds:YWJjZGVm\nkey:\n  - id: acme-sds\n    algorithm: hmac-sha512\n    secret: YWJjZGVm\n  - id: other\n    algorithm: hmac-sha256\n    secret: eHl6\nacl:\n  - id: update\n";
        let key = TsigKey::parse(keymgr).unwrap();
        assert_eq!(key.signer.signer_name().to_ascii(), "acme-sds.");
        assert_eq!(*key.signer.algorithm(), TsigAlgorithm::HmacSha512);
        let spaced =
            "/* two */ key acme.example. { algorithm HMAC-SHA512 ; secret \"YWJj\" ; } ; // x";
        assert_eq!(
            *TsigKey::parse(spaced).unwrap().signer.algorithm(),
            TsigAlgorithm::HmacSha512
        );
        for (text, says) in [
            ("", "no `key"),
            ("key:\n  - id: k\n    secret: YWJj\n", "no `algorithm`"),
            (
                "key:\n  - id: k\n    algorithm: hmac-md5\n    secret: YWJj\n",
                "hmac-md5 is not supported",
            ),
            ("key:\n  - algorithm: hmac-sha256\n", "no `- id:`"),
            (
                "key \"k\" { algorithm hmac-md5; secret \"YWJj\"; };",
                "hmac-md5 is not supported",
            ),
            ("key \"k\" { secret \"YWJj\"; };", "no `algorithm`"),
            ("key \"k\" { algorithm hmac-sha256; };", "no `secret`"),
            (
                "key \"k\" { algorithm hmac-sha256; secret \"!!\"; };",
                "not base64",
            ),
            (
                "key \"k\" { algorithm hmac-sha256 secret \"YWJj\"; };",
                "expected `;`",
            ),
            (
                "key \"k\" { algorithm hmac-sha256; secret \"YWJj",
                "not closed",
            ),
        ] {
            let e = TsigKey::parse(text).unwrap_err();
            assert!(e.contains(says), "{text:?}: {e}");
        }
    }

    /// A key file that does not parse: the error names the file and the line, says what is wrong, and
    /// never repeats the secret (nor a word out of place that may be it).
    #[test]
    fn key_file_errors_name_file_and_line_and_never_the_secret() {
        let dir = tempfile::tempdir().unwrap();
        let secret = "c2VjcmV0LXZhbHVlLWZvci10ZXN0cw==";
        let bad = "not*base64*c2VjcmV0";
        for (i, (text, line, says, hidden)) in [
            (
                format!("key \"k\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{bad}\";\n}};\n"),
                3,
                "the secret is not base64",
                bad,
            ),
            (
                format!("# made by hand\nkey \"k\" {{\n\talgorithm hmac-md5;\n\tsecret \"{secret}\";\n}};\n"),
                3,
                "algorithm hmac-md5 is not supported",
                secret,
            ),
            (
                format!("key \"k\" {{\n\talgorithm {secret};\n\tsecret \"YWJj\";\n}};\n"),
                2,
                "the algorithm is not one this client knows",
                secret,
            ),
            (
                "\n\nkey \"k\" {\n\talgorithm hmac-sha256;\n};\n".to_owned(),
                3,
                "key \"k\" has no `secret`",
                "",
            ),
            (
                format!("key \"k\" {{\n\tsecret \"{secret}\";\n}};\n"),
                1,
                "key \"k\" has no `algorithm`",
                secret,
            ),
            (
                format!("key \"k\" {{\n\talgorithm hmac-sha256;\n\t{secret};\n}};\n"),
                3,
                "unexpected word in key \"k\"",
                secret,
            ),
            (
                format!("key \"k\" {{\n\talgorithm hmac-sha256;\n\tsecret \"{secret}\n}};\n"),
                3,
                "a quoted string is not closed",
                secret,
            ),
            (
                format!("key:\n  - id: k\n    algorithm: hmac-sha256\n    {secret}\n"),
                4,
                "expected `field: value`",
                secret,
            ),
            (
                format!("key:\n  - id: k\n    algorithm: hmac-sha256\n    secret: {bad}\n"),
                4,
                "the secret is not base64",
                bad,
            ),
            (
                "server:\n  listen: 0.0.0.0@53\nkey:\n  - id: k\n    algorithm: hmac-sha256\n".to_owned(),
                4,
                "key \"k\" has no `secret`",
                "",
            ),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.path().join(format!("key-{i}.conf"));
            std::fs::write(&path, &text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            let e = TsigKey::read(&path).unwrap_err().to_string();
            assert!(
                e.contains(&path.display().to_string())
                    && e.contains(&format!("line {line}: "))
                    && e.contains(says),
                "{text:?}: {e}"
            );
            if !hidden.is_empty() {
                assert!(!e.contains(hidden), "the secret is shown: {e}");
            }
        }
        // A good key every user of the host can read is refused as well, at every read (a rotated key
        // written with the wrong mode is caught at the next order).
        let path = dir.path().join("open.key");
        std::fs::write(
            &path,
            format!("key \"k\" {{ algorithm hmac-sha256; secret \"{secret}\"; }};\n"),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .unwrap();
        let e = TsigKey::read(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "dns01.tsig_key_file {}: mode 0644",
                path.display()
            )) && e.contains("chmod 600")
                && !e.contains(secret),
            "{e}"
        );
    }

    /// Each answer a server can refuse an update with, as the operator reads it.
    #[test]
    fn refusals_are_told_in_the_servers_words_with_what_they_mean() {
        let key = TsigKey::parse("key \"acme-sds\" { algorithm hmac-sha256; secret \"YWJj\"; };")
            .unwrap();
        for (code, tsig, says) in [
            (
                ResponseCode::NotAuth,
                Some(TsigError::BadSig),
                "NOTAUTH (BADSIG): the server has a key named \"acme-sds\" with another secret",
            ),
            (
                ResponseCode::NotAuth,
                Some(TsigError::BadKey),
                "NOTAUTH (BADKEY): the server knows no key named \"acme-sds\"",
            ),
            (
                ResponseCode::NotAuth,
                Some(TsigError::BadTime),
                "NOTAUTH (BADTIME): this host's clock",
            ),
            (
                ResponseCode::Refused,
                None,
                "REFUSED: the key \"acme-sds\" is not allowed",
            ),
            (
                ResponseCode::NotAuth,
                None,
                "NOTAUTH: the server is not authoritative",
            ),
            (ResponseCode::NotZone, None, "NOTZONE"),
            (ResponseCode::ServFail, None, "SERVFAIL"),
        ] {
            let text = explain(code, tsig, &key);
            assert!(text.starts_with(says), "{text}");
        }
    }

    /// How the stub name server answers an update.
    enum Answer {
        /// NOERROR, signed with this secret (under the key's own name and algorithm).
        Signed(&'static [u8]),
        /// NOERROR, unsigned.
        Unsigned,
        /// NOERROR signed with the right key, but with the opcode of a query.
        QueryOpcode(&'static [u8]),
        /// NOTAUTH with an unsigned BADSIG, as RFC 8945 has a server answer a signature it cannot verify.
        BadSig,
    }

    const SECRET: &[u8] = b"the secret both sides have";

    /// A name server on loopback TCP that answers one request as `how` says: for faults a real server
    /// does not produce (a forged or misdirected answer).
    async fn stub_server(how: Answer) -> std::net::SocketAddr {
        use hickory_proto::op::OpCode;
        use hickory_proto::rr::TSigResponseContext;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let len = conn.read_u16().await.unwrap();
            let mut raw = vec![0u8; usize::from(len)];
            conn.read_exact(&mut raw).await.unwrap();
            let request = Message::from_vec(&raw).unwrap();
            let id = request.metadata.id;
            let op_code = match how {
                Answer::QueryOpcode(_) => OpCode::Query,
                _ => OpCode::Update,
            };
            let mut answer = Message::response(id, op_code);
            answer.add_queries(request.queries.clone());
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let name = request.signature.as_ref().unwrap().name.clone();
            let signer = |secret: &[u8]| {
                TSigner::new(
                    secret.to_vec(),
                    TsigAlgorithm::HmacSha256,
                    name.clone(),
                    FUDGE,
                )
                .unwrap()
            };
            let context = match how {
                Answer::Signed(secret) | Answer::QueryOpcode(secret) => {
                    let mac = request.signature.as_ref().unwrap().data.mac.clone();
                    Some(TSigResponseContext::new(id, now, signer(secret), mac, None))
                }
                Answer::Unsigned => None,
                Answer::BadSig => {
                    answer.metadata.response_code = ResponseCode::NotAuth;
                    Some(TSigResponseContext::bad_signature(id, now, signer(SECRET)))
                }
            };
            if let Some(context) = context {
                let tsig = context.sign(&answer.to_vec().unwrap()).unwrap();
                answer.set_signature(tsig);
            }
            let bytes = answer.to_vec().unwrap();
            let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
            framed.extend_from_slice(&bytes);
            conn.write_all(&framed).await.unwrap();
        });
        addr
    }

    /// Adds a record at a stub server answering as `how`, with a key of [`SECRET`].
    async fn add_at_stub(how: Answer) -> Result<(), DnsError> {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("acme-sds.key");
        let secret = base64::engine::general_purpose::STANDARD.encode(SECRET);
        std::fs::write(
            &key_file,
            format!("key \"acme-sds\" {{ algorithm hmac-sha256; secret \"{secret}\"; }};\n"),
        )
        .unwrap();
        std::fs::set_permissions(
            &key_file,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let server = stub_server(how).await;
        let dns01 = Dns01::new(
            Dns01Config {
                server: ServerAddr::new(&server.to_string(), 53).unwrap(),
                tsig_key_file: key_file,
                zone: None,
                propagation_timeout: Duration::from_secs(5),
                check_nameservers: Vec::new(),
            },
            Metrics::default(),
        );
        let record = TxtRecord {
            zone: "example.test.".into(),
            name: "_acme-challenge.example.test.".into(),
            value: "token".into(),
        };
        dns01.add(&record).await
    }

    /// An answer to a signed update counts only when the server signed it with the key: an unsigned
    /// NOERROR, one signed with another secret, or the answer to a query is refused, naming the server
    /// and what is wrong; the server's own refusals are still explained; a properly signed answer (the
    /// stub's signing checked against the client's verification) is taken.
    #[tokio::test]
    async fn answers_to_an_update_must_be_signed_with_the_key() {
        add_at_stub(Answer::Signed(SECRET))
            .await
            .expect("an answer signed with the key is taken");
        for (how, says) in [
            (Answer::Unsigned, "the answer is not signed"),
            (
                Answer::Signed(b"another secret"),
                "its TSIG signature does not check out with the key \"acme-sds\"",
            ),
            (
                Answer::QueryOpcode(SECRET),
                "its opcode is QUERY, not UPDATE",
            ),
        ] {
            let e = add_at_stub(how).await.expect_err(says);
            let text = e.to_string();
            assert!(
                matches!(e, DnsError::Untrusted { .. })
                    && text.starts_with("name server 127.0.0.1:")
                    && text.contains("cannot be trusted")
                    && text.contains(says),
                "{says}: {text}"
            );
        }
        let e = add_at_stub(Answer::BadSig).await.expect_err("BADSIG");
        let text = e.to_string();
        assert!(
            matches!(e, DnsError::Refused { .. }) && text.contains("NOTAUTH (BADSIG)"),
            "{text}"
        );
    }

    #[test]
    fn records_are_under_the_base_name() {
        assert_eq!(
            challenge_name("*.example.com").unwrap().to_ascii(),
            "_acme-challenge.example.com."
        );
        assert_eq!(
            challenge_name("example.com").unwrap().to_ascii(),
            "_acme-challenge.example.com."
        );
    }
}
