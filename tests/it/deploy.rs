//! The deployment kits in deploy/: manifests parse, carry the fields the README promises, and their
//! embedded acme-sds configurations are valid.

use std::path::{Path, PathBuf};

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn docs(file: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(root().join(file)).unwrap();
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{file}: {e}"))
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .collect()
}

fn s(y: &Yaml) -> &str {
    y.as_str().unwrap_or_else(|| panic!("not a string: {y:?}"))
}

/// The Service exposes the SDS port and the HTTP-01 port, by the names Istio reads the protocols from.
fn assert_serves_sds_and_acme(svc: &Yaml) {
    let ports: Vec<&str> = svc["spec"]["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| s(&p["name"]))
        .collect();
    assert!(
        ports.contains(&"grpc-sds") && ports.contains(&"http-acme"),
        "{ports:?}"
    );
}

/// Every embedded acme-sds.toml passes acme-sds's own validation.
fn check_embedded_config(doc: &Yaml) {
    let toml = s(&doc["data"]["acme-sds.toml"]);
    acme_sds::config::parse(toml, Path::new("/etc/acme-sds/acme-sds.toml"))
        .unwrap_or_else(|e| panic!("embedded config: {e}"));
}

#[test]
fn kubernetes_manifests() {
    let d = docs("kubernetes/acme-sds.yaml");
    let cm = of_kind(&d, "ConfigMap");
    check_embedded_config(cm[0]);
    assert_eq!(of_kind(&d, "PersistentVolumeClaim").len(), 1);

    let svc = of_kind(&d, "Service")[0];
    assert_serves_sds_and_acme(svc);

    let dep = of_kind(&d, "Deployment")[0];
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(s(&sc["capabilities"]["drop"][0]), "ALL");
    assert_eq!(s(&c["livenessProbe"]["httpGet"]["path"]), "/healthz");
    assert_eq!(s(&c["readinessProbe"]["httpGet"]["path"]), "/readyz");
    let mounts: Vec<&str> = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| s(&m["mountPath"]))
        .collect();
    assert!(mounts.contains(&"/var/lib/acme-sds"), "storage on the PVC");
    assert_eq!(dep["spec"]["replicas"].as_i64(), Some(1));
}

