//! `on-demand`: Envoy's on-demand certificate selector in front of acme-sds (`[on_demand]`), against Pebble:
//! the first TLS handshake for a new allowed name, from the client's hello until it completes with the
//! issued certificate (sequential names, median), and 20 new names at once until all are served. The same
//! against Caddy's on-demand TLS on the same Pebble, when Debian's `caddy` is installed. Both ask the same
//! stub `ask` endpoint (it allows everything), so both pay for one local HTTP request per name.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::envoy::{Envoy, envoy_bin, on_demand_bootstrap, presented_chain};
use testkit::pebble::{Pebble, PebbleOptions, free_port};

use crate::Sizes;
use crate::daemon::Daemon;
use crate::report::{Csv, percentile};

/// An `ask` endpoint that allows every name.
async fn ask_stub() -> Result<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    Ok(port)
}

/// One handshake for `sni`, retried (a refused or reset connection) until it presents a certificate
/// chaining to `root`, within 60 s; how long it took.
async fn first_handshake(port: u16, sni: &str, root: &[u8]) -> Result<Duration> {
    let t0 = Instant::now();
    loop {
        if let Ok(Ok(chain)) =
            tokio::time::timeout(Duration::from_secs(60), presented_chain(port, Some(sni))).await
            && testkit::pebble::verify_chain(&chain, root, sni).is_ok()
        {
            return Ok(t0.elapsed());
        }
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("{sni} was not served within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sequential first handshakes for `names`, then `batch` names at once: (per-name times, batch time).
async fn measure(
    port: u16,
    root: &[u8],
    prefix: &str,
    rounds: usize,
    batch: usize,
) -> Result<(Vec<f64>, f64)> {
    let mut each = Vec::new();
    for i in 0..rounds {
        let took = first_handshake(port, &format!("{prefix}{i}.od.example.com"), root).await?;
        each.push(took.as_secs_f64() * 1000.0);
    }
    let t0 = Instant::now();
    let mut all = Vec::new();
    for i in 0..batch {
        let sni = format!("{prefix}batch{i}.od.example.com");
        let root = root.to_vec();
        all.push(tokio::spawn(async move {
            first_handshake(port, &sni, &root).await
        }));
    }
    for h in all {
        h.await??;
    }
    each.sort_by(f64::total_cmp);
    Ok((each, t0.elapsed().as_secs_f64() * 1000.0))
}

pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let Some(envoy) = envoy_bin() else {
        println!("(envoy not found: no on-demand figures)");
        return Ok(());
    };
    let dir = tempfile::Builder::new()
        .prefix("acme-sds-bench-")
        .tempdir()?;
    let d = dir.path();
    let port80 = free_port();
    let mut opts = PebbleOptions::new(port80);
    opts.nonce_reject = 0;
    opts.authz_reuse = 0;
    let Some(pebble) = Pebble::start(&d.join("pebble"), opts) else {
        println!("(pebble not found: no on-demand figures)");
        return Ok(());
    };
    let root = pebble.root_der().await;
    let ask = ask_stub().await?;
    let (rounds, batch) = if a.quick { (2, 3) } else { (7, 20) };

    let http01 = free_port();
    let config = d.join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{http01}\"\n\n{}[on_demand]\nallow = [\"*.od.example.com\"]\nask = \"http://127.0.0.1:{ask}/\"\n",
            d.join("sds.sock").display(),
            d.join("data").display(),
            pebble.acme_table()
        ),
    )?;
    let (daemon, _, _) = Daemon::start(&config)?;
    let bootstrap = on_demand_bootstrap(
        &d.join("sds.sock"),
        "fallback",
        port80,
        &[format!("127.0.0.1:{http01}")],
    );
    let mut proxy = Envoy::start(&envoy, &bootstrap, d);
    proxy.wait_live();
    let https = proxy.listener_port("https");
    let (each, all) = measure(https, &root, "a", rounds, batch).await?;
    drop(proxy);
    drop(daemon);
    let param = format!("ca=pebble rounds={rounds}");
    let median = percentile(&each, 0.5);
    csv.row("on_demand", &param, "first_handshake_median", median, "ms");
    csv.row(
        "on_demand",
        &param,
        "first_handshake_max",
        percentile(&each, 1.0),
        "ms",
    );
    csv.row(
        "on_demand",
        &format!("names={batch}"),
        "all_served",
        all,
        "ms",
    );

    if a.quick {
        return Ok(()); // the smoke run leaves the peer out
    }
    match caddy(d, &pebble, port80, ask, &root, rounds, batch).await? {
        Some((each, all)) => {
            let caddy_median = percentile(&each, 0.5);
            csv.row(
                "on_demand",
                &format!("{param} peer=caddy"),
                "first_handshake_median",
                caddy_median,
                "ms",
            );
            csv.row(
                "on_demand",
                &format!("names={batch} peer=caddy"),
                "all_served",
                all,
                "ms",
            );
            csv.row(
                "on_demand",
                &param,
                "caddy_over_acme_sds",
                caddy_median / median,
                "x",
            );
        }
        None => println!("(caddy not installed: no peer figure)"),
    }
    Ok(())
}

/// The same with Caddy's on-demand TLS (`tls { on_demand }`, the same `ask`), on Pebble's HTTP port.
async fn caddy(
    d: &Path,
    pebble: &Pebble,
    port80: u16,
    ask: u16,
    root: &[u8],
    rounds: usize,
    batch: usize,
) -> Result<Option<(Vec<f64>, f64)>> {
    if Command::new("caddy").arg("version").output().is_err() {
        return Ok(None);
    }
    let https = free_port();
    let caddyfile = d.join("Caddyfile-on-demand");
    std::fs::write(
        &caddyfile,
        format!(
            "{{\n  admin off\n  http_port {port80}\n  https_port {https}\n  storage file_system {}\n  skip_install_trust\n  on_demand_tls {{\n    ask http://127.0.0.1:{ask}/\n  }}\n  cert_issuer acme {{\n    dir {}\n    trusted_roots {}\n    disable_tlsalpn_challenge\n  }}\n}}\nhttps:// {{\n  tls {{\n    on_demand\n  }}\n  respond \"ok\"\n}}\n",
            d.join("caddy-on-demand").display(),
            pebble.directory,
            pebble.directory_ca.display(),
        ),
    )?;
    let mut caddy = crate::issuance::spawn_caddy(d, &caddyfile).context("start caddy")?;
    // Up once its HTTPS port accepts connections.
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", https)).is_err() {
        if up.elapsed() > Duration::from_secs(30) {
            let _ = caddy.kill();
            bail!("caddy did not listen within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let result = measure(https, root, "c", rounds, batch).await;
    let _ = caddy.kill();
    let _ = caddy.wait();
    result.map(Some)
}
