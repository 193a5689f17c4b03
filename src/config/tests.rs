use super::*;
use crate::values::{KeyType, ListenAddr};

fn parse_str(text: &str) -> Result<Config, ConfigError> {
    parse(text, Path::new("/etc/acme-sds/acme-sds.toml"))
}

#[test]
fn full_contract_parses() {
    let cfg = parse_str(
        r#"
[sds]
listen = ["unix:/run/acme-sds/sds.sock", "127.0.0.1:8234"]
socket_mode = "0660"

[[certificate]]
name = "web"
cert_file = "/etc/acme-sds/web.crt"
key_file = "web.key"

[[trust_bundle]]
name = "client-ca"
file = "/etc/acme-sds/ca.pem"
"#,
    )
    .unwrap();
    assert_eq!(
        cfg.sds.listen,
        vec![
            ListenAddr::Unix("/run/acme-sds/sds.sock".into()),
            ListenAddr::Tcp("127.0.0.1:8234".parse().unwrap())
        ]
    );
    assert_eq!(cfg.sds.socket_mode, 0o660);
    let CertificateSource::Files { key_file, .. } = &cfg.certificates[0].source else {
        panic!("expected files");
    };
    assert_eq!(
        key_file,
        Path::new("/etc/acme-sds/web.key"),
        "relative to the config file"
    );
    assert_eq!(cfg.trust_bundles[0].name, "client-ca");
}

#[test]
fn unknown_key_names_key_and_line() {
    let err = parse_str(
        "[sds]\nlisten = [\"127.0.0.1:1\"]\n\n[[certificate]]\nname = \"a\"\ncert_fil = \"x\"\n",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].line, Some(6));
    assert!(err.problems[0].message.contains("cert_fil"), "{err}");
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let err = parse_str(
        r#"
[sds]
listen = ["nonsense", "unix:"]
socket_mode = "999"

[[certificate]]
name = "web"
cert_file = "a.crt"

[[certificate]]
name = "web"
cert_file = "b.crt"
key_file = "b.key"

[[trust_bundle]]
name = "sds://ca"
"#,
    )
    .unwrap_err();
    let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "sds.listen[0]",
            "sds.listen[1]",
            "sds.socket_mode",
            "certificate[0].key_file",
            "trust_bundle[0].name",
            "trust_bundle[0].file",
        ]
    );
    assert_eq!(err.problems[0].line, Some(3));
    let text = err.to_string();
    assert!(text.contains("acme-sds.toml:4: sds.socket_mode"), "{text}");
}

#[test]
fn duplicate_names_across_kinds() {
    let err = parse_str(
        "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"x\"\ncert_file=\"a\"\nkey_file=\"b\"\n[[trust_bundle]]\nname=\"x\"\nfile=\"c\"\n",
    )
    .unwrap_err();
    assert_eq!(err.problems.len(), 1);
    assert_eq!(err.problems[0].key, "trust_bundle[0].name");
    assert_eq!(err.problems[0].line, Some(7));
    assert!(err.problems[0].message.contains("certificate[0]"));
}

#[test]
fn missing_sds_and_duplicate_listen() {
    let err = parse_str("").unwrap_err();
    assert_eq!(err.problems[0].key, "sds");
    let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\", \"127.0.0.1:1\"]").unwrap_err();
    assert_eq!(err.problems[0].key, "sds.listen[1]");
}

#[test]
fn acme_contract_parses() {
    let cfg = parse_str(
        r#"
[sds]
listen = ["unix:/run/acme-sds/sds.sock"]

[storage]
path = "/var/lib/acme-sds"

[http01]
listen = "0.0.0.0:8089"

[acme]
directory = "letsencrypt"
contact = ["mailto:ops@example.com"]
accept_terms_of_service = true
directory_ca = "root.pem"
eab_kid = "kid-1"
eab_hmac_key = "c2VjcmV0LWtleQ"
retry_initial = "2s"

[[certificate]]
name = "mydomain"
domains = ["WWW.mydomain.com", "mobile.mydomain.com."]
key_type = "ecdsa-p384"
"#,
    )
    .unwrap();
    let acme = cfg.acme.as_ref().unwrap();
    assert_eq!(acme.directory, LETSENCRYPT);
    let eab = acme.eab.as_ref().unwrap();
    assert_eq!(eab.hmac_key.as_slice(), b"secret-key");
    assert!(
        !format!("{acme:?}").contains("secret-key"),
        "the key never shows in Debug"
    );
    assert_eq!(
        acme.directory_ca.as_deref(),
        Some(Path::new("/etc/acme-sds/root.pem"))
    );
    assert_eq!(acme.retry_initial, std::time::Duration::from_secs(2));
    assert_eq!(cfg.storage.path, Path::new("/var/lib/acme-sds"));
    assert_eq!(cfg.http01.listen.port(), 8089);
    let CertificateSource::Acme {
        domains, key_type, ..
    } = &cfg.certificates[0].source
    else {
        panic!("expected ACME");
    };
    assert_eq!(domains, &["www.mydomain.com", "mobile.mydomain.com"]);
    assert_eq!(*key_type, KeyType::EcdsaP384);
    assert!(cfg.has_acme_certificates());
}

