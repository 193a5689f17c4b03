//! Live reload: SIGHUP or an edited config file applies a new configuration without dropping streams.

use testkit::*;
use tonic::Code;

struct Setup {
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
    pki: Pki,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    pki.leaf(&["www.example.com"]).write(dir.path(), "web");
    pki.leaf(&["api.example.com"]).write(dir.path(), "api");
    let config = dir.path().join("acme-sds.toml");
    Setup { dir, config, pki }
}

impl Setup {
    fn write(&self, names: &[&str], extra: &str) {
        let mut text = format!(
            "[sds]\nlisten = [\"unix:{}\"]\n{extra}\n",
            self.dir.path().join("sds.sock").display()
        );
        for n in names {
            let d = self.dir.path();
            text.push_str(&cert_table(
                n,
                &d.join(format!("{n}.crt")),
                &d.join(format!("{n}.key")),
            ));
        }
        // Write whole, as an editor's save does.
        replace_by_rename(&self.config, text.as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_and_removes_secrets_without_dropping_streams() {
    let s = setup();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("acme_sds=debug")
        .with_test_writer()
        .try_init();
    s.write(&["web"], "");
    let cfg = acme_sds::config::load(&s.config).unwrap();
    let mut running = acme_sds::daemon::start(&cfg).await.unwrap();
    let socket = s.dir.path().join("sds.sock");
    let mut client = uds_client(&socket).await;
    let (mut web, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    web.send(ack(&["web"], &r1)).await;
    let mut api = SotwStream::open(&mut client).await;
    api.send(subscribe(&["api", "web"])).await;
    let first = api.recv().await;
    assert_eq!(first.resources.len(), 1, "api is not configured yet");
    api.send(ack(&["api", "web"], &first)).await;

    // Add api, remove web.
    s.write(&["api"], "");
    running.reload(&s.config).await.unwrap();
    eprintln!(
        "DEBUG api={:?} subs={}",
        running
            .registry()
            .get("api")
            .map(|v| v.version().to_owned()),
        running.registry().subscribers("api")
    );
    let r = api.recv().await;
    let names: Vec<_> = r.resources.iter().map(|a| decode_secret(a).name).collect();
    assert_eq!(
        names,
        ["api", "web"],
        "api arrives; web, already delivered, is not yanked"
    );
    let err = client.fetch_secrets(subscribe(&["web"])).await.unwrap_err();
    assert_eq!(
        err.code(),
        Code::NotFound,
        "web is no longer offered to new requests"
    );

    // A broken config is rejected as a whole; the running one stays.
    s.write(&["api"], "nonsense_key = 1");
    let err = running.reload(&s.config).await.unwrap_err();
    assert!(format!("{err:#}").contains("nonsense_key"), "{err:#}");
    assert_eq!(fetch(&mut client, &["api"]).await.resources.len(), 1);

    // web comes back: offered again, and its stream is still open to hear about rotations.
    s.write(&["api", "web"], "");
    running.reload(&s.config).await.unwrap();
    assert_eq!(fetch(&mut client, &["web"]).await.resources.len(), 1);
    let newer = s.pki.leaf(&["www.example.com"]);
    newer.write(s.dir.path(), "web");
    let r = web.recv().await;
    assert_eq!(leaf_der(&decode_secret(&r.resources[0])), newer.leaf_der);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_file_edits_reload_the_running_daemon() {
    let s = setup();
    s.write(&["web"], "");
    let p = Process::spawn(&["run", "--config", s.config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&s.dir.path().join("sds.sock")).await;
    let mut api = SotwStream::open(&mut client).await;
    api.send(subscribe(&["api"])).await;

    // An edit of the file alone is enough.
    s.write(&["web", "api"], "");
    let line = p.wait_for_line("configuration reloaded");
    assert!(line.contains("api"), "{line}");
    assert_eq!(decode_secret(&api.recv().await.resources[0]).name, "api");

    // SIGHUP reloads too; a rejected config says why and changes nothing.
    std::fs::write(&s.config, "[sds]\nlisten = [\"nowhere\"]\n").unwrap();
    p.wait_for_line("reload rejected");
    assert_eq!(fetch(&mut client, &["web", "api"]).await.resources.len(), 2);
    s.write(&["web"], "");
    p.wait_for_line("configuration reloaded");
    p.signal("HUP");
    p.wait_for_line("SIGHUP: reloading");
    assert!(p.log().lines().all(|l| !l.contains("panicked")));
}

/// The internal CA by live reload: an added certificate is issued and pushed to a stream already waiting
/// for it, a change of its names pushes a new certificate from the same root, and stopping and starting
/// again serves the stored one rather than a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_certificates_follow_live_reload_and_survive_a_restart() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let s = setup();
    let internal = |domains: &str| {
        format!("[[certificate]]\nname = \"dev\"\nissuer = \"internal\"\ndomains = [{domains}]\n")
    };
    s.write(&["web"], "");
    let cfg = acme_sds::config::load(&s.config).unwrap();
    let mut running = acme_sds::daemon::start(&cfg).await.unwrap();
    let mut client = uds_client(&s.dir.path().join("sds.sock")).await;
    let mut dev = SotwStream::open(&mut client).await;
    // Not configured yet: SotW answers when it exists.
    dev.send(subscribe(&["dev"])).await;

    s.write(&["web"], &internal("\"localhost\""));
    running.reload(&s.config).await.unwrap();
    let r = dev.recv().await;
    dev.send(ack(&["dev"], &r)).await;
    let one = leaf_der(&decode_secret(&r.resources[0]));
    let root = running.internal_root().expect("the root file exists");
    let root_pem = std::fs::read(&root).unwrap();
    let names = |der: &[u8]| {
        let (_, c) = X509Certificate::from_der(der).unwrap();
        let san = c.subject_alternative_name().unwrap().unwrap().value;
        san.general_names
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&one), ["DNSName(localhost)"]);

    s.write(&["web"], &internal("\"localhost\", \"10.1.2.3\""));
    running.reload(&s.config).await.unwrap();
    let two = leaf_der(&decode_secret(&dev.recv().await.resources[0]));
    assert_ne!(one, two);
    assert_eq!(
        names(&two),
        ["DNSName(localhost)", "IPAddress(0a:01:02:03)"]
    );
    assert_eq!(std::fs::read(&root).unwrap(), root_pem, "same CA");
    running.shutdown().await.unwrap();

    let cfg = acme_sds::config::load(&s.config).unwrap();
    let running = acme_sds::daemon::start(&cfg).await.unwrap();
    let mut client = uds_client(&s.dir.path().join("sds.sock")).await;
    let again = leaf_der(&decode_secret(
        &fetch(&mut client, &["dev"]).await.resources[0],
    ));
    assert_eq!(
        again, two,
        "the stored certificate is served after a restart"
    );
    running.shutdown().await.unwrap();
}

/// The run loop, driven in process as `main.rs` drives it with signals: a reload event applies the file
/// (here an edit the file watcher cannot tell from no edit: same inode, size and modification time, so only
/// the event reloads), and a shutdown event drains and returns, removing the socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_loop_reloads_on_an_event_and_stops_on_shutdown() {
    use acme_sds::daemon::Event;
    let s = setup();
    s.write(&["web"], "");
    let cfg = acme_sds::config::load(&s.config).unwrap();
    let running = acme_sds::daemon::start(&cfg).await.unwrap();
    let registry = running.registry().clone();
    let socket = s.dir.path().join("sds.sock");
    let (events, rx) = tokio::sync::mpsc::channel(1);
    let run = tokio::spawn(running.run_until_stopped(rx));
    let mut client = uds_client(&socket).await;
    let mut api = SotwStream::open(&mut client).await;
    // Not configured yet: SotW answers when it exists.
    api.send(subscribe(&["api"])).await;

    // "web" and "api" are names of one length: the rewritten file keeps its size.
    let modified = std::fs::metadata(&s.config).unwrap().modified().unwrap();
    let text = std::fs::read_to_string(&s.config)
        .unwrap()
        .replace("\"web\"", "\"api\"")
        .replace("web.crt", "api.crt")
        .replace("web.key", "api.key");
    rewrite_in_place(&s.config, text.as_bytes());
    std::fs::File::options()
        .write(true)
        .open(&s.config)
        .unwrap()
        .set_modified(modified)
        .unwrap();
    assert!(registry.get("api").is_none());
    events.send(Event::Reload("test")).await.unwrap();
    let served = api.recv().await;
    assert_eq!(decode_secret(&served.resources[0]).name, "api");
    drop(api);

    events.send(Event::Shutdown("test")).await.unwrap();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("the run loop returns after a shutdown event")
        .unwrap()
        .unwrap();
    assert!(!socket.exists(), "the socket is removed on the way out");
}

/// A reload that fails at any step changes nothing, whatever step fails: here the TLS-ALPN-01 responder's
/// address is taken, and then the TSIG key cannot be used. The reload is rejected naming the cause, the
/// HTTP-01 responder stays bound, and the running certificate's renewal (Pebble certificates of 8 s) still
/// comes and is pushed: the ACME manager was never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_reload_changes_nothing_and_renewals_go_on() {
    use testkit::pebble::{Pebble, PebbleOptions, free_port};
    let dir = tempfile::tempdir().unwrap();
    let port80 = free_port();
    let mut opts = PebbleOptions::new(port80);
    opts.validity_seconds = Some(8);
    opts.nonce_reject = 0;
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let config = dir.path().join("acme-sds.toml");
    let base = format!(
        "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{port80}\"\n\n{}[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n\n",
        dir.path().join("sds.sock").display(),
        dir.path().join("data").display(),
        pebble.acme_table()
    );
    std::fs::write(&config, &base).unwrap();
    let mut running = acme_sds::daemon::start(&acme_sds::config::load(&config).unwrap())
        .await
        .unwrap();
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["site"])).await;
    let first = s.recv_issued(std::time::Duration::from_secs(60)).await;
    s.send(ack(&["site"], &first)).await;
    let http01 = running.http01_addr().expect("HTTP-01 responder bound");

