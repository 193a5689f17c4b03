//! File-backed certificates: every common way of replacing the files reaches a subscribed stream.

use testkit::*;

async fn stream_for(daemon: &Daemon, name: &str) -> (SotwStream, Vec<u8>) {
    let mut client = daemon.client().await;
    let (s, r) = SotwStream::subscribed(&mut client, &[name]).await;
    s.send(ack(&[name], &r)).await;
    let leaf = leaf_der(&decode_secret(&r.resources[0]));
    (s, leaf)
}

async fn next_leaf(s: &mut SotwStream) -> Vec<u8> {
    let r = s.recv().await;
    leaf_der(&decode_secret(&r.resources[0]))
}

#[tokio::test]
async fn rename_over_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = pki.leaf(&["a.example"]);
    let (crt, key) = first.write(dir.path(), "a");
    let daemon = Daemon::start(dir, &cert_table("a", &crt, &key)).await;
    let (mut s, leaf) = stream_for(&daemon, "a").await;
    assert_eq!(leaf, first.leaf_der);
    let second = pki.leaf(&["a.example"]);
    second.write(daemon.dir.path(), "a");
    assert_eq!(next_leaf(&mut s).await, second.leaf_der);
}

#[tokio::test]
async fn in_place_rewrite_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = pki.leaf(&["b.example"]);
    let (crt, key) = first.write(dir.path(), "b");
    let daemon = Daemon::start(dir, &cert_table("b", &crt, &key)).await;
    let (mut s, _) = stream_for(&daemon, "b").await;
    let second = pki.leaf(&["b.example"]);
    // Key first, then certificate: in between, the pair does not match and must not be served.
    rewrite_in_place(&key, second.key_pem.as_bytes());
    rewrite_in_place(&crt, second.chain_pem.as_bytes());
    assert_eq!(next_leaf(&mut s).await, second.leaf_der);
}

#[tokio::test]
async fn combined_pem_file_is_served_and_rotated() {
    // One file holding the chain and the key (as HAProxy and many renewal hooks write it): `cert_file` and
    // `key_file` name the same path, and one rename replaces both at once.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let combined = |leaf: &Leaf| format!("{}{}", leaf.key_pem, leaf.chain_pem);
    let pem = dir.path().join("c.pem");
    let first = pki.leaf(&["c.example"]);
    replace_by_rename(&pem, combined(&first).as_bytes());
    let daemon = Daemon::start(dir, &cert_table("c", &pem, &pem)).await;
    let (mut s, leaf) = stream_for(&daemon, "c").await;
    assert_eq!(leaf, first.leaf_der);
    let second = pki.leaf(&["c.example"]);
    replace_by_rename(&pem, combined(&second).as_bytes());
    let r = s.recv().await;
    let secret = decode_secret(&r.resources[0]);
    assert_eq!(leaf_der(&secret), second.leaf_der);
    // Envoy gets the chain and the key apart, each as it expects them.
    use acme_sds::proto::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    let Some(Type::TlsCertificate(tls)) = secret.r#type else {
        panic!("not a TLS certificate: {secret:?}");
    };
    let text = |d: Option<_>| String::from_utf8(inline(&d.unwrap())).unwrap();
    let (chain, key) = (text(tls.certificate_chain), text(tls.private_key));
    assert!(
        chain.contains("CERTIFICATE") && !chain.contains("PRIVATE KEY"),
        "{chain}"
    );
    assert!(key.contains("PRIVATE KEY") && !key.contains("CERTIFICATE"));
}

#[tokio::test]
async fn kubernetes_secret_symlink_swap_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let first = pki.leaf(&["k8s.example"]);
    let mut secret_dir = K8sSecretDir::new(&dir.path().join("secret-volume"), &first);
    let daemon = Daemon::start(
        dir,
        &cert_table("k8s", &secret_dir.crt(), &secret_dir.key()),
    )
    .await;
    let (mut s, leaf) = stream_for(&daemon, "k8s").await;
    assert_eq!(leaf, first.leaf_der);
    for _ in 0..2 {
        let next = pki.leaf(&["k8s.example"]);
        secret_dir.update(&next);
        assert_eq!(next_leaf(&mut s).await, next.leaf_der);
    }
}

#[tokio::test]
async fn trust_bundle_rotation_is_pushed() {
    let dir = tempfile::tempdir().unwrap();
    let first = Pki::new();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, first.ca_pem()).unwrap();
    let daemon = Daemon::start(
        dir,
        &format!(
            "[[trust_bundle]]\nname = \"ca\"\nfile = \"{}\"\n",
            ca.display()
        ),
    )
    .await;
    let mut client = daemon.client().await;
    let (mut s, r1) = SotwStream::subscribed(&mut client, &["ca"]).await;
    s.send(ack(&["ca"], &r1)).await;
    let second = Pki::new();
    replace_by_rename(
        &ca,
        format!("{}{}", first.ca_pem(), second.ca_pem()).as_bytes(),
    );
    let r2 = s.recv().await;
    let secret = decode_secret(&r2.resources[0]);
    let Some(acme_sds::proto::envoy::extensions::transport_sockets::tls::v3::secret::Type::ValidationContext(vc)) = secret.r#type else {
        panic!("not a validation context");
    };
    let pem = String::from_utf8(inline(vc.trusted_ca.as_ref().unwrap())).unwrap();
    assert_eq!(pem.matches("BEGIN CERTIFICATE").count(), 2);
}