#[test]
fn acme_mistakes_are_named() {
    let err = parse_str(
        r#"
[sds]
listen = ["127.0.0.1:1"]
[acme]
directory = "http://insecure.example/dir"
contact = ["ops@example.com"]
eab_kid = "x"
[[certificate]]
name = "a"
domains = ["*.example.com", "a.example.com", "a.example.com", "bad_name.example.com"]
key_type = "dsa"
[[certificate]]
name = "b"
domains = ["x.example.com"]
cert_file = "x.crt"
[[certificate]]
name = "c"
domains = ["c.example.com"]
[[certificate]]
name = "d"
domains = ["c.example.com"]
"#,
    )
    .unwrap_err();
    let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "acme.directory",
            "acme.contact[0]",
            "acme.eab_hmac_key",
            "certificate[0].key_type",
            "certificate[1].domains",
            "certificate[3].domains",
            "acme.accept_terms_of_service",
        ],
        "{err}"
    );
    let err = parse_str(
        "[sds]\nlisten=[\"127.0.0.1:1\"]\n[acme]\naccept_terms_of_service=true\n[[certificate]]\nname=\"a\"\ndomains=[\"*.example.com\", \"a.example.com\", \"A.example.com\", \"bad_name.example.com\", \"localhost\"]\n",
    )
    .unwrap_err();
    let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "certificate[0].domains[0]",
            "certificate[0].domains[2]",
            "certificate[0].domains[3]",
            "certificate[0].domains[4]",
        ],
        "{err}"
    );
    assert!(
        err.problems[0]
            .message
            .contains("needs challenge = \"dns-01\"")
    );
}

#[test]
fn duplicate_domains_can_be_intended() {
    let text = "[sds]\nlisten=[\"127.0.0.1:1\"]\n[acme]\naccept_terms_of_service=true\n[[certificate]]\nname=\"ec\"\ndomains=[\"a.example.com\"]\n[[certificate]]\nname=\"rsa\"\ndomains=[\"a.example.com\"]\nkey_type=\"rsa-2048\"\nallow_duplicate_domains=true\n";
    parse_str(text).unwrap();
    let err = parse_str(&text.replace("allow_duplicate_domains=true\n", "")).unwrap_err();
    assert_eq!(err.problems[0].key, "certificate[1].domains");
    let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"a\"\ndomains=[\"a.example.com\"]\n").unwrap_err();
    assert!(err.problems[0].message.contains("[acme]"), "{err}");
}

#[test]
fn bad_patterns_and_quotas_are_named() {
    let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\nmax_streams_per_peer=0\n[[certificate]]\nname=\"a\"\ncert_file=\"a\"\nkey_file=\"b\"\nallowed_nodes=[\"edge-*\", \"edge-[\"]\n").unwrap_err();
    let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "sds.max_streams_per_peer",
            "certificate[0].allowed_nodes[1]"
        ],
        "{err}"
    );
    assert_eq!(err.problems[1].line, Some(8));
    let cfg =
        parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\nmax_streams=50\nmax_connections_per_peer=3\n")
            .unwrap();
    assert_eq!(cfg.sds.quotas.max_streams, 50);
    assert_eq!(cfg.sds.quotas.max_connections_per_peer, 3);
    assert_eq!(
        cfg.sds.quotas.max_streams_per_peer,
        crate::net::peer::Quotas::default().max_streams_per_peer
    );
}

