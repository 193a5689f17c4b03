//! acme-sds: automatic HTTPS for Envoy.
//!
//! Data flows one way: [`config`] → certificate sources ([`sources`] for files, [`acme`] for ACME) →
//! [`store`] (persisted) → [`registry`] (watchable, versioned, encoded once) → [`sds`] streams → Envoy. The
//! [`http01`] responder reads pending challenges from the store. [`daemon`] wires them together; [`server`]
//! owns the SDS listeners; [`ops`] tells the status of it all (`/status`, `acme-sds status`, metrics).

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
