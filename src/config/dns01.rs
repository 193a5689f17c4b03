//! `[dns01]`: where and how acme-sds adds the DNS-01 TXT records, by RFC 2136 dynamic update to the zone's
//! primary server signed with a TSIG key, and how long it waits for them to be served.
//!
//! The key file is only named here: it is read (and its format checked) when the ACME side starts and by
//! `acme-sds check`, and again at each order, so that a rotated key is used without a restart. Its mode is
//! checked here ([`super::secret_files`]): open to every user, refused; open to its group, a warning.

use std::path::PathBuf;
use std::time::Duration;

use toml::Spanned;

use super::raw::RawDns01;
use super::{Locations, Problem, Validator, secret_files};
use crate::values::{DnsName, ServerAddr};

/// `[dns01]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns01Config {
    /// `server`: the zone's primary, which takes the updates (port 53 unless given).
    pub server: ServerAddr,
    /// `tsig_key_file`: the TSIG key, in BIND's (`tsig-keygen`) or Knot's (`keymgr -t`) format.
    pub tsig_key_file: PathBuf,
    /// `zone`: the zone to update; found by an SOA query to `server` when absent.
    pub zone: Option<DnsName>,
    /// `propagation_timeout`: how long to wait for `server` (and each of `check_nameservers`) to serve a
    /// record before asking the CA to look.
    pub propagation_timeout: Duration,
    /// `check_nameservers`: further servers that must serve the record first (the zone's secondaries, the
    /// ones the CA will ask).
    pub check_nameservers: Vec<ServerAddr>,
}

/// `propagation_timeout` when not configured.
pub const DEFAULT_PROPAGATION_TIMEOUT: Duration = Duration::from_secs(120);

impl Validator<'_> {
    pub(super) fn dns01(&mut self, raw: Spanned<RawDns01>) -> Option<Dns01Config> {
        let line = self.line(&raw);
        let raw = raw.into_inner();
        let server = match raw.server {
            None => {
                self.problem(
                    "dns01.server",
                    line,
                    "is required: the zone's primary name server, which takes RFC 2136 updates (\"ns1.example.com:53\")",
                );
                None
            }
            Some(s) => {
                let l = self.line(&s);
                ServerAddr::new(s.get_ref(), 53)
                    .map_err(|msg| self.problem("dns01.server", l, msg))
                    .ok()
            }
        };
        let tsig_key_file = match raw.tsig_key_file {
            None => {
                self.problem(
                    "dns01.tsig_key_file",
                    line,
                    "is required: a TSIG key in BIND's or Knot's format (`tsig-keygen -a hmac-sha256 acme-sds` or `keymgr -t acme-sds hmac-sha256` writes one)",
                );
                None
            }
            Some(p) => {
                let l = self.line(&p);
                let path = self.path(p.get_ref());
                self.secret_file("dns01.tsig_key_file", l, &path);
                Some(path)
            }
        };
        let zone = raw.zone.and_then(|z| {
            let l = self.line(&z);
            DnsName::new(z.get_ref())
                .map_err(|msg| self.problem("dns01.zone", l, msg))
                .ok()
        });
        let propagation_timeout = match raw.propagation_timeout {
            None => DEFAULT_PROPAGATION_TIMEOUT,
            Some(d) => {
                let l = self.line(&d);
                match super::parse_duration(d.get_ref()) {
                    Ok(v) if !v.is_zero() => v,
                    Ok(_) => {
                        self.problem("dns01.propagation_timeout", l, "must be longer than zero");
                        DEFAULT_PROPAGATION_TIMEOUT
                    }
                    Err(msg) => {
                        self.problem("dns01.propagation_timeout", l, msg);
                        DEFAULT_PROPAGATION_TIMEOUT
                    }
                }
            }
        };
        let mut check_nameservers = Vec::new();
        for (i, s) in raw.check_nameservers.unwrap_or_default().iter().enumerate() {
            let l = self.line(s);
            match ServerAddr::new(s.get_ref(), 53) {
                Ok(a) => check_nameservers.push(a),
                Err(msg) => self.problem(format!("dns01.check_nameservers[{i}]"), l, msg),
            }
        }
        Some(Dns01Config {
            server: server?,
            tsig_key_file: tsig_key_file?,
            zone,
            propagation_timeout,
            check_nameservers,
        })
    }
}

impl Dns01Config {
    /// A TSIG key file its group may open (`check` prints it, every start logs it).
    pub(super) fn warnings(&self, locations: &Locations) -> Vec<Problem> {
        secret_files::group_access(&self.tsig_key_file)
            .map(|why| {
                Problem::new(
                    "dns01.tsig_key_file",
                    locations.line("dns01.tsig_key_file"),
                    format!("{}: {why}", self.tsig_key_file.display()),
                )
            })
            .into_iter()
            .collect()
    }
}
