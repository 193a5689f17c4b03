//! SDS protocol rules, checked with a real tonic client against acme-sds serving file-backed certificates.

use std::collections::HashMap;

use acme_sds::certs;
use acme_sds::proto::envoy::extensions::transport_sockets::tls::v3::secret;
use acme_sds::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use acme_sds::registry::{SECRET_TYPE_URL, SecretContent};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;
use testkit::*;
use tonic::Code;

/// A daemon serving `web` (www.example.com) and `api` (api.example.com) from files, and the CA bundle `ca`.
struct Fixture {
    pki: Pki,
    daemon: Daemon,
    web: Leaf,
    api: Leaf,
}

impl Fixture {
    async fn new() -> Fixture {
        Self::with_listen(&[]).await
    }

    async fn with_listen(extra: &[&str]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new();
        let web = pki.leaf(&["www.example.com"]);
        let api = pki.leaf(&["api.example.com"]);
        let (wc, wk) = web.write(dir.path(), "web");
        let (ac, ak) = api.write(dir.path(), "api");
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, pki.ca_pem()).unwrap();
        let tables = format!(
            "{}{}[[trust_bundle]]\nname = \"ca\"\nfile = \"{}\"\n",
            cert_table("web", &wc, &wk),
            cert_table("api", &ac, &ak),
            ca.display()
        );
        let daemon = Daemon::start_with_listen(dir, &tables, extra).await;
        Fixture {
            pki,
            daemon,
            web,
            api,
        }
    }

    /// Issues a new leaf for `name` and replaces its files (rename over).
    fn rotate(&self, name: &str, dns: &str) -> Leaf {
        let leaf = self.pki.leaf(&[dns]);
        leaf.write(self.daemon.dir.path(), name);
        leaf
    }
}

fn leaf_of(resp_any: &acme_sds::proto::google::protobuf::Any) -> Vec<u8> {
    leaf_der(&decode_secret(resp_any))
}

#[tokio::test]
async fn sotw_first_response_serves_the_files_as_inline_pem() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let (_s, r) = SotwStream::subscribed(&mut client, &["web"]).await;
    assert_eq!(r.type_url, SECRET_TYPE_URL);
    assert!(!r.version_info.is_empty());
    assert!(!r.nonce.is_empty());
    assert_eq!(r.resources.len(), 1);
    let secret = decode_secret(&r.resources[0]);
    assert_eq!(secret.name, "web");
    assert_eq!(leaf_der(&secret), f.web.leaf_der);
    let Some(secret::Type::TlsCertificate(tls)) = &secret.r#type else {
        unreachable!()
    };
    let served_key =
        PrivateKeyDer::from_pem_slice(&inline(tls.private_key.as_ref().unwrap())).unwrap();
    let file_key = PrivateKeyDer::from_pem_slice(f.web.key_pem.as_bytes()).unwrap();
    assert_eq!(served_key.secret_der(), file_key.secret_der());
    // The chain carries the intermediate/CA after the leaf.
    let chain = inline(tls.certificate_chain.as_ref().unwrap());
    assert_eq!(
        String::from_utf8(chain)
            .unwrap()
            .matches("BEGIN CERTIFICATE")
            .count(),
        2
    );
}

#[tokio::test]
async fn sotw_ack_is_not_answered_and_rotation_is_pushed() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let (mut s, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    s.send(ack(&["web"], &r1)).await;
    let new = f.rotate("web", "www.example.com");
    // Had the ACK been answered, that answer (old version) would come first.
    let r2 = s.recv().await;
    assert_ne!(r2.version_info, r1.version_info);
    assert_ne!(r2.nonce, r1.nonce);
    assert_eq!(leaf_of(&r2.resources[0]), new.leaf_der);
}

