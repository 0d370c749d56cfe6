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

/// The DNS name every agent's server certificate carries and every client checks, whatever
/// address it dials: one certificate name, any agent address.
pub const AGENT_SERVER_NAME: &str = "docker-agent.agentpool";
