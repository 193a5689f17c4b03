//! Pebble, Let's Encrypt's test ACME server (Debian `pebble`), with `pebble-challtestsrv` resolving every
//! name to 127.0.0.1, on free loopback ports.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

use super::{Pki, WAIT};

/// `(pebble, pebble-challtestsrv)`, or `None` to skip; under CI a missing Pebble fails instead.
pub fn pebble_bins() -> Option<(PathBuf, PathBuf)> {
    crate::tools_on_path(["pebble", "pebble-challtestsrv"], "apt-get install pebble")
}

/// Ports handed out by this test process: the kernel readily gives a just-released port again, and two
/// tests (or two roles in one test, Pebble's and acme-sds's) must never be given the same one.
static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());

/// Whether `port` was not handed out before (and is now).
fn first_time(port: u16) -> bool {
    let mut seen = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    if seen.contains(&port) {
        return false;
    }
    seen.push(port);
    true
}

/// A free loopback TCP port (bound then released), never the same twice in this process. For peers whose
/// port must be known before they start (Pebble's, and the port Pebble validates on); acme-sds's own
/// listeners bind port 0 wherever they can.
///
/// It is taken below the kernel's ephemeral range (32768 and up on Linux), from which every port-0 bind
/// and every outgoing connection's source port come: a port picked there could be taken by one of those
/// (an Envoy's admin listener, a client connection) between the pick and the bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000; // 20000..32000
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7919) % SPAN;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (start + n) % SPAN).unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && first_time(port) {
            return port;
        }
        assert!(n < SPAN, "no free port left below the ephemeral range");
    }
}

/// A port free for both UDP and TCP (DNS listens on both).
pub(crate) fn free_dns_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && first_time(port) {
            return port;
        }
    }
}

pub struct PebbleOptions {
    /// Pebble's `httpPort`: where it connects to validate HTTP-01 (the responder, or Envoy's port-80 listener).
    pub http_port: u16,
    /// `certificateValidityPeriod` in seconds (short values exercise renewal).
    pub validity_seconds: Option<u64>,
    /// `PEBBLE_WFE_NONCEREJECT`: percentage of nonces rejected.
    pub nonce_reject: u8,
    /// Require External Account Binding with this (key id, base64url MAC key).
    pub eab: Option<(String, String)>,
    /// `PEBBLE_AUTHZREUSE`: percentage of valid authorizations reused (0: every order is validated).
    pub authz_reuse: u8,
    /// Pebble's `tlsPort`: where it connects to validate TLS-ALPN-01 (Envoy's port-443 listener).
    pub tls_port: Option<u16>,
    /// Pebble's `-dnsserver`: a real name server (BIND serving the test zone) instead of challtestsrv, for
    /// DNS-01.
    pub dns_server: Option<SocketAddr>,
}

impl PebbleOptions {
    pub fn new(http_port: u16) -> Self {
        PebbleOptions {
            http_port,
            validity_seconds: None,
            nonce_reject: 5,
            eab: None,
            authz_reuse: 50,
            tls_port: None,
            dns_server: None,
        }
    }
}

pub struct Pebble {
    pebble: Option<Child>,
    challtest: Child,
    pebble_bin: PathBuf,
    config: PathBuf,
    nonce_reject: u8,
    authz_reuse: u8,
    dns: SocketAddr,
    /// The ACME directory URL.
    pub directory: String,
    /// PEM file of the CA that signed Pebble's own HTTPS certificate (`directory_ca`).
    pub directory_ca: PathBuf,
    pub listen: SocketAddr,
    pub management: SocketAddr,
    pub challtest_management: SocketAddr,
    tls: Pki,
}

fn spawn_logged(mut cmd: Command, log: &Path) -> (Child, mpsc::Receiver<String>) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("start pebble");
    let (tx, rx) = mpsc::channel();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        let log = log.to_owned();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .ok();
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                let _ = tx.send(line);
            }
        });
    }
    (child, rx)
}

fn wait_line(rx: &mpsc::Receiver<String>, needle: &str, log: &Path) {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => return,
            Ok(_) => {}
            Err(_) => panic!(
                "no {needle:?} from pebble; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            ),
        }
    }
}

