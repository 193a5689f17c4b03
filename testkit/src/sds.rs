//! SDS from the client side: channels over Unix sockets, requests and ACK/NACKs as Envoy sends them,
//! SotW and delta streams, and what a served secret holds.

use std::path::Path;
use std::time::Duration;

use acme_sds::proto::envoy::config::core::v3::Node;
use acme_sds::proto::envoy::extensions::transport_sockets::tls::v3::{Secret, secret};
use acme_sds::proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use acme_sds::proto::google::protobuf::Any;
use acme_sds::proto::google::rpc;
use acme_sds::registry::SECRET_TYPE_URL;
use hyper_util::rt::TokioIo;
use prost::Message;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Status, Streaming};

use crate::*;

pub async fn uds_client(path: &Path) -> SecretDiscoveryServiceClient<Channel> {
    SecretDiscoveryServiceClient::new(uds_channel(path).await)
}

pub async fn uds_channel(path: &Path) -> Channel {
    uds_channel_result(path).await.unwrap()
}

pub async fn uds_channel_result(path: &Path) -> Result<Channel, tonic::transport::Error> {
    let path = path.to_owned();
    Endpoint::try_from("http://acme-sds.invalid")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
}

// ---------- SDS requests and responses ----------

pub fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.to_owned(),
        cluster: "test-cluster".to_owned(),
    })
}

/// The first request of a SotW stream.
pub fn subscribe(names: &[&str]) -> DiscoveryRequest {
    DiscoveryRequest {
        node: node("test-node"),
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        ..Default::default()
    }
}

/// A later SotW request (no node) changing the subscription, acknowledging `last`.
pub fn resubscribe(names: &[&str], last: &DiscoveryResponse) -> DiscoveryRequest {
    DiscoveryRequest {
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET_TYPE_URL.to_owned(),
        version_info: last.version_info.clone(),
        response_nonce: last.nonce.clone(),
        ..Default::default()
    }
}

pub fn ack(names: &[&str], resp: &DiscoveryResponse) -> DiscoveryRequest {
    resubscribe(names, resp)
}

pub fn nack(names: &[&str], resp: &DiscoveryResponse, previous_version: &str) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: previous_version.to_owned(),
        error_detail: Some(rpc::Status {
            code: 13,
            message: "Failed to load certificate chain from <inline>".to_owned(),
            details: vec![],
        }),
        ..resubscribe(names, resp)
    }
}

/// The first request of a delta stream from the node `node_id`, subscribing to `names`.
pub fn delta_subscribe<S: AsRef<str>>(node_id: &str, names: &[S]) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: node(node_id),
        type_url: SECRET_TYPE_URL.to_owned(),
        resource_names_subscribe: names.iter().map(|n| n.as_ref().to_owned()).collect(),
        ..Default::default()
    }
}

/// A delta ACK of `resp`.
pub fn delta_ack(resp: &DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        response_nonce: resp.nonce.clone(),
        type_url: SECRET_TYPE_URL.to_owned(),
        ..Default::default()
    }
}

pub fn decode_secret(any: &Any) -> Secret {
    assert_eq!(any.type_url, SECRET_TYPE_URL);
    Secret::decode(any.value.clone()).unwrap()
}

/// The leaf certificate DER of a tls_certificate secret.
pub fn leaf_der(secret: &Secret) -> Vec<u8> {
    let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
        panic!("not a tls_certificate: {secret:?}");
    };
    let chain = inline(tls.certificate_chain.as_ref().unwrap());
    CertificateDer::pem_slice_iter(&chain)
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

/// Whether a secret is acme-sds's temporary stand-in for a certificate not issued yet (its subject says so).
pub fn is_temporary(secret: &Secret) -> bool {
    if !matches!(secret.r#type, Some(secret::Type::TlsCertificate(_))) {
        return false;
    }
    x509_parser::parse_x509_certificate(&leaf_der(secret))
        .map(|(_, c)| {
            c.subject()
                .to_string()
                .contains(acme_sds::sources::acme::temporary::MARKER)
        })
        .unwrap_or(false)
}

/// Every certificate (DER) of a tls_certificate secret's chain, leaf first.
pub fn chain_ders(secret: &Secret) -> Vec<Vec<u8>> {
    let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
        panic!("not a tls_certificate: {secret:?}");
    };
    let chain = inline(tls.certificate_chain.as_ref().unwrap());
    CertificateDer::pem_slice_iter(&chain)
        .map(|c| c.unwrap().to_vec())
        .collect()
}

