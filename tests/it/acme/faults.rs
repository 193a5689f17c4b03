//! A CA that misbehaves: rejected nonces, outages, hangs, validation failures, crash loops, a CA not
//! reached at all; everything else keeps being served and orders stay bounded.

use std::time::Duration;

use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuance_survives_pebble_rejecting_half_the_nonces() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.nonce_reject = 50;
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let tables = acme_tables(&pebble, http, &[("n", &["nonce.example.com"])]);
    let daemon = Daemon::start(dir, &tables).await;
    let mut client = daemon.client().await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["n"])).await;
    let r = s.recv_issued(ISSUE).await;
    let chain = chain_ders(&decode_secret(&r.resources[0]));
    verify_chain(&chain, &pebble.root_der().await, "nonce.example.com").unwrap();
}

/// Half of all nonces rejected (`PEBBLE_WFE_NONCEREJECT=50`): every badNonce that outlives instant-acme's
/// own three tries is retried on its own, in a fraction of a second, so both certificates of a two-
/// certificate setup are issued well within a minute with the default (60 s) retry settings, each from
/// one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_the_nonces_rejected_both_certificates_within_a_minute_one_order_each() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.nonce_reject = 50;
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let tables = format!(
        "[http01]\nlisten = \"127.0.0.1:{http}\"\n\n{}[[certificate]]\nname = \"web\"\ndomains = [\"www.example.com\", \"example.com\"]\n\n[[certificate]]\nname = \"api\"\ndomains = [\"api.example.com\"]\n",
        default_retry_table(&pebble)
    );
    let config = write_config(dir.path(), &tables);
    let started = std::time::Instant::now();
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let root = pebble.root_der().await;
    for (name, domain) in [("web", "www.example.com"), ("api", "api.example.com")] {
        let mut s = SotwStream::open(&mut client).await;
        s.send(subscribe(&[name])).await;
        let r = s
            .recv_issued(Duration::from_secs(60).saturating_sub(started.elapsed()))
            .await;
        verify_chain(&chain_ders(&decode_secret(&r.resources[0])), &root, domain).unwrap();
    }
    let took = started.elapsed();
    eprintln!("both certificates issued {took:?} after start, with half the nonces rejected");
    let log = p.log();
    assert_eq!(
        log.matches("order created").count(),
        2,
        "one order each:\n{log}"
    );
    assert!(
        !log.contains("certificate order failed"),
        "no order failed:\n{log}"
    );
}

/// A crash loop (kill -9 at short intervals) around a certificate whose validation keeps failing: the next
/// attempt is stored before each order, and an order in progress is resumed rather than placed again, so
/// the CA sees a handful of orders, not one per restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_places_at_most_one_order_per_backoff_step() {
    let dir = tempfile::tempdir().unwrap();
    // Pebble validates on a port where nothing listens: every order fails.
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(free_port()))
    else {
        return;
    };
    let tables = format!(
        "[http01]\nlisten = \"127.0.0.1:{}\"\n\n{}[[certificate]]\nname = \"down\"\ndomains = [\"down.example.com\"]\n",
        free_port(),
        default_retry_table(&pebble)
    );
    let config = write_config(dir.path(), &tables);
    let args = ["run", "--config", config.to_str().unwrap()];
    let rounds = 8;
    for round in 0..rounds {
        let mut p = Process::spawn(&args, &[]);
        p.wait_for_line("acme-sds started");
        // Until it orders (or would have), then the crash.
        let _ = p.line_within("order created", Duration::from_millis(1500));
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        eprintln!("round {round}: killed");
    }
    let orders = pebble.log().matches("Added order").count();
    eprintln!("{rounds} kill -9 restarts: {orders} orders at Pebble");
    assert!(orders >= 1, "it did order");
    // The first order, and the quick second try a first validation that could not connect gets; then
    // the 60 s backoff holds, however often the process restarts.
    assert!(
        orders <= 3,
        "{orders} orders in {rounds} restarts:\n{}",
        pebble.log()
    );
}

