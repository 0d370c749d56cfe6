//! The `docker-agent` program: serve the Docker API of this machine over mutual TLS with an
//! allow-list, and make the certificates for it.
//!
//! ```text
//! docker-agent certs ca --out ca/                                  # ca.pem + ca-key.pem (0600)
//! docker-agent certs agent --ca ca/ --host 192.0.2.10 --host edge-1.example --out edge-1/
//!     # edge-1/ca.pem, cert.pem, key.pem: the agent's bundle (CA certificate, its own key pair)
//! docker-agent certs client --ca ca/ --name controller --out controller/
//!     # controller/ca.pem, cert.pem, key.pem: a client bundle (the layout DOCKER_CERT_PATH expects)
//! docker-agent certs fingerprint controller/cert.pem               # for a revocation list
//! docker-agent serve --config agent.toml [--listen ..] [--docker-socket ..] [--name ..] [--profile ..]
//! ```
//!
//! The agent's bundle holds nothing that opens another agent: client bundles are made apart,
//! one per client, and each can be revoked by listing its fingerprint in the file the
//! configuration's `tls.revoked` names. Keys are written with mode 0600 and create-new
//! semantics: `--force` replaces a regular file but refuses to write through a symbolic link.
//!
//! `serve` prints `listening on <address>` on stdout once it accepts connections (useful with
//! port 0). Logs go to stderr, filtered by `RUST_LOG` (default `info`). SIGINT and SIGTERM shut
//! the server down gracefully; SIGHUP re-reads the revocation list.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use docker_agent::acl::Profile;
use docker_agent::certs::{CertificateAuthority, IssuedCert};
use docker_agent::config::AgentConfigFile;
use docker_agent::revocation::RevocationList;
use docker_agent::server::AgentServer;
use humantime_serde::re::humantime;

#[derive(Debug, Parser)]
#[command(name = "docker-agent", version, about = "Serve the local Docker API over mutual TLS, allow-listed")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent.
    Serve(ServeArgs),
    /// Make certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// The configuration file (TOML).
    #[arg(long, env = "DOCKER_AGENT_CONFIG")]
    config: PathBuf,
    /// Listen address, overriding the configuration.
    #[arg(long, env = "DOCKER_AGENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Docker socket, overriding the configuration.
    #[arg(long, env = "DOCKER_AGENT_DOCKER_SOCKET")]
    docker_socket: Option<PathBuf>,
    /// Agent name, overriding the configuration.
    #[arg(long, env = "DOCKER_AGENT_NAME")]
    name: Option<String>,
    /// ACL profile (read-only, lifecycle, none), overriding the configuration; custom rules stay.
    #[arg(long, env = "DOCKER_AGENT_PROFILE")]
    profile: Option<Profile>,
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Make a new certificate authority: DIR/ca.pem and DIR/ca-key.pem (mode 0600).
    Ca {
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. `10years`, `3650d`.
        #[arg(long, default_value = "10years", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// The CA's common name.
        #[arg(long, default_value = "docker-agent CA")]
        name: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent's server certificate: OUT/ca.pem (the CA certificate only), OUT/cert.pem
    /// and OUT/key.pem — everything the agent needs, nothing a client could use.
    Agent {
        /// The CA directory (ca.pem and ca-key.pem, as written by `certs ca`).
        #[arg(long)]
        ca: PathBuf,
        /// An address or DNS name clients dial the agent by (repeatable). The fixed name
        /// docker-agent.agentpool is always included.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. `1year`, `90d`.
        #[arg(long, default_value = "1year", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// Overwrite existing files (never through a symbolic link).
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate (for a controller or the docker CLI): OUT/ca.pem, OUT/cert.pem,
    /// OUT/key.pem, the layout DOCKER_CERT_PATH expects. Prints its fingerprint.
    Client {
        /// The CA directory (ca.pem and ca-key.pem, as written by `certs ca`).
        #[arg(long)]
        ca: PathBuf,
        /// The client's name (the certificate's common name, shown in the agent's logs).
        #[arg(long)]
        name: String,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime, e.g. `1year`, `90d`.
        #[arg(long, default_value = "1year", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// Overwrite existing files (never through a symbolic link).
        #[arg(long)]
        force: bool,
    },
    /// Print the SHA-256 fingerprint of a certificate (PEM), as a revocation list takes it.
    Fingerprint {
        /// The certificate file.
        cert: PathBuf,
    },
}

fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Certs(command) => certs(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("docker-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyError = Box<dyn std::error::Error>;

fn serve(args: ServeArgs) -> Result<(), AnyError> {
    let mut file = AgentConfigFile::load(&args.config)?;
    if let Some(listen) = args.listen {
        file.listen = Some(listen);
    }
    let revoked_file = file.tls.revoked.clone();
    if let Some(socket) = args.docker_socket {
        file.docker_socket = socket;
    }
    if let Some(name) = args.name {
        file.name = name;
    }
    if let Some(profile) = args.profile {
        file.acl.profile = profile;
    }
    let config = file.into_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let agent = AgentServer::bind(config).await?;
        // The address on stdout, for whoever started us with port 0.
        println!("listening on {}", agent.local_addr());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: shutting down"); break; }
                _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
                _ = hup.recv() => match &revoked_file {
                    // A list that cannot be read keeps the one in force.
                    Some(path) => match RevocationList::load(path) {
                        Ok(list) => agent.set_revoked(list),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: revocation list not reloaded"),
                    },
                    None => tracing::info!("SIGHUP: no tls.revoked file configured; nothing to reload"),
                },
            }
        }
        agent.shutdown().await;
        Ok(())
    })
}

