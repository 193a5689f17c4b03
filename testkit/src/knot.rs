//! A real Knot DNS (Debian `knot`) for the DNS-01 tests: a second RFC 2136 server, written by people other than
//! BIND's, so the update and TSIG code is not only right for one implementation. `knotd` runs in the foreground
//! on a free loopback port, serving one zone that accepts TXT updates signed with an hmac-sha256 TSIG key (an
//! `acl` with `action: update`, `update-type: [TXT]`), its database, journal and log in the test's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use super::WAIT;
use crate::bind::{dig_txt, tsig_secret};

pub struct Knot {
    child: Child,
    dig: PathBuf,
    /// Where knotd answers, UDP and TCP.
    pub addr: SocketAddr,
    /// The TSIG key in Knot's format (`key:` list), included by knot.conf and read by acme-sds.
    pub key_file: PathBuf,
    dir: PathBuf,
}

impl Knot {
    /// Starts knotd in `dir` serving `zone` (e.g. `example.test`), updatable with a fresh hmac-sha256 key named
    /// `acme-sds`, and waits (bounded) until it serves the zone. `None` (skip) when Knot is not installed; under
    /// CI that fails instead.
    pub fn start(dir: &Path, zone: &str) -> Option<Knot> {
        // Debian puts knotd in /usr/sbin, which a non-root PATH may lack.
        let knotd = Path::new("/usr/sbin/knotd");
        let (knotd, dig) = if knotd.is_file() {
            let dig = crate::tools_on_path(["dig", "dig"], "apt-get install bind9-dnsutils")?;
            (knotd.to_owned(), dig.0)
        } else {
            crate::tools_on_path(["knotd", "dig"], "apt-get install knot bind9-dnsutils")?
        };
        std::fs::create_dir_all(dir.join("db")).unwrap();
        let dir = dir.canonicalize().unwrap();
        let secret = tsig_secret(32);
        // Knot's own key format (what `keymgr -t acme-sds hmac-sha256` prints), included by knot.conf and
        // read by acme-sds: one file, as an operator would keep it.
        let key_file = dir.join("acme-sds.key");
        crate::write_private(
            &key_file,
            format!(
                "# hmac-sha256:acme-sds:{secret}\nkey:\n  - id: acme-sds\n    algorithm: hmac-sha256\n    secret: {secret}\n"
            ),
        );
        std::fs::write(
            dir.join(format!("{zone}.zone")),
            format!(
                "$TTL 60\n@ IN SOA ns1.{zone}. hostmaster.{zone}. 1 3600 600 86400 60\n@ IN NS ns1.{zone}.\nns1 IN A 127.0.0.1\n@ IN A 127.0.0.1\n"
            ),
        )
        .unwrap();
        let port = crate::pebble::free_dns_port();
        let d = dir.display();
        let conf = dir.join("knot.conf");
        let key = key_file.display();
        std::fs::write(
            &conf,
            format!(
                "server:\n  listen: 127.0.0.1@{port}\n  rundir: {d}\ncontrol:\n  listen: {d}/knot.sock\nlog:\n  - target: stderr\n    any: info\ndatabase:\n  storage: {d}/db\ninclude: {key}\nacl:\n  - id: update\n    key: acme-sds\n    action: update\n    update-type: [TXT]\ntemplate:\n  - id: default\n    storage: {d}\n    file: \"%s.zone\"\nzone:\n  - domain: {zone}\n    acl: update\n"
            ),
        )
        .unwrap();
        let log = dir.join("knotd.log");
        let mut child = Command::new(&knotd)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start knotd");
        let stderr = child.stderr.take().unwrap();
        let rx = crate::tee_lines(stderr, log.clone());
        // The zone is loaded after the sockets are bound ("[zone.] loaded, serial ..."); both are logged
        // once, in either order.
        let (mut started, mut loaded) = (false, false);
        let deadline = Instant::now() + WAIT;
        while !(started && loaded) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    started |= l.contains("server started");
                    loaded |= l.contains(&format!("[{zone}.] loaded"));
                }
                Err(_) => panic!(
                    "knotd did not start; log:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                ),
            }
        }
        Some(Knot {
            child,
            dig,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            key_file,
            dir,
        })
    }

    /// The TXT values `name` has on this server right now (asked with `dig`, over TCP, bounded).
    pub fn txt(&self, name: &str) -> Vec<String> {
        dig_txt(&self.dig, self.addr, name)
    }

    /// knotd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("knotd.log")).unwrap_or_default()
    }
}

impl Drop for Knot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
