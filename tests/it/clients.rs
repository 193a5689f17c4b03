//! SDS clients nobody on this project wrote: Python's grpcio with a default channel (gRPC-core, which sends
//! the socket path as `:authority` on Unix sockets), and Envoy's own `google_grpc` client, over the Unix
//! socket; and proof that the TCP listener still refuses what h2 refuses.

use std::io::{Read, Write};
use std::process::Command;

use acme_sds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryResponse,
};
use acme_sds::registry::SECRET_TYPE_URL;
use prost::Message;
use testkit::envoy::{Envoy, SdsClient, envoy_bin, https_get, one_secret_bootstrap};
use testkit::*;

/// Python with grpcio, or `None` to skip (under CI a missing one fails: `scripts/setup` installs it).
pub(crate) fn python_with_grpcio() -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !in_ci(),
            "python3 with grpcio not found: scripts/lib/tools.sh installs it (pip install grpcio)"
        );
        eprintln!("SKIPPED: python3 with grpcio not found (pip install grpcio)");
        return None;
    }
    Some("python3")
}

/// One call through `tests/support/grpcio_client.py`: Ok(first response bytes) or Err((code, details)).
pub(crate) fn grpcio_call(
    target: &str,
    rpc: &str,
    request: &[u8],
) -> Result<Vec<u8>, (String, String)> {
    let script = testkit::script("grpcio_client.py");
    let hex: String = request.iter().map(|b| format!("{b:02x}")).collect();
    let out = Command::new("python3")
        .arg(script)
        .args([target, rpc, &hex])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    match v["response"].as_str() {
        Some(h) => Ok((0..h.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
            .collect()),
        None => Err((
            v["code"].as_str().unwrap_or_default().to_owned(),
            v["details"].as_str().unwrap_or_default().to_owned(),
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_with_a_default_channel_is_served_on_the_unix_socket_by_every_rpc() {
    let Some(_) = python_with_grpcio() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let web = pki.leaf(&["www.example.com"]);
    let (crt, key) = web.write(dir.path(), "web");
    let daemon =
        Daemon::start_with_listen(dir, &cert_table("web", &crt, &key), &["127.0.0.1:0"]).await;
    let socket = daemon.socket.to_str().unwrap().to_owned();
    let tcp = daemon.running().tcp_addrs()[0].to_string();
    // grpcio's spellings of a Unix socket target; the first sends the path %-encoded as :authority.
    let targets = [format!("unix:{socket}"), format!("unix://{socket}"), tcp];
    let fetch_req = subscribe(&["web"]).encode_to_vec();
    let delta_req = DeltaDiscoveryRequest {
        node: node("py"),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["web".into()],
        ..Default::default()
    }
    .encode_to_vec();
    for target in &targets {
        let blocking = {
            let (target, fetch_req, delta_req) =
                (target.clone(), fetch_req.clone(), delta_req.clone());
            move || {
                (
                    grpcio_call(&target, "fetch", &fetch_req),
                    grpcio_call(&target, "stream", &fetch_req),
                    grpcio_call(&target, "delta", &delta_req),
                )
            }
        };
        let (fetch, stream, delta) = tokio::task::spawn_blocking(blocking).await.unwrap();
        for (rpc, got) in [("FetchSecrets", fetch), ("StreamSecrets", stream)] {
            let bytes = got.unwrap_or_else(|e| panic!("{rpc} over {target}: {e:?}"));
            let r = DiscoveryResponse::decode(&bytes[..]).unwrap();
            assert_eq!(
                leaf_der(&decode_secret(&r.resources[0])),
                web.leaf_der,
                "{rpc} over {target}"
            );
        }
        let bytes = delta.unwrap_or_else(|e| panic!("DeltaSecrets over {target}: {e:?}"));
        let r = DeltaDiscoveryResponse::decode(&bytes[..]).unwrap();
        assert_eq!(r.resources[0].name, "web");
        assert_eq!(
            leaf_der(&decode_secret(r.resources[0].resource.as_ref().unwrap())),
            web.leaf_der,
            "DeltaSecrets over {target}"
        );
    }
    // Refusals still arrive as gRPC statuses, not as resets.
    let refused = tokio::task::spawn_blocking(move || {
        grpcio_call(
            &format!("unix:{socket}"),
            "fetch",
            &subscribe(&["nope"]).encode_to_vec(),
        )
    })
    .await
    .unwrap();
    assert_eq!(refused.unwrap_err().0, "NOT_FOUND");
}

/// HPACK: a header as a literal without indexing, no Huffman (enough for short test values).
fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
    out.push(0);
    for s in [name, value] {
        assert!(s.len() < 127);
        out.push(s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    f.extend([kind, flags]);
    f.extend(stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Opens a stream with `authority` over raw HTTP/2 and returns the RST_STREAM error code the server
/// answers with, or `None` when it answers with response HEADERS instead.
fn raw_request(mut conn: impl Read + Write, authority: &str) -> Option<u32> {
    let mut block = Vec::new();
    literal(&mut block, ":method", "POST");
    literal(&mut block, ":scheme", "http");
    literal(
        &mut block,
        ":path",
        "/envoy.service.secret.v3.SecretDiscoveryService/FetchSecrets",
    );
    literal(&mut block, ":authority", authority);
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4 | 0x1, 1, &block)); // HEADERS, END_HEADERS | END_STREAM
    conn.write_all(&out).unwrap();
    let mut read = |n: usize| {
        let mut b = vec![0; n];
        conn.read_exact(&mut b).unwrap();
        b
    };
    loop {
        let h = read(9);
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let payload = read(len);
        let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]);
        match (h[3], stream) {
            (0x3, 1) => return Some(u32::from_be_bytes(payload[..4].try_into().unwrap())),
            (0x1, 1) => return None,
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_path_authority_is_served_on_unix_sockets_and_refused_on_tcp_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["www.example.com"]).write(dir.path(), "web");
    let daemon =
        Daemon::start_with_listen(dir, &cert_table("web", &crt, &key), &["127.0.0.1:0"]).await;
    let socket = daemon.socket.clone();
    let tcp = daemon.running().tcp_addrs()[0];
    let path = socket.to_str().unwrap().to_owned();
    let encoded = path.trim_start_matches('/').replace('/', "%2F");
    let results = tokio::task::spawn_blocking(move || {
        let unix = |a: &str| {
            let c = std::os::unix::net::UnixStream::connect(&socket).unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            raw_request(c, a)
        };
        let tcp = |a: &str| {
            let c = std::net::TcpStream::connect(tcp).unwrap();
            c.set_read_timeout(Some(WAIT)).unwrap();
            raw_request(c, a)
        };
        (
            unix(&encoded),
            unix(&path),
            unix("localhost"),
            tcp(&encoded),
            tcp("127.0.0.1"),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        results.0, None,
        "grpcio's %-encoded path is served on the Unix socket"
    );
    assert_eq!(
        results.1, None,
        "grpc-go's raw path is served on the Unix socket"
    );
    assert_eq!(results.2, None);
    assert_eq!(results.3, Some(1), "TCP keeps h2's check: PROTOCOL_ERROR");
    assert_eq!(results.4, None);
}

async fn envoy_google_grpc(api_type: &str) {
    let Some(bin) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let web = pki.leaf(&["www.example.com"]);
    let (crt, key) = web.write(dir.path(), "web");
    let envoy_dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir, &cert_table("web", &crt, &key)).await;
    let target = format!("unix:{}", daemon.socket.display());
    let bootstrap = one_secret_bootstrap(SdsClient::GoogleGrpc(&target), api_type);
    let mut envoy = Envoy::start(&bin, &bootstrap, envoy_dir.path());
    envoy.wait_live();
    let port = envoy.listener_port("https");
    let (leaf, _) = https_get(port, "www.example.com", &pki.ca_der())
        .await
        .unwrap();
    assert_eq!(leaf, web.leaf_der, "{}", envoy.log_text());
    assert_eq!(envoy.stat("sds.web.update_rejected").unwrap_or(0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_google_grpc_over_the_unix_socket_sotw() {
    envoy_google_grpc("GRPC").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_google_grpc_over_the_unix_socket_delta() {
    envoy_google_grpc("DELTA_GRPC").await;
}
