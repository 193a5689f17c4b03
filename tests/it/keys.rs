//! Private key formats Envoy accepts (PKCS#8, SEC1, PKCS#1; ECDSA P-256/P-384, RSA), as real tools write
//! them: keys and certificates here come from the `openssl` command line.

use std::path::Path;
use std::process::Command;

use acme_sds::certs::{MaterialError, certified_pem};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").current_dir(dir).args(args).output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!("openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr)),
        Err(e) => panic!("openssl is needed for this test (.ci/run installs it): {e}"),
    }
}

/// Makes a key with `keygen`, and a self-signed certificate for it.
fn key_and_cert(dir: &Path, keygen: &[&str]) -> (Vec<u8>, Vec<u8>) {
    openssl(dir, keygen);
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-key",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "30",
            "-subj",
            "/CN=keys.example",
            "-addext",
            "subjectAltName=DNS:keys.example",
        ],
    );
    (
        std::fs::read(dir.join("key.pem")).unwrap(),
        std::fs::read(dir.join("cert.pem")).unwrap(),
    )
}

#[test]
fn every_key_format_envoy_accepts_is_served_with_its_own_label() {
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "key.pem",
            ],
            "EC PRIVATE KEY",
        ),
        (
            &[
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                "key.pem",
            ],
            "EC PRIVATE KEY",
        ),
        (
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "key.pem",
            ],
            "BEGIN PRIVATE KEY",
        ),
        (
            &["genrsa", "-traditional", "-out", "key.pem", "2048"],
            "RSA PRIVATE KEY",
        ),
        (
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "key.pem",
            ],
            "BEGIN PRIVATE KEY",
        ),
    ];
    for (keygen, label) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = key_and_cert(dir.path(), keygen);
        assert!(
            String::from_utf8_lossy(&key).contains(label),
            "{keygen:?} wrote {label}"
        );
        let c = certified_pem(&cert, &key).unwrap_or_else(|e| panic!("{keygen:?}: {e}"));
        assert!(
            String::from_utf8_lossy(&c.key_pem).contains(label),
            "{keygen:?}"
        );
        assert_eq!(c.leaf.dns_names, ["keys.example"]);
    }
}

#[test]
fn an_rsa_key_with_the_wrong_certificate_is_a_mismatch() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (key_a, _) = key_and_cert(
        a.path(),
        &["genrsa", "-traditional", "-out", "key.pem", "2048"],
    );
    let (_, cert_b) = key_and_cert(
        b.path(),
        &["genrsa", "-traditional", "-out", "key.pem", "2048"],
    );
    assert!(matches!(
        certified_pem(&cert_b, &key_a),
        Err(MaterialError::KeyMismatch)
    ));
}
