//! The `acme-sds` command: `run` the daemon, or `check` a configuration.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

use acme_sds::certs;
use acme_sds::config::{self, CertificateSource, Config, ConfigError};
use acme_sds::daemon;
use acme_sds::registry::SecretContent;
use acme_sds::sources::files::FileSource;

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
        /// Configuration file.
        #[arg(short, long, default_value = "acme-sds.toml", env = "ACME_SDS_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration, load its files, and print a summary; exits non-zero on any problem.
    Check {
        /// Configuration file.
        #[arg(short, long, default_value = "acme-sds.toml", env = "ACME_SDS_CONFIG")]
        config: PathBuf,
    },
    /// Show the certificates: expiry (date and days left), next renewal, last error, subscribed streams.
    /// Asks the running daemon's admin listener when `[admin] listen` is set and it answers; otherwise reads
    /// the files and the storage directory.
    Status {
        /// Configuration file.
        #[arg(short, long, default_value = "acme-sds.toml", env = "ACME_SDS_CONFIG")]
        config: PathBuf,
    },
    /// Print a complete Envoy bootstrap for a configuration: the SDS cluster, a port-80 listener whose ACME
    /// challenge route comes before the HTTPS redirect, and a TLS listener with one SNI chain per certificate.
    EnvoyBootstrap {
        /// Configuration file.
        #[arg(short, long, default_value = "acme-sds.toml", env = "ACME_SDS_CONFIG")]
        config: PathBuf,
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
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Status { config } => status(&config),
        Command::EnvoyBootstrap {
            config,
            http_port,
            https_port,
            admin_port,
            node_id,
            node_cluster,
            upstream,
        } => {
            let opts = acme_sds::bootstrap::BootstrapOptions {
                http_port,
                https_port,
                admin_port,
                node_id,
                node_cluster,
                upstream,
            };
            envoy_bootstrap(&config, &opts)
        }
        Command::Run { config } => {
            init_logging(cli.log_format);
            match run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    // Once: the log goes to stderr too.
                    tracing::error!("{e:#}");
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

fn run(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let open_files = raise_open_files_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        if let Some(limit) = open_files {
            daemon::check_open_files_limit(&config, limit);
        }
        let running = daemon::start(&config).await?;
        running.run_until_stopped().await?;
        tracing::info!("acme-sds stopped");
        Ok(())
    })
}

/// Loads and validates a configuration and its files, printing every problem; `None` when there are any.
fn load_checked(path: &Path) -> Option<(Config, Vec<(String, SecretContent)>)> {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return None;
        }
    };
    match FileSource::from_config(&config).load_all() {
        Ok(loaded) => Some((config, loaded)),
        Err(problems) => {
            eprintln!(
                "{}",
                ConfigError {
                    path: config.path.clone(),
                    problems
                }
            );
            None
        }
    }
}