    // The TLS-ALPN-01 responder's address is in use.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let alpn = format!(
        "{base}[tls_alpn01]\nlisten = \"{taken_addr}\"\n\n[[certificate]]\nname = \"alpn\"\ndomains = [\"alpn.example.com\"]\nchallenge = \"tls-alpn-01\"\n"
    );
    std::fs::write(&config, alpn).unwrap();
    let err = running.reload(&config).await.unwrap_err();
    assert!(
        acme_sds::daemon::causes(&err)
            .contains(&format!("tls_alpn01.listen: cannot listen on {taken_addr}")),
        "{}",
        acme_sds::daemon::causes(&err)
    );
    // A TSIG key the daemon cannot use.
    let key = dir.path().join("tsig.key");
    write_private(
        &key,
        "key \"acme-sds\" {\n\talgorithm hmac-md5;\n\tsecret \"c2VjcmV0LXNlY3JldC1zZWNyZXQ=\";\n};\n",
    );
    let dns = format!(
        "{base}[dns01]\nserver = \"127.0.0.1:{}\"\ntsig_key_file = \"{}\"\n\n[[certificate]]\nname = \"wild\"\ndomains = [\"*.example.com\"]\nchallenge = \"dns-01\"\n",
        free_port(),
        key.display()
    );
    std::fs::write(&config, dns).unwrap();
    let err = running.reload(&config).await;
    assert!(err.is_err(), "a TSIG key with hmac-md5 is refused");
    assert!(
        acme_sds::daemon::causes(&err.unwrap_err()).contains("hmac-md5"),
        "the refusal names what is wrong"
    );

    // Nothing changed: the responder answers, and the renewal is pushed.
    assert_eq!(running.http01_addr(), Some(http01));
    let answer = http_get(http01, "/.well-known/acme-challenge/none");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let renewed = s.recv_issued(std::time::Duration::from_secs(60)).await;
    assert_ne!(
        leaf_der(&decode_secret(&renewed.resources[0])),
        leaf_der(&decode_secret(&first.resources[0])),
        "renewed after the failed reloads"
    );
    drop(taken);
    running.shutdown().await.unwrap();
}

