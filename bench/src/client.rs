//! SDS clients as cheap as possible, so that the machine is left to acme-sds: tonic channels for a fetch,
//! and a bare HTTP/2 client (`h2`) for ten thousand SotW streams that ACK as Envoy does.

use std::time::Instant;

use acme_sds::proto::envoy::config::core::v3::Node;
use acme_sds::proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use acme_sds::registry::SECRET_TYPE_URL;
use acme_sds::sds::grpc::frame;
use anyhow::{Context, Result, bail};
use bytes::{Buf, Bytes, BytesMut};
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint};

/// The ACK of `last`, as Envoy with `set_node_on_first_message_only` (which README recommends) sends it:
/// version and nonce, without the node.
pub fn ack(name: &str, last: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: vec![name.to_owned()],
        type_url: SECRET_TYPE_URL.into(),
        version_info: last.version_info.clone(),
        response_nonce: last.nonce.clone(),
        ..Default::default()
    }
}

pub fn request(name: &str, last: Option<&DiscoveryResponse>) -> DiscoveryRequest {
    DiscoveryRequest {
        node: Some(Node {
            id: "bench".into(),
            cluster: "bench".into(),
        }),
        resource_names: vec![name.to_owned()],
        type_url: SECRET_TYPE_URL.into(),
        version_info: last.map(|r| r.version_info.clone()).unwrap_or_default(),
        response_nonce: last.map(|r| r.nonce.clone()).unwrap_or_default(),
        ..Default::default()
    }
}

pub async fn channels(port: u16, n: usize) -> Result<Vec<Channel>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
                // Envoy's defaults: 256 MiB per stream, 1 MiB per connection.
                .initial_stream_window_size(256 << 20)
                .initial_connection_window_size(1 << 20)
                .connect()
                .await?,
        );
    }
    Ok(out)
}

/// One FetchSecrets of every one of `names` from the acme-sds at `port` (TCP, plaintext).
pub async fn fetch_all(port: u16, names: &[String]) -> Result<DiscoveryResponse> {
    use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    let chans = channels(port, 1).await?;
    let mut client =
        SecretDiscoveryServiceClient::new(chans[0].clone()).max_decoding_message_size(64 << 20);
    let mut req = request("", None);
    req.resource_names = names.to_vec();
    Ok(client.fetch_secrets(req).await?.into_inner())
}

/// One HTTP/2 connection for SDS streams, as one Envoy holds it.
pub type H2Conn = h2::client::SendRequest<Bytes>;

/// Opens `n` HTTP/2 connections with Envoy's window sizes (256 MiB per stream, 1 MiB per connection).
pub async fn h2_connections(port: u16, n: usize) -> Result<Vec<H2Conn>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(256 << 20)
            .initial_connection_window_size(1 << 20)
            .handshake(tcp)
            .await?;
        tokio::spawn(conn);
        out.push(send);
    }
    Ok(out)
}

/// One SotW stream, as Envoy runs it: ask for `name`, and ACK every response (version and nonce).
/// Calls `on_push` with the arrival time of every decoded response.
pub async fn sotw_stream(
    conn: H2Conn,
    name: String,
    mut on_push: impl FnMut(Instant),
) -> Result<()> {
    let mut conn = conn.ready().await?;
    let req = http::Request::post(
        "http://127.0.0.1/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
    )
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())?;
    let (response, mut send) = conn.send_request(req, false)?;
    send.send_data(frame(&request(&name, None)), false)?;
    let response = response.await?;
    if response.status() != http::StatusCode::OK {
        bail!("StreamSecrets answered HTTP {}", response.status());
    }
    let mut body = response.into_body();
    // Bytes not yet forming a whole message; whole messages are decoded from the received chunk itself.
    let mut partial = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let mut chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if !partial.is_empty() {
            partial.extend_from_slice(&chunk);
            chunk = partial.split().freeze();
        }
        while chunk.len() >= 5 {
            let len = u32::from_be_bytes([chunk[1], chunk[2], chunk[3], chunk[4]]) as usize;
            if chunk.len() < 5 + len {
                break;
            }
            let mut msg = chunk.split_to(5 + len);
            msg.advance(5);
            let r = DiscoveryResponse::decode(msg)?;
            let now = Instant::now();
            send.send_data(frame(&ack(&name, &r)), false)?;
            on_push(now);
        }
        partial.extend_from_slice(&chunk);
    }
    bail!("stream ended")
}

/// Opens `n` streams over `conns` (round robin) for `names` (round robin); waits until each has its first
/// response, then reports the arrival time of every later push.
///
/// The client is plain HTTP/2 (the `h2` crate: one task per stream, no per-message channel) on the
/// benchmark's single thread, so that as much of the machine as possible is left to acme-sds.
pub async fn open_streams(
    conns: &[H2Conn],
    names: &[String],
    n: usize,
) -> Result<(
    mpsc::UnboundedReceiver<Instant>,
    Vec<tokio::task::JoinHandle<()>>,
)> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<()>();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let conn = conns[i % conns.len()].clone();
        let name = names[i % names.len()].clone();
        let tx = tx.clone();
        let ready = ready_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            let _ = sotw_stream(conn, name, |now| {
                if first {
                    first = false;
                    let _ = ready.send(());
                } else {
                    let _ = tx.send(now);
                }
            })
            .await;
        }));
    }
    drop(ready_tx);
    for _ in 0..n {
        ready_rx.recv().await.context("a stream failed to open")?;
    }
    Ok((rx, tasks))
}
