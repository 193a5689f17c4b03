//! TLS-ALPN-01 (RFC 8737) answered through Envoy: Pebble validates on the port-443 listener that
//! `acme-sds envoy-bootstrap` generates, whose `acme-tls/1` filter chain forwards the CA's hellos to
//! acme-sds's responder, while every other handshake on that port is served the real certificate.

use std::time::{Duration, Instant};

use testkit::envoy::{Envoy, envoy_bin, presented_chain, presented_chain_offering};
use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

const ACME_TLS: &[u8] = b"acme-tls/1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn01_is_answered_through_envoys_port_443_and_other_handshakes_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    // Known ahead: the port Pebble validates on, and the two the generated bootstrap points at.
    let (https, alpn, http01) = (free_port(), free_port(), free_port());
    let mut opts = PebbleOptions::new(free_port()); // nothing answers HTTP-01: only TLS-ALPN-01 can pass
    opts.tls_port = Some(https);
    opts.authz_reuse = 0;
    opts.nonce_reject = 0;
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let Some(envoy_bin) = envoy_bin() else { return };
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{http01}\"\n\n[tls_alpn01]\nlisten = \"127.0.0.1:{alpn}\"\n\n{}[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\nchallenge = \"tls-alpn-01\"\n",
            dir.path().join("sds.sock").display(),
            dir.path().join("data").display(),
            pebble.acme_table()
        ),
    )
    .unwrap();
    let bootstrap = testkit::envoy::https_only_bootstrap(&config, https);
    assert!(
        bootstrap.contains("application_protocols: [\"acme-tls/1\"]"),
        "{bootstrap}"
    );
    // Envoy first, as deployed: its port 443 is open before anything is ordered.
    let mut envoy = Envoy::start(&envoy_bin, &bootstrap, dir.path());
    testkit::envoy::poll(&mut envoy, "port 443 to accept", |_| {
        std::net::TcpStream::connect(("127.0.0.1", https))
            .ok()
            .map(|_| ())
    });
    let daemon = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    daemon.wait_for_line("acme-sds started");

    // Issued over TLS-ALPN-01 through Envoy, and served on the same port to ordinary clients.
    let root = pebble.root_der().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(chain) = presented_chain(https, Some("site.example.com")).await
            && verify_chain(&chain, &root, "site.example.com").is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not issued over TLS-ALPN-01:\n{}\n{}\n{}",
            daemon.log(),
            pebble.log(),
            envoy.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        daemon.log().contains("TLS-ALPN-01 challenge answered"),
        "{}",
        daemon.log()
    );
    assert_eq!(pebble.log().matches("Added order").count(), 1);

    // acme-tls/1 for a name with no pending challenge, on Envoy's port and on the responder itself:
    // refused. Unknown names on Envoy's port match no chain at all.
    for (port, name) in [
        (https, "site.example.com"),
        (alpn, "site.example.com"),
        (https, "other.example.com"),
        (alpn, "other.example.com"),
    ] {
        let r = presented_chain_offering(port, Some(name), &[ACME_TLS]).await;
        assert!(r.is_err(), "{name} on {port}: {r:?}");
    }
    // Without acme-tls/1, the responder answers nobody.
    assert!(
        presented_chain(alpn, Some("site.example.com"))
            .await
            .is_err()
    );
}
