//! Several replicas on one etcd prefix, end to end: a real three-member etcd cluster, real Pebble, and a
//! real Envoy in front of each replica. Pebble validates through Envoy A only, and Envoy A routes
//! `/.well-known/acme-challenge/` to replica B, never to A: whichever replica orders, B answers.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use acme_sds::store::Store;
use acme_sds::store::etcd::EtcdStore;
use testkit::envoy::{Envoy, edge_bootstrap, envoy_bin, https_get};
use testkit::etcd::EtcdCluster;
use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

/// Issuance, lock take-overs and pushes take seconds; generous bounds absorb a loaded CI machine.
const BOUND: Duration = Duration::from_secs(90);

/// How long Envoy holds each challenge request in the fault tests: the order is in progress that long.
const HOLD: Duration = Duration::from_secs(1);

/// One replica: its process, its own Envoy, and the addresses its listeners bound (port 0: no port is
/// picked ahead and raced for).
struct Replica {
    p: Process,
    envoy: Option<Envoy>,
    dir: PathBuf,
    admin: SocketAddr,
    http01: SocketAddr,
}

/// The world of a test: etcd, Pebble (validating through `port80`, Envoy A's), the key file.
struct World {
    dir: tempfile::TempDir,
    etcd: EtcdCluster,
    pebble: Pebble,
    port80: u16,
    key_file: PathBuf,
    envoy: PathBuf,
}

