//! What the integration tests (`tests/it`) and the benchmark (`bench/`) share: a test PKI, file rotation
//! helpers, the `acme-sds` process, SDS clients, the real peers (Envoy, Pebble, etcd, BIND, Knot) on loopback
//! ports, and a TCP proxy for the faults they cannot produce themselves.

use std::time::Duration;

/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(15);

/// Whether a missing external tool must fail the test rather than skip it.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

pub mod bind;
pub mod envoy;
pub mod etcd;
pub mod knot;
pub mod pebble;
pub mod proxy;

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

/// Two programs a test needs (`pebble` and `pebble-challtestsrv`, `etcd` and `etcdctl`) found on PATH, or
/// `None` to skip the test; under CI a missing one fails instead, saying what installs it.
pub fn tools_on_path(
    names: [&str; 2],
    install: &str,
) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    let find = |name: &str| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
    };
    match (find(names[0]), find(names[1])) {
        (Some(a), Some(b)) => Some((a, b)),
        _ => {
            assert!(
                !in_ci(),
                "{} not found: scripts/setup installs it ({install})",
                names[0]
            );
            eprintln!("SKIPPED: {} not found ({install})", names[0]);
            None
        }
    }
}

/// Copies a child's output to the file at `log`, line by line, and sends each line to the receiver returned
/// (a server's start-up is awaited on it, bounded, with `recv_timeout`).
pub fn tee_lines(
    output: impl std::io::Read + Send + 'static,
    log: std::path::PathBuf,
) -> std::sync::mpsc::Receiver<String> {
    use std::io::{BufRead, Write};
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut file = std::fs::File::create(log).ok();
        for line in std::io::BufReader::new(output)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(f) = file.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send(line);
        }
    });
    rx
}
