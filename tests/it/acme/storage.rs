//! The storage under ACME: corrupt values, kill -9 mid-issuance, a store that refuses writes, read-only
//! and shared volumes, a second daemon on the same directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use testkit::pebble::{Pebble, PebbleOptions, free_port, verify_chain};
use testkit::*;

use super::*;

#[test]
fn a_corrupt_stored_certificate_is_moved_aside_and_obtained_again() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["c.example.com"])]),
    );
    let args = ["run", "--config", config.to_str().unwrap()];
    issue_then_stop(&args);

    // Half-written, as a crash mid-write on a filesystem without atomic rename would leave it.
    let certs_dir = std::fs::read_dir(dir.path().join("acme-sds-data/acme"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path()
        .join("certs");
    let stored = certs_dir.join("site");
    let bytes = std::fs::read(&stored).unwrap();
    std::fs::write(&stored, &bytes[..bytes.len() / 2]).unwrap();

    let second = Process::spawn(&args, &[]);
    let aside = second.wait_for_line("moved aside");
    assert!(
        aside.contains("secret=site") || aside.contains("secret=\"site\""),
        "{aside}"
    );
    second.wait_for_line_within("certificate issued", ISSUE);
    let names: Vec<String> = std::fs::read_dir(&certs_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n.starts_with("site.corrupt-")),
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "site"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_during_issuance_never_corrupts_state() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let storage = dir.path().join("acme-sds-data");
    let config_path = dir.path().join("acme-sds.toml");
    let args = ["run", "--config", config_path.to_str().unwrap()];
    // Each round adds two certificates, so every run is in the middle of issuing something when killed.
    let mut names: Vec<String> = Vec::new();
    let write = |names: &[String]| {
        let domains: Vec<[String; 1]> =
            names.iter().map(|n| [format!("{n}.example.com")]).collect();
        let doms: Vec<[&str; 1]> = domains.iter().map(|d| [d[0].as_str()]).collect();
        let certs: Vec<(&str, &[&str])> = names
            .iter()
            .zip(&doms)
            .map(|(n, d)| (n.as_str(), &d[..]))
            .collect();
        write_config(dir.path(), &acme_tables(&pebble, http, &certs));
    };

    // Deterministic "random" moments across the issuance window.
    let mut seed: u64 = 0x5eed;
    for round in 0..10 {
        names.push(format!("r{round}a"));
        names.push(format!("r{round}b"));
        write(&names);
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = std::time::Duration::from_millis((seed >> 33) % 900);
        let mut p = Process::spawn(&args, &[]);
        p.wait_for_line("acme-sds started");
        tokio::time::sleep(delay).await; // the moment of the crash, not a synchronisation
        p.child.kill().unwrap(); // SIGKILL
        p.child.wait().unwrap();
        let stored = check_storage(&storage);
        eprintln!(
            "round {round}: killed after {delay:?}; {stored} of {} certificates stored, all whole",
            names.len()
        );
    }
    let domains: Vec<String> = names.iter().map(|n| format!("{n}.example.com")).collect();

    // Final run: everything completes, and what is served matches what is stored.
    let p = Process::spawn(&args, &[]);
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let root = pebble.root_der().await;
    for (name, domain) in names.iter().zip(&domains) {
        let mut s = SotwStream::open(&mut client).await;
        s.send(subscribe(&[name])).await;
        let secret = decode_secret(&s.recv_issued(ISSUE).await.resources[0]);
        // Certificates from before a Pebble restart would not verify; this Pebble ran throughout.
        verify_chain(&chain_ders(&secret), &root, domain).unwrap();
    }
    assert_eq!(check_storage(&storage), names.len());
    assert!(!p.log().contains("panicked"));
}

/// A certificate the CA issued is never lost: when the store refuses it, it is served from memory and the
/// write retried until it lands; and an acme-sds killed meanwhile downloads it again at its next start
/// (the order was kept) rather than ordering a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issued_certificate_the_store_refused_is_served_stored_later_and_never_ordered_twice() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["w.example.com"])]),
    );
    let storage = dir.path().join("acme-sds-data");
    // The certificate's value cannot be written: a non-empty directory stands where its file goes.
    let blocked = storage.join(
        acme_sds::sources::keys::AcmeKeys::for_directory(&pebble.directory)
            .cert(&acme_sds::values::SecretId::named("site")),
    );
    std::fs::create_dir_all(blocked.join("in-the-way")).unwrap();
    let args = ["run", "--config", config.to_str().unwrap()];
    let mut p = Process::spawn(&args, &[]);
    let issued = p.wait_for_line_within("certificate issued", ISSUE);
    assert!(issued.contains("NOT STORED"), "{issued}");
    assert!(p.log().contains("served from memory"), "{}", p.log());
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let served = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    let secret = decode_secret(&fetch(&mut client, &["site"]).await.resources[0]);
    assert!(!is_temporary(&secret), "the issued certificate is served");
    verify_chain(
        &chain_ders(&secret),
        &pebble.root_der().await,
        "w.example.com",
    )
    .unwrap();

    // Killed before the write could land: the next start resumes the kept order and downloads the same
    // certificate.
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    std::fs::remove_dir_all(&blocked).unwrap();
    let p = Process::spawn(&args, &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    assert!(
        p.log().contains("resuming the order in progress"),
        "{}",
        p.log()
    );
    assert!(
        !p.log().contains("order created"),
        "no new order:\n{}",
        p.log()
    );
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let again = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert_eq!(again, served, "the same certificate, downloaded again");
    assert_eq!(stored_leaf(&storage, "site").as_deref(), Some(&served[..]));
}