/// The several-replicas variant: etcd instead of a volume, the storage key from a Secret, replicas spread
/// over nodes, a disruption budget, and a Service that keeps sending Envoys to a replica that etcd's outage
/// made not-ready (it still serves what it has).
#[test]
fn kubernetes_replicas_manifests() {
    let d = docs("kubernetes/acme-sds-replicas.yaml");
    let cm = of_kind(&d, "ConfigMap")[0];
    check_embedded_config(cm);
    let config = acme_sds::config::parse(
        s(&cm["data"]["acme-sds.toml"]),
        Path::new("/etc/acme-sds/acme-sds.toml"),
    )
    .unwrap();
    let etcd = config.storage.etcd.as_ref().expect("[storage.etcd]");
    assert!(etcd.endpoints.len() >= 3, "every member listed");
    let key_file = config.storage.encryption_key_file.clone().unwrap();
    assert!(of_kind(&d, "PersistentVolumeClaim").is_empty(), "no volume");

    let dep = of_kind(&d, "Deployment")[0];
    assert!(dep["spec"]["replicas"].as_i64().unwrap() >= 2);
    assert_eq!(s(&dep["spec"]["strategy"]["type"]), "RollingUpdate");
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(
        s(&pod["topologySpreadConstraints"][0]["topologyKey"]),
        "kubernetes.io/hostname"
    );
    let c = &pod["containers"][0];
    assert_eq!(
        c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
        Some(true)
    );
    assert_eq!(s(&c["readinessProbe"]["httpGet"]["path"]), "/readyz");
    // The key file named in the configuration is the Secret's, mounted where the configuration says.
    let secret_volume = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|v| !v["secret"].is_badvalue())
        .expect("a Secret volume");
    let name = s(&secret_volume["name"]);
    let mount = c["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|m| s(&m["name"]) == name)
        .expect("the Secret mounted");
    assert_eq!(
        key_file.parent().unwrap(),
        Path::new(s(&mount["mountPath"]))
    );
    // Not readable by every user (acme-sds would refuse it); readable by the pod's fsGroup, since Secret
    // files belong to root and acme-sds does not run as root.
    assert_eq!(secret_volume["secret"]["defaultMode"].as_i64(), Some(0o440));
    assert_eq!(
        pod["securityContext"]["fsGroup"].as_i64(),
        pod["securityContext"]["runAsGroup"].as_i64()
    );

    let pdb = of_kind(&d, "PodDisruptionBudget")[0];
    assert_eq!(
        s(&pdb["spec"]["selector"]["matchLabels"]["app"]),
        s(&dep["spec"]["selector"]["matchLabels"]["app"])
    );
    let svc = of_kind(&d, "Service")[0];
    assert_eq!(
        svc["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    assert_serves_sds_and_acme(svc);
}

#[test]
fn istio_central_provider_gateway_routes_and_policy() {
    let d = docs("istio/central.yaml");
    let op = of_kind(&d, "IstioOperator")[0];
    let p = &op["spec"]["meshConfig"]["extensionProviders"][0];
    assert_eq!(s(&p["sds"]["name"]), "acme-sds");
    assert_eq!(
        s(&p["sds"]["service"]),
        "acme-sds.acme-sds.svc.cluster.local"
    );
    assert_eq!(p["sds"]["port"].as_i64(), Some(8234));

    let gw = of_kind(&d, "Gateway")[0];
    let servers = gw["spec"]["servers"].as_vec().unwrap();
    let https = servers
        .iter()
        .find(|x| s(&x["port"]["protocol"]) == "HTTPS")
        .unwrap();
    assert_eq!(s(&https["tls"]["credentialName"]), "sds://mydomain");
    let http = servers
        .iter()
        .find(|x| s(&x["port"]["protocol"]) == "HTTP")
        .unwrap();
    assert!(
        http["tls"]["httpsRedirect"].is_badvalue(),
        "httpsRedirect on port 80 breaks HTTP-01"
    );

    let vs = of_kind(&d, "VirtualService")[0];
    let routes = vs["spec"]["http"].as_vec().unwrap();
    assert_eq!(
        s(&routes[0]["match"][0]["uri"]["prefix"]),
        "/.well-known/acme-challenge/",
        "the challenge route comes first"
    );
    assert_eq!(
        routes[0]["route"][0]["destination"]["port"]["number"].as_i64(),
        Some(8089)
    );
    assert_eq!(s(&routes[1]["redirect"]["scheme"]), "https");

    let ap = of_kind(&d, "AuthorizationPolicy")[0];
    assert_eq!(s(&ap["spec"]["action"]), "ALLOW");
    let principal = s(&ap["spec"]["rules"][0]["from"][0]["source"]["principals"][0]);
    assert!(
        principal.ends_with("/sa/istio-ingressgateway-service-account"),
        "{principal}"
    );
}

#[test]
fn istio_sidecar_variant() {
    // `kubectl patch --patch-file` reads one document: the patch is exactly one, the Deployment's.
    let patch = docs("istio/sidecar-patch.yaml");
    assert_eq!(patch.len(), 1, "the patch file must be a single document");
    let dep = &patch[0];
    assert_eq!(s(&dep["kind"]), "Deployment");
    let tmpl = &dep["spec"]["template"];
    let proxy_config = s(&tmpl["metadata"]["annotations"]["proxy.istio.io/config"]);
    assert!(
        proxy_config.contains("ISTIO_META_credential: \"true\""),
        "{proxy_config}"
    );
    // One daemon per storage: one replica, replaced rather than rolled.
    assert_eq!(dep["spec"]["replicas"].as_i64(), Some(1));
    assert_eq!(s(&dep["spec"]["strategy"]["type"]), "Recreate");
    let pod = &tmpl["spec"];
    // The volume is group-writable for acme-sds through the pod's fsGroup.
    assert_eq!(pod["securityContext"]["fsGroup"].as_i64(), Some(1337));
    let sidecar = &pod["initContainers"][0];
    assert_eq!(
        s(&sidecar["restartPolicy"]),
        "Always",
        "native sidecar: up before istio-proxy"
    );
    assert!(!sidecar["startupProbe"].is_badvalue());
    let mounts = sidecar["volumeMounts"].as_vec().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| s(&m["mountPath"]) == "/var/run/secrets/credential-uds")
    );

    // Everything the patch refers to is in the resources file.
    let res = docs("istio/sidecar-resources.yaml");
    let names = |kind: &str| -> Vec<String> {
        of_kind(&res, kind)
            .iter()
            .map(|d| s(&d["metadata"]["name"]).to_owned())
            .collect()
    };
    for v in pod["volumes"].as_vec().unwrap() {
        if let Some(cm) = v["configMap"]["name"].as_str() {
            assert!(names("ConfigMap").iter().any(|n| n == cm), "ConfigMap {cm}");
        }
        if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            assert!(
                names("PersistentVolumeClaim").iter().any(|n| n == claim),
                "PersistentVolumeClaim {claim}"
            );
        }
    }
    let cm = of_kind(&res, "ConfigMap")[0];
    check_embedded_config(cm);
    let cfg =
        acme_sds::config::parse(s(&cm["data"]["acme-sds.toml"]), Path::new("/x.toml")).unwrap();
    assert_eq!(
        cfg.sds.listen,
        [acme_sds::values::ListenAddr::Unix(
            "/var/run/secrets/credential-uds/socket".into()
        )]
    );
    assert_eq!(
        cfg.sds.allowed_uids.as_deref(),
        Some(&[1337][..]),
        "istio-proxy's UID"
    );
    // The challenge route: its Gateway exists and leaves port 80 plain, it comes before the redirect,
    // and its Service selects the gateway pods that run acme-sds.
    let vs = of_kind(&res, "VirtualService")[0];
    let gateway = s(&vs["spec"]["gateways"][0]);
    let gw = of_kind(&res, "Gateway")
        .into_iter()
        .find(|g| s(&g["metadata"]["name"]) == gateway)
        .unwrap_or_else(|| panic!("Gateway {gateway}"));
    for server in gw["spec"]["servers"].as_vec().unwrap() {
        assert!(server["tls"]["httpsRedirect"].is_badvalue());
    }
    assert_eq!(
        s(&vs["spec"]["http"][0]["match"][0]["uri"]["prefix"]),
        "/.well-known/acme-challenge/"
    );
    assert!(!vs["spec"]["http"][1]["redirect"].is_badvalue());
    let svc = of_kind(&res, "Service")[0];
    assert_eq!(
        s(&svc["spec"]["selector"]["istio"]),
        s(&gw["spec"]["selector"]["istio"])
    );
    assert!(
        s(&vs["spec"]["http"][0]["route"][0]["destination"]["host"])
            .starts_with(&format!("{}.", s(&svc["metadata"]["name"])))
    );
}

