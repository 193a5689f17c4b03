//! acme-sds: automatic HTTPS for Envoy.
//!
//! Data flows one way: [`config`] → certificate sources ([`sources`]) → [`registry`] (watchable, versioned,
//! encoded once) → [`sds`] streams → Envoy. [`daemon`] wires them together; [`server`] owns the listeners.

pub mod certs;
pub mod config;
pub mod daemon;
pub mod proto;
pub mod registry;
pub mod sds;
pub mod server;
pub mod sources;