#[test]
fn security_settings() {
    let err = parse_str("[sds]\nlisten=[\"0.0.0.0:8234\", \"127.0.0.1:1\"]\n[[trust_bundle]]\nname=\"a\"\nfile=\"a\"\nallowed_clients=[\"x\"]\n").unwrap_err();
    let keys: Vec<_> = err.problems.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(
        keys,
        ["sds.listen[0]", "trust_bundle[0].allowed_clients"],
        "{err}"
    );
    assert!(err.problems[0].message.contains("allow_plaintext"));
    let cfg = parse_str("[sds]\nlisten=[\"0.0.0.0:8234\"]\nallow_plaintext=true\nsocket_group=\"root\"\nallowed_uids=[0, 1337]\n[[certificate]]\nname=\"a\"\ncert_file=\"a\"\nkey_file=\"b\"\nallowed_nodes=[\"edge-*\"]\n").unwrap();
    assert_eq!(cfg.sds.socket_group, Some(0));
    assert_eq!(cfg.sds.allowed_uids.as_deref(), Some(&[0, 1337][..]));
    assert_eq!(
        cfg.certificates[0].access.nodes.as_deref(),
        Some(&[crate::sds::access::NodePattern::new("edge-*").unwrap()][..])
    );
    let cfg = parse_str("[sds]\nlisten=[\"[::]:8234\"]\n[sds.tls]\ncert_file=\"s.crt\"\nkey_file=\"s.key\"\nclient_ca_file=\"ca.pem\"\n").unwrap();
    assert_eq!(
        cfg.sds.tls.unwrap().client_ca_file,
        Path::new("/etc/acme-sds/ca.pem")
    );
    let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\nsocket_group=\"no-such-group-here\"\n")
        .unwrap_err();
    assert_eq!(err.problems[0].key, "sds.socket_group");
}

#[test]
fn every_unknown_key_and_wrong_type_is_reported_in_config_words() {
    let text = "[sds]\nlisten = \"unix:/tmp/x.sock\"\nmax_streams = \"101\"\nallowed_uids = [101, \"1337\"]\nsokcet_mode = \"0660\"\n\n[storag]\npath = \"/tmp/x\"\n\n[acme]\naccept_terms_of_service = \"yes\"\n\n[[certificate]]\nname = \"web\"\ndomains = [\"www.example.com\", 5]\ncolour = \"blue\"\n\n[[certificate]]\nname = 7\n";
    let err = parse_str(text).unwrap_err();
    let got: Vec<(Option<usize>, &str)> = err
        .problems
        .iter()
        .map(|p| (p.line, p.key.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (Some(2), "sds.listen"),
            (Some(3), "sds.max_streams"),
            (Some(4), "sds.allowed_uids[1]"),
            (Some(5), "sds.sokcet_mode"),
            (Some(7), "storag"),
            (Some(11), "acme.accept_terms_of_service"),
            (Some(15), "certificate[0].domains[1]"),
            (Some(16), "certificate[0].colour"),
            (Some(19), "certificate[1].name"),
        ],
        "{err}"
    );
    let text = err.to_string();
    for words in [
        "expected a whole number, such as 1000, found the string \"101\"",
        "did you mean `socket_mode`?",
        "did you mean [storage]?",
        "expected true or false, found the string \"yes\"",
        "certificate[0] has name, cert_file",
    ] {
        assert!(text.contains(words), "{words}: {text}");
    }
    assert!(!text.contains("invalid type"), "serde's words: {text}");
}

/// The shape check and the typed reading agree: every key the shape knows, with a value of its kind, is
/// read by serde (a key added to one and not the other fails here or in the tests that use it).
#[test]
fn the_shape_matches_the_typed_reading() {
    fn value(kind: schema::Kind) -> String {
        use schema::Kind;
        let table = |fields: &[(&str, Kind)]| {
            let items: Vec<String> = fields
                .iter()
                .map(|(k, kind)| format!("{k} = {}", value(*kind)))
                .collect();
            format!("{{ {} }}", items.join(", "))
        };
        match kind {
            Kind::Str(_) | Kind::StrOrInt(_) => "\"x\"".into(),
            Kind::Int(_) => "1".into(),
            Kind::Bool => "true".into(),
            Kind::StrList(_) => "[\"x\"]".into(),
            Kind::IntList(_) => "[1]".into(),
            Kind::Table(fields) => table(fields),
            Kind::Tables(fields) => format!("[{}]", table(fields)),
        }
    }
    let doc: String = schema::ROOT
        .iter()
        .map(|(k, kind)| format!("{k} = {}\n", value(*kind)))
        .collect();
    let de = toml::de::Deserializer::parse(&doc).unwrap();
    if let Err(e) = RawConfig::deserialize(de) {
        panic!("{e}\n{doc}");
    }
    let lines = LineIndex::new(&doc);
    let table = toml::de::DeTable::parse(&doc).unwrap();
    assert!(schema::check(table.get_ref(), &lines, &mut Locations::default()).is_empty());
}