/// The store refuses a renewal for a while: the renewal is served from memory, and stored once the store
/// takes writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_the_store_refused_is_stored_once_it_can_be() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.validity_seconds = Some(6);
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["w.example.com"])]),
    );
    let p = Process::spawn(&["run", "--config", config.to_str().unwrap()], &[]);
    p.wait_for_line_within("certificate issued", ISSUE);
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let first = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    let storage = dir.path().join("acme-sds-data");

    // The stored value cannot be replaced any more (a directory now stands in its place).
    let ca_dir = std::fs::read_dir(storage.join("acme"))
        .unwrap()
        .flatten()
        .next()
        .unwrap()
        .path();
    let stored = ca_dir.join("certs/site");
    std::fs::remove_file(&stored).unwrap();
    std::fs::create_dir(&stored).unwrap();
    std::fs::write(stored.join("keep"), b"x").unwrap();

    // The renewal (half of 6 s) is obtained but cannot be stored: it is served all the same.
    let line = p.wait_for_line_within("NOT STORED", ISSUE);
    assert!(line.contains("certificate issued"), "{line}");
    let renewed = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert_ne!(renewed, first, "the renewal is served from memory");

    // The store takes writes again: the served certificate lands there.
    std::fs::remove_dir_all(&stored).unwrap();
    p.wait_for_line_within("is stored now", ISSUE);
    let on_disk = stored_leaf(&storage, "site").unwrap();
    let served = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert!(
        on_disk == served || on_disk == renewed,
        "what is stored is what was served"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_storage_serves_the_stored_certificate_then_its_renewal_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let mut opts = PebbleOptions::new(http);
    opts.validity_seconds = Some(6);
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), opts) else {
        return;
    };
    let config = write_config(
        dir.path(),
        &acme_tables(&pebble, http, &[("site", &["ro.example.com"])]),
    );
    issue_then_stop(&["run", "--config", config.to_str().unwrap()]);

    // Run again with the storage directory mounted read-only (a private mount namespace; root can write
    // through file modes, not through a read-only mount).
    let storage = dir.path().join("acme-sds-data");
    let script = format!(
        "mount --bind '{s}' '{s}' && mount -o remount,bind,ro '{s}' && exec '{bin}' run --config '{c}'",
        s = storage.display(),
        bin = bin(),
        c = config.display()
    );
    let p = Process::spawn_program(
        "unshare",
        &["-m", "--propagation", "private", "sh", "-c", &script],
        &[],
    );
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&dir.path().join("sds.sock")).await;
    let served = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    // The renewal (due after 3 s) cannot be stored: the error says why, and the renewal is served from
    // memory (an issued certificate is never thrown away).
    let issued = p.wait_for_line_within("certificate issued", ISSUE);
    assert!(issued.contains("NOT STORED"), "{issued}");
    let why = p.wait_for_line("cannot store the issued certificate");
    assert!(why.contains("Read-only file system"), "{why}");
    let after = leaf_der(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0],
    ));
    assert_ne!(after, served, "the renewal is served");
}

