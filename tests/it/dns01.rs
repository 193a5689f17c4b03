//! DNS-01 over RFC 2136 against a real BIND: a wildcard and its apex issued in one order with Pebble looking the
//! records up in BIND, another tool's record under the same name untouched, nothing of ours left behind, and
//! every way the server can say no reported with the zone and the server's answer; the same against Knot DNS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use acme_sds::config::Dns01Config;
use acme_sds::metrics::Metrics;
use acme_sds::sources::acme::dns01::{Dns01, DnsError, TxtRecord};
use acme_sds::values::{DnsName, ServerAddr};
use testkit::bind::{Bind, key_file_text, tsig_secret};
use testkit::knot::Knot;
use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

fn dns01(server: SocketAddr, key_file: &Path) -> Dns01 {
    Dns01::new(
        Dns01Config {
            server: ServerAddr::new(&server.to_string(), 53).unwrap(),
            tsig_key_file: key_file.to_owned(),
            zone: None,
            propagation_timeout: Duration::from_secs(10),
            check_nameservers: Vec::new(),
        },
        Metrics::default(),
    )
}

/// A Pebble that looks DNS-01 records up at `dns` and reuses no authorization (nothing answers HTTP-01: only
/// DNS-01 can pass), with `tune` applied to its options.
fn pebble_asking(
    dir: &Path,
    dns: SocketAddr,
    tune: impl FnOnce(&mut PebbleOptions),
) -> Option<Pebble> {
    let mut opts = PebbleOptions::new(free_port());
    opts.dns_server = Some(dns);
    opts.authz_reuse = 0;
    tune(&mut opts);
    Pebble::start(&dir.join("pebble"), opts)
}

/// Runs acme-sds with `config` (written to `DIR/acme-sds.toml`; its SDS socket `DIR/sds.sock`) until the
/// secret `wild` is issued: the daemon and the chain.
async fn run_until_issued(dir: &Path, config: &str) -> (Process, Vec<Vec<u8>>) {
    let path = dir.join("acme-sds.toml");
    std::fs::write(&path, config).unwrap();
    let daemon = Process::spawn(&["run", "--config", path.to_str().unwrap()], &[]);
    daemon.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.join("sds.sock")).await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["wild"])).await;
    let r = s.recv_issued(Duration::from_secs(60)).await;
    (daemon, chain_ders(&decode_secret(&r.resources[0])))
}

/// Key files every server refuses, with its answer: the right name with another secret, an unknown name.
fn refused_keys(dir: &Path) -> Vec<(PathBuf, &'static str)> {
    let wrong_secret = dir.join("wrong.key");
    write_private(
        &wrong_secret,
        key_file_text("acme-sds", "hmac-sha256", &tsig_secret(32)),
    );
    let unknown = dir.join("unknown.key");
    write_private(
        &unknown,
        key_file_text("nobody", "hmac-sha512", &tsig_secret(64)),
    );
    vec![
        (wrong_secret, "NOTAUTH (BADSIG)"),
        (unknown, "NOTAUTH (BADKEY)"),
    ]
}

