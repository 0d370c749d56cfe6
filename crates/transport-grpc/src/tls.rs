//! TLS settings of both sides, built into rustls configurations once (ring provider, TLS 1.2
//! and 1.3 only, ALPN `h2`).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// Why TLS material was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GrpcTlsError {
    /// PEM that holds no certificate, or does not parse.
    #[error("{what}: no certificate could be read from the PEM ({problem})")]
    Certificates {
        /// Which certificates (`"CA"`, `"certificate chain"`…).
        what: &'static str,
        /// What went wrong.
        problem: String,
    },
    /// PEM that holds no private key, or does not parse.
    #[error("private key: {0}")]
    PrivateKey(String),
    /// A server name override that is not a DNS name or IP address.
    #[error("invalid server name {name:?}: {problem}")]
    ServerName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        problem: String,
    },
    /// rustls refused the combination (a key that does not match its certificate…).
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

fn certificates(what: &'static str, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, GrpcTlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| GrpcTlsError::Certificates { what, problem: e.to_string() })?;
    if certs.is_empty() {
        return Err(GrpcTlsError::Certificates { what, problem: "the PEM is empty".into() });
    }
    Ok(certs)
}

fn roots(what: &'static str, pem: &[u8]) -> Result<RootCertStore, GrpcTlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(what, pem)? {
        store.add(cert).map_err(|e| GrpcTlsError::Certificates { what, problem: e.to_string() })?;
    }
    Ok(store)
}

fn key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, GrpcTlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| GrpcTlsError::PrivateKey(e.to_string()))
}

/// The proxy side's TLS, for `grpcs://` endpoints: the CA that signs the agents' certificates,
/// optionally the name to expect in them (instead of the endpoint's host) and a client
/// certificate for agents that require one (mutual TLS).
///
/// ```no_run
/// # fn f(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<(), transport_grpc::GrpcTlsError> {
/// let tls = transport_grpc::GrpcClientTls::new(ca)?
///     .with_server_name("waf.agents.internal")?
///     .with_identity(cert, key)?;
/// # let _ = tls; Ok(()) }
/// ```
#[derive(Clone)]
pub struct GrpcClientTls {
    roots: Arc<RootCertStore>,
    server_name: Option<ServerName<'static>>,
    config: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for GrpcClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcClientTls")
            .field("roots", &self.roots.len())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl GrpcClientTls {
    /// Trusts the CA certificates in `ca_pem` (and nothing else) to sign agents' certificates.
    pub fn new(ca_pem: &[u8]) -> Result<Self, GrpcTlsError> {
        let roots = Arc::new(roots("CA", ca_pem)?);
        let config = Self::build(&roots, None)?;
        Ok(Self { roots, server_name: None, config })
    }

    /// Expects `name` in the agent's certificate instead of the endpoint's host (for agents
    /// dialled by IP address, or behind a name the certificate does not carry).
    pub fn with_server_name(mut self, name: &str) -> Result<Self, GrpcTlsError> {
        let parsed = ServerName::try_from(name.to_owned())
            .map_err(|e| GrpcTlsError::ServerName { name: name.to_owned(), problem: e.to_string() })?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// Presents the certificate chain in `cert_pem` with the private key in `key_pem` to agents
    /// that ask for a client certificate.
    pub fn with_identity(mut self, cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, GrpcTlsError> {
        let identity = (certificates("client certificate chain", cert_pem)?, key(key_pem)?);
        self.config = Self::build(&self.roots, Some(identity))?;
        Ok(self)
    }

    fn build(
        roots: &Arc<RootCertStore>,
        identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    ) -> Result<Arc<rustls::ClientConfig>, GrpcTlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| GrpcTlsError::Config(e.to_string()))?
            .with_root_certificates(roots.clone());
        let mut config = match identity {
            Some((chain, key)) => {
                builder.with_client_auth_cert(chain, key).map_err(|e| GrpcTlsError::Config(e.to_string()))?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// The name to verify: the override, or `host`.
    pub(crate) fn server_name(&self, host: &str) -> Result<ServerName<'static>, String> {
        match &self.server_name {
            Some(name) => Ok(name.clone()),
            None => ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?}: {e}")),
        }
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.clone())
    }
}

/// The agent side's TLS: its certificate chain and key, and optionally the CA whose client
/// certificates it requires (mutual TLS: a proxy without one, or with one another CA signed, is
/// refused during the TLS handshake).
#[derive(Clone)]
pub struct GrpcServerTls {
    config: Arc<rustls::ServerConfig>,
    mutual: bool,
}

impl std::fmt::Debug for GrpcServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServerTls").field("mutual", &self.mutual).finish_non_exhaustive()
    }
}

impl GrpcServerTls {
    /// Serves with the certificate chain in `cert_pem` and the private key in `key_pem`; no
    /// client certificate is asked for.
    pub fn new(cert_pem: &[u8], key_pem: &[u8]) -> Result<Self, GrpcTlsError> {
        Self::build(cert_pem, key_pem, None)
    }

    /// Serves as [`new`](Self::new) does, and requires every proxy to present a certificate
    /// signed by a CA in `client_ca_pem`.
    pub fn mutual(cert_pem: &[u8], key_pem: &[u8], client_ca_pem: &[u8]) -> Result<Self, GrpcTlsError> {
        Self::build(cert_pem, key_pem, Some(client_ca_pem))
    }

    fn build(cert_pem: &[u8], key_pem: &[u8], client_ca: Option<&[u8]>) -> Result<Self, GrpcTlsError> {
        let chain = certificates("certificate chain", cert_pem)?;
        let key = key(key_pem)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(|e| GrpcTlsError::Config(e.to_string()))?;
        let builder = match client_ca {
            Some(pem) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("client CA", pem)?),
                    provider(),
                )
                .build()
                .map_err(|e| GrpcTlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config =
            builder.with_single_cert(chain, key).map_err(|e| GrpcTlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self { config: Arc::new(config), mutual: client_ca.is_some() })
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }
}