/// One daemon per storage directory: a second acme-sds on the same storage refuses to start and names the
/// first; `acme-sds status` reads the storage alongside it without locking or writing anything.
#[test]
fn a_second_daemon_on_the_same_storage_is_refused_and_status_reads_alongside() {
    let dir = tempfile::tempdir().unwrap();
    let acme = |socket: &str, http: u16| {
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n\n[http01]\nlisten = \"127.0.0.1:{http}\"\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\n[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n",
            dir.path().join(socket).display(),
            free_port()
        )
    };
    let first_config = dir.path().join("first.toml");
    std::fs::write(&first_config, acme("first.sock", free_port())).unwrap();
    let second_config = dir.path().join("second.toml");
    std::fs::write(&second_config, acme("second.sock", free_port())).unwrap();
    let mut first = Process::spawn(&["run", "--config", first_config.to_str().unwrap()], &[]);
    first.wait_for_line("acme-sds started");

    let mut second = Process::spawn(&["run", "--config", second_config.to_str().unwrap()], &[]);
    assert_eq!(second.wait_exit(), Some(1));
    let err = second.log();
    assert!(
        err.contains("in use by another acme-sds")
            && err.contains(&format!("pid {}", first.child.id())),
        "{err}"
    );
    assert_eq!(
        err.matches("in use by another acme-sds").count(),
        1,
        "said once:\n{err}"
    );

    let storage = dir.path().join("acme-sds-data");
    // What is stored (the daemon's own temp files come and go as it writes; they are not compared).
    let files = |d: &Path| -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![d.to_owned()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                } else if !name.contains(".tmp-") {
                    out.push(e.path().display().to_string());
                }
            }
        }
        out.sort();
        out
    };
    // The daemon has written what it writes before its first order (its state) by now.
    let deadline = std::time::Instant::now() + WAIT;
    while !files(&storage).iter().any(|f| f.ends_with("/state/site")) {
        assert!(std::time::Instant::now() < deadline, "no state written");
        std::thread::sleep(Duration::from_millis(20));
    }
    let before = files(&storage);
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&second_config)
        .output()
        .unwrap();
    assert!(matches!(out.status.code(), Some(0 | 2)), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("site"),
        "{out:?}"
    );
    assert_eq!(files(&storage), before, "status wrote nothing");

    // The first goes: the storage is free again.
    first.signal("TERM");
    assert_eq!(first.wait_exit(), Some(0));
    let second = Process::spawn(&["run", "--config", second_config.to_str().unwrap()], &[]);
    second.wait_for_line("acme-sds started");
}

