//! `cold-start`: from process start until one fetch returns every one of many file-backed certificates.

use anyhow::{Result, bail};
use testkit::pebble::free_port;

use crate::Sizes;
use crate::certs::Certs;
use crate::client::fetch_all;
use crate::daemon::Daemon;
use crate::report::Csv;

pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let certs = Certs::new()?;
    let names: Vec<String> = (0..a.certs).map(|i| format!("c{i}")).collect();
    for n in &names {
        certs.write(n)?;
    }
    let port = free_port();
    let config = certs.config(&names, port)?;
    let (daemon, started, ready) = Daemon::start(&config)?;
    // Everything is served once one fetch of every name succeeds.
    let resp = fetch_all(port, &names).await?;
    let all = started.elapsed();
    if resp.resources.len() != names.len() {
        bail!(
            "served {} of {} certificates",
            resp.resources.len(),
            names.len()
        );
    }
    let param = format!("certs={}", a.certs);
    csv.row(
        "cold_start",
        &param,
        "started",
        ready.as_secs_f64() * 1000.0,
        "ms",
    );
    csv.row(
        "cold_start",
        &param,
        "all_served",
        all.as_secs_f64() * 1000.0,
        "ms",
    );
    drop(daemon);
    Ok(())
}
