//! Reach remote Docker engines through a small agent, safely.
//!
//! Two halves. **The agent** (the `docker-agent` program, or [`AgentServer`] in process) sits
//! beside a Docker engine and serves its API over mutual TLS through a deny-by-default
//! allow-list. **The controller side** is what a proxy links: a typed [`DockerHost`], one
//! pooled mTLS client per agent with a bollard `Docker` over it, an [`DockerAgentPool`] that watches
//! every agent's health, and [`DockerRuntime`], the `pool_api::ContainerRuntime` that
//! `idlewatch` drives (containers, plus Swarm service scaling). Certificates for both come from
//! [`certs`] (`docker-agent certs …`): the CA key stays with the controller.
//!
//! # Features
//!
//! | Feature | Default | What it adds |
//! |---|---|---|
//! | `agent` | yes | [`server`], [`acl`], [`config`] (TOML), [`revocation`], [`certs`] (rcgen) |
//! | `controller` | yes | [`client`], [`pool`], [`runtime`], [`host`]; bollard (re-exported as [`bollard`]) |
//! | `cli` | no | the `docker-agent` program (clap, tracing-subscriber); implies `agent` |
//!
//! A proxy that only reaches agents takes `default-features = false, features = ["controller"]`
//! and links neither the server, TOML, rcgen nor the command line.
//!
//! # The agent
//!
//! `docker-agent serve` runs next to a Docker engine and offers its API on a TCP port, guarded
//! in two layers:
//!
//! 1. **Mutual TLS** ([`server`], [`certs`]): the client must present a certificate signed by the
//!    deployment's CA; there is no switch to turn this off. Every agent's server certificate
//!    carries the fixed name [`AGENT_SERVER_NAME`] (plus the hosts it was issued for), so a
//!    client can check one name whatever address it dials. The agent holds the CA
//!    *certificate* and its own key pair, never the CA key.
//! 2. **An allow-list** ([`acl`]): deny by default; built-in `read-only` and `lifecycle`
//!    profiles plus custom rules. Paths that would change under normalisation (`..`, `//`,
//!    `%2f`, …) are denied, never repaired; API versions older than
//!    [`acl::MIN_API_VERSION`] (whose request bodies configure what later versions refuse to)
//!    are never forwarded. A rule names a method and a path pattern **and** what the request may
//!    carry: which query parameters, whether a body (none, any, or a service spec that changes
//!    the replica count only), whether an upgrade. The `lifecycle` profile can start, stop,
//!    kill, restart, pause and unpause existing containers and scale services, and configure
//!    nothing. A plain custom rule (`"POST /containers/create"`) admits any query and body: it
//!    hands out everything that endpoint can do (privileged containers, bind mounts of the
//!    host's files). Environment values in inspect answers are redacted by default.
//!
//! Allowed requests are forwarded to the engine's Unix socket and streamed both ways; the agent
//! answers `GET /agent/info` and `GET /agent/health` itself. Configuration: [`config`] (a TOML
//! file, or [`AgentConfig`] in memory).
//!
//! Setting one up with the program (built with the `cli` feature:
//! `cargo install --path crates/docker-agent --features cli`):
//!
//! ```text
//! docker-agent certs ca --out ca/
//! docker-agent certs agent --ca ca/ --host 192.0.2.10 --out edge-1/
//! docker-agent certs client --ca ca/ --name controller --out controller/
//! # copy edge-1/{ca.pem,cert.pem,key.pem} and an agent.toml to the Docker host, then:
//! docker-agent serve --config agent.toml --profile lifecycle
//! # from the controller, with its client bundle:
//! DOCKER_HOST=tcp://192.0.2.10:2376 DOCKER_TLS_VERIFY=1 DOCKER_CERT_PATH=controller docker ps
//! ```
//!
//! The same in process (as the tests do):
//!
//! ```
//! use std::time::Duration;
//! use docker_agent::{AgentConfig, AgentServer, CertificateAuthority, Profile, TlsMaterial};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let day = Duration::from_secs(86_400);
//! let ca = CertificateAuthority::generate("example CA", 365 * day)?;
//! let server = ca.issue_server(&["127.0.0.1".to_owned()], 90 * day)?;
//! let tls = TlsMaterial {
//!     ca_cert_pem: ca.cert_pem().to_owned(),
//!     cert_pem: server.cert_pem,
//!     key_pem: server.key_pem,
//! };
//! let mut config = AgentConfig::new("edge-1", "127.0.0.1:0".parse()?, tls);
//! config.acl.profile = Profile::Lifecycle;
//! let agent = AgentServer::bind(config).await?;
//! println!("agent on {}", agent.local_addr());
//! agent.shutdown().await;
//! # Ok(())
//! # }
//! ```
//!
//! # The controller side
//!
//! - [`host`]: a Docker host parsed once into [`DockerHost`] (`unix://`, `tcp://`, `https://`,
//!   `agent://`), with typed errors for everything else.
//! - [`client`]: [`AgentClient`], one pooled mutual-TLS HTTP client per agent (trusting only the
//!   deployment's CA, checking [`AGENT_SERVER_NAME`] whatever address it dials), a bollard
//!   `Docker` over it, and the agent's `/agent/info` and `/agent/health`;
//!   [`connect_local`] for engines reached without an agent.
//! - [`pool`]: [`DockerAgentPool`], the agents by address, Docker host and name, each watched by a
//!   monitor task (health checks, back-off while unhealthy, stats and gauges). An agent that is
//!   down when added is registered as unhealthy and recovers by itself; configuration errors
//!   (TLS, ACL, an engine API older than required, duplicate names) are refused at once.
//! - [`runtime`]: [`DockerRuntime`], `pool_api::ContainerRuntime` over any bollard `Docker`
//!   (local or through an agent): status, start, stop, kill, pause, unpause and typed events;
//!   plus Swarm service status and scaling.
//!
//! ```no_run
//! use docker_agent::{AgentEndpoint, DockerAgentPool, AgentTls, DockerRuntime, DockerAgentPoolConfig};
//! use pool_api::ContainerRuntime;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let pool = DockerAgentPool::new(DockerAgentPoolConfig::default());
//! let tls = AgentTls::from_dir("certs/edge-1")?;
//! pool.add(AgentEndpoint::new("edge-1", "192.0.2.10:2376", tls)).await?;
//! let agent = pool.get_by_docker_host("agent://192.0.2.10:2376")?.expect("added");
//! let runtime = DockerRuntime::new(agent.docker());
//! let status = runtime.status("web").await?;
//! println!("web is {:?} and {:?}", status.state, status.health);
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

