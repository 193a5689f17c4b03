//! `acme-sds envoy-bootstrap`: what it prints is a valid Envoy bootstrap that serves real traffic.

use std::path::Path;
use std::process::Command;

use testkit::envoy::{Envoy, envoy_bin, https_get};
use testkit::pebble::free_port;
use testkit::*;

fn bootstrap(config: &Path, extra: &[&str]) -> String {
    testkit::envoy::generated_bootstrap(config, extra)
}

fn validate(bin: &Path, yaml: &str, dir: &Path) {
    let file = dir.join("generated.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(bin)
        .args(["--mode", "validate", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_acme_example_gets_a_valid_bootstrap_with_the_challenge_route_first() {
    let Some(envoy) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let yaml = bootstrap(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/envoy-acme/acme-sds.toml"),
        &[],
    );
    let challenge = yaml
        .find("/.well-known/acme-challenge/")
        .expect("challenge route");
    let redirect = yaml.find("https_redirect: true").expect("redirect");
    assert!(
        challenge < redirect,
        "the challenge route must come before the redirect"
    );
    assert!(yaml.contains("server_names: [\"www.example.com\", \"mobile.example.com\"]"));
    assert!(yaml.contains("/run/acme-sds/sds.sock"));
    // As README recommends: Envoy otherwise repeats its ~60 KB node in every request.
    assert!(yaml.contains("set_node_on_first_message_only: true"));
    validate(&envoy, &yaml, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_bootstrap_serves_each_certificate_on_its_sni() {
    let Some(envoy_path) = envoy_bin() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let web = pki.leaf(&["www.example.com", "example.com"]);
    let api = pki.leaf(&["api.example.com"]);
    let (wc, wk) = web.write(dir.path(), "web");
    let (ac, ak) = api.write(dir.path(), "api");
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n{}{}",
            dir.path().join("sds.sock").display(),
            cert_table("web", &wc, &wk),
            cert_table("api", &ac, &ak)
        ),
    )
    .unwrap();
    let (http, https, admin) = (free_port(), free_port(), free_port());
    let yaml = bootstrap(
        &config,
        &[
            "--http-port",
            &http.to_string(),
            "--https-port",
            &https.to_string(),
            "--admin-port",
            &admin.to_string(),
            "--address",
            "127.0.0.1",
        ],
    );
    assert!(yaml.contains("socket_address: { address: \"127.0.0.1\", port_value"));
    validate(&envoy_path, &yaml, dir.path());

    let sds = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    sds.wait_for_line("acme-sds started");
    let mut envoy = Envoy::start(&envoy_path, &yaml, dir.path());
    envoy.wait_live();
    let ca = pki.ca_der();
    for (sni, want) in [
        ("www.example.com", &web),
        ("example.com", &web),
        ("api.example.com", &api),
    ] {
        let (leaf, body) = https_get(https, sni, &ca).await.unwrap();
        assert_eq!(leaf, want.leaf_der, "{sni}");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    }
    let redirect = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
        write!(
            s,
            "GET /x HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    assert!(redirect.starts_with("HTTP/1.1 301"), "{redirect}");

    // Live reload against the running Envoy: point "web" at other files; Envoy presents them, no restart.
    let pid = envoy.pid();
    let other = pki.leaf(&["www.example.com", "example.com"]);
    let (oc, ok) = other.write(dir.path(), "web-v2");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(wc.to_str().unwrap(), oc.to_str().unwrap())
        .replace(wk.to_str().unwrap(), ok.to_str().unwrap());
    replace_by_rename(&config, text.as_bytes());
    sds.wait_for_line("configuration reloaded");
    let start = std::time::Instant::now();
    loop {
        let (leaf, _) = https_get(https, "www.example.com", &ca).await.unwrap();
        if leaf == other.leaf_der {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "the reloaded certificate never reached Envoy"
        );
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(envoy.pid(), pid);
    let (leaf, _) = https_get(https, "api.example.com", &ca).await.unwrap();
    assert_eq!(leaf, api.leaf_der, "untouched");
}

/// With `[on_demand]`, names no chain lists go to a default chain with Envoy's on-demand selector (SNI
/// mapper, delta SDS, session resumption off, as the selector requires); a certificate without names
/// serves clients that send no SNI. Envoy accepts it.
#[test]
fn an_on_demand_configuration_gets_the_on_demand_selector() {
    let Some(envoy) = envoy_bin() else { return };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        "[sds]\nlisten = [\"unix:/run/acme-sds/sds.sock\"]\n\n[acme]\ncontact = [\"mailto:ops@example.com\"]\naccept_terms_of_service = true\n\n[on_demand]\nallow = [\"*.customers.example.com\"]\n\n[[certificate]]\nname = \"www\"\ndomains = [\"www.example.com\"]\n",
    )
    .unwrap();
    let yaml = bootstrap(&config, &[]);
    assert!(
        yaml.contains("envoy.tls.certificate_selectors.on_demand_secret"),
        "{yaml}"
    );
    assert!(yaml.contains("disable_stateful_session_resumption: true"));
    assert!(yaml.contains("server_names: [\"www.example.com\"]"));
    let selector = yaml.find("on_demand_secret").unwrap();
    assert!(yaml[selector..].contains("api_type: DELTA_GRPC"));
    assert!(
        yaml[selector..].contains("default_value: \"www\""),
        "{yaml}"
    );
    validate(&envoy, &yaml, dir.path());
}
