//! On-demand TLS end to end: a real Envoy 1.40 with its on-demand certificate selector (SNI mapper, delta
//! SDS) in front of acme-sds, real Pebble. A handshake for an allowed name nobody configured waits while
//! acme-sds obtains the certificate; anything else fails fast and never reaches the CA.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use acme_sds::proto::envoy::service::discovery::v3::DiscoveryRequest;
use testkit::envoy::{Envoy, envoy_bin, on_demand_bootstrap, presented_chain};
use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

/// Issuance with Pebble takes well under a second; generous bounds absorb a loaded CI machine.
const BOUND: Duration = Duration::from_secs(60);

struct Edge {
    dir: tempfile::TempDir,
    pebble: Pebble,
    port80: u16,
    envoy_bin: PathBuf,
    daemon: Option<Process>,
    envoy: Option<Envoy>,
    https: u16,
}

impl Edge {
    /// Pebble, then acme-sds with `on_demand` as its `[on_demand]` table, then Envoy.
    fn start(on_demand: &str) -> Option<Edge> {
        Self::start_with(on_demand, "")
    }

    /// The same with more `[[certificate]]` tables (`extra`).
    fn start_with(on_demand: &str, extra: &str) -> Option<Edge> {
        let dir = tempfile::tempdir().unwrap();
        let port80 = free_port();
        let mut opts = PebbleOptions::new(port80);
        opts.authz_reuse = 0;
        opts.nonce_reject = 0;
        let pebble = Pebble::start(&dir.path().join("pebble"), opts)?;
        let envoy_bin = envoy_bin()?;
        std::fs::write(
            dir.path().join("acme-sds.toml"),
            format!(
                "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:0\"\n\n{}[on_demand]\n{on_demand}\n\n[[certificate]]\nname = \"fallback\"\ndomains = [\"localhost\"]\nissuer = \"internal\"\n\n{extra}",
                dir.path().join("sds.sock").display(),
                dir.path().join("data").display(),
                pebble.acme_table(),
            ),
        )
        .unwrap();
        let mut edge = Edge {
            dir,
            pebble,
            port80,
            envoy_bin,
            daemon: None,
            envoy: None,
            https: 0,
        };
        edge.restart();
        Some(edge)
    }

    /// (Re)starts acme-sds and Envoy.
    fn restart(&mut self) {
        self.envoy = None;
        if let Some(mut d) = self.daemon.take() {
            d.signal("TERM");
            assert_eq!(d.wait_exit(), Some(0));
        }
        let config = self.dir.path().join("acme-sds.toml");
        let daemon = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
        daemon.wait_for_line("acme-sds started");
        let http01: SocketAddr = daemon.listen_addr("HTTP-01 responder");
        let bootstrap = on_demand_bootstrap(
            &self.dir.path().join("sds.sock"),
            "fallback",
            self.port80,
            &[http01.to_string()],
        );
        let mut envoy = Envoy::start(&self.envoy_bin, &bootstrap, self.dir.path());
        envoy.wait_live();
        self.https = envoy.listener_port("https");
        self.envoy = Some(envoy);
        self.daemon = Some(daemon);
    }

    fn orders(&self) -> usize {
        self.pebble.log().matches("Added order").count()
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(|d| d.log()).unwrap_or_default()
    }

    /// A handshake for `sni`, bounded: the chain presented, or why it failed.
    async fn handshake(&self, sni: Option<&str>) -> Result<Vec<Vec<u8>>, String> {
        match tokio::time::timeout(BOUND, presented_chain(self.https, sni)).await {
            Ok(Ok(chain)) => Ok(chain),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no handshake within {BOUND:?}")),
        }
    }
}

