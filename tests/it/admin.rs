//! The admin listener: health, readiness and a JSON status of every secret.

use testkit::*;

fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let web = pki.leaf(&["www.example.com"]);
    let (crt, key) = web.write(dir.path(), "web");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let tables = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}[[trust_bundle]]\nname = \"ca\"\nfile = \"{}\"\n",
        cert_table("web", &crt, &key),
        ca.display()
    );
    let daemon = Daemon::start(dir, &tables).await;
    let admin = daemon.running().admin_addr().unwrap();
    assert_eq!(get(admin, "/healthz").0, 200);
    assert_eq!(get(admin, "/readyz").0, 200);
    assert_eq!(get(admin, "/nope").0, 404);

    let mut client = daemon.client().await;
    let (_s, _) = SotwStream::subscribed(&mut client, &["web"]).await;
    let (status, body) = get(admin, "/status");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let secrets = v["secrets"].as_array().unwrap();
    let web_status = secrets.iter().find(|s| s["name"] == "web").unwrap();
    assert_eq!(web_status["source"], "files");
    assert_eq!(web_status["serving"], true);
    assert_eq!(web_status["subscribed_streams"], 1);
    assert!(web_status["serial"].as_str().unwrap().contains(':'));
    assert!(
        web_status["not_after"]
            .as_str()
            .unwrap()
            .starts_with("4096-")
    );
    let ca_status = secrets.iter().find(|s| s["name"] == "ca").unwrap();
    assert_eq!(ca_status["source"], "trust_bundle");
    assert_eq!(ca_status["subscribed_streams"], 0);
    assert!(!body.contains("PRIVATE"));

    let (status, metrics) = get(admin, "/metrics");
    assert_eq!(status, 200);
    for line in [
        "acme_sds_sds_streams{rpc=\"sotw\"} 1",
        "acme_sds_certificate_ready{name=\"web\"} 1",
        "# TYPE acme_sds_sds_pushes counter",
        "# TYPE acme_sds_certificate_not_after_timestamp_seconds gauge",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    assert!(metrics.contains("acme_sds_sds_pushes_total "), "{metrics}");
    let not_after = metrics
        .lines()
        .find(|l| l.starts_with("acme_sds_certificate_not_after_timestamp_seconds{name=\"web\"}"))
        .unwrap();
    let value: f64 = not_after.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value > 4e10, "{not_after}");
    assert!(
        !metrics.contains("name=\"ca\""),
        "trust bundles have no certificate gauges"
    );
}

/// Two daemons in one process count apart: each one's metrics are its own (no process-wide counters).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_in_one_process_keep_their_own_metrics() {
    let pki = Pki::new();
    let start = |dir: tempfile::TempDir| {
        let (crt, key) = pki.leaf(&["www.example.com"]).write(dir.path(), "web");
        let tables = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}",
            cert_table("web", &crt, &key)
        );
        async move { Daemon::start(dir, &tables).await }
    };
    let busy = start(tempfile::tempdir().unwrap()).await;
    let idle = start(tempfile::tempdir().unwrap()).await;
    let mut client = busy.client().await;
    let (_s, _) = SotwStream::subscribed(&mut client, &["web"]).await;
    let pushes = |d: &Daemon| {
        let (_, m) = get(d.running().admin_addr().unwrap(), "/metrics");
        m.lines()
            .find(|l| l.starts_with("acme_sds_sds_pushes_total "))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    assert_eq!(pushes(&busy), "acme_sds_sds_pushes_total 1");
    assert_eq!(pushes(&idle), "acme_sds_sds_pushes_total 0");
}

/// `acme-sds status` without a daemon reads the files and the store through the daemon's own code: for
/// every kind of secret it tells what the running daemon's `/status` tells (but for the streams, which only
/// a daemon can count).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_status_tells_what_the_daemon_tells() {
    use acme_sds::ops::status::SecretStatus;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["www.example.com"]).write(dir.path(), "web");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pki.ca_pem()).unwrap();
    let tables = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{}[[certificate]]\nname = \"dev\"\nissuer = \"internal\"\ndomains = [\"localhost\", \"10.0.0.1\"]\n\n[[trust_bundle]]\nname = \"ca\"\nfile = \"{}\"\n",
        cert_table("web", &crt, &key),
        ca.display()
    );
    let daemon = Daemon::start(dir, &tables).await;
    let (_, body) = get(daemon.running().admin_addr().unwrap(), "/status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let live: Vec<SecretStatus> = serde_json::from_value(v["secrets"].clone()).unwrap();
    let config = acme_sds::config::load(&daemon.dir.path().join("acme-sds.toml")).unwrap();
    let offline = acme_sds::ops::status::offline(&config).await.unwrap();
    assert_eq!(live.len(), 3);
    assert_eq!(offline.len(), live.len());
    for (a, b) in live.iter().zip(&offline) {
        assert_eq!(a.subscribed_streams, Some(0), "{}", a.name);
        assert_eq!(b.subscribed_streams, None, "{}", b.name);
        let same = |s: &SecretStatus| SecretStatus {
            subscribed_streams: None,
            ..s.clone()
        };
        assert_eq!(same(a), same(b));
    }
    let web = live.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(
        web.domains,
        ["www.example.com"],
        "a file certificate's names"
    );
    let dev = live.iter().find(|s| s.name == "dev").unwrap();
    assert!(dev.next_renewal.is_some() && dev.serving);
}
