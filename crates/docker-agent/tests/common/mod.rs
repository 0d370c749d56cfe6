//! Certificates for tests that run agents in process: one CA, the agent's server material and
//! the controller's client material.
#![allow(dead_code)]

pub mod engine;

use std::time::Duration;

use docker_agent::certs::CertificateAuthority;
use docker_agent::client::AgentTls;
use docker_agent::config::TlsMaterial;

pub const DAY: Duration = Duration::from_secs(86_400);

/// A CA, the agent's server material (for 127.0.0.1) and the controller's client material.
pub struct Pki {
    pub ca: CertificateAuthority,
    pub server: TlsMaterial,
    pub client: AgentTls,
}

/// A day-long deployment under a CA named `ca_name`.
pub fn pki(ca_name: &str) -> Pki {
    let ca = CertificateAuthority::generate(ca_name, DAY).unwrap();
    let server = ca.issue_server(&["127.0.0.1".to_owned()], DAY).unwrap();
    Pki {
        server: TlsMaterial {
            ca_cert_pem: ca.cert_pem().to_owned(),
            cert_pem: server.cert_pem,
            key_pem: server.key_pem,
        },
        client: client_of(&ca, "controller"),
        ca,
    }
}

/// Client material for `name` issued by `ca`, trusting `ca`.
pub fn client_of(ca: &CertificateAuthority, name: &str) -> AgentTls {
    let client = ca.issue_client(name, DAY).unwrap();
    AgentTls {
        ca_cert_pem: ca.cert_pem().to_owned(),
        client_cert_pem: client.cert_pem,
        client_key_pem: client.key_pem,
    }
}
