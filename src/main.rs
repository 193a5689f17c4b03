//! The `acme-sds` command: `run` the daemon, `check` a configuration, show its `status`, print an Envoy
//! bootstrap or an example configuration.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use acme_sds::certs;
use acme_sds::config::{self, CertificateSource, Config};
use acme_sds::daemon;
use acme_sds::ops::status::{SecretStatus, Source};
use acme_sds::registry::SecretContent;
use acme_sds::sources::files::FileSource;
use acme_sds::values::{ListenAddr, SecretName};

/// Automatic HTTPS for Envoy: an SDS server that streams TLS certificates to every connected Envoy.
#[derive(Parser)]
#[command(name = "acme-sds", version, about)]
struct Cli {
    /// Log format on stderr: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: serve SDS until SIGTERM or SIGINT.
    Run {
        /// Configuration file [default: acme-sds.toml in the current directory, else the built-in
        /// configuration: see `acme-sds example-config`].
        #[arg(short, long, env = "ACME_SDS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Validate a configuration, load its files, and print a summary; exits non-zero on any problem.
    Check {
        /// Configuration file [default: acme-sds.toml in the current directory, else the built-in
        /// configuration: see `acme-sds example-config`].
        #[arg(short, long, env = "ACME_SDS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Show the certificates: expiry (date and days left), next renewal, last error, subscribed streams.
    /// Asks the running daemon's admin listener when `[admin] listen` is set and it answers; otherwise reads
    /// the files and the storage directory.
    Status {
        /// Configuration file [default: acme-sds.toml in the current directory, else the built-in
        /// configuration: see `acme-sds example-config`].
        #[arg(short, long, env = "ACME_SDS_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Print a complete Envoy bootstrap for a configuration: the SDS cluster, a port-80 listener whose ACME
    /// challenge route comes before the HTTPS redirect, and a TLS listener with one SNI chain per certificate.
    EnvoyBootstrap {
        /// Configuration file [default: acme-sds.toml in the current directory, else the built-in
        /// configuration: see `acme-sds example-config`].
        #[arg(short, long, env = "ACME_SDS_CONFIG")]
        config: Option<PathBuf>,
        /// Envoy's plain-HTTP port (ACME challenges and the HTTPS redirect).
        #[arg(long, default_value_t = 80)]
        http_port: u16,
        /// Envoy's HTTPS port.
        #[arg(long, default_value_t = 443)]
        https_port: u16,
        /// Envoy's admin port (on 127.0.0.1).
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
        /// Envoy's node id (SDS needs one; allowed_nodes match it).
        #[arg(long, default_value = "edge-1")]
        node_id: String,
        /// Envoy's node cluster.
        #[arg(long, default_value = "edge")]
        node_cluster: String,
        /// Where HTTPS requests go (IP:PORT); without it Envoy answers with a fixed text.
        #[arg(long)]
        upstream: Option<std::net::SocketAddr>,
        /// The address Envoy's HTTP and HTTPS listeners bind (127.0.0.1 keeps them on this machine).
        #[arg(long, default_value = "0.0.0.0")]
        address: std::net::IpAddr,
    },
    /// Storage maintenance.
    Storage {
        #[command(subcommand)]
        action: StorageCommand,
    },
    /// Print a configuration to start from: the built-in one (what `run` uses when there is no file), or
    /// with --letsencrypt one for Let's Encrypt (save it as acme-sds.toml and edit the domains and contact).
    ExampleConfig {
        /// A configuration for Let's Encrypt (HTTP-01 through Envoy) instead of the built-in one.
        #[arg(long)]
        letsencrypt: bool,
    },
}

#[derive(Subcommand)]
enum StorageCommand {
    /// Copy a storage directory (a single node's) into the etcd cluster of the configuration's
    /// [storage.etcd]: account, certificates, plans, orders, the internal CA. Keys already in etcd are kept.
    /// Stop the daemon using the directory first.
    Migrate {
        /// The storage directory to copy from.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// Configuration file naming [storage.etcd] [default: acme-sds.toml in the current directory].
        #[arg(short, long, env = "ACME_SDS_CONFIG")]
        config: Option<PathBuf>,
    },
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn main() -> ExitCode {
    // One crypto provider for the process (ring, the only one compiled in): the library names it wherever
    // it builds a TLS configuration, and anything that asks for the process default gets the same.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(config.as_deref()),
        Command::Status { config } => status(config.as_deref()),
        Command::Storage {
            action: StorageCommand::Migrate { from, config },
        } => migrate(&from, config.as_deref()),
        Command::ExampleConfig { letsencrypt } => {
            print!(
                "{}",
                if letsencrypt {
                    LETSENCRYPT_EXAMPLE
                } else {
                    config::BUILT_IN
                }
            );
            ExitCode::SUCCESS
        }
        Command::EnvoyBootstrap {
            config,
            http_port,
            https_port,
            admin_port,
            node_id,
            node_cluster,
            upstream,
            address,
        } => {
            let opts = acme_sds::bootstrap::BootstrapOptions {
                http_port,
                https_port,
                admin_port,
                node_id,
                node_cluster,
                upstream,
                address,
            };
            envoy_bootstrap(config.as_deref(), &opts)
        }
        Command::Run { config } => {
            init_logging(cli.log_format);
            match run(config.as_deref(), cli.log_format) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Once: the log goes to stderr too.
                    tracing::error!("{}", daemon::causes(&*e));
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Raises the soft open-files limit to the hard one, as Go programs and most servers do at start: every SDS
/// connection, stream-bearing or idle, is a descriptor, and the usual soft default (1,024) is far below what
/// one Envoy fleet needs. Returns the limit in force.
fn raise_open_files_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// The Let's Encrypt example, as `example-config --letsencrypt` prints it.
const LETSENCRYPT_EXAMPLE: &str = include_str!("../examples/letsencrypt/acme-sds.toml");

fn run(path: Option<&Path>, log_format: LogFormat) -> anyhow::Result<()> {
    let config = config::load_or_built_in(path)?;
    let open_files = raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(limit) = open_files {
            daemon::check_open_files_limit(&config, limit);
        }
        let events = signal_events()?;
        let running = daemon::start(&config).await?;
        if config.built_in && matches!(log_format, LogFormat::Text) {
            eprint!("{}", built_in_guide(&running));
        }
        running.run_until_stopped(events).await?;
        tracing::info!("acme-sds stopped");
        Ok(())
    })
}

/// The process's signals as daemon events: SIGHUP reloads, SIGTERM and SIGINT stop. The handlers are in
/// place before the daemon starts, so that a signal sent as soon as it serves is never lost.
fn signal_events() -> anyhow::Result<tokio::sync::mpsc::Receiver<daemon::Event>> {
    use daemon::Event;
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let event = tokio::select! {
                _ = term.recv() => Event::Shutdown("SIGTERM"),
                _ = int.recv() => Event::Shutdown("SIGINT"),
                _ = hup.recv() => Event::Reload("SIGHUP"),
            };
            if tx.send(event).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// What `run` prints once it serves the built-in configuration: where it is, how to put Envoy in front of
/// it, and how to move on to Let's Encrypt. Commands are written as they can be pasted here.
fn built_in_guide(running: &daemon::Running) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    let here = |p: &Path| {
        p.strip_prefix(&cwd)
            .map(Path::to_path_buf)
            .unwrap_or_else(|_| p.to_owned())
            .display()
            .to_string()
    };
    // The command as it was started (target/release/acme-sds under `cargo run`), else the installed name.
    let me = std::env::args()
        .next()
        .filter(|a| a.contains('/'))
        .map(|a| here(Path::new(&a)))
        .unwrap_or_else(|| "acme-sds".into());
    let root = running
        .internal_root()
        .map(|p| here(&p))
        .unwrap_or_else(|| "acme-sds-data/internal/root.crt".into());
    format!(
        "
acme-sds is serving its built-in configuration (there is no {file} in {cwd}):
  SDS:          {sds}
  certificate:  \"localhost\" (localhost, 127.0.0.1, ::1), signed by acme-sds's own local CA
  CA root:      {root}   (trust this file to trust the certificate)

Put Envoy in front of it (in another terminal, in this directory):
  {me} envoy-bootstrap --address 127.0.0.1 --http-port 8080 --https-port 8443 > envoy.yaml
  envoy -c envoy.yaml
  curl --cacert {root} https://localhost:8443/

For Let's Encrypt: `{me} example-config --letsencrypt > {file}` (the same as
examples/letsencrypt/acme-sds.toml), set your domains and contact in it, and start acme-sds again here.

",
        file = config::DEFAULT_FILE,
        cwd = cwd.display(),
        sds = running.addresses().join(", "),
    )
}

/// Loads and validates a configuration and its files, printing every problem; `None` when there are any.
fn load_checked(path: Option<&Path>) -> Option<(Config, Vec<(SecretName, SecretContent)>)> {
    let config = match config::load_or_built_in(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return None;
        }
    };
    match FileSource::from_config(&config).load_all() {
        Ok(loaded) => Some((config, loaded)),
        Err(problems) => {
            eprintln!("{}", config.error(problems));
            None
        }
    }
}

fn envoy_bootstrap(path: Option<&Path>, opts: &acme_sds::bootstrap::BootstrapOptions) -> ExitCode {
    let Some((config, loaded)) = load_checked(path) else {
        return ExitCode::FAILURE;
    };
    match acme_sds::bootstrap::envoy_bootstrap(&config, &loaded, opts) {
        Ok(yaml) => {
            print!("{yaml}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: {e}", config.path.display());
            ExitCode::FAILURE
        }
    }
}

fn status(path: Option<&Path>) -> ExitCode {
    let config = match config::load_or_built_in(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (rows, storage, origin) = match config.admin.and_then(status_from_daemon) {
        Some((rows, storage)) => (rows, storage, "from the running daemon"),
        None => match status_from_disk(&config) {
            Ok(rows) => (rows, None, "from files and storage: no daemon answered"),
            Err(e) => {
                eprintln!("acme-sds status: {}", daemon::causes(&*e));
                return ExitCode::FAILURE;
            }
        },
    };
    print!(
        "{}",
        status_table(&rows, origin, std::io::stdout().is_terminal())
    );
    // What makes `/readyz` answer 503 is a problem here too (a cron job on the exit status must hear it).
    if let Some(why) = &storage {
        println!(
            "storage: UNAVAILABLE: {why} (not ready: certificates already loaded are served, nothing is issued or renewed until the store is back)"
        );
    }
    if storage.is_some() || rows.iter().any(|r| status_problem(r).is_some()) {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

/// The running daemon's `/status`: every secret's, and why the store is unavailable if it is.
fn status_from_daemon(admin: std::net::SocketAddr) -> Option<(Vec<SecretStatus>, Option<String>)> {
    use std::io::{Read, Write};
    let mut addr = admin;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
    }
    let mut s =
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        s,
        "GET /status HTTP/1.1\r\nHost: acme-sds\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let body = out.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let storage = v
        .get("storage")
        .and_then(|s| s.get("unavailable"))
        .and_then(|u| u.as_str())
        .map(str::to_owned);
    Some((
        serde_json::from_value(v.get("secrets")?.clone()).ok()?,
        storage,
    ))
}

fn migrate(from: &Path, path: Option<&Path>) -> ExitCode {
    let config = match config::load_or_built_in(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("acme-sds storage migrate: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(acme_sds::ops::migrate::from_directory(
        from,
        &config.storage,
    )) {
        Ok(done) => {
            for key in &done.copied {
                println!("copied  {key}");
            }
            for key in &done.kept {
                println!("kept    {key} (already in etcd)");
            }
            println!(
                "{} copied, {} already there; replicas on this prefix now serve them without ordering",
                done.copied.len(),
                done.kept.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("acme-sds storage migrate: {}", daemon::causes(&e));
            ExitCode::FAILURE
        }
    }
}

/// The status read from the files and the store (no daemon answered), through the daemon's own code.
fn status_from_disk(config: &Config) -> anyhow::Result<Vec<SecretStatus>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(runtime.block_on(acme_sds::ops::status::offline(config))?)
}

/// What is wrong with a certificate, if anything.
fn status_problem(r: &SecretStatus) -> Option<String> {
    if !r.source.is_certificate() {
        return None;
    }
    let expiry = r.not_after;
    let now = time::OffsetDateTime::now_utc();
    // The internal CA's certificates live a week and are renewed with two days left.
    let short_notice = if r.source == Source::Internal {
        time::Duration::days(1)
    } else {
        time::Duration::days(7)
    };
    if r.temporary {
        return Some(format!(
            "not issued yet (a temporary self-signed certificate is served meanwhile){}",
            r.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ));
    }
    match (r.serving, expiry) {
        (false, _) | (_, None) => Some(
            r.last_error
                .clone()
                .unwrap_or_else(|| "not issued yet".into()),
        ),
        (_, Some(t)) if t < now => Some("EXPIRED".into()),
        (_, Some(t)) if t - now < short_notice => Some(format!(
            "expires within {}{}",
            if short_notice.whole_days() == 1 {
                "a day"
            } else {
                "a week"
            },
            r.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        )),
        _ => r
            .last_error
            .clone()
            .map(|e| format!("renewal failing: {e}")),
    }
}

fn status_table(rows: &[SecretStatus], origin: &str, color: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "acme-sds status, {origin}");
    let _ = writeln!(
        out,
        "{:<20} {:<9} {:<36} {:<17} {:>7}",
        "NAME", "SOURCE", "EXPIRES", "NEXT RENEWAL", "STREAMS"
    );
    for r in rows {
        let expires = match r.not_after {
            Some(t) => {
                let days = (t - time::OffsetDateTime::now_utc()).whole_days();
                if days < 0 {
                    format!("{} (expired {} days ago)", t.date(), -days)
                } else {
                    format!("{} (in {days} days)", t.date())
                }
            }
            None => "-".into(),
        };
        let renewal = r
            .next_renewal
            .map(|t| {
                certs::format_time(t)
                    .chars()
                    .take(16)
                    .collect::<String>()
                    .replace('T', " ")
            })
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<20} {:<9} {:<36} {:<17} {:>7}",
            r.name,
            r.source.as_str(),
            expires,
            renewal,
            r.subscribed_streams
                .map_or_else(|| "unknown".to_owned(), |n| n.to_string())
        );
        if !r.domains.is_empty() {
            let _ = writeln!(out, "{:<20} names: {}", "", r.domains.join(", "));
            if let Some(how) = &r.allowed_by {
                let _ = writeln!(out, "{:<20} on demand: {how}", "");
            }
        }
        if let Some(p) = status_problem(r) {
            let (on, off) = if color {
                ("\x1b[1;31m", "\x1b[0m")
            } else {
                ("", "")
            };
            let _ = writeln!(out, "{:<20} {on}PROBLEM: {p}{off}", "");
            if let Some(retry) = r.next_retry {
                let _ = writeln!(
                    out,
                    "{:<20} next attempt: {}",
                    "",
                    certs::format_time(retry)
                );
            }
        }
    }
    out
}

fn check(path: Option<&Path>) -> ExitCode {
    let config = match config::load_or_built_in(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    // Every problem at once: the files, and what starting here would run into.
    let (loaded, mut problems) = match FileSource::from_config(&config).load_all() {
        Ok(loaded) => (loaded, Vec::new()),
        Err(problems) => (Vec::new(), problems),
    };
    problems.extend(daemon::preflight(&config));
    if !problems.is_empty() {
        eprintln!("{}", config.error(problems));
        return ExitCode::FAILURE;
    }
    for w in config.warnings() {
        eprintln!("warning: {}", w.located(&config.path));
    }
    print!("{}", summary(&config, &loaded));
    ExitCode::SUCCESS
}

fn summary(config: &Config, loaded: &[(SecretName, SecretContent)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if config.built_in {
        let _ = writeln!(
            out,
            "the built-in configuration (no {} in {}): OK",
            config::DEFAULT_FILE,
            config.path.parent().unwrap_or(Path::new(".")).display()
        );
    } else {
        let _ = writeln!(out, "{}: OK", config.path.display());
    }
    let _ = writeln!(out, "SDS listeners:");
    for l in &config.sds.listen {
        match l {
            ListenAddr::Unix(_) => {
                let _ = writeln!(out, "  {l} (mode {:04o})", config.sds.socket_mode);
            }
            ListenAddr::Tcp(_) => {
                let _ = writeln!(out, "  {l}");
            }
        }
    }
    let _ = writeln!(out, "Secrets:");
    for (name, content) in loaded {
        match content {
            SecretContent::TlsCertificate(c) => {
                let files = config
                    .certificates
                    .iter()
                    .find(|cert| cert.name == *name)
                    .and_then(|cert| match &cert.source {
                        CertificateSource::Files {
                            cert_file,
                            key_file,
                            ..
                        } => Some(format!("{} + {}", cert_file.display(), key_file.display())),
                        CertificateSource::Acme { .. } | CertificateSource::Internal { .. } => None,
                    })
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {name}: tls_certificate from {files}\n    {} (serial {}), chain of {}, {}",
                    if c.leaf.dns_names.is_empty() {
                        c.leaf.subject.clone()
                    } else {
                        c.leaf.dns_names.join(", ")
                    },
                    c.leaf.serial,
                    c.chain_len,
                    c.leaf.expiry()
                );
            }
            SecretContent::TrustBundle(b) => {
                let file = config
                    .trust_bundles
                    .iter()
                    .find(|t| t.name == *name)
                    .map(|t| t.file.display().to_string())
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {name}: validation_context from {file}\n    {} CA certificate(s), earliest {}",
                    b.certs.len(),
                    b.earliest_expiry()
                        .map(certs::describe_expiry)
                        .unwrap_or_default()
                );
            }
        }
    }
    for c in &config.certificates {
        if let CertificateSource::Acme {
            domains,
            key_type,
            challenge,
            ..
        } = &c.source
        {
            let _ = writeln!(
                out,
                "  {}: tls_certificate over ACME ({}), {}, {}\n    {}",
                c.name,
                config
                    .acme
                    .as_ref()
                    .map(|a| a.directory.as_str())
                    .unwrap_or(""),
                key_type.as_str(),
                challenge.as_str(),
                domains.join(", ")
            );
        }
    }
    for c in &config.certificates {
        if let CertificateSource::Internal { domains, key_type } = &c.source {
            let _ = writeln!(
                out,
                "  {}: tls_certificate from the internal CA, {}\n    {}",
                c.name,
                key_type.as_str(),
                domains.join(", ")
            );
        }
    }
    if config.has_acme_certificates() {
        let _ = writeln!(out, "HTTP-01 responder: {}", config.http01.listen);
    }
    if config.uses_challenge(acme_sds::values::Challenge::TlsAlpn01) {
        let _ = writeln!(out, "TLS-ALPN-01 responder: {}", config.tls_alpn01.listen);
    }
    if let Some(d) = config
        .dns01
        .as_ref()
        .filter(|_| config.uses_challenge(acme_sds::values::Challenge::Dns01))
    {
        let _ = writeln!(
            out,
            "DNS-01 updates: to {} in zone {}, signed with {}; records must be served within {}s",
            d.server,
            d.zone.as_deref().unwrap_or("(found by an SOA query)"),
            d.tsig_key_file.display(),
            d.propagation_timeout.as_secs()
        );
    }
    if config
        .certificates
        .iter()
        .any(|c| c.source.issued_domains().is_some())
    {
        match &config.storage.etcd {
            Some(etcd) => {
                let _ = writeln!(
                    out,
                    "Storage: etcd {} under {}",
                    etcd.endpoints.join(", "),
                    etcd.prefix
                );
            }
            None => {
                let _ = writeln!(out, "Storage: {}", config.storage.path.display());
            }
        }
    }
    out
}
