//! Reach remote Docker engines through a small agent, safely.
//!
//! (crate docs being written)

pub mod acl;
pub mod certs;
pub mod client;
pub mod config;
pub mod host;
pub mod pool;
pub mod runtime;
pub mod server;

pub use acl::{Acl, AclConfig, Decision, DenyReason, Profile, Rule};
pub use certs::{CertError, CertificateAuthority, IssuedCert};
pub use config::{AgentConfig, AgentConfigFile, ConfigError, TlsMaterial};
pub use server::{AgentServer, RunningAgent, ServerError};

/// The DNS name every agent's server certificate carries and every client checks, whatever
/// address it dials: one certificate name, any agent address.
pub const AGENT_SERVER_NAME: &str = "docker-agent.agentpool";
