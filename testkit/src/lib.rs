//! What the integration tests (`tests/it`) and the benchmark (`bench/`) share: a test PKI, file rotation
//! helpers, the `acme-sds` process, SDS clients, and the real peers (Envoy, Pebble) on loopback ports.

use std::io::{BufRead, BufReader};
pub mod envoy;
pub mod pebble;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acme_sds::proto::envoy::config::core::v3::Node;
use acme_sds::proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use acme_sds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use acme_sds::proto::google::protobuf::Any;
use acme_sds::proto::google::rpc;
use acme_sds::registry::SECRET_TYPE_URL;
use hyper_util::rt::TokioIo;
use prost::Message;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Status, Streaming};

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(15);

/// Whether a missing external tool must fail the test rather than skip it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

// ---------- PKI ----------

/// A test CA that issues leaf certificates.
pub struct Pki {
    ca: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate with its chain and key, as PEM.
#[derive(Clone)]
pub struct Leaf {
    /// Leaf then CA.
    pub chain_pem: String,
    pub key_pem: String,
    /// DER of the leaf, to compare with what is served.
    pub leaf_der: Vec<u8>,
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "acme-sds test CA");
        let ca = params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(params, ca_key);
        Pki { ca, issuer }
    }

    pub fn issuer(&self) -> &rcgen::Issuer<'static, rcgen::KeyPair> {
        &self.issuer
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    pub fn ca_der(&self) -> Vec<u8> {
        self.ca.der().to_vec()
    }

    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            chain_pem: format!("{}{}", cert.pem(), self.ca.pem()),
            key_pem: key.serialize_pem(),
            leaf_der: cert.der().to_vec(),
        }
    }
}

impl Leaf {
    /// Writes chain and key to `dir/NAME.crt` and `dir/NAME.key`.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let crt = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        replace_by_rename(&crt, self.chain_pem.as_bytes());
        replace_by_rename(&key, self.key_pem.as_bytes());
        (crt, key)
    }
}

// ---------- file rotation ----------

/// Writes a temp file next to `path` and renames it over `path` (how most tools replace files).
pub fn replace_by_rename(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Truncates and rewrites `path` in place (same inode).
pub fn rewrite_in_place(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

/// A directory laid out like a mounted Kubernetes Secret: `tls.crt -> ..data/tls.crt`,
/// `..data -> ..<generation>`; an update writes a new generation and swaps `..data` atomically.
pub struct K8sSecretDir {
    pub dir: PathBuf,
    generation: u32,
}

impl K8sSecretDir {
    pub fn new(dir: &Path, leaf: &Leaf) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut s = K8sSecretDir {
            dir: dir.to_owned(),
            generation: 0,
        };
        s.update(leaf);
        std::os::unix::fs::symlink("..data/tls.crt", dir.join("tls.crt")).unwrap();
        std::os::unix::fs::symlink("..data/tls.key", dir.join("tls.key")).unwrap();
        s
    }

    pub fn update(&mut self, leaf: &Leaf) {
        self.generation += 1;
        let gen_name = format!("..2026_11_25_{:04}", self.generation);
        let gen_dir = self.dir.join(&gen_name);
        std::fs::create_dir(&gen_dir).unwrap();
        std::fs::write(gen_dir.join("tls.crt"), &leaf.chain_pem).unwrap();
        std::fs::write(gen_dir.join("tls.key"), &leaf.key_pem).unwrap();
        let tmp = self.dir.join("..data_tmp");
        std::os::unix::fs::symlink(&gen_name, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.join("..data")).unwrap();
    }

    pub fn crt(&self) -> PathBuf {
        self.dir.join("tls.crt")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.join("tls.key")
    }
}

// ---------- acme-sds in process ----------

/// An acme-sds started in this process on a Unix socket in a temp dir.
pub struct Daemon {
    pub running: Option<acme_sds::daemon::Running>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts acme-sds with `[sds] listen = [unix socket, extra...]` and the given `[[...]]` tables.
    pub async fn start(dir: tempfile::TempDir, tables: &str) -> Daemon {
        Self::start_with_listen(dir, tables, &[]).await
    }

    pub async fn start_with_listen(dir: tempfile::TempDir, tables: &str, extra: &[&str]) -> Daemon {
        let socket = dir.path().join("sds.sock");
        let mut listen = vec![format!("\"unix:{}\"", socket.display())];
        listen.extend(extra.iter().map(|e| format!("\"{e}\"")));
        let text = format!("[sds]\nlisten = [{}]\n\n{tables}", listen.join(", "));
        let path = dir.path().join("acme-sds.toml");
        std::fs::write(&path, text).unwrap();
        let config = acme_sds::config::load(&path).unwrap();
        let running = acme_sds::daemon::start(&config).await.unwrap();
        Daemon {
            running: Some(running),
            dir,
            socket,
        }
    }

    pub fn running(&self) -> &acme_sds::daemon::Running {
        self.running.as_ref().unwrap()
    }

    pub async fn client(&self) -> SecretDiscoveryServiceClient<Channel> {
        uds_client(&self.socket).await
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
    }
}

/// `[[certificate]]` table text for a file pair.
pub fn cert_table(name: &str, crt: &Path, key: &Path) -> String {
    format!(
        "[[certificate]]\nname = \"{name}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
        crt.display(),
        key.display()
    )
}

pub async fn uds_client(path: &Path) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(uds_channel(path).await)
}