#[test]
fn the_built_in_configuration_parses_and_needs_no_acme() {
    let c = parse(BUILT_IN, Path::new("/home/me/acme-sds.toml")).unwrap();
    assert_eq!(
        c.sds.listen,
        [ListenAddr::Unix(PathBuf::from("/home/me/acme-sds.sock"))]
    );
    assert_eq!(c.storage.path, Path::new("/home/me/acme-sds-data"));
    assert!(c.acme.is_none() && !c.has_acme_certificates());
    match &c.certificates[0].source {
        CertificateSource::Internal { domains, key_type } => {
            assert_eq!(domains, &["localhost", "127.0.0.1", "::1"]);
            assert_eq!(*key_type, KeyType::EcdsaP256);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn internal_names_and_issuer_mistakes() {
    let ok = "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"dev\"\nissuer=\"internal\"\nkey_type=\"rsa-2048\"\ndomains=[\"db\", \"*.svc.internal\", \"10.0.0.1\", \"0:0::1\", \"Web.Local.\"]\n";
    let c = parse_str(ok).unwrap();
    let CertificateSource::Internal { domains, .. } = &c.certificates[0].source else {
        panic!()
    };
    assert_eq!(
        domains,
        &["db", "*.svc.internal", "10.0.0.1", "::1", "web.local"]
    );
    // The same names are not for ACME.
    let acme = ok.replace("issuer=\"internal\"\n", "");
    let err = parse_str(&acme).unwrap_err().to_string();
    assert!(err.contains("certificate[0].domains[0]"), "{err}");
    for (text, key, words) in [
        (
            ok.replace("\"internal\"", "\"letsencrypt\""),
            "certificate[0].issuer",
            "\"acme\" (the [acme] CA, the default) or \"internal\"",
        ),
        (
            ok.replace("\"db\"", "\"bad name\""),
            "certificate[0].domains[0]",
            "or an IP address",
        ),
        (
            ok.replace("domains=", "temporary_certificate=true\ndomains="),
            "certificate[0].temporary_certificate",
            "issued at once",
        ),
        (
            "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"f\"\nissuer=\"internal\"\ncert_file=\"a\"\nkey_file=\"b\"\n".to_owned(),
            "certificate[0].issuer",
            "with `domains`",
        ),
    ] {
        let err = parse_str(&text).unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == key && p.message.contains(words)),
            "{key}: {err}"
        );
    }
}

#[test]
fn acme_names_must_fit_a_file_name_in_the_store() {
    let long = "a".repeat(201);
    let text = format!(
        "[sds]\nlisten=[\"127.0.0.1:1\"]\n[acme]\naccept_terms_of_service=true\n[[certificate]]\nname=\"{long}\"\ndomains=[\"a.example.com\"]\n[[certificate]]\nname=\"ok\"\ndomains=[\"b.example.com\"]\n"
    );
    let err = parse_str(&text).unwrap_err();
    assert_eq!(err.problems.len(), 1, "{err}");
    assert_eq!(err.problems[0].key, "certificate[0].name");
    assert_eq!(err.problems[0].line, Some(5));
    assert!(err.problems[0].message.contains("201 bytes"), "{err}");
    // File certificates are not stored: any valid secret name will do.
    let files = format!(
        "[sds]\nlisten=[\"127.0.0.1:1\"]\n[[certificate]]\nname=\"{long}\"\ncert_file=\"a\"\nkey_file=\"b\"\n"
    );
    assert!(parse_str(&files).is_ok());
}

#[test]
fn durations() {
    let secs = std::time::Duration::from_secs;
    assert_eq!(parse_duration("90"), Ok(secs(90)));
    assert_eq!(parse_duration("10m"), Ok(secs(600)));
    assert_eq!(parse_duration("1d"), Ok(secs(86400)));
    assert_eq!(parse_duration("3650d"), Ok(MAX_DURATION));
    assert!(parse_duration("1w").unwrap_err().contains("not a duration"));
    assert!(parse_duration("m").is_err());
    assert!(parse_duration("3651d").unwrap_err().contains("10 years"));
    assert!(parse_duration("3650000d").unwrap_err().contains("10 years"));
    assert!(parse_duration("99999999999999999999d").is_err());
    // In a file: the key and the line, never a panic later.
    let err = parse_str("[sds]\nlisten=[\"127.0.0.1:1\"]\nstall_timeout=\"3650000d\"\n[acme]\nretry_max = \"3650000d\"\n").unwrap_err();
    let found: Vec<_> = err
        .problems
        .iter()
        .map(|p| (p.key.as_str(), p.line))
        .collect();
    assert_eq!(
        found,
        [("sds.stall_timeout", Some(3)), ("acme.retry_max", Some(5))],
        "{err}"
    );
}

#[test]
fn syntax_error_has_line() {
    let err = parse_str("[sds]\nlisten = [\n\"a\"\n=\n").unwrap_err();
    assert!(err.problems[0].line.is_some());
}

#[test]
fn etcd_storage_is_checked_key_by_key() {
    let cfg = parse_str(
        r#"
[sds]
listen = ["127.0.0.1:1"]
[storage]
encryption_key_file = "storage.key"
[storage.etcd]
endpoints = ["https://10.0.0.1:2379", "https://etcd-2.internal:2379/"]
prefix = "/edge/acme-sds/"
ca_file = "etcd-ca.pem"
cert_file = "client.pem"
key_file = "client.key"
username = "acme-sds"
password_file = "/run/secrets/etcd-password"
lock_ttl = "15s"
"#,
    )
    .unwrap();
    let etcd = cfg.storage.etcd.unwrap();
    assert_eq!(etcd.endpoints.len(), 2);
    assert_eq!(etcd.prefix, "/edge/acme-sds");
    assert_eq!(
        etcd.ca_file.unwrap(),
        Path::new("/etc/acme-sds/etcd-ca.pem")
    );
    assert_eq!(etcd.user.unwrap().0, "acme-sds");
    assert_eq!(etcd.lock_ttl, std::time::Duration::from_secs(15));

    let minimal = parse_str("[sds]\nlisten = [\"127.0.0.1:1\"]\n[storage]\nencryption_key_file = \"k\"\n[storage.etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n").unwrap();
    let etcd = minimal.storage.etcd.unwrap();
    assert_eq!(etcd.prefix, DEFAULT_ETCD_PREFIX);
    assert_eq!(etcd.lock_ttl, DEFAULT_LOCK_TTL);

    let err = parse_str(
        r#"
[sds]
listen = ["127.0.0.1:1"]
[storage]
path = "/var/lib/acme-sds"
[storage.etcd]
endpoints = ["127.0.0.1:2379", "https://a:2379"]
prefix = "acme"
cert_file = "c.pem"
username = "u"
lock_ttl = "1s"
"#,
    )
    .unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "storage.path",
        "storage.encryption_key_file",
        "storage.etcd.endpoints[0]",
        "storage.etcd.prefix",
        "storage.etcd.ca_file",
        "storage.etcd.key_file",
        "storage.etcd.password_file",
        "storage.etcd.lock_ttl",
    ] {
        assert!(keys.contains(&key), "{key} not in {keys:?}\n{err}");
    }
    assert!(err.problems.iter().all(|p| p.line.is_some()), "{err}");
}