#[test]
fn a_domain_that_cannot_validate_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    // Nothing answers HTTP-01 on 127.0.0.2.
    pebble.resolve("bad.example.com", "127.0.0.2");
    let config = write_config(
        dir.path(),
        &acme_tables(
            &pebble,
            http,
            &[
                ("bad", &["bad.example.com"]),
                ("good", &["good.example.com"]),
            ],
        ),
    );
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen(
            "[http01]",
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n[http01]",
            1,
        ),
    )
    .unwrap();
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let admin_line = p.wait_for_line("admin listening");
    let admin: std::net::SocketAddr = admin_line
        .split("listen=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    p.wait_for_log("good issued, bad failed twice", ISSUE, |log| {
        log.lines()
            .any(|l| l.contains("certificate issued") && l.contains("good"))
            && log
                .lines()
                .any(|l| l.contains("order failed") && l.contains("attempt=2"))
    });
    let log = p.log();
    let failed = log
        .lines()
        .find(|l| l.contains("certificate order failed"))
        .unwrap();
    assert!(failed.contains("secret=bad"), "{failed}");
    assert!(failed.contains("bad.example.com"), "{failed}");
    assert!(failed.contains("next attempt at"), "{failed}");
    assert!(
        !log.lines()
            .any(|l| l.contains("order failed") && l.contains("secret=good"))
    );

    // The status view tells the same story.
    let status: serde_json::Value = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(
            s,
            "GET /status HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        serde_json::from_str(out.split_once("\r\n\r\n").unwrap().1).unwrap()
    };
    let find = |n: &str| {
        status["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .unwrap()
            .clone()
    };
    let (good, bad) = (find("good"), find("bad"));
    assert_eq!(good["source"], "acme");
    assert_eq!(good["serving"], true);
    assert_eq!(good["temporary"], false);
    assert!(good["next_renewal"].is_string(), "{good}");
    assert!(good["last_error"].is_null(), "{good}");
    // Never issued: a temporary certificate is served, and said to be one.
    assert_eq!(bad["serving"], true);
    assert_eq!(bad["temporary"], true);
    assert!(bad["serial"].is_string());
    assert!(
        bad["last_error"]
            .as_str()
            .unwrap()
            .contains("bad.example.com"),
        "{bad}"
    );
    assert!(bad["next_retry"].is_string(), "{bad}");
    // And so does `acme-sds status` read offline, with the very renewal the daemon planned.
    let offline = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(acme_sds::ops::status::offline(
            &acme_sds::config::load(&config).unwrap(),
        ))
        .unwrap();
    let good_offline = offline.iter().find(|s| s.name == "good").unwrap();
    let planned: acme_sds::ops::status::SecretStatus =
        serde_json::from_value(good.clone()).unwrap();
    assert_eq!(good_offline.next_renewal, planned.next_renewal);
    assert_eq!(good_offline.serial, planned.serial);

    let metrics = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    for needle in [
        "acme_sds_acme_orders_total{name=\"good\",result=\"issued\"} 1",
        "acme_sds_acme_orders_total{name=\"bad\",result=\"failed\"}",
        "acme_sds_acme_request_duration_seconds_bucket{",
        "action=\"new_order\",status=\"ok\"",
        "acme_sds_http01_requests_total{result=\"answered\"}",
        "acme_sds_certificate_ready{name=\"good\"} 1",
        "acme_sds_certificate_ready{name=\"bad\"} 0",
        "acme_sds_certificate_renewal_timestamp_seconds{name=\"good\"}",
    ] {
        assert!(
            metrics.contains(needle),
            "{needle} missing from:\n{metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_outage_keeps_serving_retries_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.validity_seconds = Some(8);
    let Some(mut pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["down.example.com"])]),
    );
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let (mut s, r1) = SotwStream::subscribed(&mut client, &["site"]).await;
    s.send(ack(&["site"], &r1)).await;

    // The CA goes away before the renewal is due.
    pebble.stop();
    let failed = p.wait_for_line_within("certificate order failed", ISSUE);
    assert!(failed.contains("keeps being served"), "{failed}");
    let r = fetch(&mut client, &["site"]).await;
    assert_eq!(
        leaf_der(&decode_secret(&r.resources[0])),
        leaf_der(&decode_secret(&r1.resources[0]))
    );
    p.wait_for_line_within("attempt=2", ISSUE);

    // The CA is back (a fresh Pebble that forgot the account): the next attempt succeeds and is pushed.
    pebble.restart();
    let r2 = s.recv_issued(ISSUE).await;
    assert_ne!(
        leaf_der(&decode_secret(&r2.resources[0])),
        leaf_der(&decode_secret(&r1.resources[0]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_starts_and_serves_files_while_the_ca_is_down() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let pki = Pki::new();
    let leaf = pki.leaf(&["files.example.com"]);
    let (crt, key) = leaf.write(dir.path(), "files");
    // A directory nobody listens on.
    let mut tables = cert_table("files", &crt, &key);
    tables.push_str(&format!(
        "[http01]\nlisten = \"127.0.0.1:{http}\"\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\nretry_initial = \"1s\"\n[[certificate]]\nname = \"acme\"\ndomains = [\"acme.example.com\"]\n",
        free_port()
    ));
    let daemon = Daemon::start(dir, &tables).await;
    let mut client = daemon.client().await;
    let r = fetch(&mut client, &["files"]).await;
    assert_eq!(leaf_der(&decode_secret(&r.resources[0])), leaf.leaf_der);
    // The ACME certificate was never issued: its temporary stand-in is served, for its domain.
    let r = fetch(&mut client, &["acme"]).await;
    let secret = decode_secret(&r.resources[0]);
    assert!(is_temporary(&secret));
    let der = leaf_der(&secret);
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans = &cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names;
    assert_eq!(format!("{sans:?}"), r#"[DNSName("acme.example.com")]"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_ca_times_out_and_is_retried_while_everything_else_is_served() {
    let dir = tempfile::tempdir().unwrap();
    // A "CA" that accepts connections and never answers.
    let tarpit = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tarpit.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in tarpit.incoming().flatten() {
            held.push(conn);
        }
    });
    let pki = Pki::new();
    let leaf = pki.leaf(&["files.example.com"]);
    let (crt, key) = leaf.write(dir.path(), "files");
    std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
    let tables = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[http01]\nlisten = \"127.0.0.1:{}\"\n[acme]\ndirectory = \"https://127.0.0.1:{port}/dir\"\ndirectory_ca = \"{}\"\naccept_terms_of_service = true\nrequest_timeout = \"1s\"\nretry_initial = \"1s\"\nretry_max = \"2s\"\n[[certificate]]\nname = \"acme\"\ndomains = [\"acme.example.com\"]\n\n{}",
        free_port(),
        dir.path().join("ca.pem").display(),
        cert_table("files", &crt, &key)
    );
    let config = write_config(dir.path(), &tables);
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let r = fetch(&mut client, &["files"]).await;
    assert_eq!(leaf_der(&decode_secret(&r.resources[0])), leaf.leaf_der);
    p.wait_for_log("two timed-out attempts", ISSUE, |log| {
        log.lines()
            .filter(|l| l.contains("order failed") && l.contains("did not answer"))
            .count()
            >= 2
    });
    assert_eq!(fetch(&mut client, &["files"]).await.resources.len(), 1);
    // The schedule is not frozen: the status shows the failure and the next attempt, at once.
    let admin = p.listen_addr("admin");
    let t = std::time::Instant::now();
    let status = http_get(admin, "/status");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "/status took {:?}",
        t.elapsed()
    );
    let body: serde_json::Value =
        serde_json::from_str(status.split_once("\r\n\r\n").unwrap().1).unwrap();
    let acme = body["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "acme")
        .unwrap()
        .clone();
    assert!(
        acme["last_error"]
            .as_str()
            .unwrap()
            .contains("did not answer"),
        "{acme}"
    );
    assert!(acme["next_retry"].is_string(), "{acme}");
    assert_eq!(acme["temporary"], true, "{acme}");
}

