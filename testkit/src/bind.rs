//! A real BIND (Debian `bind9`) for the DNS-01 tests: `named -g` on a free loopback port, serving one zone that
//! accepts RFC 2136 updates signed with a TSIG key (`update-policy { grant <key> zonesub TXT; }`), its journal and
//! log in the test's directory. `dig` (Debian `bind9-dnsutils`) reads what the zone serves.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::WAIT;

/// The `named` and `dig` binaries, or `None` to skip; under CI a missing BIND fails instead.
pub fn bind_bins() -> Option<(PathBuf, PathBuf)> {
    // Debian puts named in /usr/sbin, which a non-root PATH may lack.
    let sbin = Path::new("/usr/sbin/named");
    if sbin.is_file() {
        let dig = crate::tools_on_path(["dig", "dig"], "apt-get install bind9-dnsutils")?;
        return Some((sbin.to_owned(), dig.0));
    }
    crate::tools_on_path(["named", "dig"], "apt-get install bind9 bind9-dnsutils")
}

pub struct Bind {
    child: Child,
    dig: PathBuf,
    /// Where named answers, UDP and TCP.
    pub addr: SocketAddr,
    /// The zone it serves, without the trailing dot.
    pub zone: String,
    /// The TSIG key, in BIND's `key "name" { algorithm ...; secret "..."; };` form.
    pub key_file: PathBuf,
    /// The key's name.
    pub key_name: String,
    /// A key named `readonly` that the server knows and `update-policy` grants nothing.
    pub readonly_key_file: PathBuf,
    /// Keys granted like `key_file`, with hmac-sha384 (`acme-sds-384`) and hmac-sha512 (`acme-sds-512`).
    pub sha384_key_file: PathBuf,
    pub sha512_key_file: PathBuf,
    dir: PathBuf,
}