/// An allowed name: the first handshake waits and completes with the certificate Pebble issued, the second
/// is served from Envoy's cache, a case variant is the same certificate, many concurrent handshakes for a
/// new name make one order, and after a restart of acme-sds (and Envoy) the stored certificate is served
/// without a new order. A name outside `allow` fails fast and never reaches the CA; no SNI gets the
/// mapper's default certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_name_is_obtained_during_its_first_handshake_and_others_fail_fast() {
    let Some(mut edge) = Edge::start("allow = [\"*.customers.example.com\", \"shop.example.org\"]")
    else {
        return;
    };
    let root = edge.pebble.root_der().await;

    let chain = edge
        .handshake(Some("a.customers.example.com"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
    verify_chain(&chain, &root, "a.customers.example.com")
        .unwrap_or_else(|e| panic!("not Pebble's certificate for the name: {e}"));
    assert_eq!(edge.orders(), 1);
    let started = Instant::now();
    let again = edge
        .handshake(Some("a.customers.example.com"))
        .await
        .unwrap();
    assert_eq!(again[0], chain[0]);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the second handshake is served from Envoy's cache: {:?}",
        started.elapsed()
    );
    let variant = edge
        .handshake(Some("A.Customers.Example.COM"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
    assert_eq!(
        variant[0], chain[0],
        "a case variant is the same certificate"
    );
    assert_eq!(edge.orders(), 1);

    // Outside allow: fails at once, nothing ordered.
    let started = Instant::now();
    let denied = edge.handshake(Some("www.google.com")).await;
    assert!(denied.is_err(), "{denied:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a refused name fails fast: {:?}",
        started.elapsed()
    );
    assert_eq!(edge.orders(), 1);
    // (The log is read from the daemon's output by a thread: the line may arrive just after the refusal.)
    edge.daemon
        .as_ref()
        .unwrap()
        .wait_for_line_within("on-demand certificate refused", BOUND);
    // Malformed (an underscore), and a bare suffix of the pattern: refused the same way.
    for bad in ["bad_name.customers.example.com", "customers.example.com"] {
        let started = Instant::now();
        assert!(edge.handshake(Some(bad)).await.is_err(), "{bad}");
        assert!(started.elapsed() < Duration::from_secs(1), "{bad}");
    }
    assert_eq!(edge.orders(), 1);

    // Ten handshakes at once for a new name: one order, all served.
    let mut handshakes = Vec::new();
    for _ in 0..10 {
        let port = edge.https;
        handshakes.push(tokio::spawn(async move {
            tokio::time::timeout(BOUND, presented_chain(port, Some("shop.example.org"))).await
        }));
    }
    for h in handshakes {
        let chain = h.await.unwrap().expect("in time").expect("handshake");
        verify_chain(&chain, &root, "shop.example.org").unwrap();
    }
    assert_eq!(edge.orders(), 2, "{}", edge.pebble.log());

    // No SNI: the mapper's default, a configured certificate.
    let fallback = edge.handshake(None).await.unwrap();
    assert!(verify_chain(&fallback, &root, "localhost").is_err());
    assert_ne!(fallback[0], chain[0]);

    // `/status`-style listing: the on-demand certificates with how they were allowed (offline here).
    let config = edge.dir.path().join("acme-sds.toml");
    edge.daemon.as_mut().unwrap().signal("TERM");
    assert_eq!(edge.daemon.as_mut().unwrap().wait_exit(), Some(0));
    edge.daemon = None;
    let out = std::process::Command::new(bin())
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("a.customers.example.com")
            && text.contains("on_demand")
            && text.contains("on demand: allow *.customers.example.com")
            && text.contains("on demand: allow shop.example.org"),
        "{text}"
    );

    // Restarted: served from storage, no new order.
    edge.restart();
    let after = edge
        .handshake(Some("a.customers.example.com"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
    assert_eq!(after[0], chain[0]);
    assert_eq!(edge.orders(), 2);
}

/// A stub of Caddy's `ask` endpoint: allows names starting with `ok`, counts the calls per name.
async fn ask_stub() -> (
    u16,
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let calls = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
    let counted = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).into_owned();
                let domain = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|path| path.split("domain=").nth(1))
                    .unwrap_or("")
                    .to_owned();
                *counted.lock().unwrap().entry(domain.clone()).or_insert(0) += 1;
                let status = if domain.starts_with("ok") {
                    "200 OK"
                } else {
                    "403 Forbidden"
                };
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    (port, calls)
}

/// `ask` is asked once per name (its denials are cached), a name it denies fails fast and is never
/// ordered, and the hourly cap refuses the (N+1)-th new name while the first N are served, before `ask` is
/// asked about it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ask_is_asked_once_per_name_and_the_hourly_cap_holds() {
    let (port, calls) = ask_stub().await;
    let Some(edge) = Edge::start(&format!(
        "allow = [\"*.customers.example.com\"]\nask = \"http://127.0.0.1:{port}/check\"\nmax_new_per_hour = 2"
    )) else {
        return;
    };
    let root = edge.pebble.root_der().await;
    let obtain = async |name: &str| {
        let chain = edge
            .handshake(Some(name))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", edge.log()));
        verify_chain(&chain, &root, name).unwrap();
    };
    obtain("ok1.customers.example.com").await;
    // Denied by ask, under two spellings: asked once, never ordered, and no slot of the cap taken.
    for spelling in ["no.customers.example.com", "NO.customers.example.com."] {
        let started = Instant::now();
        assert!(edge.handshake(Some(spelling)).await.is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    obtain("ok2.customers.example.com").await;
    // The third new name in the hour: refused before ask is asked (the cap comes first).
    assert!(
        edge.handshake(Some("ok3.customers.example.com"))
            .await
            .is_err()
    );
    assert_eq!(edge.orders(), 2, "{}", edge.pebble.log());
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.get("no.customers.example.com"), Some(&1), "{calls:?}");
    assert_eq!(
        calls.get("ok1.customers.example.com"),
        Some(&1),
        "{calls:?}"
    );
    assert_eq!(calls.get("ok3.customers.example.com"), None, "{calls:?}");
    edge.daemon
        .as_ref()
        .unwrap()
        .wait_for_line_within("max_new_per_hour", BOUND);
}

/// A certificate no Envoy asks for during `drop_unused_after` is forgotten: not renewed, and asked for again
/// later it is a new name (a new order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unused_certificate_is_forgotten_after_drop_unused_after() {
    let Some(mut edge) =
        Edge::start("allow = [\"*.customers.example.com\"]\ndrop_unused_after = \"2s\"")
    else {
        return;
    };
    let root = edge.pebble.root_der().await;
    let name = "gone.customers.example.com";
    let chain = edge.handshake(Some(name)).await.unwrap();
    verify_chain(&chain, &root, name).unwrap();
    // No Envoy asks for it any more.
    edge.envoy = None;
    let daemon = edge.daemon.as_ref().unwrap();
    daemon.wait_for_line_within("no longer renewed, and forgotten", BOUND);
    edge.restart();
    let again = edge.handshake(Some(name)).await.unwrap();
    verify_chain(&again, &root, name).unwrap();
    assert_ne!(again[0], chain[0], "obtained again");
    assert_eq!(edge.orders(), 2);
}

