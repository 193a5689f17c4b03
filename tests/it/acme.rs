//! ACME end to end against Pebble: issuance over HTTP-01 served by SDS, restart, renewal and faults.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

/// Issuance with Pebble takes well under a second; generous bounds absorb a loaded CI machine.
const ISSUE: Duration = Duration::from_secs(60);

fn acme_tables(pebble: &Pebble, http_port: u16, certs: &[(&str, &[&str])]) -> String {
    let mut t = format!(
        "[http01]\nlisten = \"127.0.0.1:{http_port}\"\n\n{}",
        pebble.acme_table()
    );
    for (name, domains) in certs {
        let list: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
        t.push_str(&format!(
            "[[certificate]]\nname = \"{name}\"\ndomains = [{}]\n\n",
            list.join(", ")
        ));
    }
    t
}

fn write_config(dir: &Path, tables: &str) -> std::path::PathBuf {
    let path = dir.join("acme-sds.toml");
    std::fs::write(
        &path,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n{tables}",
            dir.join("sds.sock").display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_domain_certificate_is_issued_over_http01_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let tables = acme_tables(
        &pebble,
        http,
        &[("site", &["www.example.com", "mobile.example.com"])],
    );
    let daemon = Daemon::start(dir, &tables).await;
    let mut client = daemon.client().await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["site"])).await;
    let r = s.recv_issued(ISSUE).await;
    let secret = decode_secret(&r.resources[0]);
    assert_eq!(secret.name, "site");
    let chain = chain_ders(&secret);
    let root = pebble.root_der().await;
    for name in ["www.example.com", "mobile.example.com"] {
        verify_chain(&chain, &root, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(verify_chain(&chain, &root, "other.example.com").is_err());

    // Stored safely; nothing pending left behind.
    let storage = daemon.dir.path().join("acme-sds-data");
    assert_eq!(
        std::fs::metadata(&storage).unwrap().permissions().mode() & 0o777,
        0o700
    );
    let mut files = Vec::new();
    let mut stack = vec![storage.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().contains("/certs/site")),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().ends_with("/account")),
        "{files:?}"
    );
    for f in &files {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{f:?}"
        );
        assert!(
            !f.to_string_lossy().contains("/challenges/"),
            "challenge left behind: {f:?}"
        );
    }
}

