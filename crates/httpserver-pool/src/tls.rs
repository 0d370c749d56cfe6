//! TLS material: loading certificate chains and keys (files or memory), checking that they fit,
//! and building the rustls server configuration (ALPN, optional client-certificate checking).

use std::path::PathBuf;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::Error;

/// Where PEM text comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PemSource {
    /// A file, read when the configuration is validated, started or applied.
    File(PathBuf),
    /// PEM text held in memory.
    Pem(String),
}

impl PemSource {
    fn describe(&self) -> String {
        match self {
            PemSource::File(p) => format!("file {}", p.display()),
            PemSource::Pem(_) => "in-memory PEM".to_owned(),
        }
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let certs: Result<Vec<_>, _> = match self {
            PemSource::File(p) => {
                CertificateDer::pem_file_iter(p).map_err(|e| format!("{}: {e}", self.describe()))?.collect()
            }
            PemSource::Pem(s) => CertificateDer::pem_slice_iter(s.as_bytes()).collect(),
        };
        let certs = certs.map_err(|e| format!("{}: {e}", self.describe()))?;
        if certs.is_empty() {
            return Err(format!("{}: no certificate found", self.describe()));
        }
        Ok(certs)
    }

    fn key(&self) -> Result<PrivateKeyDer<'static>, String> {
        match self {
            PemSource::File(p) => PrivateKeyDer::from_pem_file(p),
            PemSource::Pem(s) => PrivateKeyDer::from_pem_slice(s.as_bytes()),
        }
        .map_err(|e| format!("{}: {e}", self.describe()))
    }
}

/// A server's TLS settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The certificate chain, leaf first.
    pub cert_chain: PemSource,
    /// The private key of the leaf certificate.
    pub key: PemSource,
    /// When set, clients must present a certificate signed by one of these CAs (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PemSource>,
}

/// Loaded, checked TLS material. Equality compares the bytes, so a reload of unchanged files is
/// recognised as unchanged.
#[derive(Debug)]
pub(crate) struct TlsMaterial {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    client_ca: Vec<CertificateDer<'static>>,
}

impl PartialEq for TlsMaterial {
    fn eq(&self, other: &Self) -> bool {
        self.chain == other.chain
            && self.key.secret_der() == other.key.secret_der()
            && self.client_ca == other.client_ca
    }
}

pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsMaterial {
    /// Reads and checks everything; the messages name the server and the source at fault.
    pub(crate) fn load(server: &str, cfg: &TlsConfig) -> Result<TlsMaterial, Error> {
        let tls_err = |message: String| Error::Tls { server: server.to_owned(), message };
        let chain = cfg.cert_chain.certs().map_err(tls_err)?;
        let key = cfg.key.key().map_err(tls_err)?;
        let client_ca = match &cfg.client_ca {
            Some(src) => src.certs().map_err(tls_err)?,
            None => Vec::new(),
        };
        CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider())
            .map_err(|e| tls_err(format!("certificate and key do not match: {e}")))?;
        Ok(TlsMaterial { chain, key, client_ca })
    }

    /// The rustls configuration: ALPN offers `h2` only when HTTP/2 is enabled.
    pub(crate) fn server_config(
        &self,
        server: &str,
        http2: bool,
    ) -> Result<Arc<rustls::ServerConfig>, Error> {
        let tls_err = |e: rustls::Error| Error::Tls { server: server.to_owned(), message: e.to_string() };
        let provider = provider();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(tls_err)?;
        let builder = if self.client_ca.is_empty() {
            builder.with_no_client_auth()
        } else {
            let mut roots = RootCertStore::empty();
            for ca in &self.client_ca {
                roots.add(ca.clone()).map_err(tls_err)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::Tls { server: server.to_owned(), message: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut config =
            builder.with_single_cert(self.chain.clone(), self.key.clone_key()).map_err(tls_err)?;
        config.alpn_protocols =
            if http2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
        Ok(Arc::new(config))
    }
}