/// Adding `record` at `server` signed with `key` is refused, and the error names the zone and `answer`.
async fn assert_refused(
    server: SocketAddr,
    key: &Path,
    record: &TxtRecord,
    answer: &str,
    server_log: impl Fn() -> String,
) {
    let e = dns01(server, key).add(record).await.expect_err("refused");
    let text = e.to_string();
    assert!(
        matches!(e, DnsError::Refused { .. })
            && text.contains("zone example.test")
            && text.contains(answer),
        "{answer}: {text}\n{}",
        server_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_and_its_apex_are_issued_in_one_order_and_no_record_is_left() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bind) = Bind::start(&dir.path().join("bind"), "example.test") else {
        return;
    };
    // Another tool's value under the name acme-sds writes to: it must survive.
    bind.nsupdate_add("_acme-challenge.example.test", "someone-else");
    let Some(pebble) = pebble_asking(dir.path(), bind.addr, |_| {}) else {
        return;
    };
    // First with a key the server does not have: the failure names the zone and the server's answer.
    let key = dir.path().join("acme-sds.key");
    write_private(
        &key,
        key_file_text(&bind.key_name, "hmac-sha256", &tsig_secret(32)),
    );
    let socket = dir.path().join("sds.sock");
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{}\"\n\n[admin]\nlisten = \"{admin}\"\n\n[dns01]\nserver = \"{}\"\ntsig_key_file = \"{}\"\npropagation_timeout = \"20s\"\n\n{}[[certificate]]\nname = \"wild\"\ndomains = [\"*.example.test\", \"example.test\"]\nchallenge = \"dns-01\"\n",
            socket.display(),
            dir.path().join("data").display(),
            free_port(),
            bind.addr,
            key.display(),
            pebble.acme_table()
        ),
    )
    .unwrap();
    let daemon = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let refused = daemon.wait_for_line_within("refused the update", Duration::from_secs(30));
    assert!(
        refused.contains("zone example.test") && refused.contains("NOTAUTH (BADSIG)"),
        "{refused}"
    );
    let key_text = std::fs::read_to_string(&key).unwrap();
    let secret = key_text.split('"').nth(3).unwrap();
    assert!(
        !daemon.log().contains(secret),
        "the TSIG secret is never logged"
    );

    // The right key, put in place without a restart: the next attempt uses it.
    std::fs::copy(&bind.key_file, &key).unwrap();
    let mut client = uds_client(&socket).await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["wild"])).await;
    let r = s.recv_issued(Duration::from_secs(60)).await;
    let chain = chain_ders(&decode_secret(&r.resources[0]));
    let root = pebble.root_der().await;
    for name in ["example.test", "www.example.test", "api.example.test"] {
        verify_chain(&chain, &root, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(verify_chain(&chain, &root, "a.b.example.test").is_err());
    // A real Envoy with the bootstrap acme-sds generates serves it for any name under the wildcard.
    let Some(envoy_bin) = testkit::envoy::envoy_bin() else {
        return;
    };
    let https = free_port();
    let bootstrap = testkit::envoy::https_only_bootstrap(&config, https);
    assert!(
        bootstrap.contains("server_names: [\"*.example.test\", \"example.test\"]"),
        "{bootstrap}"
    );
    let envoy = testkit::envoy::Envoy::start(&envoy_bin, &bootstrap, dir.path());
    for sni in ["shop.example.test", "example.test"] {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            match testkit::envoy::presented_chain(https, Some(sni)).await {
                Ok(c) if verify_chain(&c, &root, sni).is_ok() => break,
                other => assert!(
                    std::time::Instant::now() < deadline,
                    "{sni}: {:?}\n{}",
                    other.err(),
                    envoy.log_text()
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    drop(envoy);
    let log = daemon.log();
    assert_eq!(
        log.matches("order created").count(),
        1,
        "one order for both names:\n{log}"
    );
    assert_eq!(log.matches("DNS-01 record added").count(), 2, "{log}");

    // Both of our values deleted once the order ended; the other tool's stays.
    daemon.wait_for_log("both records removed", Duration::from_secs(15), |l| {
        l.matches("DNS-01 record removed").count() >= 2
    });
    assert_eq!(
        bind.txt("_acme-challenge.example.test"),
        ["someone-else"],
        "{}",
        bind.log()
    );
    // What happened is in the status and the metrics too.
    let status = http_get(admin, "/status");
    assert!(status.contains("\"challenge\":\"dns-01\""), "{status}");
    let metrics = http_get(admin, "/metrics");
    for series in [
        "acme_sds_dns01_updates_total{action=\"add\",result=\"refused\"}",
        "acme_sds_dns01_updates_total{action=\"add\",result=\"ok\"} 2",
        "acme_sds_dns01_updates_total{action=\"remove\",result=\"ok\"} 2",
    ] {
        assert!(metrics.contains(series), "{series} in\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_append_delete_by_value_and_refusals_name_the_zone_and_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bind) = Bind::start(&dir.path().join("bind"), "example.test") else {
        return;
    };
    let dns = dns01(bind.addr, &bind.key_file);
    // Two values under one name (an apex and its wildcard), found in the zone by its SOA.
    let add = async |domain: &str, value: &str| {
        let r = dns.record_for(domain, value).await?;
        dns.add(&r).await.map(|_| r)
    };
    let apex = add("example.test", "value-apex")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bind.log()));
    let wild = add("*.example.test", "value-wild").await.unwrap();
    assert_eq!(apex.zone, "example.test.");
    assert_eq!(wild.name, "_acme-challenge.example.test.");
    dns.wait_served(&[apex.clone(), wild.clone()])
        .await
        .unwrap();
    let mut both = bind.txt("_acme-challenge.example.test");
    both.sort();
    assert_eq!(both, ["value-apex", "value-wild"]);
    dns.remove(&apex).await.unwrap();
    assert_eq!(bind.txt("_acme-challenge.example.test"), ["value-wild"]);
    dns.remove(&wild).await.unwrap();
    assert!(bind.txt("_acme-challenge.example.test").is_empty());
    // Deeper names find the same zone.
    let deep = add("a.b.example.test", "deep").await.unwrap();
    assert_eq!(deep.zone, "example.test.");
    dns.remove(&deep).await.unwrap();

    // Every algorithm a BIND key may have here: hmac-sha384 and hmac-sha512 sign updates too.
    for key in [&bind.sha384_key_file, &bind.sha512_key_file] {
        let other = dns01(bind.addr, key);
        other
            .add(&apex)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        other.remove(&apex).await.unwrap();
    }
    assert!(bind.txt("_acme-challenge.example.test").is_empty());

    // Each refusal says which zone, and the server's answer in its own words.
    let mut refused = refused_keys(dir.path());
    refused.push((bind.readonly_key_file.clone(), "REFUSED"));
    for (key, answer) in refused {
        assert_refused(bind.addr, &key, &apex, answer, || bind.log()).await;
    }
    assert!(bind.txt("_acme-challenge.example.test").is_empty());

    // A name the server has no zone for, and a value that never appears, are errors too, not hangs.
    let e = add("example.org", "x").await.unwrap_err();
    assert!(matches!(e, DnsError::NoZone { .. }), "{e:?}");
    let mut fixed_zone = Dns01Config {
        server: ServerAddr::new(&bind.addr.to_string(), 53).unwrap(),
        tsig_key_file: bind.key_file.clone(),
        zone: Some(DnsName::new("example.test").unwrap()),
        propagation_timeout: Duration::from_millis(300),
        check_nameservers: Vec::new(),
    };
    // The error says what the server last answered: where to look next.
    let never = |zone: &str| TxtRecord {
        zone: format!("{zone}."),
        name: format!("_acme-challenge.{zone}."),
        value: "never-added".into(),
    };
    let not_served = async |record: TxtRecord| {
        let e = Dns01::new(fixed_zone.clone(), Metrics::default())
            .wait_served(&[record])
            .await
            .unwrap_err();
        assert!(matches!(e, DnsError::NotServed { .. }), "{e:?}");
        e.to_string()
    };
    let e = not_served(never("example.test")).await;
    assert!(e.ends_with("last answer: no TXT record there"), "{e}");
    bind.nsupdate_add("_acme-challenge.example.test", "someone-else");
    let e = not_served(never("example.test")).await;
    assert!(
        e.ends_with("last answer: 1 other value(s), not this one"),
        "{e}"
    );
    let e = not_served(never("example.org")).await;
    assert!(
        e.ends_with("last answer: REFUSED (not serving the zone?)"),
        "{e}"
    );
    fixed_zone.zone = Some(DnsName::new("example.org").unwrap());
    let e = Dns01::new(fixed_zone, Metrics::default())
        .record_for("example.test", "x")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not in dns01.zone"), "{e}");
}

/// The config of a daemon that validates `*.example.test` and `example.test` over DNS-01 at `server` with
/// `key_file`, with `extra` lines in `[dns01]`.
fn dns01_config(
    dir: &Path,
    server: SocketAddr,
    key_file: &Path,
    pebble: &Pebble,
    extra: &str,
) -> String {
    format!(
        "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{}\"\n\n[dns01]\nserver = \"{}\"\ntsig_key_file = \"{}\"\n{extra}\n\n{}[[certificate]]\nname = \"wild\"\ndomains = [\"*.example.test\", \"example.test\"]\nchallenge = \"dns-01\"\n",
        dir.join("sds.sock").display(),
        dir.join("data").display(),
        free_port(),
        server,
        key_file.display(),
        pebble.acme_table()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_deleted_when_the_order_fails_and_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bind) = Bind::start(&dir.path().join("bind"), "example.test") else {
        return;
    };
    let Some(pebble) = pebble_asking(dir.path(), bind.addr, |_| {}) else {
        return;
    };
    let name = "_acme-challenge.example.test";
    // A secondary that never answers: the records are added, never confirmed, and the attempt fails.
    let silent = free_port();
    let silent_secondary = |timeout: &str| {
        dns01_config(
            dir.path(),
            bind.addr,
            &bind.key_file,
            &pebble,
            &format!(
                "propagation_timeout = \"{timeout}\"\ncheck_nameservers = [\"127.0.0.1:{silent}\"]"
            ),
        )
    };
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(&config, silent_secondary("1s")).unwrap();
    let mut daemon = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let failed = daemon.wait_for_line_within("certificate order failed", Duration::from_secs(30));
    assert!(
        failed.contains(&format!(
            "127.0.0.1:{silent} did not serve the TXT value within 1s (dns01.propagation_timeout); last answer: name server 127.0.0.1:{silent}: "
        )),
        "{failed}"
    );
    daemon.wait_for_log("both records removed", WAIT, |l| {
        l.matches("DNS-01 record removed").count() >= 2
    });
    assert!(bind.txt(name).is_empty(), "{}", bind.log());

    // Killed while waiting for the records to be served: they are in the zone, and the store lists them.
    daemon.signal("KILL");
    daemon.wait_exit();
    std::fs::write(&config, silent_secondary("60s")).unwrap();
    let mut daemon = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    daemon.wait_for_log("both records added", Duration::from_secs(30), |l| {
        l.matches("DNS-01 record added").count() >= 2
    });
    daemon.signal("KILL");
    daemon.wait_exit();
    assert_eq!(bind.txt(name).len(), 2, "left by the crash");

    // The next start (any replica) deletes them before it orders again; the certificate is then issued and
    // nothing is left.
    let config = dns01_config(dir.path(), bind.addr, &bind.key_file, &pebble, "");
    let (daemon, _) = run_until_issued(dir.path(), &config).await;
    daemon.wait_for_log("the records removed", WAIT, |l| {
        l.matches("DNS-01 record removed").count() >= 4
    });
    assert!(bind.txt(name).is_empty(), "{}", daemon.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_go_to_the_zone_that_holds_the_name_and_follow_a_cname() {
    let dir = tempfile::tempdir().unwrap();
    // A child zone on the same primary, and `_acme-challenge.delegated` handed to a third zone by CNAME.
    let Some(bind) = Bind::start_zones(
        &dir.path().join("bind"),
        "example.test",
        &["sub.example.test", "acme-delegation.test"],
        "_acme-challenge.delegated IN CNAME delegated.acme-delegation.test.\n",
    ) else {
        return;
    };
    let dns = dns01(bind.addr, &bind.key_file);
    let child = dns
        .record_for("*.www.sub.example.test", "in-child")
        .await
        .unwrap();
    assert_eq!(
        (child.zone.as_str(), child.name.as_str()),
        ("sub.example.test.", "_acme-challenge.www.sub.example.test.")
    );
    let delegated = dns
        .record_for("delegated.example.test", "delegated-value")
        .await
        .unwrap();
    assert_eq!(
        (delegated.zone.as_str(), delegated.name.as_str()),
        ("acme-delegation.test.", "delegated.acme-delegation.test.")
    );
    for r in [&child, &delegated] {
        dns.add(r).await.unwrap();
    }
    dns.wait_served(&[child.clone(), delegated.clone()])
        .await
        .unwrap();
    assert_eq!(
        bind.txt("_acme-challenge.www.sub.example.test"),
        ["in-child"]
    );
    assert_eq!(
        bind.txt("delegated.acme-delegation.test"),
        ["delegated-value"]
    );
    for r in [&child, &delegated] {
        dns.remove(r).await.unwrap();
    }
    assert!(bind.txt("delegated.acme-delegation.test").is_empty());
    assert!(bind.txt("_acme-challenge.www.sub.example.test").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_dns01_order_is_taken_over_and_its_records_deleted_by_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let Some(etcd) = testkit::etcd::EtcdCluster::start(&dir.path().join("etcd"), 1) else {
        return;
    };
    let Some(bind) = Bind::start(&dir.path().join("bind"), "example.test") else {
        return;
    };
    let Some(pebble) = pebble_asking(dir.path(), bind.addr, |o| o.nonce_reject = 0) else {
        return;
    };
    let storage_key = dir.path().join("storage.key");
    write_private(
        &storage_key,
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n",
    );
    // Two replicas on one etcd prefix. A waits for a secondary that never answers, so it is still in the
    // order, its records in the zone, when it is killed.
    let replica = |name: &str, dns01_extra: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let config = d.join("acme-sds.toml");
        std::fs::write(
            &config,
            format!(
                "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\nencryption_key_file = \"{}\"\n\n[storage.etcd]\nendpoints = {}\nlock_ttl = \"2s\"\n\n[http01]\nlisten = \"127.0.0.1:0\"\n\n[dns01]\nserver = \"{}\"\ntsig_key_file = \"{}\"\n{dns01_extra}\n\n{}[[certificate]]\nname = \"wild\"\ndomains = [\"*.example.test\", \"example.test\"]\nchallenge = \"dns-01\"\n",
                d.join("sds.sock").display(),
                storage_key.display(),
                etcd.endpoints_toml(),
                bind.addr,
                bind.key_file.display(),
                pebble.acme_table()
            ),
        )
        .unwrap();
        (d, config)
    };
    let silent = free_port();
    let (_, a_config) = replica(
        "a",
        &format!("propagation_timeout = \"60s\"\ncheck_nameservers = [\"127.0.0.1:{silent}\"]"),
    );
    let mut a = Process::spawn(&["run", "--config", a_config.to_str().unwrap()], &[]);
    a.wait_for_log("both records added", Duration::from_secs(30), |l| {
        l.matches("DNS-01 record added").count() >= 2
    });
    a.signal("KILL");
    a.wait_exit();
    let name = "_acme-challenge.example.test";
    assert_eq!(bind.txt(name).len(), 2, "left by the killed replica");

    // B takes the certificate's lock once A's lease runs out, deletes what A listed in etcd, resumes A's
    // order (no second order), and leaves nothing in the zone.
    let (b_dir, b_config) = replica("b", "");
    let b = Process::spawn(&["run", "--config", b_config.to_str().unwrap()], &[]);
    b.wait_for_line("acme-sds started");
    let mut client = uds_client(&b_dir.join("sds.sock")).await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["wild"])).await;
    let r = s.recv_issued(Duration::from_secs(60)).await;
    let chain = chain_ders(&decode_secret(&r.resources[0]));
    verify_chain(&chain, &pebble.root_der().await, "www.example.test").unwrap();
    b.wait_for_log("A's records and its own removed", WAIT, |l| {
        l.matches("DNS-01 record removed").count() >= 4
    });
    let log = b.log();
    assert!(log.contains("resuming the order in progress"), "{log}");
    assert!(!log.contains("order created"), "one order only:\n{log}");
    assert!(bind.txt(name).is_empty(), "{log}");
    // Nothing of the order is left in etcd either.
    let out = etcd.etcdctl(&["get", "--prefix", "--keys-only", "/acme-sds/"]);
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("/certs/wild"), "{listed}");
    assert!(!listed.contains("dns-01"), "{listed}");
}

/// Knot DNS, a second RFC 2136 implementation (not BIND's code): its refusals are named in its words, and a
/// wildcard and its apex are issued in one order with Pebble reading the records from Knot, nothing left after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn knot_dns_takes_the_updates_and_its_refusals_are_named_too() {
    let dir = tempfile::tempdir().unwrap();
    let Some(knot) = Knot::start(&dir.path().join("knot"), "example.test") else {
        return;
    };
    let dns = dns01(knot.addr, &knot.key_file);
    let record = dns
        .record_for("example.test", "probe")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", knot.log()));
    assert_eq!(record.zone, "example.test.");
    for (key, answer) in refused_keys(dir.path()) {
        assert_refused(knot.addr, &key, &record, answer, || knot.log()).await;
    }

    let Some(pebble) = pebble_asking(dir.path(), knot.addr, |_| {}) else {
        return;
    };
    let config = dns01_config(dir.path(), knot.addr, &knot.key_file, &pebble, "");
    let (daemon, chain) = run_until_issued(dir.path(), &config).await;
    let root = pebble.root_der().await;
    for name in ["example.test", "www.example.test"] {
        verify_chain(&chain, &root, name).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    daemon.wait_for_log("both records removed", WAIT, |l| {
        l.matches("DNS-01 record removed").count() >= 2
    });
    assert!(
        knot.txt("_acme-challenge.example.test").is_empty(),
        "{}",
        knot.log()
    );
}

/// A DNSSEC-signed zone (BIND signing it inline, as production zones often are): the updates go in, the values
/// are served signed before the CA would be asked, and they go away again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inline_signed_zone_takes_the_updates_and_serves_them_signed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bind) = Bind::start_signed(&dir.path().join("bind"), "example.test") else {
        return;
    };
    let dns = dns01(bind.addr, &bind.key_file);
    let mut records = Vec::new();
    for (domain, value) in [
        ("example.test", "value-apex"),
        ("*.example.test", "value-wild"),
    ] {
        let r = dns.record_for(domain, value).await.unwrap();
        dns.add(&r)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", bind.log()));
        records.push(r);
    }
    dns.wait_served(&records)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", bind.log()));
    let answer = bind.dig(&["+dnssec", "_acme-challenge.example.test", "TXT"]);
    assert!(
        answer.contains("\"value-apex\"")
            && answer.contains("\"value-wild\"")
            && answer.lines().any(|l| l.starts_with("TXT ")),
        "both values and an RRSIG over them:\n{answer}"
    );
    for r in &records {
        dns.remove(r).await.unwrap();
    }
    // named answers the update once the unsigned zone has it; the signed zone follows a moment later.
    let deadline = std::time::Instant::now() + WAIT;
    while !bind.txt("_acme-challenge.example.test").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "still served:\n{}",
            bind.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A reload does not skip a backoff. A DNS-01 certificate failing on a wrong TSIG secret (its order kept,
/// to be resumed) waits for its next attempt, a minute away, through five reloads that each add another
/// ACME certificate: its task, schedule and backoff go on unchanged, and its order is not resumed early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_keep_a_failing_certificates_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let Some(bind) = Bind::start(&dir.path().join("bind"), "example.test") else {
        return;
    };
    let Some(pebble) = pebble_asking(dir.path(), bind.addr, |_| {}) else {
        return;
    };
    let (wrong_key, _) = refused_keys(dir.path()).remove(0);
    let base = dns01_config(dir.path(), bind.addr, &wrong_key, &pebble, "")
        .replace("retry_initial = \"1s\"", "retry_initial = \"1m\"")
        .replace("retry_max = \"4s\"", "retry_max = \"5m\"");
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(&config, &base).unwrap();
    let daemon = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    daemon.wait_for_line_within("certificate order failed", Duration::from_secs(30));
    let failures = |log: &str| {
        log.lines()
            .filter(|l| l.contains("certificate order failed") && l.contains("secret=wild"))
            .count()
    };
    let mut text = base.clone();
    for i in 1..=5 {
        text.push_str(&format!(
            "\n[[certificate]]\nname = \"other{i}\"\ndomains = [\"other{i}.example.test\"]\n"
        ));
        std::fs::write(&config, &text).unwrap();
        let applied = format!("secrets={}", 1 + i);
        daemon.wait_for_log("the reload", Duration::from_secs(30), |log| {
            log.lines()
                .any(|l| l.contains("configuration reloaded") && l.contains(&applied))
        });
    }
    let log = daemon.log();
    assert_eq!(failures(&log), 1, "one attempt only:\n{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains("resuming the order in progress") && l.contains("secret=wild")),
        "{log}"
    );
}
