//! Bad and excessive input: oversized name lists, many streams opened and dropped. The process stays up and
//! does not grow.

use acme_sds::proto::envoy::service::discovery::v3::DiscoveryRequest;
use testkit::*;
use tonic::Code;

fn setup(dir: &std::path::Path) -> std::path::PathBuf {
    let pki = Pki::new();
    let leaf = pki.leaf(&["www.example.com"]);
    let (crt, key) = leaf.write(dir, "web");
    let config = dir.join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n{}",
            dir.join("sds.sock").display(),
            cert_table("web", &crt, &key)
        ),
    )
    .unwrap();
    config
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_names_in_one_request_are_refused_and_nothing_else_is_disturbed() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let (good, _) = SotwStream::subscribed(&mut client, &["web"]).await;

    let names: Vec<String> = (0..10_000).map(|i| format!("name-{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let err = client.fetch_secrets(subscribe(&refs)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err}");
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&refs)).await;
    assert_eq!(s.end().await.unwrap().code(), Code::InvalidArgument);

    // A request over the 1 MiB limit ends its stream (and fails a fetch) with OUT_OF_RANGE.
    let huge = DiscoveryRequest {
        node: node(&"n".repeat(1_100_000)),
        ..subscribe(&["web"])
    };
    let err = client.fetch_secrets(huge.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    let mut s = SotwStream::open(&mut client).await;
    s.send(huge).await;
    let err = s.end().await.unwrap();
    assert_eq!(err.code(), Code::OutOfRange, "{err}");
    assert!(
        err.message().contains("the limit is: 1048576 bytes"),
        "{err}"
    );

    // Still serving, and the good stream is intact.
    assert_eq!(fetch(&mut client, &["web"]).await.resources.len(), 1);
    good.send(subscribe(&["web"])).await;
    drop(good);
    assert!(p.log().lines().all(|l| !l.contains("panicked")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_opened_and_dropped_leave_memory_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let pid = p.child.id();
    let socket = dir.path().join("sds.sock");

    async fn round(socket: &std::path::Path) {
        let mut channels = Vec::new();
        for _ in 0..10 {
            channels.push(uds_channel(socket).await);
        }
        let mut streams = Vec::new();
        for i in 0..1000 {
            let mut c = acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(channels[i % 10].clone());
            let (s, r) = SotwStream::subscribed(&mut c, &["web", &format!("unknown-{i}")]).await;
            assert_eq!(r.resources.len(), 1);
            streams.push(s);
        }
        drop(streams);
        drop(channels);
    }

    // Warm up: the allocator's arenas and the runtime's structures grow to their working size first.
    let mut client = uds_client(&socket).await;
    for _ in 0..3 {
        round(&socket).await;
    }
    fetch(&mut client, &["web"]).await;
    let after_first = rss_kib(pid);
    for _ in 0..5 {
        round(&socket).await;
    }
    fetch(&mut client, &["web"]).await;
    let after_more = rss_kib(pid);
    eprintln!(
        "acme-sds RSS after 3 rounds of 1,000 streams opened and dropped: {after_first} KiB; after 5 more: {after_more} KiB"
    );
    assert!(
        after_more <= after_first + after_first / 6 + 2048,
        "memory grew from {after_first} KiB to {after_more} KiB over rounds of opened and dropped streams"
    );
}

/// A spawned acme-sds serving `web` on a Unix socket and loopback TCP, with `sds_extra` in `[sds]` and
/// an admin listener; returns the process, its TCP SDS and admin addresses, and the socket path.
fn spawn_with(
    dir: &std::path::Path,
    sds_extra: &str,
    nofile: Option<u64>,
) -> (
    Process,
    std::net::SocketAddr,
    std::net::SocketAddr,
    std::path::PathBuf,
) {
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["www.example.com"]).write(dir, "web");
    let socket = dir.join("sds.sock");
    let config = dir.join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\", \"127.0.0.1:0\"]\n{sds_extra}\n[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
            socket.display(),
            cert_table("web", &crt, &key)
        ),
    )
    .unwrap();
    let args = ["run", "--config", config.to_str().unwrap()];
    let p = match nofile {
        Some(n) => Process::spawn_with_nofile(&args, &[], n),
        None => Process::spawn(&args, &[]),
    };
    p.wait_for_line("acme-sds started");
    let sds = p.listen_addr("SDS");
    let admin = p.listen_addr("admin");
    (p, sds, admin, socket)
}

