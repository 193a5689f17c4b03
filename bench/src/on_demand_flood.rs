//! `on-demand-flood`: what a flood of made-up names costs. 20,000 distinct names under an allowed wildcard
//! are subscribed over delta by 20 streams (one Envoy's connection), with an `ask` endpoint that accepts
//! requests and never answers and `max_new_per_hour = 5`, against Pebble; four rounds of new names. Printed:
//! the daemon's resident memory and tasks before, while the streams are open (every name answered), and
//! after they close; the most `ask` requests held at once; the names remembered as refused; orders placed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use acme_sds::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;
use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use acme_sds::registry::SECRET_TYPE_URL;
use anyhow::{Context, Result, bail};
use testkit::pebble::{Pebble, PebbleOptions, free_port};

use crate::Sizes;
use crate::client::channels;
use crate::daemon::Daemon;
use crate::report::Csv;

/// An `ask` endpoint that holds every request unanswered; the most it held at once.
async fn silent_ask() -> Result<(u16, Arc<AtomicUsize>)> {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let now = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let (now, most) = (now.clone(), most.clone());
            tokio::spawn(async move {
                most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                let mut buf = [0u8; 2048];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                now.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok((port, seen))
}

/// One value from the daemon's `/metrics`.
fn metric(admin: u16, series: &str) -> Result<f64> {
    let text = testkit::http_get(([127, 0, 0, 1], admin).into(), "/metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .with_context(|| format!("{series} not in /metrics"))
}

pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("acme-sds-bench-")
        .tempdir()?;
    let d = dir.path();
    let port80 = free_port();
    let mut opts = PebbleOptions::new(port80);
    opts.nonce_reject = 0;
    let Some(pebble) = Pebble::start(&d.join("pebble"), opts) else {
        println!("(pebble not found: no on-demand flood figures)");
        return Ok(());
    };
    let (streams, per_stream) = if a.quick { (4, 250) } else { (20, 1000) };
    let (ask, most_asks) = silent_ask().await?;
    let (sds, admin) = (free_port(), free_port());
    let config = d.join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"127.0.0.1:{sds}\"]\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:{port80}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\n{}[on_demand]\nallow = [\"*.flood.example.com\"]\nask = \"http://127.0.0.1:{ask}/check\"\nask_timeout = \"10m\"\nmax_new_per_hour = 5\n",
            d.join("data").display(),
            pebble.acme_table()
        ),
    )?;
    let (daemon, _, _) = Daemon::start(&config)?;
    let rss0 = daemon.rss_bytes()?;
    let tasks0 = metric(admin, "acme_sds_runtime_tasks")?;

    let param = format!(
        "names={} streams={streams} ask=silent max_new_per_hour=5",
        streams * per_stream
    );
    let mib = |b: u64| b as f64 / 1048576.0;
    csv.row("on_demand_flood", &param, "rss_before", mib(rss0), "MiB");
    csv.row("on_demand_flood", &param, "tasks_before", tasks0, "tasks");
    // Four rounds of different names: the allocator keeps freed memory mapped and reuses it, so what the
    // daemon holds shows as resident memory that stops growing after the first rounds.
    for round in 1..=4 {
        let channel = channels(sds, 1).await?.remove(0);
        let mut open = Vec::new();
        let t0 = Instant::now();
        for s in 0..streams {
            let mut client = SecretDiscoveryServiceClient::new(channel.clone());
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(DeltaDiscoveryRequest {
                node: testkit::node("edge"),
                type_url: SECRET_TYPE_URL.into(),
                resource_names_subscribe: (0..per_stream)
                    .map(|i| format!("r{round}-n{i}-s{s}.flood.example.com"))
                    .collect(),
                ..Default::default()
            })
            .await?;
            let mut inbound = client
                .delta_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            // The first answer reports every refused name; at most five being decided are awaited.
            let first = tokio::time::timeout(Duration::from_secs(60), inbound.message())
                .await
                .context("no answer within 60 s")??
                .context("stream ended")?;
            if first.removed_resources.len() + 5 < per_stream {
                bail!(
                    "stream {s}: {} of {per_stream} names answered",
                    first.removed_resources.len()
                );
            }
            open.push((tx, inbound));
        }
        let answered_ms = t0.elapsed().as_secs_f64() * 1000.0;
        let rss1 = daemon.rss_bytes()?;
        let tasks1 = metric(admin, "acme_sds_runtime_tasks")?;
        let refused = metric(admin, "acme_sds_on_demand_names{state=\"refused\"}")?;
        let deciding = metric(admin, "acme_sds_on_demand_names{state=\"deciding\"}")?;
        drop(open);
        drop(channel);
        // Closed streams are gone once the server's stream count is back to zero.
        let deadline = Instant::now() + Duration::from_secs(30);
        while metric(admin, "acme_sds_sds_streams{rpc=\"delta\"}")? > 0.0 {
            if Instant::now() > deadline {
                bail!("streams still open 30 s after the client closed them");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rss2 = daemon.rss_bytes()?;
        let tasks2 = metric(admin, "acme_sds_runtime_tasks")?;
        let p = format!("{param} round={round}");
        csv.row("on_demand_flood", &p, "all_answered", answered_ms, "ms");
        csv.row("on_demand_flood", &p, "rss_streams_open", mib(rss1), "MiB");
        csv.row(
            "on_demand_flood",
            &p,
            "rss_streams_closed",
            mib(rss2),
            "MiB",
        );
        csv.row("on_demand_flood", &p, "tasks_streams_open", tasks1, "tasks");
        csv.row(
            "on_demand_flood",
            &p,
            "tasks_streams_closed",
            tasks2,
            "tasks",
        );
        csv.row("on_demand_flood", &p, "names_deciding", deciding, "names");
        csv.row(
            "on_demand_flood",
            &p,
            "refusals_remembered",
            refused,
            "names",
        );
    }
    let orders = pebble.log().matches("Added order").count();
    drop(daemon);
    csv.row(
        "on_demand_flood",
        &param,
        "ask_requests_at_once_max",
        most_asks.load(Ordering::SeqCst) as f64,
        "requests",
    );
    csv.row("on_demand_flood", &param, "orders", orders as f64, "orders");
    Ok(())
}