#[tokio::test]
async fn nack_is_not_answered_stream_survives_and_later_rotations_arrive() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let (mut s, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    s.send(ack(&["web"], &r1)).await;
    let new = f.rotate("web", "www.example.com");
    let r2 = s.recv().await;
    assert_eq!(leaf_of(&r2.resources[0]), new.leaf_der);
    // Envoy rejects r2 and keeps r1's version.
    s.send(nack(&["web"], &r2, &r1.version_info)).await;
    let newer = f.rotate("web", "www.example.com");
    let r3 = s.recv().await;
    assert_eq!(
        leaf_of(&r3.resources[0]),
        newer.leaf_der,
        "r2 must not be resent"
    );
    assert_ne!(r3.version_info, r2.version_info);
}

#[tokio::test]
async fn stale_nonce_is_ignored() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let (mut s, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    let mut stale = resubscribe(&["web", "api"], &r1);
    stale.response_nonce = "not-the-latest".into();
    s.send(stale).await;
    let new = f.rotate("web", "www.example.com");
    let r2 = s.recv().await;
    assert_eq!(
        r2.resources.len(),
        1,
        "the stale request's subscription change was ignored"
    );
    assert_eq!(leaf_of(&r2.resources[0]), new.leaf_der);
}

#[tokio::test]
async fn subscription_changes_are_honoured() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let (mut s, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    s.send(resubscribe(&["web", "api"], &r1)).await;
    let r2 = s.recv().await;
    let names: Vec<_> = r2.resources.iter().map(|a| decode_secret(a).name).collect();
    assert_eq!(
        names,
        ["web", "api"],
        "state of the world: both, web unchanged"
    );
    assert_eq!(leaf_of(&r2.resources[0]), f.web.leaf_der);
    assert_eq!(leaf_of(&r2.resources[1]), f.api.leaf_der);
    // Drop web and add ca: the answer (api unchanged, ca new; no web) proves the change was handled.
    s.send(resubscribe(&["api", "ca"], &r2)).await;
    let r3 = s.recv().await;
    let names: Vec<_> = r3.resources.iter().map(|a| decode_secret(a).name).collect();
    assert_eq!(names, ["api", "ca"]);
    s.send(ack(&["api", "ca"], &r3)).await;
    // A web rotation must not reach us; an api one must.
    f.rotate("web", "www.example.com");
    let new_api = f.rotate("api", "api.example.com");
    let r4 = s.recv().await;
    let names: Vec<_> = r4.resources.iter().map(|a| decode_secret(a).name).collect();
    assert_eq!(names, ["api", "ca"], "web was unsubscribed");
    assert_eq!(leaf_of(&r4.resources[0]), new_api.leaf_der);
}

#[tokio::test]
async fn unknown_name_keeps_the_stream_open_until_it_appears() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["late", "web"])).await;
    // The answer (web only) proves the request naming "late" was handled before "late" exists.
    let r1 = s.recv().await;
    let names: Vec<_> = r1.resources.iter().map(|a| decode_secret(a).name).collect();
    assert_eq!(names, ["web"]);
    s.send(ack(&["late", "web"], &r1)).await;
    let leaf = f.pki.leaf(&["late.example.com"]);
    let content = SecretContent::TlsCertificate(
        certs::certified_pem(leaf.chain_pem.as_bytes(), leaf.key_pem.as_bytes()).unwrap(),
    );
    f.daemon.running().registry().publish("late", &content);
    let r2 = s.recv().await;
    let names: Vec<_> = r2.resources.iter().map(|a| decode_secret(a).name).collect();
    assert_eq!(
        names,
        ["late", "web"],
        "web is kept: a response never drops a delivered secret"
    );
    assert_eq!(leaf_of(&r2.resources[0]), leaf.leaf_der);
}

#[tokio::test]
async fn istio_sds_prefix_names_the_same_secret() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let (_s, r) = SotwStream::subscribed(&mut client, &["sds://web"]).await;
    let secret = decode_secret(&r.resources[0]);
    assert_eq!(
        secret.name, "sds://web",
        "Envoy requires the name it asked for"
    );
    assert_eq!(leaf_der(&secret), f.web.leaf_der);
}

