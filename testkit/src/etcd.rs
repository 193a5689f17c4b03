//! A real etcd cluster for tests (Debian `etcd-server`): members on free loopback ports, data in a temp
//! directory, each member's log in `DIR/etcd-N.log`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;
use crate::pebble::free_port;

/// The `etcd` and `etcdctl` binaries, or `None` to skip; under CI a missing etcd fails instead.
pub fn etcd_bins() -> Option<(PathBuf, PathBuf)> {
    crate::tools_on_path(
        ["etcd", "etcdctl"],
        "apt-get install etcd-server etcd-client",
    )
}

/// One member: its process (None once killed), its client URL and how it was started.
struct Member {
    child: Option<Child>,
    client_url: String,
    args: Vec<std::ffi::OsString>,
}

/// An etcd cluster of `n` members on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    etcd: PathBuf,
    etcdctl: PathBuf,
    dir: PathBuf,
    /// With [`EtcdCluster::start_tls`]: the files a client needs.
    pub tls: Option<ClientTls>,
}

/// What a client of a TLS cluster needs: the CA of the members' certificates, and a client certificate
/// (clients must present one).
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdCluster {
    /// Starts `n` members in `dir` and waits (bounded) until the cluster is healthy.
    pub fn start(dir: &Path, n: usize) -> Option<EtcdCluster> {
        Self::start_with(dir, n, false)
    }

    /// The same with clients served over TLS only (`https://`), client certificates required.
    pub fn start_tls(dir: &Path, n: usize) -> Option<EtcdCluster> {
        Self::start_with(dir, n, true)
    }

    fn start_with(dir: &Path, n: usize, tls: bool) -> Option<EtcdCluster> {
        let (etcd, etcdctl) = etcd_bins()?;
        std::fs::create_dir_all(dir).unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let mut server_tls = Vec::new();
        let client_tls = tls.then(|| {
            let pki = crate::Pki::new();
            let ca = dir.join("etcd-ca.pem");
            std::fs::write(&ca, pki.ca_pem()).unwrap();
            let (server_cert, server_key) = pki
                .leaf(&["127.0.0.1", "localhost"])
                .write(dir, "etcd-server");
            let (cert, key) = pki.leaf(&["acme-sds"]).write(dir, "etcd-client");
            for (flag, path) in [
                ("--cert-file", &server_cert),
                ("--key-file", &server_key),
                ("--trusted-ca-file", &ca),
            ] {
                server_tls.push(std::ffi::OsString::from(flag));
                server_tls.push(path.into());
            }
            server_tls.push("--client-cert-auth".into());
            ClientTls { ca, cert, key }
        });
        let scheme = if tls { "https" } else { "http" };
        let mut cluster = EtcdCluster {
            members: Vec::new(),
            etcd,
            etcdctl,
            dir: dir.to_owned(),
            tls: client_tls,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client_url = format!("{scheme}://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let data = dir.join(format!("m{i}.etcd"));
            let args: Vec<std::ffi::OsString> = [
                "--name",
                &format!("m{i}"),
                "--data-dir",
                &data.to_string_lossy(),
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "acme-sds-test",
                // Elections in a test's time, not a datacentre's.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ]
            .iter()
            .map(Into::into)
            .chain(server_tls.iter().cloned())
            .collect();
            cluster.members.push(Member {
                child: None,
                client_url,
                args,
            });
            cluster.spawn(i);
        }
        cluster.wait_healthy();
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-{i}.log")))
            .unwrap();
        let child = Command::new(&self.etcd)
            .args(&self.members[i].args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[i].child = Some(child);
    }

    /// Starts member `i` again after [`EtcdCluster::kill`], on its data, and waits (bounded) until the
    /// cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        if self.members[i].child.is_none() {
            self.spawn(i);
        }
        self.wait_healthy();
    }

    /// The index of the member that leads now, if one does.
    pub fn leader(&self) -> Option<usize> {
        let out = self.etcdctl(&["endpoint", "status", "-w", "json"]);
        let all: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let leader = all.as_array()?.iter().find_map(|s| {
            let status = s.get("Status")?;
            let me = status.get("header")?.get("member_id")?.as_u64()?;
            (status.get("leader")?.as_u64()? == me).then(|| s.get("Endpoint")?.as_str())?
        })?;
        self.members.iter().position(|m| m.client_url == leader)
    }

    /// The client URLs of every member (killed ones included, as a client configured once would have).
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The client URLs as a TOML list, for `[storage.etcd] endpoints`.
    pub fn endpoints_toml(&self) -> String {
        let quoted: Vec<String> = self
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect();
        format!("[{}]", quoted.join(", "))
    }

    /// Runs `etcdctl` against the live members; its stdout.
    pub fn etcdctl(&self, args: &[&str]) -> std::process::Output {
        let live: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| m.client_url.clone())
            .collect();
        let mut cmd = Command::new(&self.etcdctl);
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.cert)
                .arg("--key")
                .arg(&tls.key);
        }
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", live.join(",")))
            .args(["--dial-timeout=2s", "--command-timeout=5s"])
            .args(args)
            .output()
            .expect("run etcdctl")
    }

    /// Waits (bounded) until every live member reports healthy.
    fn wait_healthy(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = self.etcdctl(&["endpoint", "health"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy within {WAIT:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Every member's log, for a failing test.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.join(format!("etcd-{i}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                format!(
                    "== etcd member {i}\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
