//! Certificate sources: where secrets come from before the registry publishes them. Each source checks its
//! material (through [`crate::certs`]) and publishes only what is good.

pub mod acme;
pub mod files;
pub mod internal;

/// A certificate's schedule and last failure, as an issuing source (ACME, the internal CA) reports them.
#[derive(Debug, Clone, Default)]
pub struct IssuerStatus {
    pub next_renewal: Option<time::OffsetDateTime>,
    pub last_error: Option<String>,
    pub next_retry: Option<time::OffsetDateTime>,
}
