//! Certificates for tests that run agents in process: one CA, the agent's server material and
//! the controller's client material.
#![allow(dead_code)]

pub mod engine;

use std::sync::Arc;
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

/// A rustls client configuration presenting `tls`'s certificate and trusting only its CA.
pub fn client_config(tls: &AgentTls) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(tls.ca_cert_pem.as_bytes()).unwrap()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(tls.client_cert_pem.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(tls.client_key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
    )
}