/// The challenge responders follow the configuration: bound only while a certificate uses their
/// challenge (HTTP-01 also for on-demand TLS), moved when their address changes, stopped when nothing
/// uses them any more: all by reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn challenge_responders_follow_the_configuration() {
    use testkit::pebble::free_port;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("acme-sds.toml");
    let (p80, a1, a2) = (free_port(), free_port(), free_port());
    // The CA is never reached (nothing answers there): only the listeners matter here.
    let base = |alpn: u16, certs: &str| {
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{p80}\"\n\n[tls_alpn01]\nlisten = \"127.0.0.1:{alpn}\"\n\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\n\n[[certificate]]\nname = \"dev\"\nissuer = \"internal\"\ndomains = [\"localhost\"]\n\n{certs}",
            dir.path().join("sds.sock").display(),
            dir.path().join("data").display(),
            free_port()
        )
    };
    let alpn_cert = "[[certificate]]\nname = \"a\"\ndomains = [\"a.example.com\"]\nchallenge = \"tls-alpn-01\"\n\n";
    let http_cert = "[[certificate]]\nname = \"h\"\ndomains = [\"h.example.com\"]\n\n";
    let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();

    std::fs::write(&config, base(a1, "")).unwrap();
    let mut running = acme_sds::daemon::start(&acme_sds::config::load(&config).unwrap())
        .await
        .unwrap();
    assert_eq!(running.http01_addr(), None, "no certificate uses HTTP-01");
    assert!(!listening(p80));
    assert_eq!(running.tls_alpn01_addr(), None);

    std::fs::write(&config, base(a1, alpn_cert)).unwrap();
    running.reload(&config).await.unwrap();
    assert_eq!(running.tls_alpn01_addr().map(|a| a.port()), Some(a1));
    assert!(listening(a1));
    assert_eq!(running.http01_addr(), None, "TLS-ALPN-01 only");

    // Moved by a reload.
    std::fs::write(&config, base(a2, alpn_cert)).unwrap();
    running.reload(&config).await.unwrap();
    assert_eq!(running.tls_alpn01_addr().map(|a| a.port()), Some(a2));
    assert!(listening(a2));
    assert!(!listening(a1), "the old address is closed");

    std::fs::write(&config, base(a2, &format!("{alpn_cert}{http_cert}"))).unwrap();
    running.reload(&config).await.unwrap();
    assert_eq!(running.http01_addr().map(|a| a.port()), Some(p80));
    assert!(listening(p80));

    // Nothing uses them any more.
    std::fs::write(&config, base(a2, "")).unwrap();
    running.reload(&config).await.unwrap();
    assert_eq!(running.http01_addr(), None);
    assert_eq!(running.tls_alpn01_addr(), None);
    assert!(!listening(p80) && !listening(a2));
    running.shutdown().await.unwrap();
}
