//! The `docker-agent` program: serve the Docker API of this machine over mutual TLS with an
//! allow-list, and make the certificates for it.
//!
//! ```text
//! docker-agent certs ca --out ca/                                  # ca.pem + ca-key.pem (0600)
//! docker-agent certs agent --ca ca/ --host 192.0.2.10 --host edge-1.example --out edge-1/
//!     # edge-1/ca.pem, cert.pem, key.pem          -> for the agent (CA certificate only)
//!     # edge-1/client/ca.pem, cert.pem, key.pem   -> for the controller or DOCKER_CERT_PATH
//! docker-agent serve --config agent.toml [--listen ..] [--docker-socket ..] [--name ..] [--profile ..]
//! ```
//!
//! `serve` prints `listening on <address>` on stdout once it accepts connections (useful with
//! port 0). Logs go to stderr, filtered by `RUST_LOG` (default `info`). SIGINT and SIGTERM shut
//! the server down gracefully.

use std::fs::OpenOptions;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use docker_agent::acl::Profile;
use docker_agent::certs::CertificateAuthority;
use docker_agent::config::AgentConfigFile;
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
    /// Issue an agent's server certificate and a client certificate for its controller.
    ///
    /// Writes OUT/ca.pem (the CA certificate only), OUT/cert.pem, OUT/key.pem for the agent, and
    /// OUT/client/ca.pem, cert.pem, key.pem for the client (the layout DOCKER_CERT_PATH expects).
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
        /// Lifetime of both certificates, e.g. `1year`, `90d`.
        #[arg(long, default_value = "1year", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// Common name of the client certificate.
        #[arg(long, default_value = "docker-agent-client")]
        client_name: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
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
        file.listen = listen;
    }
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
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
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
        CertsCommand::Agent { ca, hosts, out, lifetime, client_name, force } => {
            let read = |name: &str| {
                let path = ca.join(name);
                std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
            };
            let authority = CertificateAuthority::from_pem(&read("ca.pem")?, &read("ca-key.pem")?)?;
            let server = authority.issue_server(&hosts, lifetime)?;
            let client = authority.issue_client(&client_name, lifetime)?;
            let client_dir = out.join("client");
            create_dir(&client_dir)?;
            for (dir, cert) in [(&out, &server), (&client_dir, &client)] {
                write_file(&dir.join("ca.pem"), authority.cert_pem(), 0o644, force)?;
                write_file(&dir.join("cert.pem"), &cert.cert_pem, 0o644, force)?;
                write_file(&dir.join("key.pem"), &cert.key_pem, 0o600, force)?;
            }
            println!(
                "wrote the agent bundle to {} and the client bundle to {} (valid until {})",
                out.display(),
                client_dir.display(),
                humantime::format_rfc3339_seconds(server.not_after)
            );
        }
    }
    Ok(())
}

fn create_dir(dir: &Path) -> Result<(), AnyError> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()).into())
}

fn write_file(path: &Path, contents: &str, mode: u32, force: bool) -> Result<(), AnyError> {
    let mut options = OpenOptions::new();
    options.write(true).mode(mode);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            format!("{} exists; use --force to overwrite", path.display())
        } else {
            format!("cannot write {}: {e}", path.display())
        }
    })?;
    // `mode` applies only to new files: make an overwritten key file private too.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
    file.write_all(contents.as_bytes()).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(())
}