#[test]
fn the_challenge_is_chosen_per_certificate() {
    let acme = "[sds]\nlisten = [\"127.0.0.1:1\"]\n[acme]\ncontact = [\"mailto:a@example.com\"]\naccept_terms_of_service = true\n";
    let cfg = parse_str(&format!(
        "{acme}[tls_alpn01]\nlisten = \"127.0.0.1:9444\"\n[[certificate]]\nname = \"a\"\ndomains = [\"a.example.com\"]\nchallenge = \"tls-alpn-01\"\n[[certificate]]\nname = \"b\"\ndomains = [\"b.example.com\"]\n"
    ))
    .unwrap();
    assert!(cfg.uses_challenge(crate::values::Challenge::TlsAlpn01));
    assert_eq!(cfg.tls_alpn01.listen.port(), 9444);
    let challenges: Vec<_> = cfg
        .certificates
        .iter()
        .map(|c| match &c.source {
            CertificateSource::Acme { challenge, .. } => *challenge,
            _ => panic!("acme"),
        })
        .collect();
    assert_eq!(
        challenges,
        [
            crate::values::Challenge::TlsAlpn01,
            crate::values::Challenge::Http01
        ]
    );

    let err = parse_str(&format!(
        "{acme}[[certificate]]\nname = \"w\"\ndomains = [\"*.example.com\"]\n[[certificate]]\nname = \"d\"\ndomains = [\"d.example.com\"]\nchallenge = \"dns-01\"\n[[certificate]]\nname = \"i\"\ndomains = [\"localhost\"]\nissuer = \"internal\"\nchallenge = \"tls-alpn-01\"\n"
    ))
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("certificate[0].domains[0]") && text.contains("needs challenge = \"dns-01\""),
        "wildcards need DNS-01: {text}"
    );
    assert!(
        text.contains("certificate[1].challenge") && text.contains("needs a [dns01] table"),
        "{text}"
    );
    assert!(text.contains("certificate[2].challenge"), "{text}");
}

