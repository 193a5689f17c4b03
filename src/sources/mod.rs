//! Certificate sources: where secrets come from before the registry publishes them. Each source checks its
//! material (through [`crate::certs`]) and publishes only what is good.

pub mod files;