impl World {
    fn start() -> Option<World> {
        let dir = tempfile::tempdir().unwrap();
        let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3)?;
        let port80 = free_port();
        let mut opts = PebbleOptions::new(port80);
        // Every order validated afresh, no nonce noise: the orders counted are the orders placed.
        opts.authz_reuse = 0;
        opts.nonce_reject = 0;
        let pebble = Pebble::start(&dir.path().join("pebble"), opts)?;
        let envoy = envoy_bin()?;
        let key_file = dir.path().join("storage.key");
        testkit::write_private(
            &key_file,
            "# shared by every replica\nMDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n",
        );
        Some(World {
            dir,
            etcd,
            pebble,
            port80,
            key_file,
            envoy,
        })
    }

    /// A replica's configuration: the same certificates and etcd prefix for all, its own listeners.
    fn config(&self, name: &str, certs: &[(&str, &[&str])]) -> PathBuf {
        self.config_with(name, certs, "")
    }

    /// The same with `extra` tables (`[on_demand]`).
    fn config_with(&self, name: &str, certs: &[(&str, &[&str])], extra: &str) -> PathBuf {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\nencryption_key_file = \"{}\"\n\n[storage.etcd]\nendpoints = {}\nprefix = \"/acme-sds\"\nlock_ttl = \"2s\"\n\n[http01]\nlisten = \"127.0.0.1:0\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
            dir.join("sds.sock").display(),
            self.key_file.display(),
            self.etcd.endpoints_toml(),
            self.pebble.acme_table(),
        );
        for (secret, domains) in certs {
            let list: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
            text.push_str(&format!(
                "[[certificate]]\nname = \"{secret}\"\ndomains = [{}]\n\n",
                list.join(", ")
            ));
        }
        text.push_str(extra);
        let path = dir.join("acme-sds.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts a replica (without its Envoy: see [`World::edge`]), once its listeners are bound.
    fn replica(&self, name: &str, certs: &[(&str, &[&str])]) -> Replica {
        self.replica_with(name, certs, "")
    }

    /// The same with `extra` tables.
    fn replica_with(&self, name: &str, certs: &[(&str, &[&str])], extra: &str) -> Replica {
        let config = self.config_with(name, certs, extra);
        let dir = config.parent().unwrap().to_owned();
        let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
        p.wait_for_line("acme-sds started");
        Replica {
            http01: p.listen_addr("HTTP-01 responder"),
            admin: p.listen_addr("admin"),
            p,
            envoy: None,
            dir,
        }
    }

    /// Starts `r`'s Envoy for `certs`: HTTP-01 arriving on `port80` (any free port when `None`) goes to
    /// the responders at `challenge`, each request held `challenge_delay` first; returns when Envoy is live
    /// (serving the temporary certificates).
    fn edge(
        &self,
        r: &mut Replica,
        certs: &[(&str, &[&str])],
        port80: Option<u16>,
        challenge: &[SocketAddr],
        challenge_delay: Duration,
    ) {
        let secrets: Vec<&str> = certs.iter().map(|(n, _)| *n).collect();
        let challenge: Vec<String> = challenge.iter().map(ToString::to_string).collect();
        let bootstrap = edge_bootstrap(
            &r.dir.join("sds.sock"),
            &secrets,
            port80.unwrap_or(0),
            &challenge,
            challenge_delay,
        );
        let mut envoy = Envoy::start(&self.envoy, &bootstrap, &r.dir);
        envoy.wait_live();
        r.envoy = Some(envoy);
    }

    /// Holds the locks of `certs` (as a replica ordering them would), so that replicas started now order
    /// nothing until [`World::release`]: every Envoy is up by then, and the replicas race from there.
    async fn hold(&self, certs: &[(&str, &[&str])]) -> (EtcdStore, Vec<acme_sds::store::Lock>) {
        let raw = EtcdStore::connect(&self.etcd.endpoints(), "/acme-sds")
            .await
            .unwrap();
        let keys = acme_sds::sources::keys::AcmeKeys::for_directory(&self.pebble.directory);
        let mut held = Vec::new();
        for (name, _) in certs {
            held.push(
                raw.lock(
                    &keys.cert(&acme_sds::values::SecretId::named(*name)),
                    Duration::from_secs(60),
                )
                .await
                .unwrap(),
            );
        }
        (raw, held)
    }

    async fn release(&self, (raw, held): (EtcdStore, Vec<acme_sds::store::Lock>)) {
        for lock in held {
            raw.unlock(lock).await.unwrap();
        }
    }

    /// Replicas A and B of `certs`, started before either may order (then they race), each with its
    /// Envoy; Pebble validates through A's, which sends challenges to either replica (a dead or paused one
    /// is skipped, as behind a Service), each held `HOLD` first so that an order stays in progress a while.
    async fn pair(&self, certs: &[(&str, &[&str])]) -> (Replica, Replica) {
        let held = self.hold(certs).await;
        let mut a = self.replica("a", certs);
        let mut b = self.replica("b", certs);
        let both = [a.http01, b.http01];
        self.edge(&mut a, certs, Some(self.port80), &both, HOLD);
        self.edge(&mut b, certs, None, &both, HOLD);
        self.release(held).await;
        (a, b)
    }

    fn orders(&self) -> usize {
        self.pebble.log().matches("Added order").count()
    }
}

impl Replica {
    /// The leaf `secret`'s listener serves for `domain`, once it chains to Pebble's root.
    async fn issued_leaf(&mut self, secret: &str, domain: &str, root: &[u8]) -> Option<Vec<u8>> {
        let envoy = self.envoy.as_mut().expect("envoy started");
        let port = envoy.listener_port(&format!("https-{secret}"));
        let (leaf, _) = https_get(port, domain, root).await.ok()?;
        verify_chain(std::slice::from_ref(&leaf), root, domain).ok();
        Some(leaf)
    }

