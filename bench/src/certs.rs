//! Certificates for the file-backed scenarios: leaves from the kit's test CA, written as a renewal tool
//! writes them (rename over, key first), and the acme-sds config that serves them.

use std::path::{Path, PathBuf};

use anyhow::Result;
use tempfile::TempDir;
use testkit::Pki;

/// The kit's test CA and a directory of certificate files.
pub struct Certs {
    pub dir: TempDir,
    pki: Pki,
}

/// A freshly issued certificate: its PEM pair and the leaf's DER.
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Certs {
    pub fn new() -> Result<Self> {
        Ok(Certs {
            dir: tempfile::Builder::new()
                .prefix("acme-sds-bench-")
                .tempdir()?,
            pki: Pki::new(),
        })
    }

    /// A leaf for `NAME.example.com`, the leaf alone in its chain (as small as a secret gets).
    pub fn issue(&self, name: &str) -> Result<Issued> {
        let key = rcgen::KeyPair::generate()?;
        let cert = rcgen::CertificateParams::new(vec![format!("{name}.example.com")])?
            .signed_by(&key, self.pki.issuer())?;
        Ok(Issued {
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        })
    }

    /// Writes (rename over) a fresh certificate and key for `name`; returns the leaf's DER.
    pub fn write(&self, name: &str) -> Result<Vec<u8>> {
        let issued = self.issue(name)?;
        self.install(name, &issued)?;
        Ok(issued.der)
    }

    /// Writes (rename over) an issued certificate and key as `name`'s files: key first, as a renewal tool
    /// would, so that the pair is whole the moment the certificate lands.
    pub fn install(&self, name: &str, issued: &Issued) -> Result<()> {
        install_pair(self.dir.path(), name, issued)
    }

    pub fn config(&self, names: &[String], port: u16) -> Result<PathBuf> {
        // One client stands in for a whole fleet: lift the per-peer quotas that would stop it.
        let mut text = format!(
            "[sds]\nlisten = [\"127.0.0.1:{port}\"]\nmax_streams_per_peer = 100000\nmax_names_per_peer = 1000000\n\n"
        );
        for n in names {
            let d = self.dir.path();
            text.push_str(&format!(
                "[[certificate]]\nname = \"{n}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
                d.join(format!("{n}.crt")).display(),
                d.join(format!("{n}.key")).display()
            ));
        }
        let path = self.dir.path().join("acme-sds.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// Writes (rename over) `dir/NAME.key`, then `dir/NAME.crt`.
pub fn install_pair(dir: &Path, name: &str, issued: &Issued) -> Result<()> {
    for (ext, body) in [("key", &issued.key_pem), ("crt", &issued.chain_pem)] {
        testkit::replace_by_rename(&dir.join(format!("{name}.{ext}")), body.as_bytes());
    }
    Ok(())
}

/// Writes (rename over) the key and chain of an issued certificate as one PEM file.
pub fn install_combined(path: &Path, issued: &Issued) -> Result<()> {
    let pem = format!("{}{}", issued.key_pem, issued.chain_pem);
    testkit::replace_by_rename(path, pem.as_bytes());
    Ok(())
}