#[tokio::test]
async fn empty_resource_names_enumerate_nothing() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&[])).await;
    // Had the empty request been a wildcard, its answer (every secret) would arrive first.
    s.send(DiscoveryRequest {
        resource_names: vec!["api".into()],
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    })
    .await;
    let r = s.recv().await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(decode_secret(&r.resources[0]).name, "api");

    let err = client.fetch_secrets(subscribe(&[])).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let mut d = DeltaStream::open(&mut client).await;
    d.send(DeltaDiscoveryRequest {
        node: node("n"),
        type_url: SECRET_TYPE_URL.into(),
        ..Default::default()
    })
    .await;
    d.send(DeltaDiscoveryRequest {
        resource_names_subscribe: vec!["ca".into()],
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    assert_eq!(r.resources.len(), 1);
    assert_eq!(r.resources[0].name, "ca");
}

#[tokio::test]
async fn trust_bundle_is_a_validation_context() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let r = fetch(&mut client, &["ca"]).await;
    let secret = decode_secret(&r.resources[0]);
    let Some(secret::Type::ValidationContext(vc)) = secret.r#type else {
        panic!("expected a validation_context");
    };
    let pem = inline(vc.trusted_ca.as_ref().unwrap());
    let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
    assert_eq!(der.as_ref(), f.pki.ca_der().as_slice());
}

#[tokio::test]
async fn delta_subscribe_unsubscribe_and_missing_names() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let mut d = DeltaStream::open(&mut client).await;
    d.send(DeltaDiscoveryRequest {
        node: node("delta-node"),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["web".into(), "nope".into()],
        ..Default::default()
    })
    .await;
    let r1 = d.recv().await;
    assert_eq!(r1.type_url, SECRET_TYPE_URL);
    assert!(!r1.nonce.is_empty());
    assert_eq!(r1.resources.len(), 1);
    assert_eq!(r1.resources[0].name, "web");
    assert!(!r1.resources[0].version.is_empty());
    assert_eq!(
        leaf_of(r1.resources[0].resource.as_ref().unwrap()),
        f.web.leaf_der
    );
    assert_eq!(r1.removed_resources, ["nope"]);
    // ACK, and unsubscribe web in the same breath as subscribing api.
    d.send(DeltaDiscoveryRequest {
        response_nonce: r1.nonce.clone(),
        resource_names_subscribe: vec!["api".into()],
        resource_names_unsubscribe: vec!["web".into()],
        ..Default::default()
    })
    .await;
    let r2 = d.recv().await;
    assert_eq!(r2.resources.len(), 1, "only the newly subscribed name");
    assert_eq!(r2.resources[0].name, "api");
    assert!(
        r2.removed_resources.is_empty(),
        "nope was reported once already"
    );
    d.send(DeltaDiscoveryRequest {
        response_nonce: r2.nonce.clone(),
        ..Default::default()
    })
    .await;
    f.rotate("web", "www.example.com");
    let new_api = f.rotate("api", "api.example.com");
    let r3 = d.recv().await;
    assert_eq!(r3.resources.len(), 1, "web was unsubscribed");
    assert_eq!(r3.resources[0].name, "api");
    assert_eq!(
        leaf_of(r3.resources[0].resource.as_ref().unwrap()),
        new_api.leaf_der
    );
}

#[tokio::test]
async fn delta_honours_subscription_changes_with_a_stale_nonce_and_ignores_nack() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let mut d = DeltaStream::open(&mut client).await;
    d.send(DeltaDiscoveryRequest {
        node: node("delta-node"),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["web".into()],
        ..Default::default()
    })
    .await;
    let r1 = d.recv().await;
    d.send(DeltaDiscoveryRequest {
        response_nonce: r1.nonce.clone(),
        error_detail: Some(acme_sds::proto::google::rpc::Status {
            code: 3,
            message: "bad secret".into(),
            details: vec![],
        }),
        ..Default::default()
    })
    .await;
    d.send(DeltaDiscoveryRequest {
        response_nonce: "stale".into(),
        resource_names_subscribe: vec!["sds://api".into()],
        ..Default::default()
    })
    .await;
    let r2 = d.recv().await;
    assert_eq!(r2.resources.len(), 1, "the NACKed web is not resent");
    assert_eq!(r2.resources[0].name, "sds://api");
    assert_eq!(
        decode_secret(r2.resources[0].resource.as_ref().unwrap()).name,
        "sds://api"
    );
}

