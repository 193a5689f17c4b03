//! The acme-sds process under measurement (the kit's [`Process`]: the binary built beside this one), its
//! start-up time, CPU time and memory.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use testkit::Process;

/// The acme-sds process under measurement; killed when dropped.
pub struct Daemon {
    process: Process,
}

impl Daemon {
    /// Starts acme-sds on `config`; returns it, when it was started, and how long it took to say it serves.
    pub fn start(config: &Path) -> Result<(Daemon, Instant, Duration)> {
        let config = config.to_str().context("a UTF-8 config path")?;
        let started = Instant::now();
        let process = Process::spawn(
            &["run", "--config", config],
            &[("RUST_LOG", "warn,acme_sds=info")],
        );
        process.wait_for_line("acme-sds started");
        Ok((Daemon { process }, started, started.elapsed()))
    }

    /// CPU time (user + system) the process has used.
    pub fn cpu_seconds(&self) -> f64 {
        testkit::cpu_seconds(self.process.child.id())
    }

    /// Resident memory.
    pub fn rss_bytes(&self) -> Result<u64> {
        let pid = self.process.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        Ok(kib * 1024)
    }
}

/// CPU time (user + system) this benchmark process has used.
pub fn own_cpu_seconds() -> f64 {
    testkit::cpu_seconds(std::process::id())
}