/// The patch applied as the kit says, with kubectl's own strategic merge (`kubectl patch --local`, no cluster),
/// to a gateway Deployment shaped as Istio's: one replica, recreated, acme-sds as a native sidecar next to
/// the proxy's own containers and volumes, which it keeps.
#[test]
fn istio_sidecar_patch_applies_with_kubectl() {
    if !have("kubectl", &["version", "--client"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gateway = dir.path().join("gateway.yaml");
    std::fs::write(
        &gateway,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: { name: istio-ingressgateway, namespace: istio-system }\n\
         spec:\n  replicas: 3\n  strategy: { type: RollingUpdate, rollingUpdate: { maxSurge: 1, maxUnavailable: 0 } }\n\
         \x20 selector: { matchLabels: { istio: ingressgateway } }\n  template:\n\
         \x20   metadata: { labels: { istio: ingressgateway } }\n    spec:\n\
         \x20     securityContext: { runAsUser: 1337 }\n\
         \x20     containers:\n      - name: istio-proxy\n        image: docker.io/istio/proxyv2:1.28.0\n\
         \x20       volumeMounts: [{ name: istio-envoy, mountPath: /etc/istio/proxy }]\n\
         \x20     volumes: [{ name: istio-envoy, emptyDir: {} }]\n",
    )
    .unwrap();
    let out = std::process::Command::new("kubectl")
        .args(["patch", "--local", "-o", "yaml", "-f"])
        .arg(&gateway)
        .arg("--patch-file")
        .arg(root().join("istio/sidecar-patch.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let patched = &YamlLoader::load_from_str(&String::from_utf8_lossy(&out.stdout)).unwrap()[0];
    let spec = &patched["spec"];
    assert_eq!(spec["replicas"].as_i64(), Some(1));
    assert_eq!(s(&spec["strategy"]["type"]), "Recreate");
    assert!(spec["strategy"]["rollingUpdate"].is_badvalue(), "{spec:?}");
    let pod = &spec["template"]["spec"];
    assert_eq!(s(&pod["initContainers"][0]["name"]), "acme-sds");
    assert_eq!(
        pod["securityContext"]["runAsUser"].as_i64(),
        Some(1337),
        "kept"
    );
    let proxy = &pod["containers"][0];
    let mounts: Vec<&str> = proxy["volumeMounts"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|m| s(&m["name"]))
        .collect();
    assert!(
        mounts.contains(&"istio-envoy") && mounts.contains(&"credential-uds"),
        "{mounts:?}"
    );
    let volumes: Vec<&str> = pod["volumes"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|v| s(&v["name"]))
        .collect();
    for v in [
        "istio-envoy",
        "credential-uds",
        "acme-sds-config",
        "acme-sds-data",
    ] {
        assert!(volumes.contains(&v), "{v}: {volumes:?}");
    }
}

#[test]
fn container_image_and_systemd_unit() {
    let dockerfile = std::fs::read_to_string(root().join("docker/Dockerfile")).unwrap();
    // BuildKit reads the syntax directive only from the very first line.
    assert!(dockerfile.starts_with("# syntax=docker/dockerfile:1\n"));
    // The build context (the repository) leaves build output, history and keys out.
    let ignore =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(".dockerignore"))
            .unwrap();
    for entry in ["target/", ".git/", "**/*.key", "examples/envoy/certs/"] {
        assert!(
            ignore.lines().any(|l| l == entry),
            "{entry} missing from .dockerignore"
        );
    }
    // A new volume on the storage directory is the runtime user's (Docker copies owner and mode into it).
    assert!(
        dockerfile.contains("COPY --from=build --chown=65532:65532 /out/state /var/lib/acme-sds"),
        "{dockerfile}"
    );
    // No image from a registry that does not exist: the kits name the image the user builds.
    for kit in [
        "kubernetes/acme-sds.yaml",
        "kubernetes/acme-sds-replicas.yaml",
        "istio/sidecar-patch.yaml",
        "istio/sidecar-resources.yaml",
    ] {
        let text = std::fs::read_to_string(root().join(kit)).unwrap();
        assert!(!text.contains("ghcr.io"), "{kit}");
    }
    let stages = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .count();
    assert!(stages >= 2, "multi-stage build");
    assert!(
        dockerfile.contains("distroless/cc-debian12:nonroot"),
        "minimal runtime image"
    );
    assert!(
        dockerfile
            .lines()
            .any(|l| l.starts_with("USER ") && !l.contains("root") && !l.contains(" 0"))
    );

    let unit = std::fs::read_to_string(root().join("systemd/acme-sds.service")).unwrap();
    for line in [
        "ExecStart=/usr/local/bin/acme-sds run --config /etc/acme-sds/acme-sds.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "User=acme-sds",
        "StateDirectory=acme-sds",
        "StateDirectoryMode=0700",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "SystemCallFilter=@system-service",
        "SystemCallErrorNumber=EPERM",
    ] {
        assert!(
            unit.lines().any(|l| l == line),
            "{line} missing from the unit"
        );
    }
    // Enough descriptors for the default connection limits (an SDS listener's 4,096 and the admin and
    // HTTP-01 listeners' 1,024 each): the sandbox forbids raising the limit at run time.
    let nofile: u64 = unit
        .lines()
        .find_map(|l| l.strip_prefix("LimitNOFILE="))
        .expect("LimitNOFILE in the unit")
        .parse()
        .unwrap();
    let defaults = acme_sds::net::peer::Quotas::default();
    assert!(
        nofile as usize >= 2 * defaults.max_connections + 2 * 1024,
        "{nofile}"
    );
}

/// A tool the kit checks need; under CI a missing one fails the test (scripts/lib/tools.sh installs it).
fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = std::process::Command::new(tool)
        .args(probe)
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !testkit::in_ci(),
            "{tool} missing: scripts/lib/tools.sh installs it"
        );
        eprintln!("SKIPPED: {tool} not available");
    }
    ok
}

