//! The agent's configuration: a TOML file ([`AgentConfigFile`]) that names the TLS files, and the
//! in-memory form the server runs from ([`AgentConfig`], with the PEM text loaded).
//!
//! ```toml
//! # agent.toml
//! name = "edge-1"                          # shown by /agent/info
//! listen = "0.0.0.0:2376"
//! docker_socket = "/var/run/docker.sock"   # the default
//! expiry_warning = "30d"                   # /agent/health says "degraded" this long before expiry (default 30d)
//! shutdown_grace = "10s"                   # how long in-flight requests may finish on shutdown (default 10s)
//!
//! [tls]                                    # relative paths are relative to this file's directory
//! ca_cert = "ca.pem"                       # the CA certificate only: client certificates must be signed by it
//! cert = "cert.pem"                        # this agent's server certificate
//! key = "key.pem"                          # and its key
//!
//! revoked = "revoked.txt"                 # optional: SHA-256 fingerprints of refused client certificates
//!
//! [acl]
//! profile = "lifecycle"                    # read-only (default), lifecycle or none
//! rules = ["GET /containers/{id}/logs"]    # added to the profile's rules
//! redact_env = true                        # the default
//!
//! [limits]                                 # every field optional; the defaults shown
//! max_connections = 512                    # open client connections, all clients together
//! max_connections_per_ip = 64              # open client connections from one IP address
//! max_requests_per_client = 64             # requests in flight (held event streams included) per client certificate
//! handshake_timeout = "5s"                 # to complete the TLS handshake
//! header_read_timeout = "30s"              # to send a request's headers; also how long an idle keep-alive connection stays
//! body_read_timeout = "30s"                # longest pause within a request body
//! engine_idle_timeout = "30s"              # idle connections to the engine are closed after this
//! ```
//!
//! `listen` may be left out of the file when `docker-agent serve --listen` gives it.
//!
//! Client certificates are always required; there is no setting to turn that off.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::acl::AclConfig;
pub use crate::revocation::RevocationList;

/// The default Docker socket.
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The default certificate expiry warning window (30 days).
pub const DEFAULT_EXPIRY_WARNING: Duration = Duration::from_secs(30 * 86_400);
/// The default shutdown grace period (10 s).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What the agent's server lets clients hold, and for how long. Every field has a safe default
/// ([`AgentLimits::default`]); in TOML the `[limits]` table, durations in humantime (`"5s"`).
///
/// A connection over [`max_connections`](Self::max_connections) or
/// [`max_connections_per_ip`](Self::max_connections_per_ip) is closed as soon as it is accepted
/// (before any TLS work), so a flood of silent connections from one address cannot use up the
/// agent's file descriptors or lock out other clients; it is counted in
/// `docker_agent_connections_refused_total{reason="global"|"per_ip"}`. A request over
/// [`max_requests_per_client`](Self::max_requests_per_client) is answered `429` and counted as
/// `docker_agent_requests_total{outcome="limited"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentLimits {
    /// Open client connections, all clients together (default 512).
    pub max_connections: usize,
    /// Open client connections from one IP address (default 64).
    pub max_connections_per_ip: usize,
    /// Requests in flight per client certificate, streaming answers (`/events`, followed logs)
    /// included until they end (default 64).
    pub max_requests_per_client: usize,
    /// How long a client may take to complete the TLS handshake (default 5 s).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How long a client may take to send a request's headers, counted from the moment the
    /// connection waits for a request: an idle keep-alive connection is closed after it too
    /// (default 30 s).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// The longest pause allowed within a request body; a body that stalls longer ends the
    /// request with `408` (default 30 s).
    #[serde(with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// Idle connections to the engine's socket are closed after this (default 30 s).
    #[serde(with = "humantime_serde")]
    pub engine_idle_timeout: Duration,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            max_connections: 512,
            max_connections_per_ip: 64,
            max_requests_per_client: 64,
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            engine_idle_timeout: Duration::from_secs(30),
        }
    }
}

