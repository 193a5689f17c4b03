//! `[storage]`: where the account, keys, certificates and ACME state are kept: a directory, or an etcd
//! cluster (`[storage.etcd]`) that several replicas share; the key file that seals the stored private keys,
//! with `accept_unsealed` for converting a store that predates it. The key files named here (the storage
//! key, etcd's client key and password) are refused when every user may open them, and warned about when
//! their group may ([`super::secret_files`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::raw::{RawEtcd, RawStorage};
use super::{Locations, Problem, Validator, secret_files};
use crate::store::sealed::KeyFile;

/// `[storage]`: where account, keys, certificates and ACME state are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// The storage directory (created if missing; 0700); unused with `[storage.etcd]`.
    pub path: PathBuf,
    /// `encryption_key_file`: the keys that seal the stored private keys (`store::sealed`), with
    /// `accept_unsealed` (private keys found in clear read and sealed in place rather than refused); off
    /// when absent (required with etcd).
    pub encryption_key_file: Option<KeyFile>,
    /// `[storage.etcd]`: a cluster shared by several replicas, instead of the directory.
    pub etcd: Option<EtcdConfig>,
}

/// `[storage.etcd]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// `endpoints`: member URLs, `http://` or `https://` (then with `ca_file`).
    pub endpoints: Vec<String>,
    /// `prefix`: everything acme-sds writes lives under it.
    pub prefix: String,
    /// `ca_file`: the CA of the members' certificates (PEM).
    pub ca_file: Option<PathBuf>,
    /// `cert_file` and `key_file`: a client certificate, when the cluster asks for one.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// `username` and the file holding its password (`password_file`).
    pub user: Option<(String, PathBuf)>,
    /// `lock_ttl`: how long a replica that stopped (crashed, paused, cut off) keeps a certificate's lock.
    pub lock_ttl: Duration,
}

/// The etcd key prefix when none is configured.
pub const DEFAULT_ETCD_PREFIX: &str = "/acme-sds";
/// `lock_ttl` when not configured: a crashed replica's order is taken over within about this long.
pub const DEFAULT_LOCK_TTL: Duration = Duration::from_secs(10);
const MIN_LOCK_TTL: Duration = Duration::from_secs(2);
const MAX_LOCK_TTL: Duration = Duration::from_secs(300);

