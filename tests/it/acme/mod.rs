//! ACME end to end against Pebble: issuance over HTTP-01 served by SDS, restart, renewal and faults.
//! The helpers here are what the three areas share.

use std::path::Path;
use std::time::Duration;

use testkit::pebble::Pebble;
use testkit::*;

mod faults;
mod issuance;
mod storage;

/// Issuance with Pebble takes well under a second; generous bounds absorb a loaded CI machine.
pub(super) const ISSUE: Duration = Duration::from_secs(60);

pub(super) fn acme_tables(pebble: &Pebble, http_port: u16, certs: &[(&str, &[&str])]) -> String {
    let mut t = format!(
        "[http01]\nlisten = \"127.0.0.1:{http_port}\"\n\n{}",
        pebble.acme_table()
    );
    for (name, domains) in certs {
        let list: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
        t.push_str(&format!(
            "[[certificate]]\nname = \"{name}\"\ndomains = [{}]\n\n",
            list.join(", ")
        ));
    }
    t
}

pub(super) fn write_config(dir: &Path, tables: &str) -> std::path::PathBuf {
    let path = dir.join("acme-sds.toml");
    std::fs::write(
        &path,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n{tables}",
            dir.join("sds.sock").display()
        ),
    )
    .unwrap();
    path
}

/// `[acme]` for this Pebble with acme-sds's default retry settings (60 s, doubling, up to a day): what a
/// user runs, and what makes a failed order expensive.
pub(super) fn default_retry_table(pebble: &Pebble) -> String {
    pebble
        .acme_table()
        .replace("retry_initial = \"1s\"\n", "")
        .replace("retry_max = \"4s\"\n", "")
}

/// Runs acme-sds until it has issued a certificate, then stops it cleanly; returns it for its log.
pub(super) fn issue_then_stop(args: &[&str]) -> Process {
    let mut p = Process::spawn(args, &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    p.signal("TERM");
    assert_eq!(p.wait_exit(), Some(0));
    p
}

/// Every stored certificate under the storage directory parses and matches its key; returns how many.
pub(super) fn check_storage(storage: &Path) -> usize {
    let mut ok = 0;
    let Ok(cas) = std::fs::read_dir(storage.join("acme")) else {
        return 0;
    };
    for ca in cas.flatten() {
        let Ok(certs) = std::fs::read_dir(ca.path().join("certs")) else {
            continue;
        };
        for f in certs.flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue; // an interrupted write's temp file; the value itself is whole
            }
            let bytes = std::fs::read(f.path()).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|e| panic!("{name} is half-written: {e}"));
            acme_sds::certs::certified_pem(
                v["chain_pem"].as_str().unwrap().as_bytes(),
                v["key_pem"].as_str().unwrap().as_bytes(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            ok += 1;
        }
        if let Ok(account) = std::fs::read(ca.path().join("account")) {
            serde_json::from_slice::<serde_json::Value>(&account).expect("account is whole");
        }
    }
    ok
}

/// The stored certificate of `name` under `storage`, as its leaf DER (None when there is none).
pub(super) fn stored_leaf(storage: &Path, name: &str) -> Option<Vec<u8>> {
    let ca = std::fs::read_dir(storage.join("acme"))
        .ok()?
        .flatten()
        .next()?
        .path();
    let bytes = std::fs::read(ca.join("certs").join(name)).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let chain = v["chain_pem"].as_str()?;
    use rustls_pki_types::pem::PemObject;
    Some(
        rustls_pki_types::CertificateDer::pem_slice_iter(chain.as_bytes())
            .next()?
            .ok()?
            .to_vec(),
    )
}
