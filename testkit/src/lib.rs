//! What the integration tests (`tests/it`) and the benchmark (`bench/`) share: a test PKI, file rotation
//! helpers, the `acme-sds` process, SDS clients, and the real peers (Envoy, Pebble) on loopback ports.

use std::time::Duration;

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(15);

/// Whether a missing external tool must fail the test rather than skip it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub mod envoy;
pub mod etcd;
pub mod pebble;

mod daemon;
mod files;
mod pki;
mod process;
mod sds;

pub use daemon::*;
pub use files::*;
pub use pki::*;
pub use process::*;
pub use sds::*;