#[test]
fn dns01_takes_a_primary_and_a_key_and_allows_wildcards() {
    let acme = "[sds]\nlisten = [\"127.0.0.1:1\"]\n[acme]\ncontact = [\"mailto:a@example.com\"]\naccept_terms_of_service = true\n";
    let cert = "[[certificate]]\nname = \"wild\"\ndomains = [\"*.example.com\", \"example.com\"]\nchallenge = \"dns-01\"\n";
    let cfg = parse_str(&format!(
        "{acme}[dns01]\nserver = \"ns1.example.com\"\ntsig_key_file = \"/etc/acme-sds/acme-sds.key\"\n{cert}"
    ))
    .unwrap();
    let d = cfg.dns01.as_ref().unwrap();
    assert_eq!(d.server.to_string(), "ns1.example.com:53");
    assert_eq!(
        d.propagation_timeout,
        crate::config::DEFAULT_PROPAGATION_TIMEOUT
    );
    assert!(d.zone.is_none() && d.check_nameservers.is_empty());
    assert!(
        cfg.uses_challenge(crate::values::Challenge::Dns01)
            && !cfg.uses_challenge(crate::values::Challenge::TlsAlpn01)
    );
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
    let unused = parse_str(&format!(
        "{acme}[dns01]\nserver = \"ns1.example.com\"\ntsig_key_file = \"k.key\"\n[[certificate]]\nname = \"a\"\ndomains = [\"a.example.com\"]\n"
    ))
    .unwrap();
    let w = unused.warnings();
    assert!(
        w.len() == 1
            && w[0].key == "dns01"
            && w[0].line.is_some()
            && w[0].message.contains("nothing uses it"),
        "{w:?}"
    );
    match &cfg.certificates[0].source {
        CertificateSource::Acme { domains, .. } => {
            assert_eq!(&*domains[0], "*.example.com");
        }
        _ => panic!("acme"),
    }

    let full = parse_str(&format!(
        "{acme}[dns01]\nserver = \"192.0.2.53:5353\"\ntsig_key_file = \"k.key\"\nzone = \"Example.com.\"\npropagation_timeout = \"30s\"\ncheck_nameservers = [\"ns2.example.com:53\", \"[2001:db8::2]\"]\n{cert}"
    ))
    .unwrap();
    let d = full.dns01.unwrap();
    assert_eq!(d.zone.as_deref(), Some("example.com"));
    assert_eq!(d.propagation_timeout, std::time::Duration::from_secs(30));
    assert_eq!(d.check_nameservers[1].to_string(), "[2001:db8::2]:53");
    assert!(d.tsig_key_file.is_absolute() || d.tsig_key_file.ends_with("k.key"));

    let err = parse_str(&format!(
        "{acme}[dns01]\nserver = \"ns1.example.com:x\"\nzone = \"not a zone\"\npropagation_timeout = \"soon\"\ncheck_nameservers = [\":53\"]\n{cert}"
    ))
    .unwrap_err();
    let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
    for key in [
        "dns01.server",
        "dns01.tsig_key_file",
        "dns01.zone",
        "dns01.propagation_timeout",
        "dns01.check_nameservers[0]",
    ] {
        assert!(keys.contains(&key), "{key} not in {keys:?}\n{err}");
    }
    assert!(err.problems.iter().all(|p| p.line.is_some()), "{err}");
}

