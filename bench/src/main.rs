//! acme-sds-bench: measures a separately started acme-sds as SDS clients and Envoy see it.
//!
//! It starts the `acme-sds` binary built beside it (`cargo build --release --workspace --bins`), with
//! certificates in a temp directory, over loopback. Figures go to stdout and, with `--csv`, to a CSV file;
//! BENCHMARKS.md has the method and the figures. `--quick` shrinks every size so that CI can check that the
//! benchmark works (its timings mean nothing there). One file per scenario; `client`, `daemon`, `certs`,
//! `prober` and `report` are what they share, on top of the test kit (`testkit/`: test CA, Envoy, Pebble).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod certs;
mod client;
mod daemon;
mod prober;
mod report;

mod authority;
mod chart;
mod cold_start;
mod dns01;
mod fanout;
mod first_cert;
mod issuance;
mod memory;
mod on_demand;
mod on_demand_flood;
mod replicas;
mod rotation;

#[derive(Parser)]
#[command(
    name = "acme-sds-bench",
    about = "Measures acme-sds as SDS clients and Envoy see it (BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Option<Scenario>,
    #[command(flatten)]
    sizes: Sizes,
    /// Also write every figure to this CSV file.
    #[arg(long, global = true, value_name = "FILE")]
    csv: Option<PathBuf>,
    /// Where `chart` (and `all`, when given) draws the fan-out chart.
    #[arg(long, global = true, value_name = "FILE")]
    svg: Option<PathBuf>,
}

/// The scenarios; `all` (the default) runs each in turn.
#[derive(Subcommand, Clone, Copy)]
enum Scenario {
    /// One rotation of the certificate files until every SotW stream has it.
    Fanout,
    /// Resident memory per idle SDS stream.
    Memory,
    /// Process start until one fetch returns every one of `--certs` certificates.
    ColdStart,
    /// Process start with empty storage until every certificate Pebble issues is served (1 and 50; Caddy
    /// too when installed). Needs Debian's pebble.
    Issuance,
    /// A renewed file until a real Envoy presents it, against Envoy's file-based SDS. Needs Envoy.
    Rotation,
    /// Fan-out at 1k..20k streams, drawn to `--svg` (default fanout.svg).
    Chart,
    /// The Unix-socket :authority fix, in memory.
    Authority,
    /// The first certificate through Envoy with its default SDS settings. Needs Envoy and pebble.
    FirstCert,
    /// Replicas on one etcd prefix: a certificate another replica stored until Envoy presents it, and a
    /// cold start on `--certs` certificates in etcd. Needs etcd, Envoy and pebble.
    Replicas,
    /// On-demand TLS through Envoy's on-demand selector: the first handshake for a new name, and 20 names at
    /// once (Caddy's on-demand TLS too when installed). Needs Envoy and pebble.
    OnDemand,
    /// 20,000 made-up names over delta with a silent `ask`: memory, tasks, asks in flight, orders. Needs
    /// pebble.
    OnDemandFlood,
    /// A wildcard and its apex over DNS-01 against a real BIND (lego's RFC 2136 provider too when installed).
    /// Needs BIND and pebble.
    Dns01,
    /// Everything above (the chart only with `--svg`).
    All,
}

/// How big each scenario is; every option applies wherever it makes sense.
#[derive(clap::Args, Clone)]
pub struct Sizes {
    /// SDS streams (fanout, memory).
    #[arg(long, global = true, default_value_t = 10_000)]
    pub streams: usize,
    /// HTTP/2 connections the streams share (fanout, memory).
    #[arg(long, global = true, default_value_t = 100)]
    pub connections: usize,
    /// Rotations measured (fanout, rotation).
    #[arg(long, global = true, default_value_t = 20)]
    pub rotations: usize,
    /// Distinct secrets the streams spread over (fanout).
    #[arg(long, global = true, default_value_t = 1)]
    pub secrets: usize,
    /// Certificates loaded (cold-start).
    #[arg(long, global = true, default_value_t = 1000)]
    pub certs: usize,
    /// Shrink every size: proves the benchmark works (CI), its timings mean nothing.
    #[arg(long, global = true)]
    pub quick: bool,
}

impl Sizes {
    fn shrunk(mut self) -> Self {
        if self.quick {
            self.streams = self.streams.min(200);
            self.connections = self.connections.min(4);
            self.rotations = self.rotations.min(3);
            self.certs = self.certs.min(20);
        }
        self
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let a = cli.sizes.clone().shrunk();
    let mut csv = report::Csv(vec!["bench,param,metric,value,unit".into()]);
    println!(
        "{:<11} {:<34} {:<24} {:>12}",
        "BENCH", "PARAMETERS", "METRIC", "VALUE"
    );
    match cli.scenario.unwrap_or(Scenario::All) {
        Scenario::Fanout => fanout::run(&a, &mut csv).await?,
        Scenario::Memory => memory::run(&a, &mut csv).await?,
        Scenario::ColdStart => cold_start::run(&a, &mut csv).await?,
        Scenario::Issuance => issuance::run(&a, &mut csv).await?,
        Scenario::Rotation => rotation::run(&a, &mut csv).await?,
        Scenario::Authority => authority::run(&a, &mut csv).await?,
        Scenario::FirstCert => first_cert::run(&a, &mut csv).await?,
        Scenario::Replicas => replicas::run(&a, &mut csv).await?,
        Scenario::OnDemand => on_demand::run(&a, &mut csv).await?,
        Scenario::OnDemandFlood => on_demand_flood::run(&a, &mut csv).await?,
        Scenario::Dns01 => dns01::run(&a, &mut csv).await?,
        Scenario::Chart => {
            let svg = cli.svg.unwrap_or_else(|| PathBuf::from("fanout.svg"));
            chart::run(&a, &mut csv, &svg).await?
        }
        Scenario::All => {
            fanout::run(&a, &mut csv).await?;
            let spread = Sizes {
                secrets: if a.quick { 10 } else { 100 },
                ..a.clone()
            };
            fanout::run(&spread, &mut csv).await?;
            memory::run(&spread, &mut csv).await?;
            cold_start::run(&spread, &mut csv).await?;
            issuance::run(&spread, &mut csv).await?;
            rotation::run(&a, &mut csv).await?;
            authority::run(&a, &mut csv).await?;
            first_cert::run(&a, &mut csv).await?;
            replicas::run(&a, &mut csv).await?;
            on_demand::run(&a, &mut csv).await?;
            on_demand_flood::run(&a, &mut csv).await?;
            dns01::run(&a, &mut csv).await?;
            if let Some(svg) = &cli.svg {
                chart::run(&a, &mut csv, svg).await?;
            }
        }
    }
    if let Some(path) = &cli.csv {
        std::fs::write(path, csv.0.join("\n") + "\n")?;
        println!("figures written to {}", path.display());
    }
    Ok(())
}
