//! The integration tests, one binary: each module is one area of behaviour, run against the real `acme-sds`
//! binary and real peers (Envoy, Pebble, grpcio) through the shared kit (`testkit/`).

mod acme;
mod admin;
mod bootstrap;
mod cli;
mod clients;
mod deploy;
mod dns01;
mod envoy;
mod files;
mod keys;
mod limits;
mod on_demand;
mod readme;
mod reload;
mod replicas;
mod sds;
mod security;
mod store;
mod tls_alpn;
