//! The `acme-sds` binary as a child process (its log collected line by line), and a process seen from
//! outside: open files, sockets, CPU time, HTTP endpoints.

use std::io::{BufRead, BufReader};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::*;

// ---------- a process seen from outside ----------

/// File descriptors `pid` holds now.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sockets `pid` holds now (connections and listeners; other descriptors come and go with its own work).
pub fn open_sockets(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("socket:"))
        .count()
}

/// CPU time (user + system) `pid` has used, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// `GET path` over HTTP/1.1 (a fresh connection); the whole response.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, WAIT).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The series of a Prometheus exposition (metric name and labels, without values).
pub fn metric_series(exposition: &str) -> std::collections::BTreeSet<String> {
    let body = exposition
        .split_once("\r\n\r\n")
        .map_or(exposition, |(_, body)| body);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_owned()))
        .collect()
}

// ---------- the acme-sds binary ----------

/// A spawned `acme-sds` process whose stderr is collected line by line.
pub struct Process {
    pub child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    line_rx: std::sync::mpsc::Receiver<String>,
}

/// What holds TCP port `port` on this machine now (`ss`), for a test that finds it unreachable.
pub fn port_report(port: u16) -> String {
    let out = Command::new("ss").args(["-tanpe"]).output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.contains(&format!(":{port} ")))
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("ss: {e}"),
    }
}

/// Makes `cmd` run as user `uid` and group `gid` (the tests run as root), with no other groups.
pub fn as_user(cmd: &mut Command, uid: u32, gid: u32) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only system calls between fork and exec. Groups first: only root may set them.
    unsafe {
        cmd.pre_exec(move || {
            use nix::unistd::{Gid, Uid, setgid, setgroups, setuid};
            setgroups(&[Gid::from_raw(gid)])
                .and_then(|()| setgid(Gid::from_raw(gid)))
                .and_then(|()| setuid(Uid::from_raw(uid)))
                .map_err(std::io::Error::from)
        });
    }
}

/// The `acme-sds` binary under test: `$ACME_SDS_BIN`, else the one Cargo built beside the running program
/// (an integration test runs from `target/<profile>/deps/`, the benchmark from `target/<profile>/`).
pub fn bin() -> &'static str {
    static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        if let Some(path) = std::env::var_os("ACME_SDS_BIN") {
            return path.to_string_lossy().into_owned();
        }
        let exe = std::env::current_exe().expect("the running program's path");
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|dir| dir.join("acme-sds"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| {
                panic!(
                    "no acme-sds binary beside {}: cargo build --bin acme-sds",
                    exe.display()
                )
            })
            .to_string_lossy()
            .into_owned()
    });
    &BIN
}

/// A helper script of the kit (`testkit/NAME`): the grpcio client, the seccomp launcher.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

impl Process {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Process {
        Self::spawn_program(bin(), args, envs)
    }

    /// Like [`Process::spawn`], with `dir` as the working directory (relative paths resolve there).
    pub fn spawn_in(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(bin());
        cmd.current_dir(dir);
        Self::spawn_command(cmd, args, envs)
    }

    /// Like [`Process::spawn`], for another program (a wrapper that ends by exec-ing acme-sds).
    pub fn spawn_program(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Process {
        Self::spawn_command(Command::new(program), args, envs)
    }

    fn spawn_command(mut cmd: Command, args: &[&str], envs: &[(&str, &str)]) -> Process {
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, line_rx) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        Process {
            child,
            lines,
            line_rx,
        }
    }

    /// Like [`Process::spawn`] with the open-files limit (soft and hard) set to `nofile`, as a service
    /// manager or container runtime would set it.
    pub fn spawn_with_nofile(args: &[&str], envs: &[(&str, &str)], nofile: u64) -> Process {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(bin());
        // SAFETY: setrlimit is async-signal-safe, and the closure touches nothing else.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::resource::setrlimit(
                    nix::sys::resource::Resource::RLIMIT_NOFILE,
                    nofile,
                    nofile,
                )
                .map_err(std::io::Error::from)
            });
        }
        Self::spawn_command(cmd, args, envs)
    }

    /// Like [`Process::spawn`], as user `uid` and group `gid` (the test runs as root): how an operator's
    /// service manager or container runtime starts acme-sds.
    pub fn spawn_as(uid: u32, gid: u32, args: &[&str], envs: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(bin());
        as_user(&mut cmd, uid, gid);
        Self::spawn_command(cmd, args, envs)
    }

    /// The TCP address of the listener the daemon logged as `WHAT listening listen=ADDR` (waits for it).
    pub fn listen_addr(&self, what: &str) -> std::net::SocketAddr {
        let needle = format!("{what} listening");
        self.wait_for_log(&needle, WAIT, |log| {
            log.lines()
                .any(|l| l.contains(&needle) && !l.contains("listen=unix:"))
        });
        self.log()
            .lines()
            .filter(|l| l.contains(&needle))
            .find_map(|l| {
                l.split("listen=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap()
    }

    /// Waits (bounded) for a stderr line containing `needle`; returns it.
    pub fn wait_for_line(&self, needle: &str) -> String {
        self.wait_for_line_within(needle, WAIT)
    }

    pub fn wait_for_line_within(&self, needle: &str, wait: Duration) -> String {
        self.line_within(needle, wait).unwrap_or_else(|| {
            panic!(
                "no line containing {needle:?} within {wait:?}; stderr so far:\n{}",
                self.log()
            )
        })
    }

    /// The next stderr line containing `needle`, if one comes within `wait`.
    pub fn line_within(&self, needle: &str, wait: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.line_rx.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits (bounded) until the whole stderr so far satisfies `pred`.
    pub fn wait_for_log(&self, what: &str, wait: Duration, pred: impl Fn(&str) -> bool) {
        let deadline = std::time::Instant::now() + wait;
        while !pred(&self.log()) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if self.line_rx.recv_timeout(left).is_err() {
                panic!("timed out waiting for {what}; stderr:\n{}", self.log());
            }
        }
    }

    pub fn log(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (bounded) for exit and returns the exit code. The exit is seen as stderr closing.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.line_rx.recv_timeout(left) {
                Ok(_) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!(
                        "acme-sds did not exit within {WAIT:?}; stderr:\n{}",
                        self.log()
                    )
                }
            }
        }
        self.child.wait().unwrap().code()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // A failing test shows what the daemon said (cargo test prints it only for failures).
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- acme-sds log (last {} lines) ----\n{}",
                tail.len(),
                tail.join("\n")
            );
        }
    }
}