pub fn inline(ds: &acme_sds::proto::envoy::config::core::v3::DataSource) -> Vec<u8> {
    use acme_sds::proto::envoy::config::core::v3::data_source::Specifier;
    match &ds.specifier {
        Some(Specifier::InlineBytes(b)) => b.to_vec(),
        other => panic!("expected inline_bytes, got {other:?}"),
    }
}

/// A unary FetchSecrets that must succeed.
pub async fn fetch(
    client: &mut SecretDiscoveryServiceClient<Channel>,
    names: &[&str],
) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, client.fetch_secrets(subscribe(names)))
        .await
        .expect("fetch timed out")
        .expect("fetch failed")
        .into_inner()
}

/// A bidirectional SotW stream.
pub struct SotwStream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: Streaming<DiscoveryResponse>,
}

impl SotwStream {
    pub async fn open(client: &mut SecretDiscoveryServiceClient<Channel>) -> Self {
        Self::try_open(client).await.expect("stream open failed")
    }

    /// Opens a stream, or the status it was refused with.
    pub async fn try_open(
        client: &mut SecretDiscoveryServiceClient<Channel>,
    ) -> Result<Self, Status> {
        let (tx, rx) = mpsc::channel(16);
        let rx = tokio::time::timeout(WAIT, client.stream_secrets(ReceiverStream::new(rx)))
            .await
            .expect("stream open timed out")?
            .into_inner();
        Ok(SotwStream { tx, rx })
    }

    /// Opens a stream, subscribes to `names` and returns it with the first response.
    pub async fn subscribed(
        client: &mut SecretDiscoveryServiceClient<Channel>,
        names: &[&str],
    ) -> (Self, DiscoveryResponse) {
        let mut s = Self::open(client).await;
        s.send(subscribe(names)).await;
        let r = s.recv().await;
        (s, r)
    }

    pub async fn send(&self, req: DiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The next response; panics on timeout or stream end.
    pub async fn recv(&mut self) -> DiscoveryResponse {
        self.recv_within(WAIT).await
    }

    pub async fn recv_within(&mut self, wait: Duration) -> DiscoveryResponse {
        match tokio::time::timeout(wait, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => panic!("stream failed: {s}"),
            Err(_) => panic!("no response within {wait:?}"),
        }
    }

    /// The next response that carries no temporary certificate (one served until the first issuance):
    /// temporary ones are acknowledged and skipped.
    pub async fn recv_issued(&mut self, wait: Duration) -> DiscoveryResponse {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let r = self
                .recv_within(deadline.saturating_duration_since(std::time::Instant::now()))
                .await;
            let secrets: Vec<Secret> = r.resources.iter().map(decode_secret).collect();
            if !secrets.iter().any(is_temporary) {
                return r;
            }
            let names: Vec<&str> = secrets.iter().map(|s| s.name.as_str()).collect();
            self.send(ack(&names, &r)).await;
        }
    }

    /// The next message, or the stream's end (None) or error status.
    pub async fn end_or_next(&mut self) -> Option<Result<DiscoveryResponse, Status>> {
        self.rx.message().await.transpose()
    }

    /// The status the stream ends with.
    pub async fn end(&mut self) -> Option<Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => panic!("expected the stream to end, got {r:?}"),
            Ok(Ok(None)) => None,
            Ok(Err(s)) => Some(s),
            Err(_) => panic!("stream did not end within {WAIT:?}"),
        }
    }
}

/// A bidirectional delta stream.
pub struct DeltaStream {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl DeltaStream {
    pub async fn open(client: &mut SecretDiscoveryServiceClient<Channel>) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let rx = tokio::time::timeout(WAIT, client.delta_secrets(ReceiverStream::new(rx)))
            .await
            .expect("stream open timed out")
            .expect("stream open failed")
            .into_inner();
        DeltaStream { tx, rx }
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The status the stream ends with.
    pub async fn end(&mut self) -> Option<Status> {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => panic!("expected the stream to end, got {r:?}"),
            Ok(Ok(None)) => None,
            Ok(Err(s)) => Some(s),
            Err(_) => panic!("stream did not end within {WAIT:?}"),
        }
    }

    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        match tokio::time::timeout(WAIT, self.rx.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => panic!("stream ended"),
            Ok(Err(s)) => panic!("stream failed: {s}"),
            Err(_) => panic!("no response within {WAIT:?}"),
        }
    }
}

/// An SDS client over TCP (`http://IP:PORT`), as the generated `connect` would make one.
pub async fn tcp_client(
    url: String,
) -> Result<SecretDiscoveryServiceClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url)?.connect().await?;
    Ok(SecretDiscoveryServiceClient::new(channel))
}
