//! The README, followed word for word as a newcomer would: its first command, on a directory with nothing in
//! it, serves a certificate to a real Envoy; "Envoy in five minutes" works line by line; every TOML snippet
//! passes `check` as it is. The commands are read from README.md, so the README cannot drift from what works.
//! Only what a test must change is changed: ports (free ones instead of 8080/8443/9901) and Envoy's listener
//! address (loopback instead of every interface).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::envoy::{Envoy, envoy_bin, https_get};
use testkit::pebble::free_port;
use testkit::*;

const README: &str = include_str!("../../README.md");

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The fenced blocks in `lang` of the README section under `heading` (all sections when `None`).
fn blocks(heading: Option<&str>, lang: &str) -> Vec<String> {
    let text = match heading {
        None => README,
        Some(h) => {
            let start = README
                .find(&format!("\n## {h}\n"))
                .unwrap_or_else(|| panic!("README has no section {h:?}"));
            let rest = &README[start + 4..];
            &rest[..rest.find("\n## ").unwrap_or(rest.len())]
        }
    };
    let fence = format!("```{lang}\n");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&fence) {
        let body = &rest[i + fence.len()..];
        let end = body.find("```").expect("closed fence");
        out.push(body[..end].to_owned());
        rest = &body[end..];
    }
    out
}

/// A shell line without its comment, split into words (the README's commands quote nothing).
fn words(line: &str) -> Vec<String> {
    line.split(" #")
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

/// The arguments of a `cargo run --release -- ARGS` line.
fn cargo_run_args(words: &[String]) -> Vec<String> {
    assert_eq!(
        words[..4],
        ["cargo", "run", "--release", "--"],
        "the README runs acme-sds with `cargo run --release -- ...`; this test maps that onto the binary under test"
    );
    words[4..].to_vec()
}

fn pem_der(path: &Path) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_file(path)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
        .to_vec()
}

