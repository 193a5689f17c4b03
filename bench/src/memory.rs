//! `memory`: the daemon's resident memory per idle SDS stream.

use anyhow::Result;
use testkit::pebble::free_port;

use crate::Sizes;
use crate::certs::Certs;
use crate::client::{h2_connections, open_streams};
use crate::daemon::Daemon;
use crate::report::Csv;

pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let certs = Certs::new()?;
    let names = vec!["m".to_string()];
    certs.write("m")?;
    let port = free_port();
    let (daemon, _, _) = Daemon::start(&certs.config(&names, port)?)?;
    let conns = h2_connections(port, a.connections).await?;
    // Warm the server with one stream per connection, then measure.
    let (_rx0, warm) = open_streams(&conns, &names, a.connections).await?;
    let before = daemon.rss_bytes()?;
    let (_rx, tasks) = open_streams(&conns, &names, a.streams).await?;
    let after = daemon.rss_bytes()?;
    let per = (after.saturating_sub(before)) as f64 / a.streams as f64;
    let param = format!("streams={} conns={}", a.streams, a.connections);
    csv.row(
        "memory",
        &param,
        "rss_before",
        before as f64 / 1048576.0,
        "MiB",
    );
    csv.row(
        "memory",
        &param,
        "rss_after",
        after as f64 / 1048576.0,
        "MiB",
    );
    csv.row("memory", &param, "per_idle_stream", per, "bytes");
    for t in tasks.into_iter().chain(warm) {
        t.abort();
    }
    Ok(())
}
