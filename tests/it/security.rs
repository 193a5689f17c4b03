//! Who may fetch which secret: Unix socket owner, group and peer uid; mutual TLS on TCP; per-secret
//! `allowed_nodes` and `allowed_clients`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use acme_sds::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use acme_sds::registry::SECRET_TYPE_URL;
use testkit::*;
use tonic::Code;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn my_uid_gid() -> (u32, u32) {
    let m = std::fs::metadata("/proc/self").unwrap();
    (m.uid(), m.gid())
}

/// A client certificate from `pki` with the given DNS and URI SANs.
fn client_cert(pki: &Pki, dns: &[&str], uris: &[&str]) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    for d in dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName((*d).try_into().unwrap()));
    }
    for u in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*u).try_into().unwrap()));
    }
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, pki.issuer()).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct MtlsFixture {
    _daemon: Daemon,
    server_ca: Pki,
    client_ca: Pki,
    port: u16,
}

async fn mtls_fixture() -> MtlsFixture {
    mtls_fixture_with("").await
}

/// The mTLS fixture with `sds_extra` (keys of `[sds]`) added.
async fn mtls_fixture_with(sds_extra: &str) -> MtlsFixture {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Pki::new();
    let client_ca = Pki::new();
    let server = server_ca.leaf(&["localhost", "127.0.0.1"]);
    let (scrt, skey) = server.write(dir.path(), "server");
    let ca = dir.path().join("client-ca.pem");
    std::fs::write(&ca, client_ca.ca_pem()).unwrap();
    let web = server_ca.leaf(&["www.example.com"]);
    let (wc, wk) = web.write(dir.path(), "web");
    let open = server_ca.leaf(&["open.example.com"]);
    let (oc, ok) = open.write(dir.path(), "open");
    let tables = format!(
        "{sds_extra}\n[sds.tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\nclient_ca_file = \"{}\"\n\n{}\nallowed_clients = [\"spiffe://example.org/ns/edge/sa/*\"]\n\n{}",
        scrt.display(),
        skey.display(),
        ca.display(),
        cert_table("web", &wc, &wk).trim_end(),
        cert_table("open", &oc, &ok),
    );
    // The [sds.tls] table must follow [sds]: put it first in the tables.
    let daemon = Daemon::start_with_listen(dir, &tables, &["127.0.0.1:0"]).await;
    let port = daemon.running().tcp_addrs()[0].port();
    MtlsFixture {
        _daemon: daemon,
        server_ca,
        client_ca,
        port,
    }
}

async fn tls_client(
    f: &MtlsFixture,
    identity: Option<(String, String)>,
) -> Result<SecretDiscoveryServiceClient<tonic::transport::Channel>, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(f.server_ca.ca_pem()))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", f.port))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(SecretDiscoveryServiceClient::new(channel))
}

/// Fetching fails, at connect or at the call: either way the caller gets nothing.
async fn assert_refused(
    client: Result<
        SecretDiscoveryServiceClient<tonic::transport::Channel>,
        tonic::transport::Error,
    >,
) {
    if let Ok(mut c) = client {
        let err = c.fetch_secrets(subscribe(&["open"])).await.unwrap_err();
        assert_ne!(err.code(), Code::Ok);
    }
}

#[tokio::test]
async fn mtls_refuses_callers_without_a_certificate_from_the_client_ca() {
    let f = mtls_fixture().await;
    assert_refused(tls_client(&f, None).await).await;
    let stranger = Pki::new();
    assert_refused(
        tls_client(
            &f,
            Some(client_cert(
                &stranger,
                &[],
                &["spiffe://example.org/ns/edge/sa/gw"],
            )),
        )
        .await,
    )
    .await;
    // Plain HTTP/2 to the TLS port gets nothing either.
    let plain = tcp_client(format!("http://127.0.0.1:{}", f.port)).await;
    if let Ok(mut c) = plain {
        assert!(c.fetch_secrets(subscribe(&["open"])).await.is_err());
    }
}

