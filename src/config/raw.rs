//! The file as written: serde types with spans, read after the shape check (`schema`) has vouched for every
//! key and type, and turned into checked settings by the table modules.

use serde::Deserialize;
use toml::Spanned;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) sds: Option<Spanned<RawSds>>,
    pub(super) storage: Option<Spanned<RawStorage>>,
    pub(super) http01: Option<Spanned<RawHttp01>>,
    pub(super) acme: Option<Spanned<RawAcme>>,
    pub(super) admin: Option<Spanned<RawAdmin>>,
    pub(super) on_demand: Option<Spanned<RawOnDemand>>,
    pub(super) tls_alpn01: Option<Spanned<RawTlsAlpn01>>,
    pub(super) dns01: Option<Spanned<RawDns01>>,
    #[serde(default)]
    pub(super) certificate: Vec<Spanned<RawCertificate>>,
    #[serde(default)]
    pub(super) trust_bundle: Vec<Spanned<RawTrustBundle>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSds {
    pub(super) listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) socket_mode: Option<Spanned<String>>,
    pub(super) socket_group: Option<Spanned<toml::Value>>,
    pub(super) allowed_uids: Option<Spanned<Vec<Spanned<i64>>>>,
    pub(super) allow_plaintext: Option<bool>,
    pub(super) stall_timeout: Option<Spanned<String>>,
    pub(super) handshake_timeout: Option<Spanned<String>>,
    pub(super) max_streams: Option<Spanned<i64>>,
    pub(super) max_streams_per_peer: Option<Spanned<i64>>,
    pub(super) max_names_per_peer: Option<Spanned<i64>>,
    pub(super) max_connections: Option<Spanned<i64>>,
    pub(super) max_connections_per_peer: Option<Spanned<i64>>,
    pub(super) tls: Option<Spanned<RawSdsTls>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSdsTls {
    pub(super) cert_file: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
    pub(super) client_ca_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub(super) name: Option<Spanned<String>>,
    pub(super) cert_file: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
    pub(super) domains: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) key_type: Option<Spanned<String>>,
    /// Lets this certificate name domains that another certificate names too (say, an RSA and an ECDSA
    /// certificate for the same site).
    #[serde(default)]
    pub(super) allow_duplicate_domains: bool,
    pub(super) allowed_nodes: Option<Spanned<Vec<String>>>,
    pub(super) allowed_clients: Option<Spanned<Vec<String>>>,
    pub(super) temporary_certificate: Option<Spanned<bool>>,
    pub(super) issuer: Option<Spanned<String>>,
    pub(super) challenge: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub(super) path: Option<Spanned<String>>,
    pub(super) encryption_key_file: Option<Spanned<String>>,
    pub(super) accept_unsealed: Option<Spanned<bool>>,
    pub(super) etcd: Option<Spanned<RawEtcd>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTlsAlpn01 {
    pub(super) listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDns01 {
    pub(super) server: Option<Spanned<String>>,
    pub(super) tsig_key_file: Option<Spanned<String>>,
    pub(super) zone: Option<Spanned<String>>,
    pub(super) propagation_timeout: Option<Spanned<String>>,
    pub(super) check_nameservers: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOnDemand {
    pub(super) allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) ask: Option<Spanned<String>>,
    pub(super) ask_timeout: Option<Spanned<String>>,
    pub(super) ask_concurrency: Option<Spanned<i64>>,
    pub(super) max_new_per_hour: Option<Spanned<i64>>,
    pub(super) max_pending: Option<Spanned<i64>>,
    pub(super) key_type: Option<Spanned<String>>,
    pub(super) allowed_nodes: Option<Spanned<Vec<String>>>,
    pub(super) drop_unused_after: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEtcd {
    pub(super) endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) prefix: Option<Spanned<String>>,
    pub(super) ca_file: Option<Spanned<String>>,
    pub(super) cert_file: Option<Spanned<String>>,
    pub(super) key_file: Option<Spanned<String>>,
    pub(super) username: Option<Spanned<String>>,
    pub(super) password_file: Option<Spanned<String>>,
    pub(super) lock_ttl: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub(super) listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp01 {
    pub(super) listen: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    pub(super) directory: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) contact: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) accept_terms_of_service: Option<Spanned<bool>>,
    pub(super) directory_ca: Option<Spanned<String>>,
    pub(super) eab_kid: Option<Spanned<String>>,
    pub(super) eab_hmac_key: Option<Spanned<String>>,
    pub(super) max_concurrent_orders: Option<Spanned<i64>>,
    pub(super) retry_initial: Option<Spanned<String>>,
    pub(super) retry_max: Option<Spanned<String>>,
    pub(super) request_timeout: Option<Spanned<String>>,
    pub(super) temporary_certificates: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTrustBundle {
    pub(super) name: Option<Spanned<String>>,
    pub(super) file: Option<Spanned<String>>,
    pub(super) allowed_nodes: Option<Spanned<Vec<String>>>,
    pub(super) allowed_clients: Option<Spanned<Vec<String>>>,
}