fn envoy_bootstrap(path: &Path, opts: &acme_sds::bootstrap::BootstrapOptions) -> ExitCode {
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

fn status(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let (rows, origin) = match config.admin.and_then(status_from_daemon) {
        Some(rows) => (rows, "from the running daemon"),
        None => match status_from_disk(&config) {
            Ok(rows) => (rows, "from files and storage: no daemon answered"),
            Err(e) => {
                eprintln!("acme-sds status: {e:#}");
                return ExitCode::FAILURE;
            }
        },
    };
    print!(
        "{}",
        status_table(&rows, origin, std::io::stdout().is_terminal())
    );
    if rows.iter().any(|r| status_problem(r).is_some()) {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}

fn status_from_daemon(admin: std::net::SocketAddr) -> Option<Vec<acme_sds::admin::SecretStatus>> {
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
    serde_json::from_value(v.get("secrets")?.clone()).ok()
}

fn status_from_disk(config: &Config) -> anyhow::Result<Vec<acme_sds::admin::SecretStatus>> {
    use acme_sds::admin::SecretStatus;
    let mut rows = Vec::new();
    let mut files = FileSource::from_config(config);
    let loaded = files.load_all().unwrap_or_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let store = if config.storage.path.is_dir() {
        // Read-only and unlocked: a running daemon holds the store, and this must not disturb it.
        Some(acme_sds::store::FsStore::open_read_only(
            &config.storage.path,
        )?)
    } else {
        None
    };
    let keys = config
        .acme
        .as_ref()
        .map(|a| acme_sds::acme::Keys::for_directory(&a.directory));
    let fmt = |t: time::OffsetDateTime| certs::format_time(t);
    for c in &config.certificates {
        let mut row = SecretStatus {
            name: c.name.clone(),
            source: String::new(),
            domains: Vec::new(),
            serving: false,
            temporary: false,
            version: None,
            serial: None,
            not_before: None,
            not_after: None,
            next_renewal: None,
            last_error: None,
            next_retry: None,
            subscribed_streams: None,
        };
        match &c.source {
            CertificateSource::Files { .. } => {
                row.source = "files".into();
                match loaded.iter().find(|(n, _)| n == &c.name) {
                    Some((_, SecretContent::TlsCertificate(p))) => {
                        row.serving = true;
                        row.domains = p.leaf.dns_names.clone();
                        row.serial = Some(p.leaf.serial.clone());
                        row.not_before = Some(fmt(p.leaf.not_before));
                        row.not_after = Some(fmt(p.leaf.not_after));
                    }
                    _ => {
                        row.last_error =
                            Some("the files cannot be loaded (run `acme-sds check`)".into())
                    }
                }
            }
            CertificateSource::Acme { domains, .. } => {
                row.source = "acme".into();
                row.domains = domains.clone();
                if let (Some(store), Some(keys)) = (&store, &keys) {
                    let (cert, state) =
                        runtime.block_on(acme_sds::acme::stored_status(store, keys, &c.name));
                    if let Some(p) = cert {
                        row.serving = true;
                        row.serial = Some(p.leaf.serial.clone());
                        row.not_before = Some(fmt(p.leaf.not_before));
                        row.not_after = Some(fmt(p.leaf.not_after));
                        row.next_renewal = Some(fmt(acme_sds::acme::schedule::lifetime_renewal(
                            p.leaf.not_before,
                            p.leaf.not_after,
                        )));
                    }
                    if state.failures > 0 {
                        row.last_error = state.last_error;
                        row.next_retry = state
                            .next_attempt_at
                            .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                            .map(fmt);
                    }
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// What is wrong with a certificate, if anything.
fn status_problem(r: &acme_sds::admin::SecretStatus) -> Option<String> {
    if r.source == "trust_bundle" {
        return None;
    }
    let expiry = r.not_after.as_deref().and_then(|t| {
        time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    let now = time::OffsetDateTime::now_utc();
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
        (_, Some(t)) if t - now < time::Duration::days(7) => Some(format!(
            "expires within a week{}",
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

fn status_table(rows: &[acme_sds::admin::SecretStatus], origin: &str, color: bool) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "acme-sds status, {origin}");
    let _ = writeln!(
        out,
        "{:<20} {:<7} {:<36} {:<17} {:>7}",
        "NAME", "SOURCE", "EXPIRES", "NEXT RENEWAL", "STREAMS"
    );
    for r in rows {
        let expiry = r.not_after.as_deref().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        });
        let expires = match expiry {
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
            .as_deref()
            .map(|t| t.chars().take(16).collect::<String>().replace('T', " "))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<20} {:<7} {:<36} {:<17} {:>7}",
            r.name,
            r.source,
            expires,
            renewal,
            r.subscribed_streams
                .map_or_else(|| "unknown".to_owned(), |n| n.to_string())
        );
        if !r.domains.is_empty() {
            let _ = writeln!(out, "{:<20} names: {}", "", r.domains.join(", "));
        }
        if let Some(p) = status_problem(r) {
            let (on, off) = if color {
                ("\x1b[1;31m", "\x1b[0m")
            } else {
                ("", "")
            };
            let _ = writeln!(out, "{:<20} {on}PROBLEM: {p}{off}", "");
            if let Some(retry) = &r.next_retry {
                let _ = writeln!(out, "{:<20} next attempt: {retry}", "");
            }
        }
    }
    out
}

fn check(path: &Path) -> ExitCode {
    let Some((config, loaded)) = load_checked(path) else {
        return ExitCode::FAILURE;
    };
    for w in config.warnings() {
        eprintln!("warning: {}", w.located(&config.path));
    }
    print!("{}", summary(&config, &loaded));
    ExitCode::SUCCESS
}

fn summary(config: &Config, loaded: &[(String, SecretContent)]) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "{}: OK", config.path.display());
    let _ = writeln!(out, "SDS listeners:");
    for l in &config.sds.listen {
        match l {
            config::ListenAddr::Unix(_) => {
                let _ = writeln!(out, "  {l} (mode {:04o})", config.sds.socket_mode);
            }
            config::ListenAddr::Tcp(_) => {
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
                    .find(|cert| &cert.name == name)
                    .and_then(|cert| match &cert.source {
                        CertificateSource::Files {
                            cert_file,
                            key_file,
                            ..
                        } => Some(format!("{} + {}", cert_file.display(), key_file.display())),
                        CertificateSource::Acme { .. } => None,
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
                    .find(|t| &t.name == name)
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
            domains, key_type, ..
        } = &c.source
        {
            let _ = writeln!(
                out,
                "  {}: tls_certificate over ACME ({}), {}\n    {}",
                c.name,
                config
                    .acme
                    .as_ref()
                    .map(|a| a.directory.as_str())
                    .unwrap_or(""),
                key_type.as_str(),
                domains.join(", ")
            );
        }
    }
    if config.has_acme_certificates() {
        let _ = writeln!(
            out,
            "HTTP-01 responder: {}\nStorage: {}",
            config.http01.listen,
            config.storage.path.display()
        );
    }
    out
}