    /// Waits (bounded) until this replica's Envoy serves a certificate for `domain` from Pebble; its leaf.
    async fn wait_issued(&mut self, secret: &str, domain: &str, root: &[u8]) -> Vec<u8> {
        let deadline = Instant::now() + BOUND;
        loop {
            if let Some(leaf) = self.issued_leaf(secret, domain, root).await {
                return leaf;
            }
            assert!(
                Instant::now() < deadline,
                "{} never served an issued certificate for {secret}; log:\n{}",
                self.dir.display(),
                self.p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until this replica's Envoy serves `leaf` for `secret`.
    async fn wait_serves(&mut self, secret: &str, domain: &str, root: &[u8], leaf: &[u8]) {
        let deadline = Instant::now() + BOUND;
        while self.issued_leaf(secret, domain, root).await.as_deref() != Some(leaf) {
            assert!(
                Instant::now() < deadline,
                "{} never served the stored certificate of {secret}; log:\n{}",
                self.dir.display(),
                self.p.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until `/readyz` says `ready` (or not); its response.
    fn wait_ready(&self, ready: bool) -> String {
        let deadline = Instant::now() + BOUND;
        loop {
            let (now, body) = self.ready();
            if now == ready {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "/readyz never became {ready}: {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `/readyz`: (ready, body).
    fn ready(&self) -> (bool, String) {
        let body = http_get(self.admin, "/readyz");
        (body.starts_with("HTTP/1.1 200"), body)
    }
}

/// Waits (bounded) until one of `replicas` logs `needle`; its index.
fn first_to_log(replicas: &[&Replica], needle: &str) -> usize {
    let deadline = Instant::now() + BOUND;
    loop {
        for (i, r) in replicas.iter().enumerate() {
            if r.p.line_within(needle, Duration::from_millis(20)).is_some() {
                return i;
            }
        }
        assert!(Instant::now() < deadline, "nobody logged {needle:?}");
    }
}

/// The issuing root, once Pebble is up.
async fn root(w: &World) -> Vec<u8> {
    w.pebble.root_der().await
}

/// Two replicas asked for the same certificates at once: one order per certificate at Pebble, both
/// Envoys serve the same serial, and B (the only replica Pebble's validation reaches) answered every
/// challenge, including those of the orders A placed (A alone has `solo`, so A orders at least that one).
/// In etcd no private key is readable, and a sealed value moved to another certificate's key is refused,
/// not served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_order_each_certificate_once_and_answer_each_others_challenges() {
    let Some(w) = World::start() else { return };
    let shared: &[(&str, &[&str])] = &[
        ("one", &["one.example.com"]),
        ("two", &["two.example.com", "www.two.example.com"]),
    ];
    let mut certs = shared.to_vec();
    certs.push(("solo", &["solo.example.com"]));
    let certs = certs.as_slice();
    // Both replicas start before either may order; then they race.
    let held = w.hold(certs).await;
    let mut a = w.replica("a", certs);
    let mut b = w.replica("b", shared);
    let (a_http01, b_http01) = (a.http01, b.http01);
    w.edge(&mut a, certs, Some(w.port80), &[b_http01], Duration::ZERO);
    w.edge(&mut b, shared, None, &[a_http01], Duration::ZERO);
    w.release(held).await;
    let root = root(&w).await;

    for (secret, domains) in shared {
        let on_a = a.wait_issued(secret, domains[0], &root).await;
        b.wait_serves(secret, domains[0], &root, &on_a).await;
    }
    a.wait_issued("solo", "solo.example.com", &root).await;
    assert_eq!(
        w.orders(),
        certs.len(),
        "one order per certificate:\n{}",
        w.pebble.log()
    );
    let ordered_by_a = a.p.log().matches("order created").count();
    let ordered_by_b = b.p.log().matches("order created").count();
    assert_eq!(ordered_by_a + ordered_by_b, certs.len());
    eprintln!("orders placed: {ordered_by_a} by A, {ordered_by_b} by B");
    // Every challenge published, by either replica, was answered by B (the only one Pebble reaches).
    let token = |l: &str| {
        l.split("token=\"")
            .nth(1)
            .and_then(|t| t.split('"').next())
            .map(str::to_owned)
    };
    let published: std::collections::BTreeSet<String> = [&a, &b]
        .iter()
        .flat_map(|r| {
            r.p.log()
                .lines()
                .filter(|l| l.contains("challenge published"))
                .filter_map(token)
                .collect::<Vec<_>>()
        })
        .collect();
    let answered: std::collections::BTreeSet<String> =
        b.p.log()
            .lines()
            .filter(|l| l.contains("HTTP-01 challenge answered"))
            .filter_map(token)
            .collect();
    let domains: usize = certs.iter().map(|(_, d)| d.len()).sum();
    assert_eq!(published.len(), domains);
    assert_eq!(
        answered, published,
        "B answers every challenge, A's orders' too"
    );
    assert!(!a.p.log().contains("HTTP-01 challenge answered"));

    // etcd holds no private key in clear: not the account's, not a certificate's.
    let dump = w.etcd.etcdctl(&["get", "--prefix", "/acme-sds/"]);
    assert!(dump.status.success(), "{dump:?}");
    let text = String::from_utf8_lossy(&dump.stdout);
    assert!(text.contains("/certs/one"), "{text}");
    assert!(
        !text.contains("PRIVATE KEY"),
        "a private key in clear in etcd"
    );

    // One certificate's sealed value copied over another's: refused, never served.
    let raw = EtcdStore::connect(&w.etcd.endpoints(), "/acme-sds")
        .await
        .unwrap();
    let keys = raw.list("acme").await.unwrap();
    let key_of = |name: &str| {
        keys.iter()
            .find(|k| k.ends_with(&format!("/certs/{name}")))
            .unwrap()
            .clone()
    };
    let one = raw.get(&key_of("one")).await.unwrap().unwrap().value;
    let two_before = a
        .issued_leaf("two", "two.example.com", &root)
        .await
        .unwrap();
    raw.put(&key_of("two"), &one).await.unwrap();
    let config = w.config("c", certs);
    let mut c = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    assert_ne!(
        c.wait_exit(),
        Some(0),
        "a replica must not start on a swapped value"
    );
    assert!(
        c.log().contains(&key_of("two")) && c.log().contains("sealed"),
        "{}",
        c.log()
    );
    // The running replicas read it (the watch) and keep serving what they had.
    a.p.wait_for_line_within("cannot read the stored certificate", BOUND);
    assert_eq!(
        a.issued_leaf("two", "two.example.com", &root)
            .await
            .unwrap(),
        two_before
    );
}

/// The replica placing an order is killed with -9 mid-order: the other takes the certificate's lock once
/// its lease lapses, resumes the same order (one order at Pebble), and serves the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_order_is_taken_over_without_a_second_order() {
    let Some(w) = World::start() else { return };
    let certs: &[(&str, &[&str])] = &[("site", &["site.example.com"])];
    let (a, b) = w.pair(certs).await;
    let root = root(&w).await;
    // Whoever orders is killed as soon as the CA has the order.
    let orderer = first_to_log(&[&a, &b], "order created");
    let (mut victim, mut survivor) = if orderer == 0 { (a, b) } else { (b, a) };
    victim.p.child.kill().unwrap();
    victim.p.child.wait().unwrap();
    survivor
        .wait_issued("site", "site.example.com", &root)
        .await;
    assert_eq!(
        w.orders(),
        1,
        "the order is resumed, not placed again:\n{}",
        w.pebble.log()
    );
}

/// The replica placing an order is paused (SIGSTOP) past its lock's lease: the other takes the lock,
/// resumes the order and stores the certificate. Resumed (SIGCONT), the paused one's late writes are
/// refused, the stored certificate stays the other's, and the paused replica ends up serving it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_paused_past_its_lease_cannot_overwrite_what_the_next_holder_stored() {
    let Some(w) = World::start() else { return };
    let certs: &[(&str, &[&str])] = &[("site", &["site.example.com"])];
    let (a, b) = w.pair(certs).await;
    let root = root(&w).await;
    let orderer = first_to_log(&[&a, &b], "order created");
    let (mut paused, mut other) = if orderer == 0 { (a, b) } else { (b, a) };
    paused.p.signal("STOP");
    let leaf = other.wait_issued("site", "site.example.com", &root).await;
    paused.p.signal("CONT");
    paused
        .p
        .wait_for_line_within("is no longer held here", BOUND);
    // What etcd holds is the other replica's certificate, and the paused one serves it as well.
    let sealer = std::sync::Arc::new(acme_sds::store::sealed::Sealer::load(&w.key_file).unwrap());
    let store = acme_sds::store::sealed::SealedStore::new(
        std::sync::Arc::new(
            EtcdStore::connect(&w.etcd.endpoints(), "/acme-sds")
                .await
                .unwrap(),
        ),
        Some(sealer),
        acme_sds::sources::keys::holds_private_key,
    );
    let keys = acme_sds::sources::keys::AcmeKeys::for_directory(&w.pebble.directory);
    let stored = store
        .get(&keys.cert(&acme_sds::values::SecretId::named("site")))
        .await
        .unwrap()
        .unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&stored.value).unwrap();
    use rustls_pki_types::pem::PemObject;
    let stored_leaf = rustls_pki_types::CertificateDer::pem_slice_iter(
        stored["chain_pem"].as_str().unwrap().as_bytes(),
    )
    .next()
    .unwrap()
    .unwrap()
    .to_vec();
    assert_eq!(stored_leaf, leaf);
    paused
        .wait_serves("site", "site.example.com", &root, &leaf)
        .await;
    assert_eq!(w.orders(), 1, "{}", w.pebble.log());
}

/// The etcd leader is killed while an order is in progress: the order completes, one order, and the other
/// replica's Envoy gets the certificate (its watch resumed on another member). Then quorum is lost: both
/// replicas keep serving, say they are not ready and why, and are ready again by themselves once etcd is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_leader_lost_mid_order_loses_nothing_and_a_lost_quorum_is_reported_and_recovered() {
    let Some(mut w) = World::start() else { return };
    let certs: &[(&str, &[&str])] = &[("site", &["site.example.com"])];
    let (mut a, mut b) = w.pair(certs).await;
    let root = root(&w).await;
    first_to_log(&[&a, &b], "order created");
    let leader = w.etcd.leader().expect("a leader");
    w.etcd.kill(leader);
    let leaf = a.wait_issued("site", "site.example.com", &root).await;
    b.wait_serves("site", "site.example.com", &root, &leaf)
        .await;
    assert_eq!(w.orders(), 1, "{}", w.pebble.log());
    assert!(a.ready().0 && b.ready().0);

    // A second member lost: no quorum.
    let second = (0..3).find(|&i| i != leader).unwrap();
    w.etcd.kill(second);
    for r in [&a, &b] {
        let body = r.wait_ready(false);
        assert!(
            body.contains("503") && body.contains("storage unavailable"),
            "{body}"
        );
        let status = http_get(r.admin, "/status");
        assert!(status.contains("\"unavailable\":\"etcd watch"), "{status}");
        // `acme-sds status` (what a cron job runs) tells the same, and fails: asked of the running replica
        // (its configuration with the admin port it was given).
        let config = r.dir.join("status.toml");
        let text = std::fs::read_to_string(r.dir.join("acme-sds.toml"))
            .unwrap()
            .replace(
                "[admin]\nlisten = \"127.0.0.1:0\"",
                &format!("[admin]\nlisten = \"{}\"", r.admin),
            );
        std::fs::write(&config, text).unwrap();
        let (code, text) = cli(&["status", "--config", config.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{text}");
        assert!(text.contains("storage: UNAVAILABLE: etcd watch"), "{text}");
        // Read from the store itself (no daemon answers on port 0): the store's error, not a table of
        // certificates that look never issued.
        let own = r.dir.join("acme-sds.toml");
        let (code, text) = cli(&["status", "--config", own.to_str().unwrap()]);
        assert_eq!(code, Some(1), "{text}");
        assert!(text.contains("reading the store: etcd"), "{text}");
    }
    // What was loaded is still served.
    assert_eq!(
        a.issued_leaf("site", "site.example.com", &root)
            .await
            .unwrap(),
        leaf
    );
    assert_eq!(
        b.issued_leaf("site", "site.example.com", &root)
            .await
            .unwrap(),
        leaf
    );

    // etcd back: ready again, without a restart.
    w.etcd.restart(second);
    w.etcd.restart(leader);
    for r in [&a, &b] {
        r.wait_ready(true);
    }
}

/// Runs the acme-sds CLI to completion: (exit code, stdout and stderr).
fn cli(args: &[&str]) -> (Option<i32>, String) {
    let out = std::process::Command::new(testkit::bin())
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A single node grows into replicas: its storage directory (sealed with the same key file) is copied into
/// etcd with `acme-sds storage migrate`, which refuses while the node still runs and copies nothing twice;
/// `check` and `status` work against etcd; and a replica on etcd serves the certificate without ordering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_node_migrates_into_etcd_and_its_certificate_is_served_without_a_new_order() {
    let Some(w) = World::start() else { return };
    let certs: &[(&str, &[&str])] = &[("site", &["site.example.com"])];
    // The single node answers HTTP-01 itself, on the port Pebble validates.
    let single = w.dir.path().join("single");
    std::fs::create_dir_all(&single).unwrap();
    let data = single.join("data");
    let single_config = single.join("acme-sds.toml");
    std::fs::write(
        &single_config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\nencryption_key_file = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{}\"\n\n{}[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n",
            single.join("sds.sock").display(),
            data.display(),
            w.key_file.display(),
            w.port80,
            w.pebble.acme_table()
        ),
    )
    .unwrap();
    let mut node = Process::spawn(&["run", "--config", single_config.to_str().unwrap()], &[]);
    node.wait_for_line_within("certificate issued", BOUND);
    let config = w.config("grown", certs);
    let config = config.to_str().unwrap();
    let data_dir = data.to_str().unwrap();

    let (code, out) = cli(&["storage", "migrate", "--from", data_dir, "--config", config]);
    assert_ne!(code, Some(0), "a directory in use is not copied: {out}");
    assert!(out.contains("in use by another acme-sds"), "{out}");
    node.signal("TERM");
    assert_eq!(node.wait_exit(), Some(0));

    let (code, out) = cli(&["storage", "migrate", "--from", data_dir, "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("/certs/site") && out.contains("/account"),
        "{out}"
    );
    let (code, again) = cli(&["storage", "migrate", "--from", data_dir, "--config", config]);
    assert_eq!(code, Some(0), "{again}");
    assert!(again.contains("0 copied"), "{again}");
    let dump = w.etcd.etcdctl(&["get", "--prefix", "/acme-sds/"]);
    assert!(!String::from_utf8_lossy(&dump.stdout).contains("PRIVATE KEY"));

    let (code, out) = cli(&["check", "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("Storage: etcd"), "{out}");
    let (code, out) = cli(&["status", "--config", config]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("from files and storage")
            && out.contains("days)")
            && !out.contains("not issued"),
        "the offline status reads the certificate from etcd: {out}"
    );

    // A replica on etcd serves it at once, and orders nothing.
    let mut r = w.replica("r", certs);
    w.edge(&mut r, certs, None, &[], Duration::ZERO);
    let root = root(&w).await;
    r.wait_issued("site", "site.example.com", &root).await;
    assert!(!r.p.log().contains("order created"), "{}", r.p.log());
    assert_eq!(w.orders(), 1);
}

/// Two replicas with on-demand TLS, `max_pending = 1`, and Envoy A's port 80 answering Pebble (sending
/// challenges to either replica).
async fn on_demand_pair(w: &World, on_demand: &str) -> (Replica, Replica) {
    let table = format!("[on_demand]\nallow = [\"*.od.example.com\"]\n{on_demand}\n");
    let mut a = w.replica_with("a", &[], &table);
    let b = w.replica_with("b", &[], &table);
    let both = [a.http01, b.http01];
    w.edge(&mut a, &[], Some(w.port80), &both, Duration::ZERO);
    (a, b)
}

/// A delta stream on `r` subscribed to `names` as an Envoy would.
async fn od_stream(r: &Replica, names: &[&str]) -> DeltaStream {
    let mut client = uds_client(&r.dir.join("sds.sock")).await;
    let stream = DeltaStream::open(&mut client).await;
    stream.send(delta_subscribe("edge", names)).await;
    stream
}

/// The certificate a delta stream is served for its one name, chaining to `root` for `name`.
async fn od_served(stream: &mut DeltaStream, name: &str, root: &[u8]) -> Vec<u8> {
    let r = tokio::time::timeout(BOUND, stream.recv())
        .await
        .unwrap_or_else(|_| panic!("{name} not served within {BOUND:?}"));
    assert!(r.removed_resources.is_empty(), "{name} refused: {r:?}");
    let chain = chain_ders(&decode_secret(r.resources[0].resource.as_ref().unwrap()));
    verify_chain(&chain, root, name).unwrap();
    chain[0].clone()
}

/// With `max_pending = 1`, a name asked of both replicas at once is ordered by one and adopted by the
/// other (no outcome there); the adopting replica's turn ends with the adoption, so the next new name it
/// is asked for is ordered too: each replica obtains one more name afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_name_adopted_from_another_replica_frees_its_turn() {
    let Some(w) = World::start() else { return };
    let (a, b) = on_demand_pair(&w, "max_pending = 1").await;
    let root = root(&w).await;
    let name = "shared.od.example.com";
    let (mut sa, mut sb) = (od_stream(&a, &[name]).await, od_stream(&b, &[name]).await);
    let leaf = od_served(&mut sa, name, &root).await;
    assert_eq!(od_served(&mut sb, name, &root).await, leaf);
    assert_eq!(w.orders(), 1, "{}", w.pebble.log());
    // Each replica's one turn is free again: a new name on each is ordered and served.
    let (mut ta, mut tb) = (
        od_stream(&a, &["next-a.od.example.com"]).await,
        od_stream(&b, &["next-b.od.example.com"]).await,
    );
    od_served(&mut ta, "next-a.od.example.com", &root).await;
    od_served(&mut tb, "next-b.od.example.com", &root).await;
    assert_eq!(w.orders(), 3, "{}", w.pebble.log());
}

/// An on-demand certificate one replica no longer serves while another still does is kept: the idle
/// replica reads, under the certificate's lock, that the other used it within `drop_unused_after`, and
/// deletes nothing. Once no replica serves it, it is forgotten, records and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_on_demand_certificate_is_dropped_only_when_no_replica_uses_it() {
    let Some(w) = World::start() else { return };
    let (a, b) = on_demand_pair(&w, "drop_unused_after = \"3s\"").await;
    let root = root(&w).await;
    let name = "kept.od.example.com";
    let mut sa = od_stream(&a, &[name]).await;
    od_served(&mut sa, name, &root).await;
    let mut sb = od_stream(&b, &[name]).await;
    od_served(&mut sb, name, &root).await;
    let record = || {
        let out = w
            .etcd
            .etcdctl(&["get", "--prefix", "--keys-only", "/acme-sds/acme/"])
            .stdout;
        String::from_utf8_lossy(&out)
            .lines()
            .filter(|k| k.contains("kept.od.example.com"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let stored = record();
    assert!(
        stored.iter().any(|k| k.contains("/on-demand/"))
            && stored.iter().any(|k| k.contains("/on-demand-certs/")),
        "{stored:?}"
    );
    // B's Envoy lets it go; A's keeps it.
    drop(sb);
    b.p.wait_for_line_within("another replica served it", BOUND);
    assert_eq!(record(), stored, "nothing deleted while A serves it");
    assert!(!b.p.log().contains("forgotten"), "{}", b.p.log());
    // Nobody serves it: forgotten.
    drop(sa);
    first_to_log(&[&a, &b], "no longer renewed, and forgotten");
    let deadline = Instant::now() + BOUND;
    while !record().is_empty() {
        assert!(Instant::now() < deadline, "left: {:?}", record());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