pub async fn uds_channel(path: &Path) -> Channel {
    uds_channel_result(path).await.unwrap()
}

pub async fn uds_channel_result(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::try_from("http://acme-sds.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

// ---------- SDS requests and responses ----------

pub fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: "test-cluster".to_owned(),
    })
}

/// The first request of a SotW stream.
pub fn subscribe(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node("test-node"),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        ..Default::default()
    }
}

/// A later SotW request (no node) changing the subscription, acknowledging `last`.
pub fn resubscribe(names: &[&str], last: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        version_info: last.version_info.clone(),
        response_nonce: last.nonce.clone(),
        ..Default::default()
    }
}

pub fn ack(names: &[&str], resp: &DiscoveryResponse) -> DiscoveryRequest {
    resubscribe(names, resp)
}

pub fn nack(names: &[&str], resp: &DiscoveryResponse, previous_version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: previous_version.to_owned(),
        error_detail: Some(rpc::Status {
            code: 13,
            message: "Failed to load certificate chain from <inline>".to_owned(),
            details: vec![],
        }),
        ..resubscribe(names, resp)
    }
}

pub fn decode_secret(any: &Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    Secret::decode(any.value.clone()).unwrap()
}

/// The leaf certificate DER of a tls_certificate secret.
pub fn leaf_der(secret: &Secret) -> Vec<u8> {
    let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
        panic!("not a tls_certificate: {secret:?}");
    };
    let chain = inline(tls.certificate_chain.as_ref().unwrap());
    CertificateDer::pem_slice_iter(&chain)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Whether a secret is acme-sds's temporary stand-in for a certificate not issued yet (its subject says so).
pub fn is_temporary(secret: &Secret) -> bool {
    if !matches!(secret.r#type, Some(secret::Type::TlsCertificate(_))) {
        return false;
    }
    x509_parser::parse_x509_certificate(&leaf_der(secret))
        .map(|(_, c)| {
            c.subject()
                .to_string()
                .contains(acme_sds::acme::temporary::MARKER)
        })
        .unwrap_or(false)
}

/// Every certificate (DER) of a tls_certificate secret's chain, leaf first.
pub fn chain_ders(secret: &Secret) -> Vec<Vec<u8>> {
    let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
        panic!("not a tls_certificate: {secret:?}");
    };
    let chain = inline(tls.certificate_chain.as_ref().unwrap());
    CertificateDer::pem_slice_iter(&chain)
        .map(|c| c.unwrap().to_vec())
        .collect()
}

pub fn inline(ds: &acme_sds::proto::envoy::config::core::v3::DataSource) -> Vec<u8> {
    use acme_sds::proto::envoy::config::core::v3::data_source::Specifier;
    match &ds.specifier {
        Some(Specifier::InlineBytes(b)) => b.to_vec(),
        other => panic!("expected inline_bytes, got {other:?}"),
    }
}

/// A unary FetchSecrets that must succeed.
pub async fn fetch(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    names: &[&str],
) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, client.fetch_secrets(subscribe(names)))
        .await
        .expect("fetch timed out")
        .expect("fetch failed")
        .into_inner()
}