/// With `allowed_nodes`, an Envoy whose node id does not match cannot make a name be obtained: it is
/// refused as for any secret it may not read (PERMISSION_DENIED, logged), and nothing is ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envoy_outside_allowed_nodes_cannot_trigger_issuance() {
    let Some(edge) =
        Edge::start("allow = [\"*.customers.example.com\"]\nallowed_nodes = [\"gateway-*\"]")
    else {
        return;
    };
    // The handshake waits (Envoy retries its stream) until this client gives up.
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        presented_chain(edge.https, Some("a.customers.example.com")),
    )
    .await;
    assert!(!matches!(r, Ok(Ok(_))), "{r:?}");
    edge.daemon
        .as_ref()
        .unwrap()
        .wait_for_line_within("SDS access denied", BOUND);
    assert_eq!(edge.orders(), 0);
}

/// A configured secret wins over on-demand TLS in every spelling: `ACME.EXAMPLE.TEST`, `Acme.example.test`,
/// `acme.example.test.` and `sds://…` are the configured secret `acme.example.test` (an ACME certificate
/// restricted to `edge*` nodes), as `Shop.Example.Test` is the configured file certificate
/// `shop.example.test` and `WWW.example.test` the configured certificate `web` whose domain it is. A node
/// outside their rules is refused (`PERMISSION_DENIED`) over SotW, delta and Fetch, with this project's
/// client and with grpcio, and never receives a key; nothing is ordered for those spellings; the Envoy that
/// may read them gets the configured certificate under the spelling it asked for (its on-demand selector,
/// an upper-case SNI) and is pushed no other version. An unconfigured name is still obtained on demand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_name_is_never_obtained_on_demand_whatever_its_spelling() {
    use acme_sds::proto::envoy::service::discovery::v3::{
        DeltaDiscoveryResponse, DiscoveryRequest,
    };
    use prost::Message;

    let pki = Pki::new();
    let shop = pki.leaf(&["shop.example.test"]);
    let files = tempfile::tempdir().unwrap();
    let (shop_crt, shop_key) = shop.write(files.path(), "shop");
    let extra = format!(
        "[[certificate]]\nname = \"acme.example.test\"\ndomains = [\"acme.example.test\"]\nallowed_nodes = [\"edge*\"]\ntemporary_certificate = false\n\n\
         [[certificate]]\nname = \"web\"\ndomains = [\"www.example.test\"]\nallowed_nodes = [\"edge*\"]\ntemporary_certificate = false\n\n\
         [[certificate]]\nname = \"shop.example.test\"\ncert_file = \"{}\"\nkey_file = \"{}\"\nallowed_nodes = [\"edge*\"]\n",
        shop_crt.display(),
        shop_key.display()
    );
    let Some(edge) = Edge::start_with("allow = [\"*.example.test\"]", &extra) else {
        return;
    };
    let socket = edge.dir.path().join("sds.sock");
    let mut client = uds_client(&socket).await;
    let delta_req = |node_id: &str, names: &[&str]| delta_subscribe(node_id, names);

    // The Envoy allowed to read them: wait until both ACME certificates are issued.
    let mut allowed = DeltaStream::open(&mut client).await;
    allowed
        .send(delta_req(
            "edge-1",
            &["acme.example.test", "web", "shop.example.test"],
        ))
        .await;
    let mut held = std::collections::HashMap::new();
    while held.len() < 3 {
        let r = allowed.recv().await;
        for res in &r.resources {
            let secret = decode_secret(res.resource.as_ref().unwrap());
            held.insert(res.name.clone(), leaf_der(&secret));
        }
        allowed.send(delta_ack(&r)).await;
    }
    assert_eq!(held["shop.example.test"], shop.leaf_der);
    let orders_before = edge.orders();

    // Every spelling, every RPC, two clients: an intruder is refused and gets no key.
    let spellings: &[(&str, &str)] = &[
        ("ACME.EXAMPLE.TEST", "acme.example.test"),
        ("Acme.example.test", "acme.example.test"),
        ("acme.example.test.", "acme.example.test"),
        ("sds://Acme.Example.Test", "acme.example.test"),
        ("SHOP.example.test", "shop.example.test"),
        ("shop.example.test.", "shop.example.test"),
        ("WWW.example.test", "web"),
        ("www.example.test", "web"),
    ];
    let grpcio = crate::clients::python_with_grpcio().is_some();
    for (spelling, _) in spellings {
        let mut sotw = SotwStream::open(&mut client).await;
        sotw.send(DiscoveryRequest {
            node: node("intruder"),
            ..subscribe(&[spelling])
        })
        .await;
        let status = sotw.end().await.expect("an error status");
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "SotW {spelling}"
        );
        let mut delta = DeltaStream::open(&mut client).await;
        delta.send(delta_req("intruder", &[spelling])).await;
        let status = delta.end().await.expect("an error status");
        assert_eq!(
            status.code(),
            tonic::Code::PermissionDenied,
            "delta {spelling}"
        );
        let fetched = client
            .fetch_secrets(DiscoveryRequest {
                node: node("intruder"),
                ..subscribe(&[spelling])
            })
            .await;
        assert_eq!(
            fetched.unwrap_err().code(),
            tonic::Code::PermissionDenied,
            "fetch {spelling}"
        );
        if grpcio {
            let target = format!("unix:{}", socket.display());
            let fetch = DiscoveryRequest {
                node: node("intruder"),
                ..subscribe(&[spelling])
            };
            let got = crate::clients::grpcio_call(&target, "fetch", &fetch.encode_to_vec());
            assert_eq!(
                got.map(|_| ()).unwrap_err().0,
                "PERMISSION_DENIED",
                "grpcio fetch {spelling}"
            );
            let got = crate::clients::grpcio_call(
                &target,
                "delta",
                &delta_req("intruder", &[spelling]).encode_to_vec(),
            );
            assert_eq!(
                got.map(|_| ()).unwrap_err().0,
                "PERMISSION_DENIED",
                "grpcio delta {spelling}"
            );
        }
    }

    // A node that may read them gets the configured certificate under the spelling it asked for.
    for (spelling, configured) in spellings {
        let r = client
            .fetch_secrets(DiscoveryRequest {
                node: node("edge-3"),
                ..subscribe(&[spelling])
            })
            .await
            .unwrap_or_else(|e| panic!("{spelling}: {e}"))
            .into_inner();
        let secret = decode_secret(&r.resources[0]);
        assert_eq!(secret.name, *spelling);
        assert_eq!(&leaf_der(&secret), &held[*configured], "{spelling}");
    }
    let mut other = DeltaStream::open(&mut client).await;
    other
        .send(delta_req(
            "edge-2",
            &["ACME.EXAMPLE.TEST", "Shop.Example.Test."],
        ))
        .await;
    let r: DeltaDiscoveryResponse = other.recv().await;
    let mut got: Vec<(String, Vec<u8>)> = r
        .resources
        .iter()
        .map(|x| {
            (
                x.name.clone(),
                leaf_der(&decode_secret(x.resource.as_ref().unwrap())),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            (
                "ACME.EXAMPLE.TEST".to_string(),
                held["acme.example.test"].clone()
            ),
            ("Shop.Example.Test.".to_string(), shop.leaf_der.clone()),
        ]
    );
    // Envoy's on-demand selector, an upper-case SNI: the configured certificate, not a new one.
    let presented = edge.handshake(Some("ACME.EXAMPLE.TEST")).await.unwrap();
    assert_eq!(presented[0], held["acme.example.test"]);

    // Nothing was ordered or recorded for those spellings.
    assert_eq!(edge.orders(), orders_before, "{}", edge.pebble.log());
    assert!(
        !edge.log().contains("obtaining an on-demand certificate"),
        "{}",
        edge.log()
    );

    // The allowed Envoy was pushed nothing new: a new subscription on its stream is answered with that
    // name alone (a pending new version of what it holds would ride along).
    allowed.send(delta_req("edge-1", &["fallback"])).await;
    let r = allowed.recv().await;
    let names: Vec<&str> = r.resources.iter().map(|x| x.name.as_str()).collect();
    assert_eq!(names, ["fallback"]);

    // A name nobody configured is still obtained on demand, apart from the configured ones.
    let root = edge.pebble.root_der().await;
    let chain = edge.handshake(Some("new.example.test")).await.unwrap();
    verify_chain(&chain, &root, "new.example.test").unwrap();
    assert_eq!(edge.orders(), orders_before + 1);
}

