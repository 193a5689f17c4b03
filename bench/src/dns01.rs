//! `dns01`: a wildcard and its apex (`*.NAME`, `NAME`) issued over DNS-01 against a real BIND (RFC 2136 updates
//! signed with TSIG) and Pebble looking the records up there: from acme-sds's start until its SDS listener
//! serves the issued certificate, several runs. The same order with Debian's `lego` (`--dns rfc2136`, the
//! same server and key) when it is installed: from its start until it exits with the certificate.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::bind::Bind;
use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};

use crate::Sizes;
use crate::daemon::Daemon;
use crate::report::{Csv, percentile};

pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("acme-sds-bench-")
        .tempdir()?;
    let d = dir.path();
    let Some(bind) = Bind::start(&d.join("bind"), "example.test") else {
        println!("(BIND not found: no dns01 figures; apt-get install bind9 bind9-dnsutils)");
        return Ok(());
    };
    let mut opts = PebbleOptions::new(free_port());
    opts.dns_server = Some(bind.addr);
    opts.authz_reuse = 0;
    opts.nonce_reject = 0;
    let Some(pebble) = Pebble::start(&d.join("pebble"), opts) else {
        println!("(pebble not found: no dns01 figures)");
        return Ok(());
    };
    let root = pebble.root_der().await;
    let runs = if a.quick { 1 } else { 5 };
    let mut took = Vec::new();
    for run in 0..runs {
        let name = format!("r{run}.example.test");
        let run_dir = d.join(format!("run{run}"));
        std::fs::create_dir_all(&run_dir)?;
        let socket = run_dir.join("sds.sock");
        let config = run_dir.join("acme-sds.toml");
        std::fs::write(
            &config,
            format!(
                "[sds]\nlisten = [\"unix:{}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{}\"\n\n[dns01]\nserver = \"{}\"\ntsig_key_file = \"{}\"\n\n{}[[certificate]]\nname = \"wild\"\ndomains = [\"*.{name}\", \"{name}\"]\nchallenge = \"dns-01\"\n",
                socket.display(),
                run_dir.join("data").display(),
                free_port(),
                bind.addr,
                bind.key_file.display(),
                pebble.acme_table()
            ),
        )?;
        let (daemon, started, _) = Daemon::start(&config)?;
        let mut client = testkit::uds_client(&socket).await;
        let mut stream = testkit::SotwStream::open(&mut client).await;
        stream.send(testkit::subscribe(&["wild"])).await;
        let r = stream.recv_issued(Duration::from_secs(60)).await;
        let elapsed = started.elapsed();
        let chain = testkit::chain_ders(&testkit::decode_secret(&r.resources[0]));
        verify_chain(&chain, &root, &format!("www.{name}")).context("the wildcard")?;
        drop(daemon);
        took.push(elapsed.as_secs_f64() * 1000.0);
    }
    took.sort_by(f64::total_cmp);
    let param = format!("ca=pebble dns=bind names=2 runs={runs}");
    let median = percentile(&took, 0.5);
    csv.row("dns01", &param, "issued_median", median, "ms");
    csv.row("dns01", &param, "issued_max", percentile(&took, 1.0), "ms");
    if a.quick {
        return Ok(()); // the smoke run leaves the peer out
    }
    match lego(d, &bind, &pebble)? {
        Some(lego) => {
            let ms = lego.as_secs_f64() * 1000.0;
            csv.row("dns01", "peer=lego names=2", "issued", ms, "ms");
            csv.row("dns01", &param, "lego_over_acme_sds", ms / median, "x");
        }
        None => println!("(lego not installed: no peer figure)"),
    }
    Ok(())
}

/// The same two names with lego's RFC 2136 provider, the same server and key; `None` without lego.
fn lego(d: &std::path::Path, bind: &Bind, pebble: &Pebble) -> Result<Option<Duration>> {
    if Command::new("lego").arg("--version").output().is_err() {
        return Ok(None);
    }
    let key = std::fs::read_to_string(&bind.key_file)?;
    let secret = key.split('"').nth(3).context("the key's secret")?;
    let started = Instant::now();
    let out = Command::new("lego")
        .args(["--server", &pebble.directory])
        .args(["--email", "ops@example.com", "--accept-tos"])
        .arg("--path")
        .arg(d.join("lego"))
        .args(["--dns", "rfc2136"])
        .args(["--dns.resolvers", &bind.addr.to_string()])
        // Its propagation check asks the zone's NS by name on port 53, which this loopback zone cannot offer.
        .arg("--dns.disable-cp")
        .args([
            "--domains",
            "*.lego.example.test",
            "--domains",
            "lego.example.test",
        ])
        .arg("run")
        .env("LEGO_CA_CERTIFICATES", &pebble.directory_ca)
        .env("RFC2136_NAMESERVER", bind.addr.to_string())
        .env("RFC2136_TSIG_KEY", format!("{}.", bind.key_name))
        .env("RFC2136_TSIG_SECRET", secret)
        .env("RFC2136_TSIG_ALGORITHM", "hmac-sha256.")
        .output()?;
    let took = started.elapsed();
    if !out.status.success() {
        bail!(
            "lego failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    Ok(Some(took))
}