#[test]
fn restart_serves_the_stored_certificate_and_orders_nothing_until_domains_change() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["a.example.com"])]),
    );
    let args = ["run", "--config", config.to_str().unwrap()];

    let first = issue_then_stop(&args);

    let mut second = Process::spawn(&args, &[]);
    let line = second.wait_for_line("next renewal at");
    assert!(line.contains("site"), "{line}");
    assert!(
        !second.log().contains("order created"),
        "nothing is ordered for a valid stored certificate:\n{}",
        second.log()
    );
    second.signal("TERM");
    assert_eq!(second.wait_exit(), Some(0));

    // A changed domains list orders a new certificate for the new names.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "[\"a.example.com\"]",
            "[\"a.example.com\", \"b.example.com\"]",
        ),
    )
    .unwrap();
    let third = Process::spawn(&args, &[]);
    let issued = third.wait_for_line_within("certificate issued", ISSUE);
    assert!(issued.contains("b.example.com"), "{issued}");
    assert!(
        first.log().contains("ACME account created")
            && !third.log().contains("ACME account created"),
        "the account is created once and reused:\n{}",
        third.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_type_is_issued() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let mut tables = acme_tables(&pebble, http, &[]);
    for (name, kt) in [("p384", "ecdsa-p384"), ("rsa", "rsa-2048")] {
        tables.push_str(&format!(
            "[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.example.com\"]\nkey_type = \"{kt}\"\n\n"
        ));
    }
    let daemon = Daemon::start(dir, &tables).await;
    let mut client = daemon.client().await;
    let root = pebble.root_der().await;
    for (name, oid_hint) in [("p384", "EC"), ("rsa", "RSA")] {
        let mut s = SotwStream::open(&mut client).await;
        s.send(subscribe(&[name])).await;
        let secret = decode_secret(&s.recv_issued(ISSUE).await.resources[0]);
        verify_chain(&chain_ders(&secret), &root, &format!("{name}.example.com")).unwrap();
        let leaf = leaf_der(&secret);
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let alg = cert.public_key().algorithm.algorithm.to_id_string();
        let expected = if oid_hint == "RSA" {
            "1.2.840.113549.1.1.1"
        } else {
            "1.2.840.10045.2.1"
        };
        assert_eq!(alg, expected, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificates_are_renewed_and_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.validity_seconds = Some(10);
    let Some(_pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let tables = acme_tables(&_pebble, http, &[("short", &["short.example.com"])]);
    let daemon = Daemon::start(dir, &tables).await;
    let mut client = daemon.client().await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["short"])).await;
    let r1 = s.recv_issued(ISSUE).await;
    s.send(ack(&["short"], &r1)).await;
    // Valid 10 s: renewed with half its life left, about 5 s after issuance.
    let r2 = s.recv_issued(ISSUE).await;
    let (a, b) = (
        decode_secret(&r1.resources[0]),
        decode_secret(&r2.resources[0]),
    );
    assert_ne!(leaf_der(&a), leaf_der(&b), "a renewed certificate");
    assert_ne!(r1.version_info, r2.version_info);
}

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

/// `[acme]` for this Pebble with acme-sds's default retry settings (60 s, doubling, up to a day): what a
/// user runs, and what makes a failed order expensive.
fn default_retry_table(pebble: &Pebble) -> String {
    pebble
        .acme_table()
        .replace("retry_initial = \"1s\"\n", "")
        .replace("retry_max = \"4s\"\n", "")
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
async fn responder_answers_pending_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let tables = format!(
        "[http01]\nlisten = \"127.0.0.1:{http}\"\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\n[[certificate]]\nname = \"acme\"\ndomains = [\"acme.example.com\"]\n",
        free_port()
    );
    let daemon = Daemon::start(dir, &tables).await;
    // The daemon holds its store (one daemon per directory): write through its own handle.
    let store = daemon.running().store().expect("an ACME store").clone();
    let token = "LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0";
    store
        .put(
            &acme_sds::sources::keys::challenge(token),
            b"LoqXcYV8q5ONbJQxbmR7SCTNo3tiAXDfowyjxAjEuX0.thumbprint",
        )
        .await
        .unwrap();
    let get = |method: &str, path: &str, host: &str| {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let path = format!("/.well-known/acme-challenge/{token}");
    let ok = get("GET", &path, "www.example.com");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(
        ok.to_ascii_lowercase().contains("content-type: text/plain"),
        "{ok}"
    );
    assert!(ok.ends_with(".thumbprint"), "{ok}");
    let head = get("HEAD", &path, "anything");
    assert!(
        head.starts_with("HTTP/1.1 200") && !head.contains("thumbprint"),
        "{head}"
    );
    for (m, p) in [
        ("GET", "/.well-known/acme-challenge/unknownunknownunknown"),
        ("GET", "/.well-known/acme-challenge/../../etc/passwd"),
        ("GET", "/"),
    ] {
        assert!(get(m, p, "x").starts_with("HTTP/1.1 404"), "{m} {p}");
    }
    assert!(get("POST", &path, "x").starts_with("HTTP/1.1 405"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_is_used_when_the_ca_requires_it() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    let mac = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";
    opts.eab = Some(("kid-1".into(), mac.into()));
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let tables = acme_tables(&pebble, http, &[("eab", &["eab.example.com"])]).replace(
        "accept_terms_of_service = true\n",
        &format!("accept_terms_of_service = true\neab_kid = \"kid-1\"\neab_hmac_key = \"{mac}\"\n"),
    );
    let daemon = Daemon::start(dir, &tables).await;
    let mut client = daemon.client().await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["eab"])).await;
    let secret = decode_secret(&s.recv_issued(ISSUE).await.resources[0]);
    verify_chain(
        &chain_ders(&secret),
        &pebble.root_der().await,
        "eab.example.com",
    )
    .unwrap();
}

#[test]
fn a_corrupt_stored_certificate_is_moved_aside_and_obtained_again() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["c.example.com"])]),
    );
    let args = ["run", "--config", config.to_str().unwrap()];
    issue_then_stop(&args);

    // Half-written, as a crash mid-write on a filesystem without atomic rename would leave it.
    let certs_dir = std::fs::read_dir(dir.path().join("acme-sds-data/acme"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path()
        .join("certs");
    let stored = certs_dir.join("site");
    let bytes = std::fs::read(&stored).unwrap();
    std::fs::write(&stored, &bytes[..bytes.len() / 2]).unwrap();

    let second = Process::spawn(&args, &[]);
    let aside = second.wait_for_line("moved aside");
    assert!(
        aside.contains("secret=site") || aside.contains("secret=\"site\""),
        "{aside}"
    );
    second.wait_for_line_within("certificate issued", ISSUE);
    let names: Vec<String> = std::fs::read_dir(&certs_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("site.corrupt-")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "site"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_keys_never_reach_the_logs_even_at_trace() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let pki = Pki::new();
    let file_leaf = pki.leaf(&["files.example.com"]);
    let (crt, key) = file_leaf.write(dir.path(), "files");
    let tables = format!(
        "{}{}[[certificate]]\nname = \"dev\"\nissuer = \"internal\"\ndomains = [\"localhost\"]\n",
        acme_tables(&pebble, http, &[("site", &["trace.example.com"])]),
        cert_table("files", &crt, &key)
    );
    let config = write_config(dir.path(), &tables);
    let p = Process::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &[("RUST_LOG", "trace")],
    );
    p.wait_for_line_within("certificate issued", ISSUE);
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    fetch(&mut client, &["site", "files", "dev"]).await;

    // Every private key acme-sds holds: the file key, the issued key, the account key, the internal CA's
    // key and the key of its certificate.
    let mut secrets: Vec<String> = vec![file_leaf.key_pem.clone()];
    let internal = dir.path().join("acme-sds-data/internal");
    for (file, field) in [("ca", "key_pem"), ("certs/dev", "key_pem")] {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(internal.join(file)).unwrap()).unwrap();
        secrets.push(v[field].as_str().unwrap().to_owned());
    }
    let data = dir.path().join("acme-sds-data/acme");
    let ca_dir = std::fs::read_dir(&data)
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ca_dir.join("certs/site")).unwrap()).unwrap();
    secrets.push(stored["key_pem"].as_str().unwrap().to_owned());
    let account: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ca_dir.join("account")).unwrap()).unwrap();
    let account_key = account["key_pkcs8"].as_str().unwrap().to_owned();
    assert!(account_key.len() > 32);
    let log = p.log();
    assert!(log.lines().count() > 50, "trace logging is on");
    assert!(!log.contains("PRIVATE KEY"), "PEM key label in the logs");
    for pem in &secrets {
        for line in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() > 16)
        {
            assert!(!log.contains(line), "key material in the logs: {line}");
        }
    }
    assert!(!log.contains(&account_key[..32]), "account key in the logs");
}

