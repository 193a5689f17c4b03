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

/// Two certificates sharing a name, both validated over TLS-ALPN-01 and ordered at the same moment: the
/// CA's connection names only the domain, so their orders take turns on it instead of overwriting (or
/// withdrawing) each other's key authorization. Both are issued by their first order, none fails, and no
/// challenge is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_certificates_sharing_a_name_take_turns_over_tls_alpn01() {
    let dir = tempfile::tempdir().unwrap();
    let alpn = free_port();
    let mut opts = PebbleOptions::new(free_port()); // nothing answers HTTP-01
    opts.tls_port = Some(alpn); // Pebble validates on the responder itself
    opts.authz_reuse = 0;
    opts.nonce_reject = 0;
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let config = dir.path().join("acme-sds.toml");
    let data = dir.path().join("data");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:0\"\n\n[tls_alpn01]\nlisten = \"127.0.0.1:{alpn}\"\n\n{}\
             [[certificate]]\nname = \"one\"\ndomains = [\"shared.example.com\"]\nchallenge = \"tls-alpn-01\"\n\n\
             [[certificate]]\nname = \"two\"\ndomains = [\"shared.example.com\", \"two.example.com\"]\nchallenge = \"tls-alpn-01\"\nallow_duplicate_domains = true\n",
            dir.path().join("sds.sock").display(),
            data.display(),
            pebble.acme_table()
        ),
    )
    .unwrap();
    let daemon = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    daemon.wait_for_log("both certificates issued", Duration::from_secs(60), |log| {
        log.matches("certificate issued and pushed").count() >= 2
    });
    let log = daemon.log();
    assert!(!log.contains("certificate order failed"), "{log}");
    assert_eq!(pebble.log().matches("Added order").count(), 2);
    let left: Vec<_> = walk(&data.join("challenges"));
    assert!(left.is_empty(), "challenges left behind: {left:?}");
}

/// Every file under `dir` (none when it does not exist).
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}