#[tokio::test]
async fn allowed_clients_are_matched_against_the_certificate_identity() {
    let f = mtls_fixture().await;
    let gateway = client_cert(
        &f.client_ca,
        &[],
        &["spiffe://example.org/ns/edge/sa/gateway"],
    );
    let mut c = tls_client(&f, Some(gateway)).await.unwrap();
    let r = fetch(&mut c, &["web", "open"]).await;
    assert_eq!(r.resources.len(), 2);

    let other = client_cert(
        &f.client_ca,
        &["app.example.com"],
        &["spiffe://example.org/ns/apps/sa/app"],
    );
    let mut c = tls_client(&f, Some(other)).await.unwrap();
    let err = c.fetch_secrets(subscribe(&["web"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(!err.message().contains("BEGIN"), "{}", err.message());
    assert_eq!(fetch(&mut c, &["open"]).await.resources.len(), 1);
    let mut s = SotwStream::open(&mut c).await;
    s.send(subscribe(&["sds://web"])).await;
    assert_eq!(s.end().await.unwrap().code(), Code::PermissionDenied);
}

async fn node_fixture() -> (Daemon, Leaf) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let web = pki.leaf(&["www.example.com"]);
    let (wc, wk) = web.write(dir.path(), "web");
    let tables = format!(
        "{}\nallowed_nodes = [\"edge-*\"]\n",
        cert_table("web", &wc, &wk).trim_end()
    );
    (Daemon::start(dir, &tables).await, web)
}

#[tokio::test]
async fn allowed_nodes_admit_matching_node_ids_only() {
    let (daemon, web) = node_fixture().await;
    let mut client = daemon.client().await;

    let mut good = subscribe(&["web"]);
    good.node = node("edge-7");
    let mut s = SotwStream::open(&mut client).await;
    s.send(good).await;
    assert_eq!(
        leaf_der(&decode_secret(&s.recv().await.resources[0])),
        web.leaf_der
    );

    let mut bad = subscribe(&["web"]);
    bad.node = node("intruder");
    let mut s = SotwStream::open(&mut client).await;
    s.send(bad.clone()).await;
    let status = s.end().await.unwrap();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(!status.message().contains("BEGIN"));

    let err = client.fetch_secrets(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let mut d = DeltaStream::open(&mut client).await;
    d.send(DeltaDiscoveryRequest {
        node: node("intruder"),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["web".into()],
        ..Default::default()
    })
    .await;
    let err = tokio::time::timeout(WAIT, d_end(&mut d)).await.unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
}

async fn d_end(d: &mut DeltaStream) -> tonic::Status {
    d.end().await.expect("stream ends with a status")
}

#[tokio::test]
async fn unix_socket_peers_outside_allowed_uids_are_refused() {
    let (uid, _) = my_uid_gid();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let web = pki.leaf(&["www.example.com"]);
    let (wc, wk) = web.write(dir.path(), "web");
    let socket = dir.path().join("sds.sock");
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\nallowed_uids = [{}]\n\n{}",
            socket.display(),
            uid + 4242,
            cert_table("web", &wc, &wk)
        ),
    )
    .unwrap();
    let cfg = acme_sds::config::load(&config).unwrap();
    let running = acme_sds::daemon::start(&cfg).await.unwrap();
    // Our uid is not listed: the connection is dropped before any gRPC.
    let channel = uds_channel_result(&socket).await;
    if let Ok(ch) = channel {
        let mut c = SecretDiscoveryServiceClient::new(ch);
        assert!(c.fetch_secrets(subscribe(&["web"])).await.is_err());
    }
    running.shutdown().await.unwrap();

    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace(&format!("[{}]", uid + 4242), &format!("[{uid}]")),
    )
    .unwrap();
    let cfg = acme_sds::config::load(&config).unwrap();
    let running = acme_sds::daemon::start(&cfg).await.unwrap();
    let mut c = uds_client(&socket).await;
    assert_eq!(
        leaf_der(&decode_secret(&fetch(&mut c, &["web"]).await.resources[0])),
        web.leaf_der
    );
    running.shutdown().await.unwrap();
}

#[tokio::test]
async fn socket_mode_and_group_are_applied() {
    let (_, gid) = my_uid_gid();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("sds.sock");
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\nsocket_mode = \"0660\"\nsocket_group = {gid}\n",
            socket.display()
        ),
    )
    .unwrap();
    let cfg = acme_sds::config::load(&config).unwrap();
    let running = acme_sds::daemon::start(&cfg).await.unwrap();
    let meta = std::fs::metadata(&socket).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    running.shutdown().await.unwrap();
}

#[test]
fn plain_tcp_beyond_loopback_needs_an_explicit_opt_in_and_warns() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(&config, "[sds]\nlisten = [\"0.0.0.0:0\"]\n").unwrap();
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("sds.listen[0]") && err.contains("[sds.tls]"),
        "{err}"
    );

    std::fs::write(
        &config,
        "[sds]\nlisten = [\"0.0.0.0:0\"]\nallow_plaintext = true\n",
    )
    .unwrap();
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let line = p.wait_for_line("allow_plaintext");
    assert!(line.contains("WARN"), "{line}");
}