/// Runs acme-sds until it has issued a certificate, then stops it cleanly; returns it for its log.
fn issue_then_stop(args: &[&str]) -> Process {
    let mut p = Process::spawn(args, &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    p.signal("TERM");
    assert_eq!(p.wait_exit(), Some(0));
    p
}

/// Every stored certificate under the storage directory parses and matches its key; returns how many.
fn check_storage(storage: &Path) -> usize {
    let mut ok = 0;
    let Ok(cas) = std::fs::read_dir(storage.join("acme")) else {
        return 0;
    };
    for ca in cas.flatten() {
        let Ok(certs) = std::fs::read_dir(ca.path().join("certs")) else {
            continue;
        };
        for f in certs.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // an interrupted write's temp file; the value itself is whole
            }
            let bytes = std::fs::read(f.path()).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{name} is half-written: {e}"));
            acme_sds::certs::certified_pem(
                v["chain_pem"].as_str().unwrap().as_bytes(),
                v["key_pem"].as_str().unwrap().as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            ok += 1;
        }
        if let Ok(account) = std::fs::read(ca.path().join("account")) {
            serde_json::from_slice::<serde_json::Value>(&account).expect("account is whole");
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_during_issuance_never_corrupts_state() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let storage = dir.path().join("acme-sds-data");
    let config_path = dir.path().join("acme-sds.toml");
    let args = ["run", "--config", config_path.to_str().unwrap()];
    // Each round adds two certificates, so every run is in the middle of issuing something when killed.
    let mut names: Vec<String> = Vec::new();
    let write = |names: &[String]| {
        let domains: Vec<[String; 1]> =
            names.iter().map(|n| [format!("{n}.example.com")]).collect();
        let doms: Vec<[&str; 1]> = domains.iter().map(|d| [d[0].as_str()]).collect();
        let certs: Vec<(&str, &[&str])> = names
            .iter()
            .zip(&doms)
            .map(|(n, d)| (n.as_str(), &d[..]))
            .collect();
        write_config(dir.path(), &acme_tables(&pebble, http, &certs));
    };

    // Deterministic "random" moments across the issuance window.
    let mut seed: u64 = 0x5eed;
    for round in 0..10 {
        names.push(format!("r{round}a"));
        names.push(format!("r{round}b"));
        write(&names);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = std::time::Duration::from_millis((seed >> 33) % 900);
        let mut p = Process::spawn(&args, &[]);
        p.wait_for_line("acme-sds started");
        tokio::time::sleep(delay).await; // the moment of the crash, not a synchronisation
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        let stored = check_storage(&storage);
        eprintln!(
            "round {round}: killed after {delay:?}; {stored} of {} certificates stored, all whole",
            names.len()
        );
    }
    let domains: Vec<String> = names.iter().map(|n| format!("{n}.example.com")).collect();

    // Final run: everything completes, and what is served matches what is stored.
    let p = Process::spawn(&args, &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let root = pebble.root_der().await;
    for (name, domain) in names.iter().zip(&domains) {
        let mut s = SotwStream::open(&mut client).await;
        s.send(subscribe(&[name])).await;
        let secret = decode_secret(&s.recv_issued(ISSUE).await.resources[0]);
        // Certificates from before a Pebble restart would not verify; this Pebble ran throughout.
        verify_chain(&chain_ders(&secret), &root, domain).unwrap();
    }
    assert_eq!(check_storage(&storage), names.len());
    assert!(!p.log().contains("panicked"));
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

/// The stored certificate of `name` under `storage`, as its leaf DER (None when there is none).
fn stored_leaf(storage: &Path, name: &str) -> Option<Vec<u8>> {
    let ca = std::fs::read_dir(storage.join("acme"))
        .ok()?
        .flatten()
        .next()?
        .path();
    let bytes = std::fs::read(ca.join("certs").join(name)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let chain = v["chain_pem"].as_str()?;
    use rustls_pki_types::pem::PemObject;
    Some(
        rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
            .next()?
            .ok()?
            .to_vec(),
    )
}

/// A certificate the CA issued is never lost: when the store refuses it, it is served from memory and the
/// write retried until it lands; and an acme-sds killed meanwhile downloads it again at its next start
/// (the order was kept) rather than ordering a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_certificate_the_store_refused_is_served_stored_later_and_never_ordered_twice() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["w.example.com"])]),
    );
    let storage = dir.path().join("acme-sds-data");
    // The certificate's value cannot be written: a non-empty directory stands where its file goes.
    let blocked = storage
        .join(acme_sds::sources::keys::AcmeKeys::for_directory(&pebble.directory).cert("site"));
    std::fs::create_dir_all(blocked.join("in-the-way")).unwrap();
    let args = ["run", "--config", config.to_str().unwrap()];
    let mut p = Process::spawn(&args, &[]);
    let issued = p.wait_for_line_within("certificate issued", ISSUE);
    assert!(issued.contains("NOT STORED"), "{issued}");
    assert!(p.log().contains("served from memory"), "{}", p.log());
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let served = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    let secret = decode_secret(&fetch(&mut client, &["site"]).await.resources[0]);
    assert!(!is_temporary(&secret), "the issued certificate is served");
    verify_chain(
        &chain_ders(&secret),
        &pebble.root_der().await,
        "w.example.com",
    )
    .unwrap();

    // Killed before the write could land: the next start resumes the kept order and downloads the same
    // certificate.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    std::fs::remove_dir_all(&blocked).unwrap();
    let p = Process::spawn(&args, &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    assert!(
        p.log().contains("resuming the order in progress"),
        "{}",
        p.log()
    );
    assert!(
        !p.log().contains("order created"),
        "no new order:\n{}",
        p.log()
    );
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let again = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert_eq!(again, served, "the same certificate, downloaded again");
    assert_eq!(stored_leaf(&storage, "site").as_deref(), Some(&served[..]));
}

/// The store refuses a renewal for a while: the renewal is served from memory, and stored once the store
/// takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_the_store_refused_is_stored_once_it_can_be() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.validity_seconds = Some(6);
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["w.example.com"])]),
    );
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let first = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    let storage = dir.path().join("acme-sds-data");

    // The stored value cannot be replaced any more (a directory now stands in its place).
    let ca_dir = std::fs::read_dir(storage.join("acme"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let stored = ca_dir.join("certs/site");
    std::fs::remove_file(&stored).unwrap();
    std::fs::create_dir(&stored).unwrap();
    std::fs::write(stored.join("keep"), b"x").unwrap();

    // The renewal (half of 6 s) is obtained but cannot be stored: it is served all the same.
    let line = p.wait_for_line_within("NOT STORED", ISSUE);
    assert!(line.contains("certificate issued"), "{line}");
    let renewed = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert_ne!(renewed, first, "the renewal is served from memory");

    // The store takes writes again: the served certificate lands there.
    std::fs::remove_dir_all(&stored).unwrap();
    p.wait_for_line_within("is stored now", ISSUE);
    let on_disk = stored_leaf(&storage, "site").unwrap();
    let served = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert!(
        on_disk == served || on_disk == renewed,
        "what is stored is what was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_storage_serves_the_stored_certificate_then_its_renewal_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.validity_seconds = Some(6);
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["ro.example.com"])]),
    );
    issue_then_stop(&["run", "--config", config.to_str().unwrap()]);

    // Run again with the storage directory mounted read-only (a private mount namespace; root can write
    // through file modes, not through a read-only mount).
    let storage = dir.path().join("acme-sds-data");
    let script = format!(
        "mount --bind '{s}' '{s}' && mount -o remount,bind,ro '{s}' && exec '{bin}' run --config '{c}'",
        s = storage.display(),
        bin = bin(),
        c = config.display()
    );
    let p = Process::spawn_program(
        "unshare",
        &["-m", "--propagation", "private", "sh", "-c", &script],
        &[],
    );
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let served = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    // The renewal (due after 3 s) cannot be stored: the error says why, and the renewal is served from
    // memory (an issued certificate is never thrown away).
    let issued = p.wait_for_line_within("certificate issued", ISSUE);
    assert!(issued.contains("NOT STORED"), "{issued}");
    let why = p.wait_for_line("cannot store the issued certificate");
    assert!(why.contains("Read-only file system"), "{why}");
    let after = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert_ne!(after, served, "the renewal is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_edit_orders_added_and_changed_certificates_live() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("a", &["a.example.com"])]),
    );
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let mut b = SotwStream::open(&mut client).await;
    b.send(subscribe(&["b"])).await;

    // One edit: a new certificate, and a domain added to the existing one.
    let text = acme_tables(
        &pebble,
        http,
        &[
            ("a", &["a.example.com", "a2.example.com"]),
            ("b", &["b.example.com"]),
        ],
    );
    write_config(dir.path(), &text);
    let secret = decode_secret(&b.recv_issued(ISSUE).await.resources[0]);
    verify_chain(
        &chain_ders(&secret),
        &pebble.root_der().await,
        "b.example.com",
    )
    .unwrap();
    p.wait_for_log("a re-ordered with a2", ISSUE, |log| {
        log.lines()
            .any(|l| l.contains("certificate issued") && l.contains("a2.example.com"))
    });
    let a = decode_secret(&fetch(&mut client, &["a"]).await.resources[0]);
    verify_chain(&chain_ders(&a), &pebble.root_der().await, "a2.example.com").unwrap();
}

