//! `fanout`: one rotation of the certificate files until every SotW stream has the new version.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use testkit::pebble::free_port;

use crate::Sizes;
use crate::certs::Certs;
use crate::client::{h2_connections, open_streams};
use crate::daemon::{Daemon, own_cpu_seconds};
use crate::report::{Csv, percentile};

pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let certs = Certs::new()?;
    let names: Vec<String> = (0..a.secrets).map(|i| format!("s{i}")).collect();
    for n in &names {
        certs.write(n)?;
    }
    let port = free_port();
    let (daemon, _, _) = Daemon::start(&certs.config(&names, port)?)?;
    let conns = h2_connections(port, a.connections).await?;
    let (mut rx, tasks) = open_streams(&conns, &names, a.streams).await?;
    let mut completions = Vec::new();
    let mut per_stream = Vec::new();
    let cpu_before = daemon.cpu_seconds();
    let client_cpu_before = own_cpu_seconds();
    for _ in 0..a.rotations {
        // Issuing (key generation, signing) is the renewal tool's work, not part of the fan-out.
        let issued = names
            .iter()
            .map(|n| certs.issue(n))
            .collect::<Result<Vec<_>>>()?;
        let t0 = Instant::now();
        for (n, i) in names.iter().zip(&issued) {
            certs.install(n, i)?;
        }
        let collect = async {
            let mut got = Vec::with_capacity(a.streams);
            while got.len() < a.streams {
                let want = a.streams - got.len();
                if rx.recv_many(&mut got, want).await == 0 {
                    bail!("streams closed");
                }
            }
            Ok(got)
        };
        let arrivals = tokio::time::timeout(Duration::from_secs(60), collect)
            .await
            .context("rotation did not reach every stream within 60 s")??;
        let mut last = t0;
        for at in arrivals {
            per_stream.push((at - t0).as_secs_f64() * 1000.0);
            last = last.max(at);
        }
        completions.push((last - t0).as_secs_f64() * 1000.0);
    }
    let server_cpu = daemon.cpu_seconds() - cpu_before;
    let client_cpu = own_cpu_seconds() - client_cpu_before;
    completions.sort_by(f64::total_cmp);
    per_stream.sort_by(f64::total_cmp);
    let param = format!(
        "streams={} conns={} secrets={}",
        a.streams, a.connections, a.secrets
    );
    csv.row(
        "fanout",
        &param,
        "last_stream_median",
        percentile(&completions, 0.5),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "last_stream_p99",
        percentile(&completions, 0.99),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "last_stream_max",
        percentile(&completions, 1.0),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "per_stream_p99",
        percentile(&per_stream, 0.99),
        "ms",
    );
    csv.row(
        "fanout",
        &param,
        "server_cpu_per_push",
        server_cpu * 1e6 / (a.rotations * a.streams) as f64,
        "us",
    );
    csv.row(
        "fanout",
        &param,
        "client_cpu_per_push",
        client_cpu * 1e6 / (a.rotations * a.streams) as f64,
        "us",
    );
    drop(daemon);
    for t in tasks {
        t.abort();
    }
    Ok(())
}