/// Storage on a volume acme-sds does not own, as an operator's platform hands it out (a Kubernetes volume
/// with `fsGroup`: root-owned, group-writable, setgid), with acme-sds running as an unprivileged user: it
/// keeps its state in a private subdirectory instead of failing to make the volume private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_on_a_group_owned_volume_works_for_a_non_root_user() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    if nix::unistd::geteuid().as_raw() != 0 {
        eprintln!("SKIPPED: needs to start acme-sds as another user");
        return;
    }
    let (uid, gid) = (65534, 65534);
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The volume: root:GID, 2775.
    let volume = dir.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    nix::unistd::chown(&volume, Some(0.into()), Some(gid.into())).unwrap();
    std::fs::set_permissions(&volume, std::fs::Permissions::from_mode(0o2775)).unwrap();
    // The socket's directory is the user's (a runtime directory).
    let run = dir.path().join("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, Some(uid.into()), Some(gid.into())).unwrap();
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\"]\n[storage]\npath = \"{}\"\n[http01]\nlisten = \"127.0.0.1:0\"\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\n[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n",
            run.join("sds.sock").display(),
            volume.display(),
            free_port()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();

    let p = Process::spawn_as(
        uid,
        gid,
        &["run", "--config", config.to_str().unwrap()],
        &[],
    );
    p.wait_for_line("acme-sds started");
    assert!(p.log().contains("private subdirectory"), "{}", p.log());
    let private = volume.join("acme-sds");
    let meta = std::fs::metadata(&private).unwrap();
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (uid, 0o700)
    );
    assert!(private.join(".lock").exists());
    // It serves (the temporary certificate, the CA being unreachable), and status finds the same store.
    let mut client = uds_client(&run.join("sds.sock")).await;
    assert!(is_temporary(&decode_secret(
        &fetch(&mut client, &["site"]).await.resources[0]
    )));
    let out = std::process::Command::new(bin())
        .args(["status", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("site"),
        "{out:?}"
    );
}

/// `storage.encryption_key_file`: the account key and certificate keys are sealed at rest (no private key
/// in any stored file), a restart opens them and orders nothing, `acme-sds status` reads them offline, and
/// without the key the daemon refuses to start rather than order afresh over them.
#[test]
fn stored_private_keys_are_sealed_with_the_configured_key() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let http = free_port();
    let Some(pebble) = Pebble::start(&dir.path().join("pebble"), PebbleOptions::new(http)) else {
        return;
    };
    let key_file = dir.path().join("storage.key");
    let key: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(11));
    std::fs::write(
        &key_file,
        base64::engine::general_purpose::STANDARD.encode(key) + "\n",
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let storage = dir.path().join("storage");
    let sealed_table = format!(
        "[storage]\npath = \"{}\"\nencryption_key_file = \"{}\"\n\n",
        storage.display(),
        key_file.display()
    );
    let tables = acme_tables(&pebble, http, &[("site", &["a.example.com"])]);
    let config = write_config(dir.path(), &format!("{sealed_table}{tables}"));
    let args = ["run", "--config", config.to_str().unwrap()];
    issue_then_stop(&args);

    // No stored file holds a private key in clear; the account and the certificate are sealed.
    let mut files = Vec::new();
    let mut dirs = vec![storage.clone()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            } else {
                files.push(e.path());
            }
        }
    }
    let sealed = |p: &Path| std::fs::read(p).unwrap().starts_with(b"ASDS1");
    let mut seen = (false, false);
    for f in &files {
        let text = String::from_utf8_lossy(&std::fs::read(f).unwrap()).into_owned();
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a key in clear",
            f.display()
        );
        let rel = f
            .strip_prefix(&storage)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel.ends_with("/account") {
            assert!(sealed(f), "{rel}");
            seen.0 = true;
        }
        if rel.ends_with("/certs/site") {
            assert!(sealed(f), "{rel}");
            seen.1 = true;
        }
    }
    assert_eq!(seen, (true, true), "{files:?}");

    // Offline status opens them.
    let out = std::process::Command::new(bin())
        .args(["status", "--config", config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("site"),
        "{out:?}"
    );

    // A restart opens the stored certificate and orders nothing.
    let mut again = Process::spawn(&args, &[]);
    again.wait_for_line("next renewal at");
    assert!(!again.log().contains("order created"), "{}", again.log());
    again.signal("TERM");
    assert_eq!(again.wait_exit(), Some(0));

    // Without the key: refused at start, naming what is missing; nothing stored is touched.
    let cert_file = files.iter().find(|f| f.ends_with("certs/site")).unwrap();
    let before = std::fs::read(cert_file).unwrap();
    let keyless = write_config(
        dir.path(),
        &format!("[storage]\npath = \"{}\"\n\n{tables}", storage.display()),
    );
    let out = std::process::Command::new(bin())
        .args(["run", "--config", keyless.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("set storage.encryption_key_file"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(cert_file).unwrap(), before);
}