/// A random TSIG secret, base64 (what `tsig-keygen` prints), `bytes` long.
pub fn tsig_secret(bytes: usize) -> String {
    use rustls::crypto::ring::default_provider;
    let mut key = vec![0u8; bytes];
    default_provider()
        .secure_random
        .fill(&mut key)
        .expect("random");
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// A key file in BIND's format.
pub fn key_file_text(name: &str, algorithm: &str, secret: &str) -> String {
    format!("key \"{name}\" {{\n\talgorithm {algorithm};\n\tsecret \"{secret}\";\n}};\n")
}

/// What `dig +short ARGS` prints when it asks the server at `addr` over TCP (bounded).
pub fn dig_short(dig: &Path, addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(dig)
        .args(["+short", "+tcp", "+time=2", "+tries=2", "-p"])
        .arg(addr.port().to_string())
        .arg(format!("@{}", addr.ip()))
        .args(args)
        .output()
        .expect("run dig");
    assert!(out.status.success(), "dig: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The TXT values `name` has on the server at `addr` right now.
pub fn dig_txt(dig: &Path, addr: SocketAddr, name: &str) -> Vec<String> {
    dig_short(dig, addr, &[name, "TXT"])
        .lines()
        .map(|l| l.trim().trim_matches('"').to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

impl Bind {
    /// Starts named in `dir` serving `zone` (e.g. `example.test`), updatable with a fresh hmac-sha256 key
    /// named `acme-sds`, and waits (bounded) until it answers.
    pub fn start(dir: &Path, zone: &str) -> Option<Bind> {
        Self::start_zones(dir, zone, &[], "")
    }

    /// The same with `more_zones` served (and updatable) too, and `records` (zone-file lines, names relative
    /// to `zone`) in `zone`.
    pub fn start_zones(dir: &Path, zone: &str, more_zones: &[&str], records: &str) -> Option<Bind> {
        Self::start_with(dir, zone, more_zones, records, false)
    }

    /// [`Bind::start`] with the zone DNSSEC-signed by named as it changes (`dnssec-policy default;
    /// inline-signing yes;`, as a production zone often is): updates go to the unsigned zone, the signed one
    /// is served.
    pub fn start_signed(dir: &Path, zone: &str) -> Option<Bind> {
        Self::start_with(dir, zone, &[], "", true)
    }

    fn start_with(
        dir: &Path,
        zone: &str,
        more_zones: &[&str],
        records: &str,
        signed: bool,
    ) -> Option<Bind> {
        let (named, dig) = bind_bins()?;
        std::fs::create_dir_all(dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let key_name = "acme-sds".to_owned();
        let key_file = dir.join("acme-sds.key");
        crate::write_private(
            &key_file,
            key_file_text(&key_name, "hmac-sha256", &tsig_secret(32)),
        );
        // A key the server knows but does not let change the zone.
        let readonly_key_file = dir.join("readonly.key");
        crate::write_private(
            &readonly_key_file,
            key_file_text("readonly", "hmac-sha256", &tsig_secret(32)),
        );
        let sha384_key_file = dir.join("acme-sds-384.key");
        crate::write_private(
            &sha384_key_file,
            key_file_text("acme-sds-384", "hmac-sha384", &tsig_secret(48)),
        );
        let sha512_key_file = dir.join("acme-sds-512.key");
        crate::write_private(
            &sha512_key_file,
            key_file_text("acme-sds-512", "hmac-sha512", &tsig_secret(64)),
        );
        // Each zone: its SOA and NS, the apex and ns1 on loopback, and `records` (zone-file lines) in the first.
        let mut zones_conf = String::new();
        for (i, z) in std::iter::once(zone)
            .chain(more_zones.iter().copied())
            .enumerate()
        {
            let zone_file = dir.join(format!("{z}.zone"));
            std::fs::write(
                &zone_file,
                format!(
                    "$TTL 60\n@ IN SOA ns1.{z}. hostmaster.{z}. 1 3600 600 86400 60\n@ IN NS ns1.{z}.\nns1 IN A 127.0.0.1\n@ IN A 127.0.0.1\n{}",
                    if i == 0 { records } else { "" }
                ),
            )
            .unwrap();
            zones_conf.push_str(&format!(
                "zone \"{z}\" {{\n  type primary;\n  file \"{}\";\n{}  update-policy {{ grant {key_name} zonesub TXT; grant acme-sds-384 zonesub TXT; grant acme-sds-512 zonesub TXT; }};\n}};\n",
                zone_file.display(),
                if signed {
                    "  dnssec-policy default;\n  inline-signing yes;\n"
                } else {
                    ""
                }
            ));
        }
        let port = crate::pebble::free_dns_port();
        let conf = dir.join("named.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "include \"{key}\";\ninclude \"{readonly}\";\ninclude \"{k384}\";\ninclude \"{k512}\";\noptions {{\n  directory \"{d}\";\n  pid-file \"{d}/named.pid\";\n  session-keyfile \"{d}/session.key\";\n  managed-keys-directory \"{d}\";\n  listen-on port {port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n  recursion no;\n  dnssec-validation no;\n  notify no;\n  allow-query {{ any; }};\n}};\ncontrols {{ }};\n{zones_conf}",
                key = key_file.display(),
                readonly = readonly_key_file.display(),
                k384 = sha384_key_file.display(),
                k512 = sha512_key_file.display(),
            ),
        )
        .unwrap();
        let log = dir.join("named.log");
        let mut child = Command::new(&named)
            .args(["-g", "-n", "1", "-c"])
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start named");
        // named -g logs to stderr; "running" means the zone is loaded and the sockets are open.
        let stderr = child.stderr.take().unwrap();
        let rx = crate::tee_lines(stderr, log.clone());
        let deadline = Instant::now() + WAIT;
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                // Its last start-up line is "<time> running" ("running as: ..." and "running on ..." come
                // first).
                Ok(l) if l.ends_with(" running") => break,
                Ok(_) => {}
                Err(_) => panic!(
                    "named did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        }
        Some(Bind {
            child,
            dig,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            zone: zone.to_owned(),
            key_file,
            key_name,
            readonly_key_file,
            sha384_key_file,
            sha512_key_file,
            dir,
        })
    }

    /// The TXT values `name` has on this server right now (asked with `dig`, over TCP, bounded).
    pub fn txt(&self, name: &str) -> Vec<String> {
        dig_txt(&self.dig, self.addr, name)
    }

    /// What `dig +short ARGS` prints when it asks this server over TCP (bounded).
    pub fn dig(&self, args: &[&str]) -> String {
        dig_short(&self.dig, self.addr, args)
    }

    /// Adds a TXT value with `nsupdate` (Debian `bind9-dnsutils`), as another tool sharing the zone would.
    pub fn nsupdate_add(&self, name: &str, value: &str) {
        use std::io::Write;
        let mut child = Command::new("nsupdate")
            .arg("-k")
            .arg(&self.key_file)
            .args(["-t", "5"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nsupdate (apt-get install bind9-dnsutils)");
        let script = format!(
            "server 127.0.0.1 {}\nzone {}\nupdate add {name} 60 TXT \"{value}\"\nsend\n",
            self.addr.port(),
            self.zone
        );
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "nsupdate: {out:?}");
    }

    /// named's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("named.log")).unwrap_or_default()
    }
}

impl Drop for Bind {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
