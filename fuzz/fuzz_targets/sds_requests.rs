//! SDS request handling: any sequence of request messages on a SotW and a delta stream gives responses or
//! an error status, never a panic. Inputs are split into messages at 0xFF bytes.
#![no_main]

use std::sync::{Arc, OnceLock};

use acme_sds::registry::{Registry, SecretContent};
use libfuzzer_sys::fuzz_target;

fn registry() -> &'static Arc<Registry> {
    static REGISTRY: OnceLock<Arc<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let registry = Registry::new();
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["web".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let pair = acme_sds::certs::certified_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .expect("pair");
        registry.publish("web", &SecretContent::TlsCertificate(pair));
        registry
    })
}

fuzz_target!(|data: &[u8]| {
    let inputs: Vec<&[u8]> = data.split(|b| *b == 0xFF).take(64).collect();
    acme_sds::sds::fuzz_requests(registry(), &inputs);
});