impl Validator<'_> {
    /// A file that holds a secret, named by `key`: refused when every user of the host may open it
    /// ([`secret_files`]).
    pub(super) fn secret_file(&mut self, key: &str, line: Option<usize>, path: &Path) {
        if let Some(why) = secret_files::world_access(path) {
            self.problem(key, line, format!("{}: {why}", path.display()));
        }
    }

    pub(super) fn storage(&mut self, raw: Option<Spanned<RawStorage>>) -> StorageConfig {
        let raw = raw.map(|r| r.into_inner());
        let (path, key_file, accept_unsealed, etcd) = match raw {
            Some(r) => (r.path, r.encryption_key_file, r.accept_unsealed, r.etcd),
            None => (None, None, None, None),
        };
        if let Some(a) = &accept_unsealed
            && key_file.is_none()
        {
            let l = self.line(a);
            self.problem(
                "storage.accept_unsealed",
                l,
                "goes with storage.encryption_key_file: it lets private keys stored in clear before the key was configured be read and sealed",
            );
        }
        let accept_unsealed = accept_unsealed.is_some_and(|a| a.into_inner());
        let key_file = key_file.map(|f| {
            let l = self.line(&f);
            let path = self.path(f.get_ref());
            self.secret_file("storage.encryption_key_file", l, &path);
            KeyFile {
                path,
                accept_unsealed,
            }
        });
        let etcd = etcd.map(|e| {
            let line = self.line(&e);
            if let Some(p) = &path {
                let l = self.line(p);
                self.problem(
                    "storage.path",
                    l,
                    "storage.path and [storage.etcd] are two places for the same state: keep one (to move a directory's state into etcd, run `acme-sds storage migrate --from DIR`)",
                );
            }
            if key_file.is_none() {
                self.problem(
                    "storage.encryption_key_file",
                    line,
                    "is required with [storage.etcd]: private keys are sealed before they leave this host (make one with `head -c 32 /dev/urandom | base64 > storage.key`; every replica needs the same file)",
                );
            }
            self.etcd(e.into_inner(), line)
        });
        let path = path
            .map(|p| p.into_inner())
            .unwrap_or_else(|| "acme-sds-data".to_owned());
        StorageConfig {
            path: self.path(&path),
            encryption_key_file: key_file,
            etcd,
        }
    }

    fn etcd(&mut self, raw: RawEtcd, line: Option<usize>) -> EtcdConfig {
        let mut endpoints = Vec::new();
        match raw.endpoints {
            None => self.problem(
                "storage.etcd.endpoints",
                line,
                "is required: the members' URLs, such as [\"http://10.0.0.1:2379\", \"http://10.0.0.2:2379\"]",
            ),
            Some(list) => {
                let list_line = self.line(&list);
                if list.get_ref().is_empty() {
                    self.problem(
                        "storage.etcd.endpoints",
                        list_line,
                        "names no member; list at least one URL",
                    );
                }
                for (i, e) in list.into_inner().into_iter().enumerate() {
                    let l = self.line(&e);
                    let url = e.into_inner();
                    match check_endpoint(&url) {
                        Ok(()) => endpoints.push(url),
                        Err(msg) => {
                            self.problem(format!("storage.etcd.endpoints[{i}]"), l, msg);
                        }
                    }
                }
            }
        }
        let prefix = match raw.prefix {
            None => DEFAULT_ETCD_PREFIX.to_owned(),
            Some(p) => {
                let l = self.line(&p);
                let p = p.into_inner();
                let trimmed = p.trim_end_matches('/');
                if !p.starts_with('/') || trimmed.is_empty() || p.chars().any(char::is_whitespace) {
                    self.problem(
                        "storage.etcd.prefix",
                        l,
                        format!(
                            "{p:?} is not a key prefix such as \"/acme-sds\": it starts with '/', has no spaces, and is not '/' alone"
                        ),
                    );
                }
                trimmed.to_owned()
            }
        };
        let tls = endpoints.iter().any(|e| e.starts_with("https://"));
        let plain = endpoints.iter().any(|e| e.starts_with("http://"));
        if tls && plain {
            self.problem(
                "storage.etcd.endpoints",
                line,
                "mixes http:// and https:// members; one cluster speaks one of them",
            );
        }
        let ca_file = raw.ca_file.map(|f| {
            if plain && !tls {
                let l = self.line(&f);
                self.problem(
                    "storage.etcd.ca_file",
                    l,
                    "is for https:// endpoints, and these are http://",
                );
            }
            self.path(f.get_ref())
        });
        if tls && ca_file.is_none() {
            self.problem(
                "storage.etcd.ca_file",
                line,
                "is required with https:// endpoints: the CA that signed the members' certificates",
            );
        }
        let client_cert = match (raw.cert_file, raw.key_file) {
            (Some(c), Some(k)) => {
                let l = self.line(&k);
                let key = self.path(k.get_ref());
                self.secret_file("storage.etcd.key_file", l, &key);
                Some((self.path(c.get_ref()), key))
            }
            (None, None) => None,
            (Some(c), None) => {
                let l = self.line(&c);
                self.problem(
                    "storage.etcd.key_file",
                    l,
                    "is required with storage.etcd.cert_file",
                );
                None
            }
            (None, Some(k)) => {
                let l = self.line(&k);
                self.problem(
                    "storage.etcd.cert_file",
                    l,
                    "is required with storage.etcd.key_file",
                );
                None
            }
        };
        if client_cert.is_some() && !tls {
            self.problem(
                "storage.etcd.cert_file",
                line,
                "a client certificate needs https:// endpoints",
            );
        }
        let user = match (raw.username, raw.password_file) {
            (Some(u), Some(p)) => {
                let l = self.line(&p);
                let password = self.path(p.get_ref());
                self.secret_file("storage.etcd.password_file", l, &password);
                Some((u.into_inner(), password))
            }
            (None, None) => None,
            (Some(u), None) => {
                let l = self.line(&u);
                self.problem(
                    "storage.etcd.password_file",
                    l,
                    "is required with storage.etcd.username (a file holding the password, so that it is not in the configuration)",
                );
                None
            }
            (None, Some(p)) => {
                let l = self.line(&p);
                self.problem(
                    "storage.etcd.username",
                    l,
                    "is required with storage.etcd.password_file",
                );
                None
            }
        };
        let lock_ttl = match raw.lock_ttl {
            None => DEFAULT_LOCK_TTL,
            Some(d) => {
                let l = self.line(&d);
                match super::parse_duration(d.get_ref()) {
                    Ok(v) if (MIN_LOCK_TTL..=MAX_LOCK_TTL).contains(&v) => v,
                    Ok(_) => {
                        self.problem(
                            "storage.etcd.lock_ttl",
                            l,
                            "must be between 2s and 5m (a replica that stops keeps its certificates locked this long)",
                        );
                        DEFAULT_LOCK_TTL
                    }
                    Err(msg) => {
                        self.problem("storage.etcd.lock_ttl", l, msg);
                        DEFAULT_LOCK_TTL
                    }
                }
            }
        };
        EtcdConfig {
            endpoints,
            prefix,
            ca_file,
            client_cert,
            user,
            lock_ttl,
        }
    }
}

impl StorageConfig {
    /// What is allowed here but should not stay: `accept_unsealed`, a migration setting, while it is on;
    /// a key file its group may open (`check` prints them, every start logs them).
    pub(super) fn warnings(&self, locations: &Locations) -> Vec<Problem> {
        let mut out = Vec::new();
        let etcd = self.etcd.as_ref();
        let files = [
            (
                "storage.encryption_key_file",
                self.encryption_key_file.as_ref().map(|k| k.path.as_path()),
            ),
            (
                "storage.etcd.key_file",
                etcd.and_then(|e| e.client_cert.as_ref().map(|(_, k)| k.as_path())),
            ),
            (
                "storage.etcd.password_file",
                etcd.and_then(|e| e.user.as_ref().map(|(_, p)| p.as_path())),
            ),
        ];
        for (key, path) in files {
            if let Some(path) = path
                && let Some(why) = secret_files::group_access(path)
            {
                out.push(Problem::new(
                    key,
                    locations.line(key),
                    format!("{}: {why}", path.display()),
                ));
            }
        }
        if self
            .encryption_key_file
            .as_ref()
            .is_some_and(|k| k.accept_unsealed)
        {
            out.push(Problem::new(
                "storage.accept_unsealed",
                locations.line("storage.accept_unsealed"),
                "is on: private keys found in clear in the store are accepted and sealed in place, so anyone who can write to the store could plant one. It is for converting a store that predates storage.encryption_key_file: one start with it seals every stored key; then remove it",
            ));
        }
        out
    }
}

/// An etcd member URL: `http://` or `https://`, a host and a port, nothing after.
fn check_endpoint(url: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!("{url:?} is not an etcd member URL such as \"http://10.0.0.1:2379\": {why}")
    };
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| bad("it starts with http:// or https://"))?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') || rest.contains('?') || rest.contains('@') {
        return Err(bad("it has a host and a port, and no path or credentials"));
    }
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| bad("it names the port (etcd's is 2379)"))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad("it has a host and a port between 1 and 65535"));
    }
    Ok(())
}