/// A bidirectional SotW stream.
pub struct SotwStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SotwStream {
    pub async fn open(client: &mut SecretDiscoveryServiceClient<Channel>) -> Self {
        Self::try_open(client).await.expect("stream open failed")
    }

    /// Opens a stream, or the status it was refused with.
    pub async fn try_open(
        client: &mut SecretDiscoveryServiceClient<Channel>,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(16);
        let rx = tokio::time::timeout(WAIT, client.stream_secrets(ReceiverStream::new(rx)))
            .await
            .expect("stream open timed out")?
            .into_inner();
        Ok(SotwStream { tx, rx })
    }

    /// Opens a stream, subscribes to `names` and returns it with the first response.
    pub async fn subscribed(
        client: &mut SecretDiscoveryServiceClient<Channel>,
        names: &[&str],
    ) -> (Self, DiscoveryResponse) {
        let mut s = Self::open(client).await;
        s.send(subscribe(names)).await;
        let r = s.recv().await;
        (s, r)
    }

    pub async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The next response; panics on timeout or stream end.
    pub async fn recv(&mut self) -> DiscoveryResponse {
        self.recv_within(WAIT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> DiscoveryResponse {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => panic!("stream failed: {s}"),
            Err(_) => panic!("no response within {wait:?}"),
        }
    }

    /// The next response that carries no temporary certificate (one served until the first issuance):
    /// temporary ones are acknowledged and skipped.
    pub async fn recv_issued(&mut self, wait: Duration) -> DiscoveryResponse {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let r = self
                .recv_within(deadline.saturating_duration_since(std::time::Instant::now()))
                .await;
            let secrets: Vec<Secret> = r.resources.iter().map(decode_secret).collect();
            if !secrets.iter().any(is_temporary) {
                return r;
            }
            let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
            self.send(ack(&names, &r)).await;
        }
    }

    /// The next message, or the stream's end (None) or error status.
    pub async fn end_or_next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        self.rx.message().await.transpose()
    }

    /// The status the stream ends with.
    pub async fn end(&mut self) -> Option<Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => panic!("expected the stream to end, got {r:?}"),
            Ok(Ok(None)) => None,
            Ok(Err(s)) => Some(s),
            Err(_) => panic!("stream did not end within {WAIT:?}"),
        }
    }
}

/// A bidirectional delta stream.
pub struct DeltaStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaStream {
    pub async fn open(client: &mut SecretDiscoveryServiceClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = tokio::time::timeout(WAIT, client.delta_secrets(ReceiverStream::new(rx)))
            .await
            .expect("stream open timed out")
            .expect("stream open failed")
            .into_inner();
        DeltaStream { tx, rx }
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The status the stream ends with.
    pub async fn end(&mut self) -> Option<Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => panic!("expected the stream to end, got {r:?}"),
            Ok(Ok(None)) => None,
            Ok(Err(s)) => Some(s),
            Err(_) => panic!("stream did not end within {WAIT:?}"),
        }
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => panic!("stream failed: {s}"),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }
}

// ---------- a process seen from outside ----------

/// File descriptors `pid` holds now.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sockets `pid` holds now (connections and listeners; other descriptors come and go with its own work).
pub fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// CPU time (user + system) `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// `GET path` over HTTP/1.1 (a fresh connection); the whole response.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The series of a Prometheus exposition (metric name and labels, without values).
pub fn metric_series(exposition: &str) -> std::collections::BTreeSet<String> {
    let body = exposition
        .split_once("\r\n\r\n")
        .map_or(exposition, |(_, body)| body);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

// ---------- the acme-sds binary ----------

/// A spawned `acme-sds` process whose stderr is collected line by line.
pub struct Process {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    line_rx: std::sync::mpsc::Receiver<String>,
}

/// What holds TCP port `port` on this machine now (`ss`), for a test that finds it unreachable.
pub fn port_report(port: u16) -> String {
    let out = Command::new("ss").args(["-tanpe"]).output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains(&format!(":{port} ")))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("ss: {e}"),
    }
}

/// Makes `cmd` run as user `uid` and group `gid` (the tests run as root), with no other groups.
pub fn as_user(cmd: &mut Command, uid: u32, gid: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only system calls between fork and exec. Groups first: only root may set them.
    unsafe {
        cmd.pre_exec(move || {
            use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
            setgroups(&[Gid::from_raw(gid)])
                .and_then(|()| setgid(Gid::from_raw(gid)))
                .and_then(|()| setuid(Uid::from_raw(uid)))
                .map_err(std::io::Error::from)
        });
    }
}

