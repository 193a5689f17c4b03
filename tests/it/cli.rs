//! The `acme-sds` binary: `check`, start-up errors, logs, signals and socket handling.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use testkit::*;

fn check(config: &Path) -> (bool, String, String) {
    let out = Command::new(bin())
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A config with one certificate and one trust bundle in `dir`.
fn good_config(dir: &Path, pki: &Pki) -> std::path::PathBuf {
    let leaf = pki.leaf(&["www.example.com", "example.com"]);
    leaf.write(dir, "web");
    std::fs::write(dir.join("ca.pem"), pki.ca_pem()).unwrap();
    let socket = dir.join("sds.sock");
    let path = dir.join("acme-sds.toml");
    std::fs::write(
        &path,
        format!(
            r#"[sds]
listen = ["unix:{}", "127.0.0.1:0"]
socket_mode = "0660"

[[certificate]]
name = "web"
cert_file = "web.crt"
key_file = "web.key"

[[trust_bundle]]
name = "client-ca"
file = "ca.pem"
"#,
            socket.display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn check_summarises_a_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(dir.path(), &Pki::new());
    let (ok, out, err) = check(&config);
    assert!(ok, "stderr: {err}");
    assert!(out.contains("sds.sock (mode 0660)"), "{out}");
    assert!(out.contains("127.0.0.1:0"), "{out}");
    assert!(out.contains("web: tls_certificate"), "{out}");
    assert!(out.contains("www.example.com, example.com"), "{out}");
    assert!(out.contains("expires"), "{out}");
    assert!(out.contains("client-ca: validation_context"), "{out}");
    assert!(!out.contains("PRIVATE KEY"));
}

#[test]
fn check_names_the_key_and_line_of_each_problem() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let config = good_config(dir.path(), &pki);
    let text = std::fs::read_to_string(&config).unwrap();

    // Unknown key.
    std::fs::write(&config, text.replace("socket_mode", "socket_mod")).unwrap();
    let (ok, _, err) = check(&config);
    assert!(!ok);
    assert!(
        err.contains("acme-sds.toml:3") && err.contains("socket_mod"),
        "{err}"
    );

    // Duplicate names.
    std::fs::write(&config, text.replace("client-ca", "web")).unwrap();
    let (ok, _, err) = check(&config);
    assert!(!ok);
    assert!(
        err.contains("trust_bundle[0].name") && err.contains("duplicate"),
        "{err}"
    );

    // Unreadable file.
    std::fs::write(&config, text.replace("web.key", "missing.key")).unwrap();
    let (ok, _, err) = check(&config);
    assert!(!ok);
    assert!(
        err.contains("acme-sds.toml:8: certificate[0].key_file"),
        "{err}"
    );
    assert!(err.contains("missing.key"), "{err}");

    // A key that does not match its certificate.
    std::fs::write(&config, &text).unwrap();
    let other = pki.leaf(&["other.example"]);
    std::fs::write(dir.path().join("web.key"), &other.key_pem).unwrap();
    let (ok, _, err) = check(&config);
    assert!(!ok);
    assert!(
        err.contains("certificate[0].key_file") && err.contains("does not match"),
        "{err}"
    );
    assert!(!err.contains("BEGIN"), "no key material in errors: {err}");
}

#[test]
fn run_refuses_to_start_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(dir.path(), &Pki::new());
    std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
    let mut p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(p.wait_exit(), Some(1));
    assert!(p.log().contains("trust_bundle[0].file"), "{}", p.log());
    assert!(!dir.path().join("sds.sock").exists());
}

#[test]
fn version_and_help() {
    let out = Command::new(bin()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("acme-sds "));
    let out = Command::new(bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("run") && help.contains("check") && help.contains("--log-format"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_streams_removes_the_socket_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(dir.path(), &Pki::new());
    let socket = dir.path().join("sds.sock");
    // A stale socket left by a crash: bound, then abandoned.
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());

    let mut p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "socket_mode applied");
    let mut client = uds_client(&socket).await;
    let mut s = SotwStream::open(&mut client).await;
    s.send(subscribe(&["web"])).await;
    s.recv().await;

    p.signal("TERM");
    let status = s.end().await.expect("stream ends with a status");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(p.wait_exit(), Some(0), "{}", p.log());
    assert!(!socket.exists(), "socket removed on clean shutdown");
}

#[test]
fn sigint_exits_zero_and_json_logs_are_json() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(dir.path(), &Pki::new());
    let mut p = Process::spawn(
        &[
            "--log-format",
            "json",
            "run",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    let line = p.wait_for_line("acme-sds started");
    let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
    assert_eq!(v["level"], "INFO");
    p.signal("INT");
    assert_eq!(p.wait_exit(), Some(0), "{}", p.log());
}

#[test]
fn a_second_instance_does_not_steal_a_live_socket() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(dir.path(), &Pki::new());
    let first = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    first.wait_for_line("acme-sds started");
    let mut second = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(second.wait_exit(), Some(1));
    assert!(second.log().contains("already running"), "{}", second.log());
    assert!(dir.path().join("sds.sock").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_files_are_rejected_with_an_error_and_the_last_good_version_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let config = good_config(dir.path(), &pki);
    let socket = dir.path().join("sds.sock");
    let p = Process::spawn(
        &["run", "--config", config.to_str().unwrap()],
        &[("RUST_LOG", "info")],
    );
    let loaded = p.wait_for_line("loaded certificate");
    assert!(
        loaded.contains("expires") && loaded.contains("serial"),
        "{loaded}"
    );
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&socket).await;
    let (mut s, r1) = SotwStream::subscribed(&mut client, &["web"]).await;
    s.send(ack(&["web"], &r1)).await;

    // Half-written certificate.
    let next = pki.leaf(&["www.example.com"]);
    let crt = dir.path().join("web.crt");
    let key = dir.path().join("web.key");
    rewrite_in_place(&crt, &next.chain_pem.as_bytes()[..next.chain_pem.len() / 4]);
    let line = p.wait_for_line("rejected changed files");
    assert!(line.contains("web.crt"), "{line}");
    // Complete, but with the old key: mismatched.
    rewrite_in_place(&crt, next.chain_pem.as_bytes());
    let line = p.wait_for_line("rejected changed files");
    assert!(line.contains("does not match"), "{line}");
    // Fixed: the next push is the good pair; nothing bad was ever sent.
    rewrite_in_place(&key, next.key_pem.as_bytes());
    let r2 = s.recv().await;
    assert_eq!(leaf_der(&decode_secret(&r2.resources[0])), next.leaf_der);
    assert!(!p.log().contains("BEGIN"), "no PEM in logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_is_logged_with_the_node_of_the_first_request_and_envoys_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(dir.path(), &Pki::new());
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let mut s = SotwStream::open(&mut client).await;
    let mut first = subscribe(&["web"]);
    first.node = node("edge-7");
    s.send(first).await;
    let r = s.recv().await;
    // Later requests carry no node: the stream keeps the first one.
    let n = nack(&["web"], &r, "");
    assert!(n.node.is_none());
    s.send(n).await;
    let line = p.wait_for_line("NACK");
    assert!(line.contains("edge-7"), "{line}");
    assert!(line.contains("Failed to load certificate chain"), "{line}");
    assert!(
        line.contains(&r.version_info),
        "names the rejected version: {line}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_the_daemon_or_else_the_disk_and_highlights_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = good_config(dir.path(), &Pki::new());
    let text = std::fs::read_to_string(&config).unwrap();
    // An ACME certificate that was never issued, and an admin listener.
    std::fs::write(
        &config,
        text.replacen(
            "[[certificate]]",
            "[admin]\nlisten = \"127.0.0.1:0\"\n\n[acme]\naccept_terms_of_service = true\n\n[[certificate]]\nname = \"shop\"\ndomains = [\"shop.example.com\"]\n\n[[certificate]]",
            1,
        ),
    )
    .unwrap();
    let status = |config: &Path| {
        let out = Command::new(bin())
            .args(["status", "--config"])
            .arg(config)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // No daemon: from the files and the (empty) storage.
    let (code, out) = status(&config);
    assert_eq!(
        code,
        Some(2),
        "a problem is reported in the exit code:\n{out}"
    );
    assert!(out.contains("no daemon answered"), "{out}");
    let web_line = out.lines().find(|l| l.starts_with("web ")).unwrap();
    assert!(
        web_line.trim_end().ends_with("unknown"),
        "streams are unknown without a daemon, not 0: {web_line}"
    );
    assert!(
        out.contains("web") && out.contains("in ") && out.contains(" days"),
        "{out}"
    );
    assert!(
        out.contains("shop") && out.contains("PROBLEM: not issued yet"),
        "{out}"
    );

    // With the daemon (its admin port comes from its log), stream counts come along.
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    let line = p.wait_for_line("admin listening");
    let port = line
        .split("listen=")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("listen = \"127.0.0.1:0\"", &format!("listen = \"{port}\"")),
    )
    .unwrap();
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let (_s, _) = SotwStream::subscribed(&mut client, &["web"]).await;
    let (_, out) = status(&config);
    assert!(out.contains("from the running daemon"), "{out}");
    let web_line = out.lines().find(|l| l.starts_with("web ")).unwrap();
    assert!(
        web_line.trim_end().ends_with(" 1"),
        "one subscribed stream: {web_line}"
    );
}

/// `check` says beforehand what `run` would run into as this user, without creating or binding anything,
/// each problem naming its key and the path, group or port; `run` then fails naming the same path.
#[test]
fn check_names_what_this_user_could_not_do_and_run_names_it_too() {
    use std::os::unix::fs::PermissionsExt;
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: needs to run acme-sds as another user");
        return;
    }
    let (uid, gid) = (65534, 65534);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // Root's directories: nobody may create anything in them.
    let run_dir = dir.path().join("run");
    let lib_dir = dir.path().join("lib");
    for d in [&run_dir, &lib_dir] {
        std::fs::create_dir(d).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\nsocket_mode = \"0660\"\nsocket_group = 0\n\n[storage]\npath = \"{}\"\n\n[http01]\nlisten = \"127.0.0.1:80\"\n\n[acme]\ndirectory_ca = \"{}\"\naccept_terms_of_service = true\n\n[[certificate]]\nname = \"site\"\ndomains = [\"www.example.com\"]\n",
            run_dir.join("acme-sds/sds.sock").display(),
            lib_dir.join("acme-sds").display(),
            dir.path().join("missing-root.pem").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut cmd = Command::new(bin());
        cmd.args(args).arg("--config").arg(&config);
        as_user(&mut cmd, uid, gid);
        cmd.output().unwrap()
    };

    let out = as_nobody(&["check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    for (key, words) in [
        (
            "sds.listen[0]",
            format!(
                "cannot create the socket {}",
                run_dir.join("acme-sds/sds.sock").display()
            ),
        ),
        ("sds.socket_group", "is not a member of group 0".to_owned()),
        (
            "storage.path",
            format!(
                "{} is not writable by this user (uid 65534)",
                lib_dir.display()
            ),
        ),
        ("http01.listen", "port 80 is privileged".to_owned()),
        ("acme.directory_ca", "missing-root.pem".to_owned()),
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains(&format!(": {key}: ")) && l.contains(&words)),
            "{key} / {words}:\n{err}"
        );
    }
    assert!(
        !run_dir.join("acme-sds").exists() && !lib_dir.join("acme-sds").exists(),
        "check created nothing"
    );

    // Root may do all of that, but for the missing root certificate.
    let (ok, _, root_err) = check(&config);
    assert!(!ok);
    assert_eq!(
        root_err.matches("acme.directory_ca").count(),
        1,
        "{root_err}"
    );
    assert!(!root_err.contains("sds.listen"), "{root_err}");

    // `run` as nobody fails once, naming the path it could not create.
    let out = as_nobody(&["run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "storage.path: storage create {}",
            lib_dir.join("acme-sds").display()
        )),
        "{err}"
    );
    assert_eq!(err.matches("Permission denied").count(), 1, "{err}");
}