fn certs(command: CertsCommand) -> Result<(), AnyError> {
    match command {
        CertsCommand::Ca { out, lifetime, name, force } => {
            let ca = CertificateAuthority::generate(&name, lifetime)?;
            create_dir(&out)?;
            write_file(&out.join("ca.pem"), ca.cert_pem(), 0o644, force)?;
            write_file(&out.join("ca-key.pem"), ca.key_pem(), 0o600, force)?;
            println!("wrote {} and {}", out.join("ca.pem").display(), out.join("ca-key.pem").display());
        }
        CertsCommand::Agent { ca, hosts, out, lifetime, force } => {
            let authority = load_ca(&ca)?;
            let server = authority.issue_server(&hosts, lifetime)?;
            write_bundle(&out, authority.cert_pem(), &server, force)?;
            println!(
                "wrote the agent bundle to {} (valid until {})",
                out.display(),
                humantime::format_rfc3339_seconds(server.not_after)
            );
        }
        CertsCommand::Client { ca, name, out, lifetime, force } => {
            let authority = load_ca(&ca)?;
            let client = authority.issue_client(&name, lifetime)?;
            write_bundle(&out, authority.cert_pem(), &client, force)?;
            println!(
                "wrote the client bundle for {name:?} to {} (valid until {}); fingerprint {}",
                out.display(),
                humantime::format_rfc3339_seconds(client.not_after),
                docker_agent::certs::fingerprint_pem(&client.cert_pem)?
            );
        }
        CertsCommand::Fingerprint { cert } => {
            let pem =
                std::fs::read_to_string(&cert).map_err(|e| format!("cannot read {}: {e}", cert.display()))?;
            println!("{}", docker_agent::certs::fingerprint_pem(&pem)?);
        }
    }
    Ok(())
}

fn load_ca(dir: &Path) -> Result<CertificateAuthority, AnyError> {
    let read = |name: &str| {
        let path = dir.join(name);
        std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    };
    Ok(CertificateAuthority::from_pem(&read("ca.pem")?, &read("ca-key.pem")?)?)
}

/// `ca.pem`, `cert.pem` and `key.pem` (0600) in `dir`.
fn write_bundle(dir: &Path, ca_pem: &str, cert: &IssuedCert, force: bool) -> Result<(), AnyError> {
    create_dir(dir)?;
    write_file(&dir.join("ca.pem"), ca_pem, 0o644, force)?;
    write_file(&dir.join("cert.pem"), &cert.cert_pem, 0o644, force)?;
    write_file(&dir.join("key.pem"), &cert.key_pem, 0o600, force)
}

fn create_dir(dir: &Path) -> Result<(), AnyError> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()).into())
}

/// Writes a new file with `mode`. With `force`, a regular file in the way is removed first; a
/// symbolic link (or anything else) is refused, and the file is always created with create-new
/// semantics (`O_EXCL`), so a link planted between the removal and the creation makes the write
/// fail instead of writing through it.
fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), AnyError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            return Err(format!("{} is a symbolic link; refusing to write through it", path.display()).into());
        }
        Ok(meta) if !meta.is_file() => {
            return Err(format!("{} exists and is not a regular file", path.display()).into());
        }
        Ok(_) if force => {
            std::fs::remove_file(path).map_err(|e| format!("cannot replace {}: {e}", path.display()))?
        }
        Ok(_) => return Err(format!("{} exists; use --force to overwrite", path.display()).into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot check {}: {e}", path.display()).into()),
    }
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{} appeared while it was being written (a link planted?); refusing", path.display())
        } else {
            format!("cannot write {}: {e}", path.display())
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(())
}