fn nack_with(names: Vec<String>, message: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names,
        type_url: acme_sds::registry::SECRET_TYPE_URL.into(),
        version_info: "".into(),
        response_nonce: "1".into(),
        error_detail: Some(acme_sds::proto::google::rpc::Status {
            code: 13,
            message: message.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_are_not_configured_create_no_metric_series() {
    use acme_sds::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    let dir = tempfile::tempdir().unwrap();
    let (p, _, admin, socket) = spawn_with(dir.path(), "", None);
    let mut client = uds_client(&socket).await;
    // Every kind of stream once, so that the series that exist once anything happened exist.
    let (s, r) = SotwStream::subscribed(&mut client, &["web"]).await;
    s.send(ack(&["web"], &r)).await;
    let mut d = DeltaStream::open(&mut client).await;
    d.send(DeltaDiscoveryRequest {
        node: node("n"),
        resource_names_subscribe: vec!["web".into()],
        ..Default::default()
    })
    .await;
    d.recv().await;
    fetch(&mut client, &["web"]).await;
    let before = http_get(admin, "/metrics");

    // One NACK naming 200,000 names nobody configured (three characters each: the request fits the 1 MiB
    // limit): refused, and counted nowhere by name.
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    let unknown: Vec<String> = (0..200_000)
        .map(|i| {
            let c = |n: usize| ALPHABET[n % 62] as char;
            [c(i), c(i / 62), c(i / 3844)].iter().collect()
        })
        .collect();
    let (mut s2, r) = SotwStream::subscribed(&mut client, &["web"]).await;
    s2.send(DiscoveryRequest {
        response_nonce: r.nonce.clone(),
        ..nack_with(unknown.clone(), "rejected")
    })
    .await;
    assert_eq!(s2.end().await.unwrap().code(), Code::InvalidArgument);
    // Within the limits: a stream on 1,000 unknown names that NACKs, a delta stream likewise, a fetch.
    let some: Vec<&str> = unknown[..1000].iter().map(String::as_str).collect();
    let s3 = SotwStream::open(&mut client).await;
    s3.send(subscribe(&some)).await;
    s3.send(nack_with(unknown[..1000].to_vec(), "rejected"))
        .await;
    d.send(DeltaDiscoveryRequest {
        resource_names_subscribe: unknown[1000..1900].to_vec(),
        ..Default::default()
    })
    .await;
    let removed = d.recv().await;
    assert_eq!(removed.removed_resources.len(), 900);
    d.send(DeltaDiscoveryRequest {
        response_nonce: removed.nonce.clone(),
        error_detail: Some(acme_sds::proto::google::rpc::Status {
            code: 13,
            message: "rejected".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    let err = client.fetch_secrets(subscribe(&some)).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    fetch(&mut client, &["web"]).await; // every request above was handled before this one's answer

    let after = http_get(admin, "/metrics");
    let (old, new) = (metric_series(&before), metric_series(&after));
    let added: Vec<&String> = new.difference(&old).collect();
    assert!(
        added.is_empty() && old.len() == new.len(),
        "{} new series, for example {:?}",
        added.len(),
        &added[..added.len().min(5)]
    );
    assert!(
        after.len() <= before.len() + 64,
        "/metrics grew from {} to {} bytes",
        before.len(),
        after.len()
    );
    let unconfigured = after
        .lines()
        .find(|l| l.starts_with("acme_sds_sds_unconfigured_names_total "))
        .unwrap_or_else(|| panic!("no aggregate counter:\n{after}"));
    assert_ne!(
        unconfigured, "acme_sds_sds_unconfigured_names_total 0",
        "counted, in one series"
    );
    drop(p);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_thousand_names_in_one_delta_request_cost_milliseconds_and_stall_nobody() {
    use acme_sds::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
    use std::time::{Duration, Instant};
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let socket = dir.path().join("sds.sock");

    // Others, on their own connection, keep being answered while the big requests are handled.
    let others = {
        let socket = socket.clone();
        tokio::spawn(async move {
            let mut c = uds_client(&socket).await;
            let mut slowest = Duration::ZERO;
            for _ in 0..50 {
                let t = Instant::now();
                fetch(&mut c, &["web"]).await;
                slowest = slowest.max(t.elapsed());
            }
            slowest
        })
    };

    let mut client = uds_client(&socket).await;
    async fn timed(d: &mut DeltaStream, req: DeltaDiscoveryRequest) -> Instant {
        let t = Instant::now();
        d.send(req).await;
        t
    }
    // 100,000 names, 1,000 distinct (each a hundred times): within the cap once de-duplicated.
    let repeated: Vec<String> = (0..100_000).map(|i| format!("name-{}", i % 1000)).collect();
    let mut d = DeltaStream::open(&mut client).await;
    let t = timed(
        &mut d,
        DeltaDiscoveryRequest {
            node: node("n"),
            resource_names_subscribe: repeated.clone(),
            ..Default::default()
        },
    )
    .await;
    let r = d.recv().await;
    let took = t.elapsed();
    assert_eq!(
        r.removed_resources.len(),
        1000,
        "each unknown name reported once"
    );
    assert!(
        took < Duration::from_secs(1),
        "subscribe answered in {took:?}"
    );

    // The same as an unsubscribe: accepted, O(n) against the 1,000 subscribed names.
    let t = timed(
        &mut d,
        DeltaDiscoveryRequest {
            resource_names_unsubscribe: repeated,
            resource_names_subscribe: vec!["web".into()],
            ..Default::default()
        },
    )
    .await;
    let r = d.recv().await;
    let took = t.elapsed();
    assert_eq!(r.resources.len(), 1);
    assert!(
        took < Duration::from_secs(1),
        "unsubscribe answered in {took:?}"
    );

    // 100,000 distinct names: over the cap, in either list, refused at once.
    let distinct: Vec<String> = (0..100_000).map(|i| format!("n-{i}")).collect();
    for (sub, unsub) in [(distinct.clone(), vec![]), (vec![], distinct)] {
        let mut d = DeltaStream::open(&mut client).await;
        let t = timed(
            &mut d,
            DeltaDiscoveryRequest {
                node: node("n"),
                resource_names_subscribe: sub,
                resource_names_unsubscribe: unsub,
                ..Default::default()
            },
        )
        .await;
        let status = d.end().await.unwrap();
        assert_eq!(status.code(), Code::InvalidArgument, "{status}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "refused in {:?}",
            t.elapsed()
        );
    }
    let slowest = others.await.unwrap();
    assert!(
        slowest < Duration::from_secs(1),
        "another client waited {slowest:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_names_huge_nodes_and_forged_nack_messages_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{text}allowed_nodes = [\"*\"]\n")).unwrap();
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;

    let long = "a".repeat(254);
    let err = client.fetch_secrets(subscribe(&[&long])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("253"), "{err}");
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["web", &long])).await;
    assert_eq!(s.end().await.unwrap().code(), Code::InvalidArgument);

    // A node id of 512 KiB: not kept (so it matches no allowed_nodes rule, even "*"), and 100 streams
    // carrying one cost far less than 100 copies of it.
    let pid = p.child.id();
    let before = rss_kib(pid);
    let mut held = Vec::new();
    for i in 0..100 {
        let s = SotwStream::open(&mut client).await;
        s.send(DiscoveryRequest {
            node: node(&format!("{i}{}", "n".repeat(512 * 1024))),
            ..subscribe(&["unrestricted-but-unknown"])
        })
        .await;
        held.push(s);
    }
    let mut s = SotwStream::open(&mut client).await;
    s.send(DiscoveryRequest {
        node: node(&"n".repeat(512 * 1024)),
        ..subscribe(&["web"])
    })
    .await;
    assert_eq!(s.end().await.unwrap().code(), Code::PermissionDenied);
    fetch(&mut client, &["web"]).await;
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 25 * 1024,
        "100 streams with 512 KiB node ids grew RSS by {grown} KiB"
    );

    // Envoy's NACK message is written clipped and quoted: it cannot forge log lines.
    let (s, r) = SotwStream::subscribed(&mut client, &["web"]).await;
    let forged = format!(
        "bad\n2026-11-30T00:00:00.000000Z  INFO acme_sds::daemon: FORGED line\n{}",
        "x".repeat(100_000)
    );
    s.send(DiscoveryRequest {
        response_nonce: r.nonce.clone(),
        ..nack_with(vec!["web".into()], &forged)
    })
    .await;
    let line = p.wait_for_line("NACKed");
    assert!(line.len() < 4096, "a {}-byte log line", line.len());
    assert!(line.contains("\\n2026-11-30T00:00:00"), "{line}");
    assert!(
        !p.log()
            .lines()
            .any(|l| l.contains("FORGED") && !l.contains("NACKed"))
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_nothing_is_dropped_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (p, sds, _, socket) = spawn_with(dir.path(), "handshake_timeout = \"1s\"", None);
    let pid = p.child.id();
    let baseline = open_sockets(pid);
    let mut tcp = tokio::net::TcpStream::connect(sds).await.unwrap();
    let mut unix = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut buf = [0u8; 16];
    let t = std::time::Instant::now();
    let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let n = tokio::time::timeout(WAIT, unix.read(&mut buf))
        .await
        .expect("closed in time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        t.elapsed() >= std::time::Duration::from_millis(900),
        "not before the timeout"
    );
    drop((tcp, unix));
    let deadline = std::time::Instant::now() + WAIT;
    while open_sockets(pid) > baseline {
        assert!(
            std::time::Instant::now() < deadline,
            "descriptors not released"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // A real client is still served.
    fetch(&mut uds_client(&socket).await, &["web"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_backs_off_when_descriptors_run_out_and_recovers() {
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let (p, sds, _, socket) = spawn_with(dir.path(), "", Some(64));
    let pid = p.child.id();
    // More connections than the process has descriptors: accept fails with EMFILE.
    let mut conns = Vec::new();
    for _ in 0..100 {
        conns.push(tokio::net::TcpStream::connect(sds).await.unwrap());
    }
    let deadline = std::time::Instant::now() + WAIT;
    while open_fds(pid) < 64 {
        assert!(
            std::time::Instant::now() < deadline,
            "acme-sds never ran out of descriptors"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Three windows of 400 ms: a spinning accept loop burns a core in every one of them; other work (a
    // periodic file re-check, the runtime's own) comes and goes, so the quietest window is what counts.
    let window = Duration::from_millis(400);
    let mut used = Vec::new();
    for _ in 0..3 {
        let cpu = cpu_seconds(pid);
        tokio::time::sleep(window).await; // the measurement window itself, not a synchronisation
        used.push(cpu_seconds(pid) - cpu);
    }
    let quietest = used.iter().copied().fold(f64::MAX, f64::min);
    assert!(
        quietest < 0.1,
        "CPU seconds per {window:?} window while out of descriptors: {used:.2?}: spinning\n{}",
        p.log()
    );
    assert!(
        p.log().contains("backing off"),
        "and it says why:\n{}",
        p.log()
    );
    // The connections go: the backlog drains and clients are served again.
    drop(conns);
    let mut client = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ch) = uds_channel_result(&socket).await {
                let mut c = acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(ch);
                if c.fetch_secrets(subscribe(&["web"])).await.is_ok() {
                    return c;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("served again after the descriptors came back");
    fetch(&mut client, &["web"]).await;
}

/// Connections from `from` to `to` that send nothing.
async fn idle_connections(
    from: &str,
    to: std::net::SocketAddr,
    n: usize,
) -> Vec<tokio::net::TcpStream> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
        // A refused or reset connection still counts as an attempt.
        if let Ok(Ok(s)) = tokio::time::timeout(WAIT, socket.connect(to)).await {
            out.push(s);
        }
    }
    out
}

/// Idle connections by the thousand (to the SDS and the admin port) and a peer at its stream quota do not
/// keep a real Envoy from connecting and being served; when they go, their descriptors go too. acme-sds
/// runs with 4,000 descriptors, as a service manager might give it: the 4,000 idle connections alone would
/// use them all up if nothing bounded them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_a_peer_at_its_quota_do_not_stop_a_real_envoy() {
    use testkit::envoy::{Envoy, SdsClient, envoy_bin, one_secret_bootstrap};
    let Some(bin) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let (p, sds, admin, _) = spawn_with(
        dir.path(),
        "max_streams = 100\nmax_streams_per_peer = 40",
        Some(4000),
    );
    let pid = p.child.id();
    let baseline = open_sockets(pid);

    let idle_sds = idle_connections("127.0.0.2", sds, 2000).await;
    let idle_admin = idle_connections("127.0.0.2", admin, 2000).await;
    // A peer (another address) opening streams as fast as it can: it gets its quota, no more.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{sds}"))
        .unwrap()
        .local_address(Some("127.0.0.3".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    let mut greedy = acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(channel);
    let mut held = Vec::new();
    let mut refused = 0;
    for i in 0..150 {
        let opened = match SotwStream::try_open(&mut greedy).await {
            Ok(mut s) => {
                s.send(subscribe(&["web", &format!("x{i}")])).await;
                match s.end_or_next().await {
                    Some(Ok(_)) => Ok(s),
                    Some(Err(status)) => Err(status),
                    None => panic!("stream ended without a status"),
                }
            }
            Err(status) => Err(status),
        };
        match opened {
            Ok(s) => held.push(s),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
                refused += 1;
            }
        }
    }
    assert_eq!((held.len(), refused), (40, 110), "the quota, then refusals");
    let during = open_sockets(pid);
    assert!(
        during < baseline + 512 + 1024 + 64,
        "{during} descriptors: the SDS per-source cap (512) and the admin cap (1,024) bound them"
    );
    eprintln!(
        "acme-sds descriptors: {baseline} before, {during} with {} + {} idle connections and the greedy peer",
        idle_sds.len(),
        idle_admin.len()
    );

    // A real Envoy, from 127.0.0.1, is served all the same.
    let pki_dir = tempfile::tempdir().unwrap();
    let address = format!(
        "{{ socket_address: {{ address: {}, port_value: {} }} }}",
        sds.ip(),
        sds.port()
    );
    let bootstrap = one_secret_bootstrap(SdsClient::EnvoyGrpc(&address), "GRPC");
    let mut envoy = Envoy::start(&bin, &bootstrap, pki_dir.path());
    envoy.wait_live();
    assert_eq!(
        envoy.stat("sds.web.update_success"),
        Some(1),
        "{}",
        envoy.log_text()
    );
    assert!(
        http_get(admin, "/healthz").contains("200 OK"),
        "other sources still reach the admin port"
    );

    // They go: so do their descriptors (all but Envoy's own connection).
    drop((idle_sds, idle_admin, held, greedy));
    let deadline = std::time::Instant::now() + WAIT;
    while open_sockets(pid) > baseline + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "descriptors still held: {} (baseline {baseline})",
            open_sockets(pid)
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(http_get(admin, "/healthz").contains("200 OK"));
}