#[tokio::test]
async fn delta_initial_resource_versions_skip_what_the_client_holds() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let web_version = f
        .daemon
        .running()
        .registry()
        .get("web")
        .unwrap()
        .version()
        .to_owned();
    let mut d = DeltaStream::open(&mut client).await;
    d.send(DeltaDiscoveryRequest {
        node: node("reconnecting"),
        type_url: SECRET_TYPE_URL.into(),
        resource_names_subscribe: vec!["web".into(), "api".into(), "gone".into()],
        initial_resource_versions: HashMap::from([
            ("web".to_string(), web_version),
            ("api".to_string(), "outdated".to_string()),
            ("gone".to_string(), "whatever".to_string()),
        ]),
        ..Default::default()
    })
    .await;
    let r = d.recv().await;
    let names: Vec<_> = r.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["api"], "web is current, api is outdated");
    assert!(
        r.removed_resources.is_empty(),
        "a secret the client holds is never taken away: {:?}",
        r.removed_resources
    );
}

#[tokio::test]
async fn fetch_returns_named_secrets_and_refuses_the_rest() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let r = fetch(&mut client, &["web", "sds://api"]).await;
    assert_eq!(r.type_url, SECRET_TYPE_URL);
    let names: Vec<_> = r.resources.iter().map(|a| decode_secret(a).name).collect();
    assert_eq!(names, ["web", "sds://api"]);
    let err = client
        .fetch_secrets(subscribe(&["nope"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let mut wrong = subscribe(&["web"]);
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let err = client.fetch_secrets(wrong).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn tcp_and_unix_listeners_serve_together() {
    let f = Fixture::with_listen(&["127.0.0.1:0"]).await;
    let addr = f.daemon.running().tcp_addrs()[0];
    assert_ne!(addr.port(), 0);
    let mut tcp = tcp_client(format!("http://{addr}")).await.unwrap();
    let r = fetch(&mut tcp, &["web"]).await;
    assert_eq!(leaf_of(&r.resources[0]), f.web.leaf_der);
    let mut uds = f.daemon.client().await;
    let r = fetch(&mut uds, &["api"]).await;
    assert_eq!(leaf_of(&r.resources[0]), f.api.leaf_der);
}

#[tokio::test]
async fn two_hundred_streams_all_receive_a_rotation() {
    let f = Fixture::new().await;
    let channel = uds_channel(&f.daemon.socket).await;
    let mut streams = Vec::new();
    for i in 0..200 {
        let mut client = acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient::new(channel.clone());
        let mut s = SotwStream::open(&mut client).await;
        let name = if i % 2 == 0 { "web" } else { "sds://web" };
        s.send(subscribe(&[name])).await;
        let r = s.recv().await;
        s.send(ack(&[name], &r)).await;
        streams.push(s);
    }
    let new = f.rotate("web", "www.example.com");
    let results = futures_util::future::join_all(streams.iter_mut().map(|s| s.recv())).await;
    for r in results {
        assert_eq!(leaf_of(&r.resources[0]), new.leaf_der);
    }
}

#[tokio::test]
async fn wrong_type_url_ends_only_that_stream() {
    let f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let (mut good, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    good.send(ack(&["web"], &r1)).await;
    let mut bad = SotwStream::open(&mut client).await;
    let mut req = subscribe(&["web"]);
    req.type_url = "type.googleapis.com/envoy.config.listener.v3.Listener".into();
    bad.send(req).await;
    assert_eq!(bad.end().await.unwrap().code(), Code::InvalidArgument);
    let new = f.rotate("web", "www.example.com");
    assert_eq!(leaf_of(&good.recv().await.resources[0]), new.leaf_der);
}

mod raw {
    use bytes::{Buf, BufMut};
    use tonic::Status;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    /// Sends and receives gRPC message bodies as raw bytes, to put garbage on the wire.
    #[derive(Default)]
    pub struct RawCodec;

    impl Codec for RawCodec {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawCodec;
        type Decoder = RawCodec;
        fn encoder(&mut self) -> RawCodec {
            RawCodec
        }
        fn decoder(&mut self) -> RawCodec {
            RawCodec
        }
    }

    impl Encoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawCodec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
        }
    }
}

#[tokio::test]
async fn garbage_requests_get_an_error_and_the_server_keeps_serving() {
    let f = Fixture::new().await;
    let channel = uds_channel(&f.daemon.socket).await;
    for path in [
        "/envoy.service.secret.v3.SecretDiscoveryService/StreamSecrets",
        "/envoy.service.secret.v3.SecretDiscoveryService/DeltaSecrets",
    ] {
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready().await.unwrap();
        let garbage = vec![
            0xff_u8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
        ];
        let req = tonic::Request::new(tokio_stream::iter(vec![garbage]));
        let result = tokio::time::timeout(WAIT, async {
            let mut stream = grpc
                .streaming(
                    req,
                    http::uri::PathAndQuery::from_static(path),
                    raw::RawCodec,
                )
                .await?
                .into_inner();
            stream.message().await
        })
        .await
        .expect("no answer to garbage");
        let status = result.expect_err("garbage must be refused");
        assert_ne!(status.code(), Code::Ok, "{status}");
    }
    let mut client = f.daemon.client().await;
    let r = fetch(&mut client, &["web"]).await;
    assert_eq!(leaf_of(&r.resources[0]), f.web.leaf_der);
}

#[tokio::test]
async fn shutdown_ends_streams_with_unavailable_and_removes_the_socket() {
    let mut f = Fixture::new().await;
    let mut client = f.daemon.client().await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["web"])).await;
    s.recv().await;
    let socket = f.daemon.socket.clone();
    assert!(socket.exists());
    f.daemon.stop().await;
    assert_eq!(s.end().await.unwrap().code(), Code::Unavailable);
    assert!(!socket.exists(), "socket removed on clean shutdown");
}

