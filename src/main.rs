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
                    tracing::error!("{e:#}");
                    eprintln!("acme-sds: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run(path: &Path) -> anyhow::Result<()> {
    let config = config::load(path)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let mut running = daemon::start(&config).await?;
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %config.path.display(), "acme-sds started");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            r = tokio::signal::ctrl_c() => {
                r.context("installing the SIGINT handler")?;
                tracing::info!("SIGINT: shutting down");
            }
            e = running.failed() => return Err(e),
        }
        running.shutdown().await?;
        tracing::info!("acme-sds stopped");
        Ok(())
    })
}

fn envoy_bootstrap(path: &Path, opts: &acme_sds::bootstrap::BootstrapOptions) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match FileSource::from_config(&config).load_all() {
        Ok(l) => l,
        Err(problems) => {
            eprintln!(
                "{}",
                ConfigError {
                    path: config.path.clone(),
                    problems
                }
            );
            return ExitCode::FAILURE;
        }
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

fn check(path: &Path) -> ExitCode {
    let config = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let loaded = match FileSource::from_config(&config).load_all() {
        Ok(l) => l,
        Err(problems) => {
            eprintln!(
                "{}",
                ConfigError {
                    path: config.path.clone(),
                    problems
                }
            );
            return ExitCode::FAILURE;
        }
    };
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
        if let CertificateSource::Acme { domains, key_type } = &c.source {
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
