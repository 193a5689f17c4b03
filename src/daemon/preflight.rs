//! What can be told about starting a configuration here before doing it: `acme-sds check` runs
//! [`preflight`] (sockets, storage, groups, ports, the CA's root) and `run` checks the open-files limit
//! against the connection caps ([`check_open_files_limit`]). Nothing here changes anything.

use crate::config::Config;

/// Warns when the process may run out of file descriptors before its connection limits are reached: then
/// accepting fails (and backs off) instead of the limits refusing the excess cleanly.
pub fn check_open_files_limit(config: &Config, limit: u64) {
    let q = config.sds.quotas;
    let http = crate::net::http1::MAX_CONNECTIONS;
    let needed = config.sds.listen.len() * q.max_connections
        + usize::from(config.admin.is_some()) * http
        + usize::from(config.has_acme_certificates()) * http
        + 256;
    if (limit as usize) < needed {
        tracing::warn!(
            open_files_limit = limit,
            needed,
            "the open-files limit is below what the connection limits allow (sds.max_connections per SDS listener, {http} each for the admin and HTTP-01 listeners); raise it (systemd: LimitNOFILE) or lower sds.max_connections"
        );
    } else {
        tracing::debug!(open_files_limit = limit, needed, "open-files limit");
    }
}

/// What `acme-sds check` can tell about starting `config` here without doing anything: whether this user
/// can create the Unix sockets and the storage directory, give the sockets their group, bind the ports it
/// asks for, read the ACME server's root, and use the DNS-01 TSIG key. `run` does each of these for real and names the path, group
/// or port when it fails; `check` says so beforehand.
pub fn preflight(config: &Config) -> Vec<crate::config::Problem> {
    use crate::config::Problem;
    use crate::values::ListenAddr;
    let mut out = Vec::new();
    let uid = nix::unistd::geteuid();
    let root = uid.is_root();
    for (i, l) in config.sds.listen.iter().enumerate() {
        let key = format!("sds.listen[{i}]");
        match l {
            ListenAddr::Unix(path) => match std::fs::symlink_metadata(path) {
                Ok(m) if !std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
                    out.push(Problem::new(
                        key,
                        None,
                        format!(
                            "{} exists and is not a socket: acme-sds will not replace it",
                            path.display()
                        ),
                    ))
                }
                Ok(_) => {}
                Err(_) => {
                    if let Err(why) = creatable(path) {
                        out.push(Problem::new(
                            key,
                            None,
                            format!("cannot create the socket {}: {why}", path.display()),
                        ));
                    }
                }
            },
            ListenAddr::Tcp(a) => {
                if let Some(why) = privileged_port(a.port()) {
                    out.push(Problem::new(key, None, format!("{a}: {why}")));
                }
            }
        }
    }
    if let Some(gid) = config.sds.socket_group
        && !root
    {
        let member = nix::unistd::getegid().as_raw() == gid
            || nix::unistd::getgroups().is_ok_and(|g| g.iter().any(|g| g.as_raw() == gid));
        if !member {
            out.push(Problem::new(
                "sds.socket_group",
                None,
                format!(
                    "this user (uid {uid}) is not a member of group {gid}, so it cannot give the sockets to it: add the user to the group, or run as root"
                ),
            ));
        }
    }
    let issued = config
        .certificates
        .iter()
        .any(|c| c.source.issued_domains().is_some());
    if let Some(etcd) = &config.storage.etcd {
        if let Err(crate::sources::OpenStoreError::EtcdFile { key, path, source }) =
            crate::sources::etcd_settings(etcd)
        {
            out.push(Problem::new(
                format!("storage.etcd.{key}"),
                None,
                format!("{}: {source}", path.display()),
            ));
        }
    } else if issued {
        let path = &config.storage.path;
        let problem = match std::fs::metadata(path) {
            Ok(m) if !m.is_dir() => Some("exists and is not a directory".to_owned()),
            Ok(_) => writable_dir(path).err(),
            Err(_) => creatable(path).err(),
        };
        if let Some(why) = problem {
            out.push(Problem::new(
                "storage.path",
                None,
                format!("{}: {why}", path.display()),
            ));
        }
    }
    if let Some(key_file) = &config.storage.encryption_key_file
        && let Err(e) = crate::store::sealed::Sealer::load(key_file)
    {
        // The error names the key and the file itself.
        let message = e.to_string();
        let message = message
            .strip_prefix("storage.encryption_key_file: ")
            .unwrap_or(&message);
        out.push(Problem::new("storage.encryption_key_file", None, message));
    }
    if config.has_acme_certificates() {
        if let Some(why) = privileged_port(config.http01.listen.port()) {
            out.push(Problem::new(
                "http01.listen",
                None,
                format!("{}: {why}", config.http01.listen),
            ));
        }
        if let Some(ca) = config.acme.as_ref().and_then(|a| a.directory_ca.as_ref()) {
            let read = std::fs::read(ca)
                .map_err(|e| e.to_string())
                .and_then(|b| crate::certs::trust_bundle_pem(&b).map_err(|e| e.to_string()));
            if let Err(why) = read {
                out.push(Problem::new(
                    "acme.directory_ca",
                    None,
                    format!("{}: {why}", ca.display()),
                ));
            }
        }
    }
    if let Some(d) = &config.dns01 {
        use crate::sources::acme::dns01::{DnsError, TsigKey};
        if let Err(DnsError::Key { path, why }) = TsigKey::read(&d.tsig_key_file) {
            out.push(Problem::new(
                "dns01.tsig_key_file",
                None,
                format!("{}: {why}", path.display()),
            ));
        }
    }
    if let Some(a) = config.admin
        && let Some(why) = privileged_port(a.port())
    {
        out.push(Problem::new("admin.listen", None, format!("{a}: {why}")));
    }
    out
}

/// Whether this process may create entries in the directory `dir`.
fn writable_dir(dir: &std::path::Path) -> Result<(), String> {
    use nix::unistd::{AccessFlags, access};
    access(dir, AccessFlags::W_OK | AccessFlags::X_OK).map_err(|e| {
        format!(
            "{} is not writable by this user (uid {}): {e}",
            dir.display(),
            nix::unistd::geteuid()
        )
    })
}

/// Whether this process could create `path` with its missing parents: its nearest existing ancestor must be
/// a directory it may write.
fn creatable(path: &std::path::Path) -> Result<(), String> {
    let mut dir = path.parent();
    while let Some(d) = dir {
        let d = if d.as_os_str().is_empty() {
            std::path::Path::new(".")
        } else {
            d
        };
        match std::fs::metadata(d) {
            Ok(m) if m.is_dir() => return writable_dir(d),
            Ok(_) => return Err(format!("{} is not a directory", d.display())),
            Err(_) => dir = d.parent(),
        }
    }
    Ok(())
}

/// Why this process cannot bind `port`, if it cannot: below `net.ipv4.ip_unprivileged_port_start` only root
/// or a holder of CAP_NET_BIND_SERVICE may.
fn privileged_port(port: u16) -> Option<String> {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if port == 0 || port >= start || nix::unistd::geteuid().is_root() {
        return None;
    }
    // CapEff bit 10: CAP_NET_BIND_SERVICE.
    let capable = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 10) != 0);
    (!capable).then(|| {
        format!(
            "port {port} is privileged (below net.ipv4.ip_unprivileged_port_start = {start}): run as root, give acme-sds CAP_NET_BIND_SERVICE, or use a port from {start} up"
        )
    })
}
