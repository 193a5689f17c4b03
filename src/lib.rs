//! acme-sds: automatic HTTPS for Envoy.
//!
//! Data flows one way: [`config`] → certificate sources ([`sources`]: PEM files, an ACME CA with its
//! HTTP-01 responder, acme-sds's own internal CA) → [`store`] (persisted) → [`registry`] (watchable,
//! versioned, encoded once) → [`sds`] streams → Envoy. [`values`] are the checked names and addresses every
//! layer takes; [`net`] the listeners every server runs on; [`ops`] tells the status of it all (`/status`,
//! `acme-sds status`, metrics); [`daemon`] wires them together and runs until `main.rs` says stop.
//!
//! Dependencies go one way too (no module imports one that imports it back): `values` and `proto` below
//! everything, then `certs`, `store` and `registry`, `metrics`, `net`, `sds`, then `config` (which knows the
//! value and rule types of what it configures), `sources`, `ops`, `bootstrap` and `daemon`.

#![warn(missing_docs)]

pub mod bootstrap;
pub mod certs;
pub mod config;
pub mod daemon;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod proto;
pub mod registry;
pub mod sds;
pub mod sources;
pub mod store;
pub mod values;
pub mod watch;
