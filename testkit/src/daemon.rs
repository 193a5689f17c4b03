//! acme-sds run in this test process (the library's daemon), and the config tables tests write.

use std::path::{Path, PathBuf};

use acme_sds::proto::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tonic::transport::Channel;

use crate::*;

// ---------- acme-sds in process ----------

/// An acme-sds started in this process on a Unix socket in a temp dir.
pub struct Daemon {
    pub running: Option<acme_sds::daemon::Running>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Daemon {
    /// Starts acme-sds with `[sds] listen = [unix socket, extra...]` and the given `[[...]]` tables.
    pub async fn start(dir: tempfile::TempDir, tables: &str) -> Daemon {
        Self::start_with_listen(dir, tables, &[]).await
    }

    pub async fn start_with_listen(dir: tempfile::TempDir, tables: &str, extra: &[&str]) -> Daemon {
        let socket = dir.path().join("sds.sock");
        let mut listen = vec![format!("\"unix:{}\"", socket.display())];
        listen.extend(extra.iter().map(|e| format!("\"{e}\"")));
        let text = format!("[sds]\nlisten = [{}]\n\n{tables}", listen.join(", "));
        let path = dir.path().join("acme-sds.toml");
        std::fs::write(&path, text).unwrap();
        let config = acme_sds::config::load(&path).unwrap();
        let running = acme_sds::daemon::start(&config).await.unwrap();
        Daemon {
            running: Some(running),
            dir,
            socket,
        }
    }

    pub fn running(&self) -> &acme_sds::daemon::Running {
        self.running.as_ref().unwrap()
    }

    pub async fn client(&self) -> SecretDiscoveryServiceClient<Channel> {
        uds_client(&self.socket).await
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
    }
}

/// `[[certificate]]` table text for a file pair.
pub fn cert_table(name: &str, crt: &Path, key: &Path) -> String {
    format!(
        "[[certificate]]\nname = \"{name}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n\n",
        crt.display(),
        key.display()
    )
}