impl Pebble {
    pub fn start(dir: &Path, opts: PebbleOptions) -> Option<Pebble> {
        let (pebble_bin, challtest_bin) = pebble_bins()?;
        std::fs::create_dir_all(dir).unwrap();
        let tls = Pki::new();
        let leaf = tls.leaf(&["localhost", "127.0.0.1"]);
        let cert = dir.join("pebble-tls.crt");
        let key = dir.join("pebble-tls.key");
        std::fs::write(&cert, &leaf.chain_pem).unwrap();
        std::fs::write(&key, &leaf.key_pem).unwrap();
        let directory_ca = dir.join("pebble-tls-ca.pem");
        std::fs::write(&directory_ca, tls.ca_pem()).unwrap();

        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let management: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let challtest_management: SocketAddr =
            format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let dns = free_dns_port();
        let mut pebble_cfg = serde_json::json!({
            "listenAddress": listen.to_string(),
            "managementListenAddress": management.to_string(),
            "certificate": cert,
            "privateKey": key,
            "httpPort": opts.http_port,
            "tlsPort": opts.tls_port.unwrap_or_else(free_port),
            "ocspResponderURL": "",
            "externalAccountBindingRequired": false,
        });
        if let Some((kid, key)) = &opts.eab {
            pebble_cfg["externalAccountBindingRequired"] = true.into();
            pebble_cfg["externalAccountMACKeys"] = serde_json::json!({ kid: key });
        }
        if let Some(v) = opts.validity_seconds {
            pebble_cfg["certificateValidityPeriod"] = v.into();
        }
        let config = dir.join("pebble-config.json");
        std::fs::write(
            &config,
            serde_json::to_vec_pretty(&serde_json::json!({ "pebble": pebble_cfg })).unwrap(),
        )
        .unwrap();

        let mut cmd = Command::new(&challtest_bin);
        cmd.args([
            "-dns01",
            &format!("127.0.0.1:{dns}"),
            "-http01",
            "",
            "-https01",
            "",
            "-tlsalpn01",
            "",
            "-management",
            &challtest_management.to_string(),
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ]);
        let log = dir.join("challtestsrv.log");
        let (challtest, rx) = spawn_logged(cmd, &log);
        wait_line(&rx, "Starting management server", &log);

        let mut p = Pebble {
            pebble: None,
            challtest,
            pebble_bin,
            config,
            nonce_reject: opts.nonce_reject,
            authz_reuse: opts.authz_reuse,
            dns: opts
                .dns_server
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], dns))),
            directory: format!("https://{listen}/dir"),
            directory_ca,
            listen,
            management,
            challtest_management,
            tls,
        };
        p.start_pebble();
        Some(p)
    }

    fn start_pebble(&mut self) {
        let mut cmd = Command::new(&self.pebble_bin);
        cmd.arg("-config")
            .arg(&self.config)
            .arg("-dnsserver")
            .arg(self.dns.to_string())
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", self.nonce_reject.to_string())
            .env("PEBBLE_AUTHZREUSE", self.authz_reuse.to_string());
        let log = self.config.with_file_name("pebble.log");
        let (child, rx) = spawn_logged(cmd, &log);
        wait_line(&rx, "ACME directory available", &log);
        self.pebble = Some(child);
    }

    /// Stops Pebble (the CA goes away; challtestsrv stays).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.pebble.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts Pebble again on the same ports (a new root, as at every Pebble start).
    pub fn restart(&mut self) {
        self.stop();
        self.start_pebble();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("pebble.log")).unwrap_or_default()
    }

    /// Makes `host` resolve to `ip` (for a domain whose challenge must fail).
    pub fn resolve(&self, host: &str, ip: &str) {
        let body = serde_json::json!({ "host": host, "addresses": [ip] }).to_string();
        let mut s = std::net::TcpStream::connect(self.challtest_management).unwrap();
        use std::io::{Read, Write};
        write!(
            s,
            "POST /add-a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    /// Pebble's current issuing root, DER. Its management listener starts a moment after the ACME one, so
    /// a refused connection is retried (bounded).
    pub async fn root_der(&self) -> Vec<u8> {
        let deadline = Instant::now() + WAIT;
        let body = loop {
            match super::envoy::https_request(
                self.management.port(),
                "localhost",
                &self.tls.ca_der(),
                "/roots/0",
            )
            .await
            {
                Ok((_, body)) => break body,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("fetch pebble root: {e}"),
            }
        };
        let pem = body
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        use rustls_pki_types::pem::PemObject;
        rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("root PEM")
            .to_vec()
    }

    /// `[acme]` table text for acme-sds pointed at this Pebble.
    pub fn acme_table(&self) -> String {
        format!(
            "[acme]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\ncontact = [\"mailto:ops@example.com\"]\naccept_terms_of_service = true\nretry_initial = \"1s\"\nretry_max = \"4s\"\n\n",
            self.directory,
            self.directory_ca.display()
        )
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.stop();
        let _ = self.challtest.kill();
        let _ = self.challtest.wait();
    }
}

/// Verifies `chain` (leaf first, DER) for `name` against `root`, as a TLS client would.
pub fn verify_chain(chain: &[Vec<u8>], root: &[u8], name: &str) -> Result<(), rustls::Error> {
    use rustls::client::danger::ServerCertVerifier;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(root.to_vec())).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
    let leaf = CertificateDer::from(chain[0].clone());
    let rest: Vec<CertificateDer> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    verifier
        .verify_server_cert(
            &leaf,
            &rest,
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::now(),
        )
        .map(|_| ())
}