/// The `acme-sds` binary under test: `$ACME_SDS_BIN`, else the one Cargo built beside the running program
/// (an integration test runs from `target/<profile>/deps/`, the benchmark from `target/<profile>/`).
pub fn bin() -> &'static str {
    static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        if let Some(path) = std::env::var_os("ACME_SDS_BIN") {
            return path.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the running program's path");
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("acme-sds"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no acme-sds binary beside {}: cargo build --bin acme-sds",
                    exe.display()
                )
            })
            .to_string_lossy()
            .into_owned()
    });
    &BIN
}

/// A helper script of the kit (`testkit/NAME`): the grpcio client, the seccomp launcher.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

impl Process {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Process {
        Self::spawn_program(bin(), args, envs)
    }

    /// Like [`Process::spawn`], with `dir` as the working directory (relative paths resolve there).
    pub fn spawn_in(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(bin());
        cmd.current_dir(dir);
        Self::spawn_command(cmd, args, envs)
    }

    /// Like [`Process::spawn`], for another program (a wrapper that ends by exec-ing acme-sds).
    pub fn spawn_program(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Process {
        Self::spawn_command(Command::new(program), args, envs)
    }

    fn spawn_command(mut cmd: Command, args: &[&str], envs: &[(&str, &str)]) -> Process {
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, line_rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Process {
            child,
            lines,
            line_rx,
        }
    }

    /// Like [`Process::spawn`] with the open-files limit (soft and hard) set to `nofile`, as a service
    /// manager or container runtime would set it.
    pub fn spawn_with_nofile(args: &[&str], envs: &[(&str, &str)], nofile: u64) -> Process {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(bin());
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    nofile,
                    nofile,
                )
                .map_err(std::io::Error::from)
            });
        }
        Self::spawn_command(cmd, args, envs)
    }

    /// Like [`Process::spawn`], as user `uid` and group `gid` (the test runs as root): how an operator's
    /// service manager or container runtime starts acme-sds.
    pub fn spawn_as(uid: u32, gid: u32, args: &[&str], envs: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(bin());
        as_user(&mut cmd, uid, gid);
        Self::spawn_command(cmd, args, envs)
    }

    /// The TCP address of the listener the daemon logged as `WHAT listening listen=ADDR` (waits for it).
    pub fn listen_addr(&self, what: &str) -> std::net::SocketAddr {
        let needle = format!("{what} listening");
        self.wait_for_log(&needle, WAIT, |log| {
            log.lines()
                .any(|l| l.contains(&needle) && !l.contains("listen=unix:"))
        });
        self.log()
            .lines()
            .filter(|l| l.contains(&needle))
            .find_map(|l| {
                l.split("listen=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap()
    }

    /// Waits (bounded) for a stderr line containing `needle`; returns it.
    pub fn wait_for_line(&self, needle: &str) -> String {
        self.wait_for_line_within(needle, WAIT)
    }

    pub fn wait_for_line_within(&self, needle: &str, wait: Duration) -> String {
        self.line_within(needle, wait).unwrap_or_else(|| {
            panic!(
                "no line containing {needle:?} within {wait:?}; stderr so far:\n{}",
                self.log()
            )
        })
    }

    /// The next stderr line containing `needle`, if one comes within `wait`.
    pub fn line_within(&self, needle: &str, wait: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.line_rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits (bounded) until the whole stderr so far satisfies `pred`.
    pub fn wait_for_log(&self, what: &str, wait: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + wait;
        while !pred(&self.log()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if self.line_rx.recv_timeout(left).is_err() {
                panic!("timed out waiting for {what}; stderr:\n{}", self.log());
            }
        }
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for exit and returns the exit code. The exit is seen as stderr closing.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.line_rx.recv_timeout(left) {
                Ok(_) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "acme-sds did not exit within {WAIT:?}; stderr:\n{}",
                        self.log()
                    )
                }
            }
        }
        self.child.wait().unwrap().code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the daemon said (cargo test prints it only for failures).
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- acme-sds log (last {} lines) ----\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}