/// The unit as shipped, with its ExecStart pointed at this build.
fn unit_for_this_build(dir: &Path) -> PathBuf {
    let unit = std::fs::read_to_string(root().join("systemd/acme-sds.service"))
        .unwrap()
        .replace("/usr/local/bin/acme-sds", testkit::bin());
    let path = dir.join("acme-sds.service");
    std::fs::write(&path, unit).unwrap();
    path
}

#[test]
fn systemd_unit_and_sysusers_file_verify() {
    if !have("systemd-analyze", &["--version"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_for_this_build(dir.path());
    let out = std::process::Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.trim().is_empty(), "{said}");
    let out = std::process::Command::new("systemd-sysusers")
        .arg("--dry-run")
        .arg(root().join("systemd/acme-sds.sysusers"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !said.contains("not a valid") && !said.contains("ignoring"),
        "{said}"
    );
}

/// Expands systemd's syscall groups (`systemd-analyze syscall-filter`) into system call names.
fn syscall_groups() -> std::collections::HashMap<String, Vec<String>> {
    let out = std::process::Command::new("systemd-analyze")
        .arg("syscall-filter")
        .output()
        .unwrap();
    let mut groups = std::collections::HashMap::new();
    let mut current: Option<String> = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        if !line.starts_with(' ') {
            current = Some(t.to_owned());
            groups.insert(t.to_owned(), Vec::new());
        } else if let Some(g) = &current {
            groups.get_mut(g).unwrap().push(t.to_owned());
        }
    }
    groups
}

fn expand(
    name: &str,
    groups: &std::collections::HashMap<String, Vec<String>>,
    out: &mut std::collections::BTreeSet<String>,
) {
    match groups.get(name) {
        Some(members) if name.starts_with('@') => {
            for m in members {
                expand(m, groups, out);
            }
        }
        _ => {
            out.insert(name.to_owned());
        }
    }
}

/// The system calls the unit's `SystemCallFilter=` lines allow, applied in order as systemd does (the first
/// line an allow list; `~` lines remove, later plain lines add back).
fn unit_syscalls(unit: &str) -> std::collections::BTreeSet<String> {
    let groups = syscall_groups();
    let mut allowed = std::collections::BTreeSet::new();
    // systemd always permits @default.
    expand("@default", &groups, &mut allowed);
    for line in unit
        .lines()
        .filter_map(|l| l.strip_prefix("SystemCallFilter="))
    {
        let (deny, list) = match line.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, line),
        };
        let mut set = std::collections::BTreeSet::new();
        for item in list.split_whitespace() {
            expand(item, &groups, &mut set);
        }
        if deny {
            allowed.retain(|s| !set.contains(s));
        } else {
            allowed.extend(set);
        }
    }
    allowed
}

