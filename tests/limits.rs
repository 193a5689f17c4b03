//! Bad and excessive input: oversized name lists, many streams opened and dropped. The process stays up and
//! does not grow.

mod support;

use acme_sds::proto::envoy::service::discovery::v3::DiscoveryRequest;
use support::*;
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
