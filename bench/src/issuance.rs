//! `issuance`: from process start with empty storage until every certificate Pebble issues is served, and
//! the same issuance by Caddy when it is installed. Temporary certificates are off here: the first response
//! a stream gets is then the issued certificate, which is what is timed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::pebble::{Pebble, PebbleOptions, free_port};

use crate::Sizes;
use crate::client::{h2_connections, open_streams};
use crate::daemon::Daemon;
use crate::report::Csv;

/// Issuance against Pebble (no validation delay, no nonce rejection): from process start with empty
/// storage until every certificate is served over SDS.
pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("acme-sds-bench-")
        .tempdir()?;
    let d = dir.path();
    let http = free_port();
    let Some(pebble) = Pebble::start(d, no_nonce_rejection(http)) else {
        println!("(pebble not found: no issuance figures; apt-get install pebble)");
        return Ok(());
    };

    let sizes: &[usize] = if a.quick { &[1, 5] } else { &[1, 50] };
    for &n in sizes {
        let port = free_port();
        let storage = d.join(format!("storage-{n}"));
        let mut text = format!(
            "[sds]\nlisten = [\"127.0.0.1:{port}\"]\n[storage]\npath = \"{}\"\n[http01]\nlisten = \"127.0.0.1:{http}\"\n[acme]\ndirectory = \"{}\"\ndirectory_ca = \"{}\"\naccept_terms_of_service = true\nmax_concurrent_orders = 16\ntemporary_certificates = false\n\n",
            storage.display(),
            pebble.directory,
            pebble.directory_ca.display()
        );
        let names: Vec<String> = (0..n).map(|i| format!("n{n}c{i}")).collect();
        for name in &names {
            text.push_str(&format!(
                "[[certificate]]\nname = \"{name}\"\ndomains = [\"{name}.example.com\"]\n\n"
            ));
        }
        let config = d.join(format!("acme-sds-{n}.toml"));
        std::fs::write(&config, text)?;
        let (daemon, started, _) = Daemon::start(&config)?;
        let conns = h2_connections(port, 1).await?;
        let (_rx, tasks) =
            tokio::time::timeout(Duration::from_secs(120), open_streams(&conns, &names, n))
                .await
                .context("certificates not issued within 120 s")??;
        let all = started.elapsed();
        csv.row(
            "issuance",
            &format!("certs={n} ca=pebble"),
            "all_served",
            all.as_secs_f64() * 1000.0,
            "ms",
        );
        drop(daemon);
        for t in tasks {
            t.abort();
        }
        // The quick (CI smoke) run leaves the peer out: it proves the benchmark works, and Caddy's own
        // pacing would only make it slower.
        let peer = if a.quick {
            None
        } else {
            caddy_issuance(d, &names, &pebble, http)?
        };
        if let Some(caddy_ms) = peer {
            csv.row(
                "issuance",
                &format!("certs={n} ca=pebble peer=caddy"),
                "all_served",
                caddy_ms,
                "ms",
            );
            csv.row(
                "issuance",
                &format!("certs={n} ca=pebble"),
                "caddy_over_acme_sds",
                caddy_ms / (all.as_secs_f64() * 1000.0),
                "ratio",
            );
        }
    }
    Ok(())
}

/// The same issuance by Caddy (when Debian's `caddy` is installed): from its start until its HTTPS port
/// serves a certificate for every name (checked with curl, every 20 ms).
fn caddy_issuance(d: &Path, names: &[String], pebble: &Pebble, http: u16) -> Result<Option<f64>> {
    if Command::new("caddy").arg("version").output().is_err() {
        println!("(caddy not installed: no peer figure)");
        return Ok(None);
    }
    let https = free_port();
    let storage = d.join(format!("caddy-{}", names.len()));
    let hosts: Vec<String> = names.iter().map(|n| format!("{n}.example.com")).collect();
    let caddyfile = d.join(format!("Caddyfile-{}", names.len()));
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n  admin off\n  http_port {http}\n  https_port {https}\n  storage file_system {}\n  skip_install_trust\n  cert_issuer acme {{\n    dir {}\n    trusted_roots {}\n    disable_tlsalpn_challenge\n  }}\n}}\n{} {{\n  respond \"ok\"\n}}\n",
            storage.display(),
            pebble.directory,
            pebble.directory_ca.display(),
            hosts.join(", ")
        ),
    )?;
    let started = Instant::now();
    let mut caddy = spawn_caddy(d, &caddyfile)?;
    let result = caddy_serves_all(&hosts, https, started);
    let _ = caddy.kill();
    let _ = caddy.wait();
    result
}

/// Starts Caddy on `caddyfile`, its home and data under `d`, quiet.
pub fn spawn_caddy(d: &Path, caddyfile: &Path) -> Result<std::process::Child> {
    Ok(Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(caddyfile)
        .env("HOME", d)
        .env("XDG_DATA_HOME", d.join("xdg-data"))
        .env("XDG_CONFIG_HOME", d.join("xdg-config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?)
}

/// Waits (bounded) until Caddy's HTTPS port serves every host.
fn caddy_serves_all(hosts: &[String], https: u16, started: Instant) -> Result<Option<f64>> {
    let deadline = started + Duration::from_secs(180);
    let mut pending = hosts.to_vec();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            bail!(
                "caddy did not serve {} certificate(s) within 180 s",
                pending.len()
            );
        }
        pending.retain(|h| {
            let ok = Command::new("curl")
                .args(["-sk", "--max-time", "1", "--resolve"])
                .arg(format!("{h}:{https}:127.0.0.1"))
                .arg(format!("https://{h}:{https}/"))
                .output()
                .map(|o| o.status.success() && o.stdout == b"ok")
                .unwrap_or(false);
            !ok
        });
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(Some(started.elapsed().as_secs_f64() * 1000.0))
}

/// Pebble as the issuance figures want it: no validation delay (always) and no nonce rejection.
pub fn no_nonce_rejection(http_port: u16) -> PebbleOptions {
    PebbleOptions {
        nonce_reject: 0,
        ..PebbleOptions::new(http_port)
    }
}