impl AgentLimits {
    /// Every problem, each with its field.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut problems = Vec::new();
        let mut invalid =
            |field, reason: &str| problems.push(ConfigError::Invalid { field, reason: reason.into() });
        for (field, value) in [
            ("limits.max_connections", self.max_connections),
            ("limits.max_connections_per_ip", self.max_connections_per_ip),
            ("limits.max_requests_per_client", self.max_requests_per_client),
        ] {
            if value == 0 {
                invalid(field, "must be at least 1");
            }
        }
        if self.max_connections_per_ip > self.max_connections {
            invalid("limits.max_connections_per_ip", "must not exceed limits.max_connections");
        }
        for (field, value) in [
            ("limits.handshake_timeout", self.handshake_timeout),
            ("limits.header_read_timeout", self.header_read_timeout),
            ("limits.body_read_timeout", self.body_read_timeout),
            ("limits.engine_idle_timeout", self.engine_idle_timeout),
        ] {
            if value.is_zero() {
                invalid(field, "must be longer than zero");
            }
        }
        problems
    }
}

/// Errors in loading or checking the configuration. Each names the field or file at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file cannot be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or does not fit the schema (the message gives the
    /// line and the key).
    #[error("invalid configuration file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error, with location.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A TLS file named in the configuration cannot be read.
    #[error("cannot read `{field}` ({path}): {source}")]
    ReadTls {
        /// The configuration field, e.g. `tls.key`.
        field: &'static str,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A field holds a value the agent cannot run with.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The configuration field, e.g. `name` or `tls.cert`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The agent's TLS material, PEM text in memory.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsMaterial {
    /// The CA certificate that client certificates must chain to (certificate only, no key).
    pub ca_cert_pem: String,
    /// The agent's server certificate (and any intermediates after it).
    pub cert_pem: String,
    /// The agent's private key.
    pub key_pem: String,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("ca_cert_pem", &self.ca_cert_pem)
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl TlsMaterial {
    /// Builds the rustls server configuration: TLS 1.2 and 1.3 with the ring provider, ALPN
    /// `http/1.1`, and a client certificate **required** on every connection: signed by the CA
    /// directly (no intermediates), with the `clientAuth` extended key usage, not itself a CA.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, ConfigError> {
        self.server_config_with(Arc::new(arc_swap::ArcSwap::from_pointee(RevocationList::default())))
    }

    /// [`Self::server_config`] refusing the client certificates `revoked` lists when they
    /// connect (the list may be swapped while the configuration is in use).
    pub(crate) fn server_config_with(
        &self,
        revoked: Arc<arc_swap::ArcSwap<RevocationList>>,
    ) -> Result<Arc<ServerConfig>, ConfigError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let invalid = |field, reason: String| ConfigError::Invalid { field, reason };
        let mut roots = rustls::RootCertStore::empty();
        let ca_certs = pem_certs(&self.ca_cert_pem).map_err(|r| invalid("tls.ca_cert", r))?;
        for cert in ca_certs {
            roots
                .add(cert)
                .map_err(|e| invalid("tls.ca_cert", format!("not a usable CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| invalid("tls.ca_cert", format!("cannot verify clients with it: {e}")))?;
        let chain = pem_certs(&self.cert_pem).map_err(|r| invalid("tls.cert", r))?;
        if self.key_pem.contains("-----BEGIN CERTIFICATE-----") && !self.key_pem.contains("PRIVATE KEY") {
            return Err(invalid("tls.key", "holds a certificate, not a private key".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| invalid("tls.key", format!("no usable private key: {e}")))?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| invalid("tls", e.to_string()))?
            .with_client_cert_verifier(Arc::new(crate::revocation::ClientPolicyVerifier {
                inner: verifier,
                revoked,
            }))
            .with_single_cert(chain, key)
            .map_err(|e| invalid("tls.key", format!("does not fit the certificate in `tls.cert`: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

fn pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// Everything the agent server runs from (see [`AgentServer::bind`](crate::server::AgentServer::bind)).
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The agent's name, reported by `/agent/info`.
    pub name: String,
    /// Where to listen (port 0 picks a free port).
    pub listen: SocketAddr,
    /// The Docker engine's Unix socket.
    pub docker_socket: PathBuf,
    /// Server certificate, key and client CA.
    pub tls: TlsMaterial,
    /// Which Docker API requests are allowed.
    pub acl: AclConfig,
    /// `/agent/health` reports `degraded` once the server certificate expires within this window.
    pub expiry_warning: Duration,
    /// How long in-flight (non-streaming) requests may take to finish on shutdown.
    pub shutdown_grace: Duration,
    /// Connection, request and time limits.
    pub limits: AgentLimits,
    /// Client certificates refused even though the CA signed them.
    pub revoked: RevocationList,
}

impl AgentConfig {
    /// A configuration with the defaults for socket, expiry warning, shutdown grace and ACL
    /// (`read-only`).
    pub fn new(name: impl Into<String>, listen: SocketAddr, tls: TlsMaterial) -> Self {
        Self {
            name: name.into(),
            listen,
            docker_socket: PathBuf::from(DEFAULT_DOCKER_SOCKET),
            tls,
            acl: AclConfig::default(),
            expiry_warning: DEFAULT_EXPIRY_WARNING,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            limits: AgentLimits::default(),
            revoked: RevocationList::default(),
        }
    }

    /// Checks every field; the error names the first one at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validated_tls(Arc::new(arc_swap::ArcSwap::from_pointee(self.revoked.clone()))).map(|_| ())
    }

    /// [`Self::validate`], returning the TLS configuration it built on the way.
    pub(crate) fn validated_tls(
        &self,
        revoked: Arc<arc_swap::ArcSwap<RevocationList>>,
    ) -> Result<Arc<ServerConfig>, ConfigError> {
        let invalid = |field, reason: &str| ConfigError::Invalid { field, reason: reason.to_owned() };
        if self.name.trim().is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.name.chars().any(char::is_control) {
            return Err(invalid("name", "must not contain control characters"));
        }
        if self.docker_socket.as_os_str().is_empty() {
            return Err(invalid("docker_socket", "must not be empty"));
        }
        if let Some(problem) = self.limits.problems().into_iter().next() {
            return Err(problem);
        }
        if self.tls.ca_cert_pem.contains("PRIVATE KEY") {
            return Err(invalid(
                "tls.ca_cert",
                "contains a private key; give the agent the CA certificate only",
            ));
        }
        let config = self.tls.server_config_with(revoked)?;
        crate::certs::not_after(&self.tls.cert_pem)
            .map_err(|e| ConfigError::Invalid { field: "tls.cert", reason: e.to_string() })?;
        Ok(config)
    }
}

/// The TLS part of the configuration file: paths to PEM files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The CA certificate (certificate only).
    pub ca_cert: PathBuf,
    /// The agent's server certificate.
    pub cert: PathBuf,
    /// The agent's private key.
    pub key: PathBuf,
    /// A file of refused client certificate fingerprints ([`RevocationList`]); re-read on
    /// `SIGHUP` by `docker-agent serve`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<PathBuf>,
}

/// The configuration file (TOML); see the [module docs](self) for an example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfigFile {
    /// See [`AgentConfig::name`].
    pub name: String,
    /// See [`AgentConfig::listen`]; may be left out when given on the command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// See [`AgentConfig::docker_socket`].
    #[serde(default = "default_socket")]
    pub docker_socket: PathBuf,
    /// The TLS files.
    pub tls: TlsFiles,
    /// See [`AgentConfig::acl`].
    #[serde(default)]
    pub acl: AclConfig,
    /// See [`AgentConfig::expiry_warning`] (humantime, e.g. `30d`).
    #[serde(default = "default_expiry_warning", with = "humantime_serde")]
    pub expiry_warning: Duration,
    /// See [`AgentConfig::shutdown_grace`] (humantime, e.g. `10s`).
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// See [`AgentConfig::limits`].
    #[serde(default)]
    pub limits: AgentLimits,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_DOCKER_SOCKET)
}

fn default_expiry_warning() -> Duration {
    DEFAULT_EXPIRY_WARNING
}

fn default_shutdown_grace() -> Duration {
    DEFAULT_SHUTDOWN_GRACE
}

impl AgentConfigFile {
    /// Reads and parses a configuration file. Relative TLS paths are made relative to the file's
    /// directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut file = Self::parse(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_owned(), source: Box::new(source) })?;
        if let Some(dir) = path.parent() {
            for p in [&mut file.tls.ca_cert, &mut file.tls.cert, &mut file.tls.key]
                .into_iter()
                .chain(file.tls.revoked.as_mut())
            {
                if p.is_relative() {
                    *p = dir.join(&*p);
                }
            }
        }
        Ok(file)
    }

    /// Parses configuration text (paths stay as written).
    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Reads the TLS files and checks the result ([`AgentConfig::validate`]).
    pub fn into_config(self) -> Result<AgentConfig, ConfigError> {
        let read = |field: &'static str, path: &Path| {
            std::fs::read_to_string(path).map_err(|source| ConfigError::ReadTls {
                field,
                path: path.to_owned(),
                source,
            })
        };
        let tls = TlsMaterial {
            ca_cert_pem: read("tls.ca_cert", &self.tls.ca_cert)?,
            cert_pem: read("tls.cert", &self.tls.cert)?,
            key_pem: read("tls.key", &self.tls.key)?,
        };
        let Some(listen) = self.listen else {
            return Err(ConfigError::Invalid {
                field: "listen",
                reason: "not set: give `listen` in the file or `--listen` on the command line".into(),
            });
        };
        let revoked = match &self.tls.revoked {
            Some(path) => RevocationList::load(path)?,
            None => RevocationList::default(),
        };
        let config = AgentConfig {
            name: self.name,
            listen,
            docker_socket: self.docker_socket,
            tls,
            acl: self.acl,
            expiry_warning: self.expiry_warning,
            shutdown_grace: self.shutdown_grace,
            limits: self.limits,
            revoked,
        };
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::Profile;
    use crate::certs::CertificateAuthority;

    #[test]
    fn the_sample_file_in_the_repository_parses_with_the_defaults_it_shows() {
        let sample = include_str!("../agent.toml");
        let file = AgentConfigFile::parse(sample).expect("agent.toml parses");
        assert_eq!(file.listen, Some("0.0.0.0:2376".parse().unwrap()));
        assert_eq!(file.limits, AgentLimits::default());
        assert_eq!(file.acl, AclConfig::default());
        assert_eq!(file.expiry_warning, DEFAULT_EXPIRY_WARNING);
        assert_eq!(file.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(file.docker_socket, PathBuf::from(DEFAULT_DOCKER_SOCKET));
    }

    const DAY: Duration = Duration::from_secs(86_400);

    fn material() -> TlsMaterial {
        let ca = CertificateAuthority::generate("cfg CA", DAY).unwrap();
        let server = ca.issue_server(&["127.0.0.1".into()], DAY).unwrap();
        TlsMaterial { ca_cert_pem: ca.cert_pem().into(), cert_pem: server.cert_pem, key_pem: server.key_pem }
    }

    fn field_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { field, .. } | ConfigError::ReadTls { field, .. } => field,
            other => panic!("unexpected {other}"),
        }
    }

    #[test]
    fn valid_config_passes() {
        let cfg = AgentConfig::new("a", "127.0.0.1:0".parse().unwrap(), material());
        cfg.validate().unwrap();
        assert_eq!(cfg.docker_socket, Path::new(DEFAULT_DOCKER_SOCKET));
        assert_eq!(cfg.expiry_warning, DEFAULT_EXPIRY_WARNING);
        assert!(!format!("{cfg:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn validate_names_the_field() {
        let good = AgentConfig::new("a", "127.0.0.1:0".parse().unwrap(), material());
        let other = material();
        type Change = Box<dyn Fn(&mut AgentConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("name", Box::new(|c| c.name = " ".into())),
            ("name", Box::new(|c| c.name = "a\nb".into())),
            ("docker_socket", Box::new(|c| c.docker_socket = PathBuf::new())),
            ("tls.ca_cert", Box::new(|c| c.tls.ca_cert_pem = "junk".into())),
            ("tls.ca_cert", Box::new(|c| c.tls.ca_cert_pem.push_str(&c.tls.key_pem.clone()))),
            ("tls.cert", Box::new(|c| c.tls.cert_pem = String::new())),
            ("tls.key", Box::new(|c| c.tls.key_pem = "junk".into())),
            ("tls.key", Box::new(|c| c.tls.key_pem = c.tls.cert_pem.clone())),
            ("tls.key", Box::new(move |c| c.tls.key_pem = other.key_pem.clone())),
        ];
        for (want, change) in cases {
            let mut cfg = good.clone();
            change(&mut cfg);
            let err = cfg.validate().unwrap_err();
            let msg = err.to_string();
            assert_eq!(field_of(err), want, "{msg}");
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn file_loads_with_defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let tls = material();
        std::fs::write(dir.path().join("ca.pem"), &tls.ca_cert_pem).unwrap();
        std::fs::write(dir.path().join("cert.pem"), &tls.cert_pem).unwrap();
        std::fs::write(dir.path().join("key.pem"), &tls.key_pem).unwrap();
        let path = dir.path().join("agent.toml");
        std::fs::write(
            &path,
            "name = \"edge\"\nlisten = \"127.0.0.1:2376\"\n[tls]\nca_cert = \"ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n",
        )
        .unwrap();
        let file = AgentConfigFile::load(&path).unwrap();
        assert_eq!(file.tls.key, dir.path().join("key.pem"));
        assert_eq!(file.acl.profile, Profile::ReadOnly);
        assert_eq!(file.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        let cfg = file.into_config().unwrap();
        assert_eq!(cfg.tls, tls);
        assert_eq!(cfg.name, "edge");

        std::fs::write(
            &path,
            "name = \"edge\"\nlisten = \"127.0.0.1:2376\"\nexpiry_warning = \"2d\"\nshutdown_grace = \"1s\"\n\
             docker_socket = \"/tmp/d.sock\"\n[tls]\nca_cert = \"/nope/ca.pem\"\ncert = \"cert.pem\"\nkey = \"key.pem\"\n\
             [acl]\nprofile = \"lifecycle\"\nrules = [\"GET /containers/{id}/logs\"]\n",
        )
        .unwrap();
        let file = AgentConfigFile::load(&path).unwrap();
        assert_eq!(file.expiry_warning, 2 * DAY);
        assert_eq!(file.shutdown_grace, Duration::from_secs(1));
        assert_eq!(file.docker_socket, Path::new("/tmp/d.sock"));
        assert_eq!(file.acl.rules.len(), 1);
        assert_eq!(field_of(file.into_config().unwrap_err()), "tls.ca_cert");
    }

    #[test]
    fn the_module_docs_example_parses() {
        let source = include_str!("config.rs");
        let start = source.find("//! ```toml\n").unwrap() + "//! ```toml\n".len();
        let end = start + source[start..].find("//! ```\n").unwrap();
        let text: String = source[start..end]
            .lines()
            .map(|l| l.strip_prefix("//!").unwrap_or(l).strip_prefix(' ').unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let file = AgentConfigFile::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(file.name, "edge-1");
        assert_eq!(file.acl.profile, Profile::Lifecycle);
        assert_eq!(file.expiry_warning, DEFAULT_EXPIRY_WARNING);
        assert_eq!(file.shutdown_grace, DEFAULT_SHUTDOWN_GRACE);
        assert_eq!(file.docker_socket, Path::new(DEFAULT_DOCKER_SOCKET));
    }

    #[test]
    fn file_errors_say_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        assert!(matches!(AgentConfigFile::load(&path), Err(ConfigError::Read { .. })));
        for (text, needle) in [
            (
                "name = \"x\"\nlisten = \"not an address\"\n[tls]\nca_cert=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
                "listen",
            ),
            ("name = \"x\"\nlisten = \"127.0.0.1:1\"\n", "tls"),
            (
                "name = \"x\"\nlisten = \"127.0.0.1:1\"\nbogus = 1\n[tls]\nca_cert=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
                "bogus",
            ),
            (
                "name = \"x\"\nlisten = \"127.0.0.1:1\"\nshutdown_grace = \"soon\"\n[tls]\nca_cert=\"a\"\ncert=\"b\"\nkey=\"c\"\n",
                "shutdown_grace",
            ),
            (
                "name = \"x\"\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert=\"a\"\ncert=\"b\"\nkey=\"c\"\n[acl]\nrules=[\"PUT x\"]\n",
                "PUT x",
            ),
        ] {
            std::fs::write(&path, text).unwrap();
            let err = AgentConfigFile::load(&path).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }));
            let msg = err.to_string();
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }
}
