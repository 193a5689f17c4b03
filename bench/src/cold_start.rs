//! `cold-start`: from process start until one fetch returns every one of many file-backed certificates.

use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use anyhow::{Result, bail};
use testkit::pebble::free_port;

use crate::Sizes;
use crate::certs::Certs;
use crate::client::{channels, request};
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
    let chans = channels(port, 1).await?;
    let mut client =
        SecretDiscoveryServiceClient::new(chans[0].clone()).max_decoding_message_size(64 << 20);
    let mut req = request("", None);
    req.resource_names = names.clone();
    let resp = client.fetch_secrets(req).await?.into_inner();
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