/// One daemon per storage directory: a second acme-sds on the same storage refuses to start and names the
/// first; `acme-sds status` reads the storage alongside it without locking or writing anything.
#[test]
fn a_second_daemon_on_the_same_storage_is_refused_and_status_reads_alongside() {
    let dir = tempfile::tempdir().unwrap();
    let acme = |socket: &str, http: u16| {
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[http01]\nlisten = \"127.0.0.1:{http}\"\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\n[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n",
            dir.path().join(socket).display(),
            free_port()
        )
    };
    let first_config = dir.path().join("first.toml");
    std::fs::write(&first_config, acme("first.sock", free_port())).unwrap();
    let second_config = dir.path().join("second.toml");
    std::fs::write(&second_config, acme("second.sock", free_port())).unwrap();
    let mut first = Process::spawn(&["run", "--config", first_config.to_str().unwrap()], &[]);
    first.wait_for_line("acme-sds started");

    let mut second = Process::spawn(&["run", "--config", second_config.to_str().unwrap()], &[]);
    assert_eq!(second.wait_exit(), Some(1));
    let err = second.log();
    assert!(
        err.contains("in use by another acme-sds")
            && err.contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    assert_eq!(
        err.matches("in use by another acme-sds").count(),
        1,
        "said once:\n{err}"
    );

    let storage = dir.path().join("acme-sds-data");
    // What is stored (the daemon's own temp files come and go as it writes; they are not compared).
    let files = |d: &Path| -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![d.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else if !name.contains(".tmp-") {
                    out.push(e.path().display().to_string());
                }
            }
        }
        out.sort();
        out
    };
    // The daemon has written what it writes before its first order (its state) by now.
    let deadline = std::time::Instant::now() + WAIT;
    while !files(&storage).iter().any(|f| f.ends_with("/state/site")) {
        assert!(std::time::Instant::now() < deadline, "no state written");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = files(&storage);
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&second_config)
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 2)), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("site"),
        "{out:?}"
    );
    assert_eq!(files(&storage), before, "status wrote nothing");

    // The first goes: the storage is free again.
    first.signal("TERM");
    assert_eq!(first.wait_exit(), Some(0));
    let second = Process::spawn(&["run", "--config", second_config.to_str().unwrap()], &[]);
    second.wait_for_line("acme-sds started");
}