/// A spawned acme-sds whose config can be rewritten and reloaded (SIGHUP).
struct Reloadable {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    process: Process,
}

impl Reloadable {
    fn start(tables: &str) -> Reloadable {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("acme-sds.toml");
        let r = Reloadable {
            config: config.clone(),
            process: {
                write_config(dir.path(), &config, tables);
                Process::spawn(&["run", "--config", config.to_str().unwrap()], &[])
            },
            dir,
        };
        r.process.wait_for_line("acme-sds started");
        r
    }

    fn reload(&self, tables: &str) {
        write_config(self.dir.path(), &self.config, tables);
        self.process.signal("HUP");
        self.process.wait_for_line("configuration reloaded");
    }

    async fn client(&self) -> SecretDiscoveryServiceClient<tonic::transport::Channel> {
        uds_client(&self.dir.path().join("sds.sock")).await
    }
}

fn write_config(dir: &std::path::Path, config: &std::path::Path, tables: &str) {
    let text = format!(
        "[sds]\nlisten = [\"unix:{}\"]\n\n{tables}",
        dir.join("sds.sock").display()
    );
    replace_by_rename(config, text.as_bytes());
}

fn sotw_as(
    names: &[&str],
    node_id: &str,
) -> acme_sds::proto::envoy::service::discovery::v3::DiscoveryRequest {
    let mut r = subscribe(names);
    r.node = node(node_id);
    r
}