#[cfg(feature = "agent")]
pub mod acl;
#[cfg(feature = "agent")]
pub mod certs;
#[cfg(feature = "controller")]
pub mod client;
#[cfg(feature = "agent")]
pub mod config;
#[cfg(feature = "controller")]
pub mod host;
#[cfg(feature = "agent")]
mod limits;
#[cfg(feature = "controller")]
pub mod pool;
#[cfg(feature = "agent")]
pub mod revocation;
#[cfg(feature = "controller")]
pub mod runtime;
#[cfg(feature = "agent")]
pub mod server;

/// bollard, re-exported: the controller side hands out its `Docker` and error types.
#[cfg(feature = "controller")]
pub use bollard;

#[cfg(feature = "agent")]
pub use acl::{Acl, AclConfig, AclDecision, BodyPolicy, DenyReason, Profile, Rule};
#[cfg(feature = "agent")]
pub use certs::{CertError, CertificateAuthority, IssuedCert};
#[cfg(feature = "controller")]
pub use client::{
    AgentClient, AgentHealthStatus, AgentInfo, AgentTls, ClientError, DockerAgentHealth, connect_local,
};
#[cfg(feature = "agent")]
pub use config::{AgentConfig, AgentConfigFile, AgentLimits, ConfigError, TlsMaterial};
#[cfg(feature = "controller")]
pub use host::{DockerHost, DockerHostError};
#[cfg(feature = "controller")]
pub use pool::{
    AddError, Agent, AgentEndpoint, AgentHealthState, AgentStatus, AgentUnavailable, DockerAgentPool,
    DockerAgentPoolConfig, DockerAgentPoolStats,
};
#[cfg(feature = "controller")]
pub use runtime::DockerRuntime;
#[cfg(feature = "agent")]
pub use server::{AgentServer, RunningDockerAgent, ServerError};

/// The DNS name every agent's server certificate carries and every client checks, whatever
/// address it dials: one certificate name, any agent address.
pub const AGENT_SERVER_NAME: &str = "docker-agent.agentpool";