/// Handshakes until Envoy answers `sni` over HTTPS trusting only `ca` (Envoy applies secrets asynchronously).
async fn https_until_ok(port: u16, sni: &str, ca: &[u8], envoy: &Envoy) -> (Vec<u8>, String) {
    let start = Instant::now();
    loop {
        match https_get(port, sni, ca).await {
            Ok(r) if r.1.starts_with("HTTP/1.1 200") => return r,
            other if start.elapsed() > WAIT => panic!(
                "no HTTPS answer for {sni} within {WAIT:?}: {other:?}\n{}",
                envoy.log_text()
            ),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_command_serves_a_certificate_to_envoy_from_an_empty_directory() {
    let Some(envoy_path) = envoy_bin() else {
        return;
    };
    let first = blocks(Some("The two commands"), "sh")[0]
        .lines()
        .next()
        .unwrap()
        .to_owned();
    let args = cargo_run_args(&words(&first));
    assert_eq!(args, ["run"], "{first}");
    // A fresh clone has no acme-sds.toml, which `run` would use instead of the built-in configuration.
    assert!(!repo().join("acme-sds.toml").exists());

    let dir = tempfile::tempdir().unwrap();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let daemon = Process::spawn_in(dir.path(), &args, &[]);
    daemon.wait_for_line("acme-sds started");
    let log = daemon.log();
    assert!(log.contains("built-in configuration"), "{log}");

    // What it prints is what the README shows (but for where the binary is), and it works as printed.
    let printed = |prefix: &str| -> String {
        log.lines()
            .map(str::trim)
            .find(|l| l.contains(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line in\n{log}"))
            .to_owned()
    };
    let bootstrap_line = printed(" envoy-bootstrap ");
    let curl_line = printed("curl --cacert");
    let readme = &blocks(Some("The two commands"), "sh")[1];
    let (_, bootstrap_args) = bootstrap_line.split_once(' ').unwrap();
    assert!(
        readme.contains(&format!("target/release/acme-sds {bootstrap_args}")),
        "README:\n{readme}\nprinted: {bootstrap_line}"
    );
    assert!(
        readme.contains(&curl_line),
        "README:\n{readme}\nprinted: {curl_line}"
    );
    assert!(readme.contains("envoy -c envoy.yaml"), "{readme}");

    let (http, https, admin) = (free_port(), free_port(), free_port());
    let mut bootstrap = words(bootstrap_args);
    assert_eq!(bootstrap.pop().as_deref(), Some("envoy.yaml"));
    assert_eq!(bootstrap.pop().as_deref(), Some(">"));
    for (flag, port) in [("--http-port", http), ("--https-port", https)] {
        let i = bootstrap.iter().position(|w| w == flag).expect(flag);
        bootstrap[i + 1] = port.to_string();
    }
    bootstrap.extend(["--admin-port".into(), admin.to_string()]);
    let out = Command::new(bin())
        .args(&bootstrap)
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let yaml = String::from_utf8(out.stdout).unwrap();
    let mut envoy = Envoy::start(&envoy_path, &yaml, dir.path());
    envoy.wait_live();

    let root = words(&curl_line)[2].clone();
    let ca = pem_der(&dir.path().join(&root));
    // By name (SNI) and by address (no SNI: the default chain), trusting only the printed root.
    let (by_name, body) = https_until_ok(https, "localhost", &ca, &envoy).await;
    assert!(body.contains("TLS by acme-sds (localhost)"), "{body}");
    let (by_address, _) = https_until_ok(https, "127.0.0.1", &ca, &envoy).await;
    assert_eq!(by_name, by_address);

    // The file it says to write for Let's Encrypt is a valid configuration, and one that `check` (and
    // `run`) find in the directory without being told.
    let letsencrypt = Command::new(bin())
        .args(["example-config", "--letsencrypt"])
        .output()
        .unwrap();
    assert!(printed("example-config --letsencrypt").contains("> acme-sds.toml"));
    assert_eq!(
        letsencrypt.stdout,
        std::fs::read(repo().join("examples/letsencrypt/acme-sds.toml")).unwrap()
    );
    std::fs::write(dir.path().join("acme-sds.toml"), &letsencrypt.stdout).unwrap();
    let check = Command::new(bin())
        .arg("check")
        .current_dir(dir.path())
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{check:?}");
    assert!(said.starts_with("acme-sds.toml: OK"), "{said}");
}

/// A copy of the repository's `examples/envoy/` in `root`, with Envoy's ports made free and loopback-only.
fn example_copy(root: &Path) -> (u16, String) {
    let ex = root.join("examples/envoy");
    std::fs::create_dir_all(&ex).unwrap();
    for f in ["acme-sds.toml", "make-certs.sh"] {
        std::fs::copy(repo().join("examples/envoy").join(f), ex.join(f)).unwrap();
    }
    let https = free_port();
    let yaml = std::fs::read_to_string(repo().join("examples/envoy/envoy.yaml"))
        .unwrap()
        .replace("port_value: 8443", &format!("port_value: {https}"))
        .replace("port_value: 9901", "port_value: 0")
        .replace("address: 0.0.0.0", "address: 127.0.0.1");
    std::fs::write(ex.join("envoy.yaml"), &yaml).unwrap();
    (https, yaml)
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_in_five_minutes_works_as_written() {
    let Some(envoy_path) = envoy_bin() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (https, yaml) = example_copy(root);
    let mut daemon = None;
    let mut envoy = None;
    let mut answered = false;
    let script = &blocks(Some("Envoy in five minutes"), "sh")[0];
    for line in script.lines() {
        let w = words(line);
        match w.first().map(String::as_str) {
            None => {}
            Some("examples/envoy/make-certs.sh") => {
                run_ok(Command::new("bash").args(&w).current_dir(root));
            }
            Some("cargo") => {
                let mut args = cargo_run_args(&w);
                let background = args.last().is_some_and(|a| a == "&");
                if background {
                    args.pop();
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    let p = Process::spawn_in(root, &args, &[]);
                    p.wait_for_line("acme-sds started");
                    daemon = Some(p);
                } else {
                    run_ok(Command::new(bin()).args(&args).current_dir(root));
                }
            }
            Some("envoy") => {
                assert_eq!(
                    w,
                    ["envoy", "-c", "examples/envoy/envoy.yaml", "&"],
                    "{line}"
                );
                let mut e = Envoy::start(&envoy_path, &yaml, root);
                e.wait_live();
                envoy = Some(e);
            }
            Some("curl") => {
                let args: Vec<String> = w[1..]
                    .iter()
                    .map(|a| a.replace(":8443", &format!(":{https}")))
                    .collect();
                let e = envoy.as_ref().expect("envoy runs before curl");
                let start = Instant::now();
                let body = loop {
                    let out = Command::new("curl")
                        .args(["-sS", "--max-time", "5"])
                        .args(&args)
                        .current_dir(root)
                        .output()
                        .expect("curl (scripts/test installs it)");
                    if out.status.success() {
                        break String::from_utf8_lossy(&out.stdout).into_owned();
                    }
                    assert!(start.elapsed() < WAIT, "{line}: {out:?}\n{}", e.log_text());
                    tokio::time::sleep(Duration::from_millis(50)).await;
                };
                assert_eq!(body, "hello from www\n");
                answered = true;
            }
            Some(other) => panic!("the test does not know how to run {other:?} ({line})"),
        }
    }
    assert!(daemon.is_some() && answered, "{script}");
}

/// A directory as the repository root is after `examples/envoy/make-certs.sh`: the README's snippets name
/// those files.
fn root_with_example_certs() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    example_copy(root.path());
    run_ok(
        Command::new("bash")
            .arg("examples/envoy/make-certs.sh")
            .current_dir(root.path()),
    );
    root
}

#[test]
fn every_toml_snippet_in_the_readme_passes_check() {
    let root = root_with_example_certs();
    let root = root.path();
    // The DNS-01 snippet names a TSIG key beside the file, which `check` reads.
    // Private, as acme-sds requires of a key file.
    testkit::write_private(
        &root.join("acme-sds.key"),
        testkit::bind::key_file_text("acme-sds", "hmac-sha256", "c2VjcmV0LXNlY3JldC1zZWNyZXQ="),
    );
    let snippets = blocks(None, "toml");
    assert!(snippets.len() >= 5, "{}", snippets.len());
    for (i, toml) in snippets.iter().enumerate() {
        std::fs::write(root.join("acme-sds.toml"), toml).unwrap();
        let out = Command::new(bin())
            .args(["check", "--config", "acme-sds.toml"])
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "TOML snippet {i} of README.md does not pass check:\n{toml}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_examples_pass_check() {
    let root = root_with_example_certs();
    let root = root.path();
    let configs: Vec<PathBuf> = vec![
        root.join("examples/envoy/acme-sds.toml"),
        repo().join("examples/envoy-acme/acme-sds.toml"),
        repo().join("examples/letsencrypt/acme-sds.toml"),
    ];
    for c in configs {
        run_ok(Command::new(bin()).arg("check").arg("--config").arg(&c));
    }
}
