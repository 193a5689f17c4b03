//! The temporary certificate: a self-signed stand-in served for an ACME certificate until its first issuance.
//!
//! Envoy keeps a listener *warming* until every SDS secret it references has arrived (up to
//! `initial_fetch_timeout`, 15 s by default), and with static listeners its whole start waits, port 80
//! included: the port the CA validates HTTP-01 through. A certificate that does not exist yet therefore
//! holds back the very validation that would create it (the ingress chicken-and-egg that cert-manager's
//! `issue-temporary-certificate` exists for). Serving a stand-in at once lets every listener start; the CA's
//! validation reaches the responder through Envoy, and the issued certificate replaces the stand-in the
//! moment it exists. The stand-in is never stored, is marked in its subject, lives a week (it is replaced
//! long before, or renewed while issuance keeps failing), and is never counted as ready.

use time::OffsetDateTime;

use crate::certs::{self, CertifiedPem};

/// What the stand-in's subject says.
pub const MARKER: &str = "acme-sds temporary certificate (not issued yet)";

/// How long a stand-in is valid.
pub const LIFETIME: time::Duration = time::Duration::days(7);

/// Makes a stand-in for `domains` (self-signed, ECDSA P-256 whatever the configured key type: it is made
/// at start and must be quick), with `name` in its subject.
pub fn make(name: &str, domains: &[String]) -> Result<CertifiedPem, String> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(domains.to_vec()).map_err(|e| e.to_string())?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, MARKER);
    dn.push(rcgen::DnType::OrganizationName, "acme-sds");
    dn.push(
        rcgen::DnType::OrganizationalUnitName,
        format!("stand-in for {}", certs_name(name)),
    );
    params.distinguished_name = dn;
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + LIFETIME;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    certs::certified_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
        .map_err(|e| e.to_string())
}

/// A secret name as it may appear in a subject field (at most 64 characters).
fn certs_name(name: &str) -> String {
    name.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stand_in_names_itself_and_covers_the_domains() {
        let domains = vec!["www.example.com".to_owned(), "example.com".to_owned()];
        let pem = make("site", &domains).unwrap();
        assert!(pem.leaf.subject.contains(MARKER), "{}", pem.leaf.subject);
        assert_eq!(pem.leaf.dns_names, domains);
        let left = pem.leaf.not_after - OffsetDateTime::now_utc();
        assert!(left <= LIFETIME && left > LIFETIME - time::Duration::minutes(1));
    }
}