#[tokio::test]
async fn a_stream_that_never_acknowledges_is_ended_when_it_falls_behind() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let leaf = pki.leaf(&["www.example.com"]);
    let (crt, key) = leaf.write(dir.path(), "web");
    // The first lines of `tables` still belong to [sds].
    let tables = format!(
        "stall_timeout = \"1s\"\n\n{}",
        cert_table("web", &crt, &key)
    );
    let daemon = Daemon::start(dir, &tables).await;
    let mut client = daemon.client().await;
    let (mut silent, _) = SotwStream::subscribed(&mut client, &["web"]).await;
    let (mut acking, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    acking.send(ack(&["web"], &r1)).await;

    // Longer than stall_timeout passes with the silent stream's push unacknowledged: that is the
    // condition under test, not a synchronisation.
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    let newer = pki.leaf(&["www.example.com"]);
    newer.write(daemon.dir.path(), "web");

    assert_eq!(
        leaf_der(&decode_secret(&acking.recv().await.resources[0])),
        newer.leaf_der
    );
    let status = loop {
        match tokio::time::timeout(WAIT, silent_next(&mut silent))
            .await
            .unwrap()
        {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status}");
}

async fn silent_next(s: &mut SotwStream) -> Result<(), tonic::Status> {
    match s.end_or_next().await {
        Some(Ok(_)) => Ok(()),
        Some(Err(status)) => Err(status),
        None => Err(tonic::Status::ok("ended")),
    }
}
