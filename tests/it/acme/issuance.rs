//! Issuance over HTTP-01 served by SDS: key types, renewal, restarts, live config edits, the responder,
//! EAB, and no key material in the logs.

use std::os::unix::fs::PermissionsExt;

use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

use super::*;

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