fn delta_as(names: &[&str], node_id: &str) -> DeltaDiscoveryRequest {
    delta_subscribe(node_id, names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_added_by_reload_applies_to_streams_already_waiting_for_the_secret() {
    let pki = Pki::new();
    let keys = tempfile::tempdir().unwrap();
    let (wc, wk) = pki.leaf(&["www.example.com"]).write(keys.path(), "web");
    let late = pki.leaf(&["late.example.com"]);
    let (lc, lk) = late.write(keys.path(), "late");
    let d = Reloadable::start(&cert_table("web", &wc, &wk));
    let mut client = d.client().await;

    // Three streams wait for a secret that is not configured yet.
    let mut intruder = SotwStream::open(&mut client).await;
    intruder.send(sotw_as(&["late"], "intruder")).await;
    let mut edge = SotwStream::open(&mut client).await;
    edge.send(sotw_as(&["late"], "edge-1")).await;
    let mut intruder_delta = DeltaStream::open(&mut client).await;
    intruder_delta
        .send(delta_as(&["sds://late"], "intruder"))
        .await;
    assert_eq!(
        intruder_delta.recv().await.removed_resources,
        ["sds://late"]
    );

    // The reload adds it, readable by edge nodes only: the publish wakes all three, and only edge gets it.
    d.reload(&format!(
        "{}{}allowed_nodes = [\"edge-*\"]\n",
        cert_table("web", &wc, &wk),
        cert_table("late", &lc, &lk).trim_end().to_owned() + "\n"
    ));
    let got = edge.recv().await;
    assert_eq!(leaf_der(&decode_secret(&got.resources[0])), late.leaf_der);
    assert_eq!(intruder.end().await.unwrap().code(), Code::PermissionDenied);
    assert_eq!(
        d_end(&mut intruder_delta).await.code(),
        Code::PermissionDenied
    );
    let log = d.process.log();
    assert!(
        log.lines().any(|l| l.contains("SDS access denied")
            && l.contains("intruder")
            && l.contains("late")),
        "the refusal is logged with the caller:\n{log}"
    );
    assert!(!log.contains("BEGIN"), "no key material in the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_tightened_by_reload_ends_open_streams_that_may_no_longer_read() {
    let pki = Pki::new();
    let keys = tempfile::tempdir().unwrap();
    let web = pki.leaf(&["www.example.com"]);
    let (wc, wk) = web.write(keys.path(), "web");
    let open = cert_table("web", &wc, &wk);
    let d = Reloadable::start(&open);
    let mut client = d.client().await;

    let (mut intruder, r) = {
        let mut s = SotwStream::open(&mut client).await;
        s.send(sotw_as(&["web"], "intruder")).await;
        let r = s.recv().await;
        (s, r)
    };
    intruder.send(ack(&["web"], &r)).await;
    let mut edge = SotwStream::open(&mut client).await;
    edge.send(sotw_as(&["web"], "edge-1")).await;
    let r = edge.recv().await;
    edge.send(ack(&["web"], &r)).await;
    let mut intruder_delta = DeltaStream::open(&mut client).await;
    intruder_delta.send(delta_as(&["web"], "intruder")).await;
    assert_eq!(intruder_delta.recv().await.resources.len(), 1);

    // Only the rule changes, not the secret: nothing is published, and still the intruder is cut off.
    d.reload(&format!(
        "{}\nallowed_nodes = [\"edge-*\"]\n",
        open.trim_end()
    ));
    assert_eq!(intruder.end().await.unwrap().code(), Code::PermissionDenied);
    assert_eq!(
        d_end(&mut intruder_delta).await.code(),
        Code::PermissionDenied
    );
    let err = client
        .fetch_secrets(sotw_as(&["web"], "intruder"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // The edge stream stays open and keeps receiving rotations.
    let web2 = pki.leaf(&["www.example.com"]);
    web2.write(keys.path(), "web");
    let got = edge.recv().await;
    assert_eq!(leaf_der(&decode_secret(&got.resources[0])), web2.leaf_der);
    let log = d.process.log();
    let denial = log
        .lines()
        .find(|l| l.contains("SDS access denied") && l.contains("rules changed"))
        .unwrap_or_else(|| panic!("no denial logged:\n{log}"));
    assert!(
        denial.contains("intruder") && denial.contains("unix(uid="),
        "{denial}"
    );
}

#[test]
fn check_warns_when_a_node_id_rule_stands_alone() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (wc, wk) = pki.leaf(&["www.example.com"]).write(dir.path(), "web");
    let config = dir.path().join("acme-sds.toml");
    write_config(
        dir.path(),
        &config,
        &format!(
            "{}allowed_nodes = [\"edge-*\"]\n",
            cert_table("web", &wc, &wk).trim_end().to_owned() + "\n"
        ),
    );
    let out = std::process::Command::new(bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "a warning, not an error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning:")
            && err.contains("certificate[0].allowed_nodes")
            && err.contains("allowed_clients"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_that_never_finishes_its_handshake_is_dropped_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = mtls_fixture_with("handshake_timeout = \"1s\"").await;
    let started = std::time::Instant::now();
    // Connected, and silent; then connected with half a ClientHello.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
        .await
        .unwrap();
    let mut half = tokio::net::TcpStream::connect(("127.0.0.1", f.port))
        .await
        .unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    for conn in [&mut silent, &mut half] {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(WAIT, conn.read(&mut buf))
            .await
            .expect("the server closes the connection");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    // A real client still gets through.
    let gateway = client_cert(
        &f.client_ca,
        &[],
        &["spiffe://example.org/ns/edge/sa/gateway"],
    );
    let mut c = tls_client(&f, Some(gateway)).await.unwrap();
    assert_eq!(fetch(&mut c, &["open"]).await.resources.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mtls_each_client_identity_has_its_own_stream_quota() {
    let f = mtls_fixture_with("max_streams_per_peer = 3").await;
    let greedy = client_cert(
        &f.client_ca,
        &[],
        &["spiffe://example.org/ns/edge/sa/greedy"],
    );
    let mut c = tls_client(&f, Some(greedy)).await.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(SotwStream::subscribed(&mut c, &["open"]).await.0);
    }
    let refused = SotwStream::try_open(&mut c)
        .await
        .err()
        .expect("over the quota");
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("quota of 3"), "{refused}");
    // Another identity, from the same address, is served.
    let other = client_cert(
        &f.client_ca,
        &[],
        &["spiffe://example.org/ns/edge/sa/gateway"],
    );
    let mut c2 = tls_client(&f, Some(other)).await.unwrap();
    let (_s, r) = SotwStream::subscribed(&mut c2, &["web"]).await;
    assert_eq!(r.resources.len(), 1);
    // The greedy one gets its room back as its streams go.
    drop(held);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        match SotwStream::try_open(&mut c).await {
            Ok(mut s) => {
                s.send(subscribe(&["open"])).await;
                assert_eq!(s.recv().await.resources.len(), 1);
                break;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted);
                assert!(std::time::Instant::now() < deadline, "quota never freed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// The central-service setup of the README: a real Envoy reaches acme-sds over TCP with mutual TLS, is
/// admitted by `allowed_clients` on its certificate's SPIFFE ID, and serves the secret; an Envoy with a
/// certificate that the rule does not admit never gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_over_mutual_tls_is_admitted_by_its_spiffe_id() {
    use testkit::envoy::{Envoy, SdsClient, envoy_bin, https_get, one_secret_bootstrap};
    let Some(bin) = envoy_bin() else { return };
    let f = mtls_fixture().await;
    let files = tempfile::tempdir().unwrap();
    let ca = files.path().join("server-ca.pem");
    std::fs::write(&ca, f.server_ca.ca_pem()).unwrap();
    let address = format!(
        "{{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }}",
        f.port
    );
    let mut envoys = Vec::new();
    for (who, uri) in [
        ("gateway", "spiffe://example.org/ns/edge/sa/gateway"),
        ("app", "spiffe://example.org/ns/apps/sa/app"),
    ] {
        let (cert, key) = client_cert(&f.client_ca, &[], &[uri]);
        let (cert_path, key_path) = (
            files.path().join(format!("{who}.crt")),
            files.path().join(format!("{who}.key")),
        );
        std::fs::write(&cert_path, cert).unwrap();
        std::fs::write(&key_path, key).unwrap();
        let bootstrap = one_secret_bootstrap(
            SdsClient::EnvoyGrpcTls(&address, &cert_path, &key_path, &ca),
            "GRPC",
        );
        let dir = tempfile::tempdir().unwrap();
        envoys.push((Envoy::start(&bin, &bootstrap, dir.path()), dir));
    }
    let (gateway, _) = &mut envoys[0];
    gateway.wait_live();
    let port = gateway.listener_port("https");
    let (leaf, _) = https_get(port, "www.example.com", &f.server_ca.ca_der())
        .await
        .unwrap();
    assert_eq!(
        gateway.stat("sds.web.update_success"),
        Some(1),
        "{}",
        gateway.log_text()
    );
    assert!(!leaf.is_empty());
    // The other Envoy's SDS stream is refused: its listener never gets a certificate.
    let (app, _) = &mut envoys[1];
    testkit::envoy::poll(app, "the SDS stream to be refused", |e| {
        e.stat("sds.web.update_failure").filter(|n| *n > 0)
    });
    assert_eq!(app.stat("sds.web.update_success").unwrap_or(0), 0);
}

#[tokio::test]
async fn a_socket_is_bound_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir, "").await;
    // What `ss -lx` lists: the address the listening socket was bound to.
    let listed = std::fs::read_to_string("/proc/net/unix").unwrap();
    let path = daemon.socket.to_str().unwrap();
    assert!(
        listed.lines().any(|l| l.ends_with(&format!(" {path}"))),
        "{path} not listed under its own name"
    );
    assert!(
        !listed.contains(&format!("{path}.tmp")),
        "a temporary name is listed"
    );
}

/// Someone who can write to the store must not be able to plant a private key: with
/// `storage.encryption_key_file` set, a key in clear (here the internal CA's and its certificate's, stored
/// before encryption was turned on) stops the start with an error naming the store key and the setting
/// that lets it in. With `storage.accept_unsealed` the daemon starts, warns (as `check` does, with the
/// line), and seals the keys in place; without it again, the converged store starts.
#[test]
fn a_private_key_in_clear_in_a_sealed_store_is_refused_unless_accepted_for_migration() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let key_file = dir.path().join("storage.key");
    std::fs::write(
        &key_file,
        base64::engine::general_purpose::STANDARD.encode([7u8; 32]) + "\n",
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let config = dir.path().join("acme-sds.toml");
    let write = |storage: &str| {
        write_config(
            dir.path(),
            &config,
            &format!(
                "[storage]\npath = \"{}\"\n{storage}\n[[certificate]]\nname = \"local\"\ndomains = [\"localhost\"]\nissuer = \"internal\"\n",
                data.display()
            ),
        )
    };
    let run_until_started = || {
        let mut p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
        p.wait_for_line("acme-sds started");
        p.signal("TERM");
        assert_eq!(p.wait_exit(), Some(0));
        p
    };
    let sealed_on_disk = |key: &str| std::fs::read(data.join(key)).unwrap().starts_with(b"ASDS1");

    // Before encryption: the internal CA's key is stored in clear.
    write("");
    run_until_started();
    assert!(!sealed_on_disk("internal/ca"));

    // The key file configured: refused, naming the store key and the way out.
    let sealed = format!("encryption_key_file = \"{}\"\n", key_file.display());
    write(&sealed);
    let out = std::process::Command::new(bin())
        .args(["run", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("storage value at internal/ca holds a private key in clear")
            && stderr.contains("storage.accept_unsealed = true"),
        "{stderr}"
    );
    assert!(!sealed_on_disk("internal/ca"), "a refusal changes nothing");

    // Accepted for one start: `check` warns with the line, the start warns too, and seals in place.
    write(&format!("{sealed}accept_unsealed = true\n"));
    let out = std::process::Command::new(bin())
        .args(["check", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not an error: {stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains("acme-sds.toml:7: storage.accept_unsealed: is on"),
        "{stderr}"
    );
    let p = run_until_started();
    assert!(
        p.log().contains("WARN") && p.log().contains("storage.accept_unsealed: is on"),
        "{}",
        p.log()
    );
    assert!(sealed_on_disk("internal/ca") && sealed_on_disk("internal/certs/local"));

    // Converged: the setting can go.
    write(&sealed);
    run_until_started();
}

/// Key files others may open: like ssh, acme-sds refuses a TSIG key or a storage key that every user of
/// the host may read (at `check` and at start, naming the setting, its line, the file, its mode and the
/// fix), and warns about one its group may read (in `check`'s output and the start's log).
#[test]
fn key_files_every_user_may_read_are_refused_and_group_readable_ones_warned() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let tsig = dir.path().join("acme-sds.key");
    testkit::write_private(
        &tsig,
        testkit::bind::key_file_text("acme-sds", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQ="),
    );
    let storage = dir.path().join("storage.key");
    testkit::write_private(
        &storage,
        base64::engine::general_purpose::STANDARD.encode([7u8; 32]) + "\n",
    );
    let config = dir.path().join("acme-sds.toml");
    write_config(
        dir.path(),
        &config,
        &format!(
            "[storage]\npath = \"{}\"\nencryption_key_file = \"{}\"\n\n[acme]\ncontact = [\"mailto:ops@example.com\"]\naccept_terms_of_service = true\n\n[dns01]\nserver = \"127.0.0.1:1053\"\ntsig_key_file = \"{}\"\n\n[[certificate]]\nname = \"wild\"\ndomains = [\"*.example.com\"]\nchallenge = \"dns-01\"\n",
            dir.path().join("data").display(),
            storage.display(),
            tsig.display()
        ),
    );
    let run = |cmd: &str| {
        let out = std::process::Command::new(bin())
            .args([cmd, "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let chmod = |path: &std::path::Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    let (ok, err) = run("check");
    assert!(ok && !err.contains("warning"), "private files: {err}");

    // Readable by everyone: refused by check and by the start, each naming what is wrong and the fix.
    for (path, key, line) in [
        (&storage, "storage.encryption_key_file", 6),
        (&tsig, "dns01.tsig_key_file", 14),
    ] {
        chmod(path, 0o644);
        for cmd in ["check", "run"] {
            let (ok, err) = run(cmd);
            assert!(!ok, "{cmd} with {} readable by all", path.display());
            assert!(
                err.contains(&format!("acme-sds.toml:{line}: {key}: {}: mode 0644 lets every user of this host read it", path.display()))
                    && err.contains(&format!("chmod 600 {}", path.display()))
                    && err.contains("defaultMode"),
                "{cmd}: {err}"
            );
        }
        chmod(path, 0o600);
    }

    // Readable by a group acme-sds runs with (its own: a system group, a pod's fsGroup): nothing to say.
    chmod(&tsig, 0o640);
    chmod(&storage, 0o640);
    let (ok, err) = run("check");
    assert!(ok && !err.contains("mode 0640"), "{err}");
    // Readable by another group: a warning, in check and at every start.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: giving a file another group needs root");
        return;
    }
    for path in [&tsig, &storage] {
        std::os::unix::fs::chown(path, None, Some(65534)).unwrap();
    }
    let (ok, err) = run("check");
    assert!(ok, "a warning, not an error: {err}");
    for (path, key) in [
        (&storage, "storage.encryption_key_file"),
        (&tsig, "dns01.tsig_key_file"),
    ] {
        assert!(
            err.contains(&format!("warning: {}", config.display()))
                && err.contains(&format!(
                    "{key}: {}: mode 0640 lets members of its group",
                    path.display()
                )),
            "{key}: {err}"
        );
    }
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let line = p.wait_for_line("tsig_key_file");
    assert!(
        line.contains("WARN") && line.contains("mode 0640"),
        "{line}"
    );
}
