//! `[sds]` and `[sds.tls]`: where the SDS server listens, who may connect, and the stream limits.

use toml::Spanned;

use super::Validator;
use super::parse_duration;
use super::raw::RawSds;
use crate::net::listen::TlsFiles;
use crate::values::ListenAddr;

/// `[sds]`: where the SDS gRPC server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdsConfig {
    /// Where SDS is served (`unix:PATH` and `IP:PORT`).
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

/// Default permission bits of SDS Unix sockets: only the owner may connect, since the socket hands out
/// private keys.
pub const DEFAULT_SOCKET_MODE: u32 = 0o600;

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

impl Validator<'_> {
    pub(super) fn sds(&mut self, raw: Option<Spanned<RawSds>>) -> SdsConfig {
        let mut out = SdsConfig {
            listen: Vec::new(),
            socket_mode: DEFAULT_SOCKET_MODE,
            socket_group: None,
            allowed_uids: None,
            tls: None,
            allow_plaintext: false,
            stall_timeout: crate::sds::DEFAULT_STALL_TIMEOUT,
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

    pub(super) fn listen_addr(&self, s: &str) -> Result<ListenAddr, String> {
        ListenAddr::parse(s, self.base)
    }
}