/// The binary, run under the unit's own system call filter (every other call failing with the unit's
/// `SystemCallErrorNumber=`), starts with everything the unit's users configure (a Unix socket given to a
/// group, TCP, the admin and HTTP-01 listeners, ACME storage), serves, reloads and stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_runs_under_the_units_syscall_filter() {
    use testkit::*;
    if !have("systemd-analyze", &["--version"])
        || !have("/usr/bin/python3", &["-c", "import seccomp"])
    {
        return;
    }
    let unit = std::fs::read_to_string(root().join("systemd/acme-sds.service")).unwrap();
    let errno = unit
        .lines()
        .find_map(|l| l.strip_prefix("SystemCallErrorNumber="))
        .expect("a filtered call fails rather than killing the process");
    let allowed = unit_syscalls(&unit);
    assert!(!allowed.contains("reboot"), "the filter is in force");
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("allowed");
    std::fs::write(
        &list,
        allowed.iter().cloned().collect::<Vec<_>>().join("\n"),
    )
    .unwrap();

    let pki = Pki::new();
    let (crt, key) = pki.leaf(&["www.example.com"]).write(dir.path(), "web");
    let gid = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .unwrap();
    let socket = dir.path().join("run/sds.sock");
    let config = dir.path().join("acme-sds.toml");
    std::fs::write(
        &config,
        format!(
            "[sds]\nlisten = [\"unix:{}\", \"127.0.0.1:0\"]\nsocket_mode = \"0660\"\nsocket_group = {gid}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[http01]\nlisten = \"127.0.0.1:0\"\n\n[acme]\ndirectory = \"https://127.0.0.1:{}/dir\"\naccept_terms_of_service = true\n\n[[certificate]]\nname = \"site\"\ndomains = [\"site.example.com\"]\n\n{}",
            socket.display(),
            testkit::pebble::free_port(),
            cert_table("web", &crt, &key)
        ),
    )
    .unwrap();
    let launcher = testkit::script("seccomp_exec.py");
    let p = Process::spawn_program(
        "/usr/bin/python3",
        &[
            launcher.to_str().unwrap(),
            list.to_str().unwrap(),
            errno,
            testkit::bin(),
            "run",
            "--config",
            config.to_str().unwrap(),
        ],
        &[],
    );
    p.wait_for_line("acme-sds started");
    let mut client = uds_client(&socket).await;
    assert_eq!(fetch(&mut client, &["web"]).await.resources.len(), 1);
    let admin = p.listen_addr("admin");
    assert!(http_get(admin, "/healthz").contains("200 OK"));
    p.signal("HUP");
    p.wait_for_line("configuration reloaded");
    let log = p.log();
    assert!(
        !log.contains("Operation not permitted"),
        "a call the filter refuses:\n{log}"
    );
    let mut p = p;
    p.signal("TERM");
    assert_eq!(p.wait_exit(), Some(0), "{}", p.log());
}
