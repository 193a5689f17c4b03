//! Operating acme-sds: one typed status of every configured secret ([`status`]), and the admin listener
//! that serves it as `/status`, as Prometheus metrics and as health and readiness ([`admin`]).
//!
//! The same status is what `acme-sds status` prints, asked of the running daemon or read offline from the
//! files and the store through the same code, so the two can never tell different stories. [`migrate`]
//! copies a single node's storage directory into etcd, for growing into several replicas.

pub mod admin;
pub mod migrate;
pub mod status;