/// An `ask` endpoint that accepts requests and never answers; returns its port and the most requests it
/// held at once.
async fn silent_ask() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let now = std::sync::Arc::new(AtomicUsize::new(0));
    let most = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (now, most) = (now.clone(), most.clone());
            tokio::spawn(async move {
                let held = now.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(held, Ordering::SeqCst);
                let mut buf = vec![0u8; 4096];
                // Read until the client gives up (it times out and closes).
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                now.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (port, seen)
}

/// acme-sds in this process with Pebble, an admin listener and `[on_demand]` as given; HTTP-01 answered
/// on Pebble's port directly.
async fn flood_daemon(on_demand: &str) -> Option<(Daemon, Pebble)> {
    let dir = tempfile::tempdir().unwrap();
    let port80 = free_port();
    let mut opts = PebbleOptions::new(port80);
    opts.authz_reuse = 0;
    opts.nonce_reject = 0;
    let pebble = Pebble::start(&dir.path().join("pebble"), opts)?;
    let tables = format!(
        "[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{port80}\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}[on_demand]\n{on_demand}\n",
        dir.path().join("data").display(),
        pebble.acme_table(),
    );
    Some((Daemon::start(dir, &tables).await, pebble))
}

/// `streams` delta streams from one Envoy subscribing `per_stream` distinct names each (under
/// `*.flood.test`); returns them once every name not awaited has been reported removed (each stream
/// reports them in its first responses), with how many were reported.
async fn flood(
    daemon: &Daemon,
    streams: usize,
    per_stream: usize,
    awaited_at_most: usize,
) -> (Vec<DeltaStream>, usize) {
    let mut client = daemon.client().await;
    let mut open = Vec::new();
    for s in 0..streams {
        let stream = DeltaStream::open(&mut client).await;
        let names: Vec<String> = (0..per_stream)
            .map(|i| format!("n{i}-s{s}.flood.test"))
            .collect();
        stream.send(delta_subscribe("edge", &names)).await;
        open.push(stream);
    }
    let want = streams * per_stream - awaited_at_most;
    let mut removed = 0;
    for stream in &mut open {
        // Every name of this stream is reported, bar those being decided (at most `awaited_at_most` over
        // all streams): read until the stream has reported all but those.
        let mut reported = 0;
        while reported + awaited_at_most < per_stream {
            let r = stream.recv().await;
            reported += r.removed_resources.len();
            assert!(r.resources.is_empty(), "nothing is served for a flood");
            stream.send(delta_ack(&r)).await;
        }
        removed += reported;
    }
    assert!(removed >= want, "{removed} of {want} reported removed");
    (open, removed)
}

/// The value of the gauge `series` (name and labels, as exposed) in `/metrics`.
fn gauge(daemon: &Daemon, series: &str) -> f64 {
    let text = http_get(daemon.running().admin_addr().unwrap(), "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

/// Twenty thousand distinct allowed names, subscribed over delta by twenty streams, with an `ask`
/// endpoint that never answers and `max_new_per_hour = 5`: at most five names are asked about at once (the
/// cap's slots are taken before `ask`), everything else is refused at once (reported removed, so Envoy's
/// handshakes fail fast), the refusals remembered stay under their bound, nothing is ordered, and once the
/// streams close the registry holds nothing more than before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_names_with_a_silent_ask_is_bounded_and_forgotten() {
    let (ask_port, most_asks) = silent_ask().await;
    let Some((mut daemon, pebble)) = flood_daemon(&format!(
        "allow = [\"*.flood.test\"]\nask = \"http://127.0.0.1:{ask_port}/check\"\nask_timeout = \"60s\"\nmax_new_per_hour = 5"
    ))
    .await
    else {
        return;
    };
    let before = daemon.running().registry().slot_count();
    let (streams, removed) = flood(&daemon, 20, 1000, 5).await;
    assert!(
        (19_995..=20_000).contains(&removed),
        "all but the five being decided: {removed}"
    );
    let asks = most_asks.load(std::sync::atomic::Ordering::SeqCst);
    assert!(asks <= 5, "{asks} ask requests at once");
    assert_eq!(
        gauge(&daemon, "acme_sds_on_demand_names{state=\"deciding\"}"),
        5.0
    );
    assert!(gauge(&daemon, "acme_sds_on_demand_names{state=\"refused\"}") <= 10_000.0);
    assert!(gauge(&daemon, "acme_sds_on_demand_ask_requests_in_flight") <= 5.0);
    drop(streams);
    let deadline = Instant::now() + BOUND;
    while daemon.running().registry().slot_count() > before {
        assert!(
            Instant::now() < deadline,
            "{} registry entries left after the streams closed (before: {before})",
            daemon.running().registry().slot_count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(pebble.log().matches("Added order").count(), 0);
    daemon.stop().await;
}

/// The same flood with no `ask`: no more certificates are obtained than `max_new_per_hour` allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_names_orders_no_more_than_the_hourly_cap() {
    let Some((mut daemon, pebble)) =
        flood_daemon("allow = [\"*.flood.test\"]\nmax_new_per_hour = 5").await
    else {
        return;
    };
    let (_streams, removed) = flood(&daemon, 20, 1000, 5).await;
    assert!(removed >= 19_995);
    // The five admitted are obtained (or fail and are refused): wait until each has an outcome.
    let deadline = Instant::now() + BOUND;
    while gauge(&daemon, "acme_sds_on_demand_names{state=\"deciding\"}") > 0.0 {
        assert!(Instant::now() < deadline, "still deciding");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let orders = pebble.log().matches("Added order").count();
    assert!((1..=5).contains(&orders), "{orders} orders for a cap of 5");
    assert!(gauge(&daemon, "acme_sds_on_demand_names{state=\"admitted\"}") <= 5.0);
    daemon.stop().await;
}

/// An `ask` answer is judged by its status: an allow whose body never ends (a misbehaving or hostile
/// endpoint) is read only to a few KiB, so the name is allowed and obtained rather than waiting for a body
/// that never finishes and counting as no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ask_answer_is_read_to_a_limit() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = s.read(&mut buf).await;
                // 200, and a body announced as a gigabyte that keeps coming.
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
                    .await;
                let chunk = vec![b'x'; 64 * 1024];
                while s.write_all(&chunk).await.is_ok() {}
            });
        }
    });
    let Some((mut daemon, pebble)) = flood_daemon(&format!(
        "allow = [\"*.flood.test\"]\nask = \"http://127.0.0.1:{port}/check\"\nask_timeout = \"30s\""
    ))
    .await
    else {
        return;
    };
    let mut client = daemon.client().await;
    let mut stream = DeltaStream::open(&mut client).await;
    stream
        .send(delta_subscribe("edge", &["big.flood.test"]))
        .await;
    let r = stream.recv().await;
    assert!(r.removed_resources.is_empty(), "refused: {r:?}");
    let secret = decode_secret(r.resources[0].resource.as_ref().unwrap());
    verify_chain(
        &chain_ders(&secret),
        &pebble.root_der().await,
        "big.flood.test",
    )
    .unwrap();
    daemon.stop().await;
}