#[test]
fn accept_unsealed_goes_with_the_key_file_and_warns_while_on() {
    let cfg = parse_str(
        "[sds]\nlisten = [\"127.0.0.1:1\"]\n[storage]\nencryption_key_file = \"storage.key\"\naccept_unsealed = true\n",
    )
    .unwrap();
    let key_file = cfg.storage.encryption_key_file.as_ref().unwrap();
    assert!(key_file.accept_unsealed);
    assert_eq!(key_file.path, Path::new("/etc/acme-sds/storage.key"));
    let w = cfg.warnings();
    assert!(
        w.len() == 1
            && w[0].key == "storage.accept_unsealed"
            && w[0].line == Some(5)
            && w[0].message.contains("plant"),
        "{w:?}"
    );

    let off = parse_str(
        "[sds]\nlisten = [\"127.0.0.1:1\"]\n[storage]\nencryption_key_file = \"storage.key\"\n",
    )
    .unwrap();
    assert!(
        !off.storage
            .encryption_key_file
            .as_ref()
            .unwrap()
            .accept_unsealed
    );
    assert!(off.warnings().is_empty());

    let err = parse_str("[sds]\nlisten = [\"127.0.0.1:1\"]\n[storage]\naccept_unsealed = true\n")
        .unwrap_err();
    assert!(
        err.problems.len() == 1
            && err.problems[0].key == "storage.accept_unsealed"
            && err.problems[0].line == Some(4)
            && err.problems[0]
                .message
                .contains("goes with storage.encryption_key_file"),
        "{err}"
    );
    let err = parse_str(
        "[sds]\nlisten = [\"127.0.0.1:1\"]\n[storage]\nencryption_key_file = \"k\"\naccept_unsealed = \"yes\"\n",
    )
    .unwrap_err();
    assert!(
        err.problems[0].key == "storage.accept_unsealed" && err.problems[0].line == Some(5),
        "{err}"
    );
}

/// `[on_demand]`: each setting that is wrong is named with its key and line; what is right is as written
/// or its default.
#[test]
fn on_demand_settings_name_their_key_and_line() {
    let head = "[sds]\nlisten = [\"127.0.0.1:1\"]\n[acme]\naccept_terms_of_service = true\n";
    let ok = parse_str(&format!(
        "{head}[on_demand]\nallow = [\"*.customers.example.com\"]\nask = \"http://127.0.0.1:9/ok\"\nask_concurrency = 4\n"
    ))
    .unwrap();
    let od = ok.on_demand.unwrap();
    assert_eq!(od.ask_concurrency, 4);
    assert_eq!(
        od.max_new_per_hour,
        crate::config::on_demand::DEFAULT_MAX_NEW_PER_HOUR
    );
    let defaults = parse_str(&format!("{head}[on_demand]\nallow = [\"a.example.com\"]\n")).unwrap();
    assert_eq!(
        defaults.on_demand.unwrap().ask_concurrency,
        crate::config::on_demand::DEFAULT_ASK_CONCURRENCY
    );
    let err = parse_str(&format!(
        "{head}[on_demand]\nallow = [\"*.*.example.com\"]\nask = \"ftp://x\"\nask_concurrency = 0\nmax_new_per_hour = -1\nmax_pending = 0\nkey_type = \"dsa\"\n"
    ))
    .unwrap_err();
    for (key, line) in [
        ("on_demand.allow[0]", 6),
        ("on_demand.ask", 7),
        ("on_demand.ask_concurrency", 8),
        ("on_demand.max_new_per_hour", 9),
        ("on_demand.max_pending", 10),
        ("on_demand.key_type", 11),
    ] {
        assert!(
            err.problems
                .iter()
                .any(|p| p.key == key && p.line == Some(line)),
            "{key} at line {line}: {err}"
        );
    }
}