/// When the CA cannot be reached, the log and the status name the request (method and URL) and the cause
/// in words a person can act on: nothing listening (connection refused), or a CA whose certificate is not
/// trusted (TLS: here Pebble without `directory_ca`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_ca_is_named_with_its_url_and_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let refused = format!("https://127.0.0.1:{}/dir", free_port());
    for (directory, cause) in [
        (refused.as_str(), "connection refused"),
        (pebble.directory.as_str(), "TLS handshake failed"),
    ] {
        let run = dir.path().join(cause.replace(' ', "-"));
        std::fs::create_dir_all(&run).unwrap();
        let config = write_config(
            &run,
            &format!(
                "[http01]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectory = \"{directory}\"\naccept_terms_of_service = true\n[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n"
            ),
        );
        let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
        let line = p.wait_for_line("cannot reach the CA");
        assert!(
            line.contains(&format!("cannot reach the CA (GET {directory}): {cause}")),
            "{line}"
        );
        assert!(!line.contains("client error (Connect)"), "{line}");
    }
}

/// A CA answering 503 with `Retry-After: 3600` (longer than a request is retried on the spot) is
/// honoured: the order fails after that one request, and the next attempt is an hour away (within
/// `retry_max`), not `retry_initial`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_retry_after_on_a_5xx_is_honoured() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let leaf = pki.leaf(&["127.0.0.1"]);
    std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();
    let certs = vec![rustls_pki_types::CertificateDer::from(
        leaf.leaf_der.clone(),
    )];
    let key = rustls_pki_types::PrivateKeyDer::try_from(
        rustls_pki_types::pem::PemObject::from_pem_slice(leaf.key_pem.as_bytes())
            .map(|k: rustls_pki_types::PrivatePkcs8KeyDer<'static>| k.secret_pkcs8_der().to_vec())
            .unwrap(),
    )
    .unwrap();
    let tls = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counted) = (acceptor.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 8192];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let base = format!("https://127.0.0.1:{port}");
                // A directory and nonces as any CA; every other request (the account, first) 503.
                let (status, body) = if head.starts_with("GET /dir ") {
                    (
                        "200 OK",
                        format!(
                            r#"{{"newNonce":"{base}/nonce","newAccount":"{base}/account","newOrder":"{base}/order","revokeCert":"{base}/revoke","keyChange":"{base}/key"}}"#
                        ),
                    )
                } else if head.contains(" /nonce ") {
                    ("200 OK", String::new())
                } else {
                    counted.fetch_add(1, Ordering::SeqCst);
                    (
                        "503 Service Unavailable\r\nRetry-After: 3600",
                        r#"{"type":"urn:ietf:params:acme:error:serverInternal","detail":"down for maintenance"}"#.to_owned(),
                    )
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nReplay-Nonce: n{n}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    let tables = format!(
        "[http01]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectory = \"https://127.0.0.1:{port}/dir\"\ndirectory_ca = \"{}\"\naccept_terms_of_service = true\nretry_initial = \"1s\"\nretry_max = \"2h\"\n[[certificate]]\nname = \"acme\"\ndomains = [\"acme.example.com\"]\n",
        dir.path().join("ca.pem").display(),
    );
    let config = write_config(dir.path(), &tables);
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let failed = p.wait_for_line_within("certificate order failed", ISSUE);
    assert!(
        failed.contains("(in 59 minutes)") || failed.contains("(in 60 minutes)"),
        "the CA's Retry-After is the next attempt: {failed}"
    );
    assert_eq!(requests.load(Ordering::SeqCst), 1, "{}", p.log());
}