/// A reload that changes `[on_demand]` keeps what was obtained: the new policy takes over the certificates
/// the old one served (no new order, the same certificate at the next handshake), and decides new names;
/// one that the new `allow` no longer matches stops being renewed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_of_on_demand_keeps_what_was_obtained() {
    let Some(edge) = Edge::start("allow = [\"*.customers.example.com\", \"old.example.org\"]")
    else {
        return;
    };
    let root = edge.pebble.root_der().await;
    let first = edge
        .handshake(Some("a.customers.example.com"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
    verify_chain(&first, &root, "a.customers.example.com").unwrap();
    edge.handshake(Some("old.example.org")).await.unwrap();
    assert_eq!(edge.orders(), 2);

    let config = edge.dir.path().join("acme-sds.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "allow = [\"*.customers.example.com\", \"old.example.org\"]",
        "allow = [\"*.customers.example.com\"]\nmax_new_per_hour = 50",
    );
    std::fs::write(&config, text).unwrap();
    let daemon = edge.daemon.as_ref().unwrap();
    daemon.wait_for_line_within("configuration reloaded", BOUND);
    assert!(
        edge.log()
            .lines()
            .any(|l| l.contains("no longer matches [on_demand] allow")
                && l.contains("old.example.org")),
        "{}",
        edge.log()
    );
    let again = edge
        .handshake(Some("a.customers.example.com"))
        .await
        .unwrap();
    assert_eq!(again[0], first[0], "the same certificate, taken over");
    let new = edge
        .handshake(Some("b.customers.example.com"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", edge.log()));
    verify_chain(&new, &root, "b.customers.example.com").unwrap();
    assert_eq!(edge.orders(), 3, "{}", edge.pebble.log());
}

/// Certificates obtained on demand stop being offered with the issuer that obtained them: after a reload
/// that removes `[on_demand]` (and with it `allowed_nodes`, so unconfigured names are open to every node),
/// a node that was never allowed cannot fetch or subscribe to one; the Envoy that held it keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_certificates_are_withdrawn_when_on_demand_is_turned_off() {
    let Some((mut daemon, _pebble)) =
        flood_daemon("allow = [\"*.flood.test\"]\nallowed_nodes = [\"edge*\"]").await
    else {
        return;
    };
    let mut client = daemon.client().await;
    let mut edge = DeltaStream::open(&mut client).await;
    edge.send(delta_subscribe("edge-1", &["x.flood.test"]))
        .await;
    let r = edge.recv().await;
    assert_eq!(r.resources.len(), 1, "{r:?}");
    edge.send(delta_ack(&r)).await;

    let config = daemon.dir.path().join("acme-sds.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let without = &text[..text.find("[on_demand]").unwrap()];
    std::fs::write(&config, without).unwrap();
    daemon
        .running
        .as_mut()
        .unwrap()
        .reload(&config)
        .await
        .unwrap();

    let fetched = client
        .fetch_secrets(DiscoveryRequest {
            node: node("intruder"),
            ..subscribe(&["x.flood.test"])
        })
        .await;
    assert_eq!(
        fetched.map(|_| ()).unwrap_err().code(),
        tonic::Code::NotFound,
        "no longer offered"
    );
    let mut intruder = DeltaStream::open(&mut client).await;
    intruder
        .send(delta_subscribe("intruder", &["x.flood.test"]))
        .await;
    let r = intruder.recv().await;
    assert!(r.resources.is_empty(), "no key for the intruder: {r:?}");
    assert_eq!(r.removed_resources, ["x.flood.test"]);
    daemon.stop().await;
}
