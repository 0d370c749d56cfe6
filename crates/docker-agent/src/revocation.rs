//! Client certificates the agent refuses although the CA signed them.
//!
//! Every client certificate of a deployment is signed by the same CA, so without revocation a
//! certificate that leaked (or belonged to a controller that is gone) would open every agent
//! until it expires. The agent keeps a deny-list of SHA-256 fingerprints of client
//! certificates (the hash of the certificate's DER bytes, as `openssl x509 -fingerprint
//! -sha256` and `docker-agent certs fingerprint` print it). A listed certificate is refused at
//! the TLS handshake, and — because the list can be replaced while the agent runs
//! ([`RunningDockerAgent::set_revoked`](crate::server::RunningDockerAgent::set_revoked), `SIGHUP` for the
//! program) — every request on a connection opened before is checked again and refused with
//! `403` once its certificate is listed.
//!
//! The file holds one fingerprint per line, 64 hex digits with or without `:` between bytes,
//! any case; `#` starts a comment; blank lines are ignored.
//!
//! ```text
//! # laptop of a former operator, revoked 2026-12-01
//! 5E:3B:...:9A
//! ```

use std::collections::HashSet;
use std::path::Path;

use crate::config::ConfigError;

/// A certificate's SHA-256 fingerprint.
pub type Fingerprint = [u8; 32];

/// The SHA-256 fingerprint of a certificate's DER bytes.
pub fn fingerprint(der: &[u8]) -> Fingerprint {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// A fingerprint as upper-case hex bytes separated by `:`.
pub fn fingerprint_hex(fp: &Fingerprint) -> String {
    fp.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}

/// A set of refused client certificate fingerprints; see the [module docs](self).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationList {
    revoked: HashSet<Fingerprint>,
}

impl RevocationList {
    /// A list of these fingerprints.
    pub fn new(fingerprints: impl IntoIterator<Item = Fingerprint>) -> Self {
        Self { revoked: fingerprints.into_iter().collect() }
    }

    /// Parses the file format; the error names the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut revoked = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split_once('#').map_or(line, |(before, _)| before).trim();
            if line.is_empty() {
                continue;
            }
            let hex: String = line.chars().filter(|c| *c != ':').collect();
            let bytes = (hex.len() == 64 && hex.is_ascii())
                .then(|| {
                    (0..32)
                        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16))
                        .collect::<Result<Vec<u8>, _>>()
                })
                .and_then(Result::ok)
                .ok_or_else(|| {
                    format!("line {}: {line:?} is not a SHA-256 fingerprint (64 hex digits)", n + 1)
                })?;
            let mut fp = [0u8; 32];
            fp.copy_from_slice(&bytes);
            revoked.insert(fp);
        }
        Ok(Self { revoked })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadTls {
            field: "tls.revoked",
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ConfigError::Invalid {
            field: "tls.revoked",
            reason: format!("{}: {reason}", path.display()),
        })
    }

    /// True when this certificate (DER) is refused.
    pub fn contains_der(&self, der: &[u8]) -> bool {
        !self.revoked.is_empty() && self.revoked.contains(&fingerprint(der))
    }

    /// True when this fingerprint is refused.
    pub fn contains(&self, fp: &Fingerprint) -> bool {
        self.revoked.contains(fp)
    }

    /// How many fingerprints are listed.
    pub fn len(&self) -> usize {
        self.revoked.len()
    }

    /// True when nothing is refused.
    pub fn is_empty(&self) -> bool {
        self.revoked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_format_takes_colons_case_and_comments() {
        let fp = fingerprint(b"certificate bytes");
        let hex = fingerprint_hex(&fp);
        assert_eq!(hex.len(), 32 * 3 - 1);
        let text = format!("# revoked\n\n{hex}  # with a comment\n{}\n", hex.replace(':', "").to_lowercase());
        let list = RevocationList::parse(&text).unwrap();
        assert_eq!(list.len(), 1);
        assert!(list.contains(&fp));
        assert!(list.contains_der(b"certificate bytes"));
        assert!(!list.contains_der(b"other bytes"));
        for bad in ["abc", &hex[..60], &format!("{hex}00"), &"zz".repeat(32), "é".repeat(32).as_str()] {
            let err = RevocationList::parse(&format!("# ok\n{bad}\n")).unwrap_err();
            assert!(err.starts_with("line 2:"), "{bad}: {err}");
        }
        assert!(RevocationList::parse("").unwrap().is_empty());
    }
}

/// The agent's client certificate check: the CA's verifier (rustls' webpki), then what the
/// deployment promises beyond it — the certificate is a leaf signed by the CA itself (no
/// intermediates: the CA signs leaves only), it carries the `clientAuth` extended key usage
/// (webpki alone accepts a certificate without the extension), it is not a CA, and it is not
/// revoked.
#[derive(Debug)]
pub(crate) struct ClientPolicyVerifier {
    pub(crate) inner: std::sync::Arc<dyn rustls::server::danger::ClientCertVerifier>,
    pub(crate) revoked: std::sync::Arc<arc_swap::ArcSwap<RevocationList>>,
}

fn refuse(reason: &str) -> rustls::Error {
    #[derive(Debug)]
    struct Policy(String);
    impl std::fmt::Display for Policy {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Policy {}
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        std::sync::Arc::new(Policy(reason.to_owned())),
    )))
}

/// Why a client certificate breaks the deployment's policy, if it does.
pub(crate) fn client_policy_violation(der: &[u8]) -> Option<&'static str> {
    use x509_parser::prelude::FromDer;
    let Ok((_, cert)) = x509_parser::certificate::X509Certificate::from_der(der) else {
        return Some("the client certificate cannot be parsed");
    };
    match cert.extended_key_usage() {
        Ok(Some(eku)) if eku.value.client_auth => {}
        Ok(_) => return Some("the client certificate lacks the clientAuth extended key usage"),
        Err(_) => return Some("the client certificate's extended key usage cannot be read"),
    }
    if cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca) {
        return Some("the client certificate is a CA certificate");
    }
    None
}

impl rustls::server::danger::ClientCertVerifier for ClientPolicyVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        if !intermediates.is_empty() {
            return Err(refuse("the client certificate must be signed by the CA itself (no intermediates)"));
        }
        let verified = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        if let Some(reason) = client_policy_violation(end_entity) {
            return Err(refuse(reason));
        }
        if self.revoked.load().contains_der(end_entity) {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Revoked));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