/// Storage on a volume acme-sds does not own, as an operator's platform hands it out (a Kubernetes volume
/// with `fsGroup`: root-owned, group-writable, setgid), with acme-sds running as an unprivileged user: it
/// keeps its state in a private subdirectory instead of failing to make the volume private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_on_a_group_owned_volume_works_for_a_non_root_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("SKIPPED: needs to start acme-sds as another user");
        return;
    }
    let (uid, gid) = (65534, 65534);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The volume: root:GID, 2775.
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    nix::unistd::chown(&volume, Some(0.into()), Some(gid.into())).unwrap();
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o2775)).unwrap();
    // The socket's directory is the user's (a runtime directory).
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, Some(uid.into()), Some(gid.into())).unwrap();
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n[storage]\npath = \"{}\"\n[http01]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\n[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n",
            run.join("sds.sock").display(),
            volume.display(),
            free_port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let p = Process::spawn_as(
        uid,
        gid,
        &["run", "--config", config.to_str().unwrap()],
        &[],
    );
    p.wait_for_line("acme-sds started");
    assert!(p.log().contains("private subdirectory"), "{}", p.log());
    let private = volume.join("acme-sds");
    let meta = std::fs::metadata(&private).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (uid, 0o700)
    );
    assert!(private.join(".lock").exists());
    // It serves (the temporary certificate, the CA being unreachable), and status finds the same store.
    let mut client = uds_client(&run.join("sds.sock")).await;
    assert!(is_temporary(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0]
    )));
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("site"),
        "{out:?}"
    );
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
