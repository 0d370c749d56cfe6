//! Certificates for the agent's mutual TLS, made in process with `rcgen`.
//!
//! One private certificate authority per deployment signs two kinds of leaf certificates:
//!
//! * a **server certificate** for each agent. Its subject alternative names always contain
//!   [`AGENT_SERVER_NAME`] (the one name clients check, whatever address
//!   they dial) plus every host given at issue time: IP addresses become IP SANs, everything else
//!   must be a valid DNS name. Extended key usage: `serverAuth`.
//! * a **client certificate** for each controller (the pool side, or the `docker` CLI). Its common
//!   name is the client's name. Extended key usage: `clientAuth`.
//!
//! All keys are ECDSA P-256, every certificate has a finite lifetime chosen by the caller, and the
//! CA carries `basicConstraints: CA:TRUE, pathlen:0` (it signs leaves only). To absorb small clock
//! differences between machines, `notBefore` is set five minutes in the past; `notAfter` is
//! exactly *now + lifetime*.
//!
//! The CA key only ever lives on the controller side: an agent needs the CA **certificate** (to
//! check client certificates) and its own server key pair, nothing else.
//!
//! ```
//! use std::time::Duration;
//! use docker_agent::certs::{CertificateAuthority, not_after};
//!
//! let day = Duration::from_secs(86_400);
//! let ca = CertificateAuthority::generate("example CA", 365 * day)?;
//! let server = ca.issue_server(&["127.0.0.1".to_owned(), "agent.example".to_owned()], 30 * day)?;
//! let client = ca.issue_client("controller", 30 * day)?;
//! assert_eq!(not_after(&server.cert_pem)?, server.not_after);
//! # let _ = client;
//! # Ok::<(), docker_agent::certs::CertError>(())
//! ```

use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use time::OffsetDateTime;
use x509_parser::certificate::X509Certificate;

use crate::AGENT_SERVER_NAME;

/// How far in the past `notBefore` is put, so that a peer whose clock runs a little behind
/// still accepts a certificate made a moment ago.
const CLOCK_SKEW_ALLOWANCE: Duration = Duration::from_secs(5 * 60);

/// Errors from making, loading or reading certificates.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// A lifetime of zero, or one so long that the expiry date cannot be written in a certificate.
    #[error("invalid lifetime {lifetime:?} for the {what}: {reason}")]
    InvalidLifetime {
        /// Which certificate the lifetime was for.
        what: &'static str,
        /// The lifetime asked for.
        lifetime: Duration,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A host for a server certificate is neither an IP address nor a valid DNS name.
    #[error("invalid host {host:?} for the server certificate: {reason}")]
    InvalidHost {
        /// The host as given.
        host: String,
        /// Why it was refused.
        reason: String,
    },
    /// A common name that is empty or that cannot be encoded.
    #[error("invalid common name {name:?} for the {what}: {reason}")]
    InvalidName {
        /// Which certificate the name was for.
        what: &'static str,
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// PEM text that does not hold what it should (not PEM, not a certificate, not a key, bad DER).
    #[error("cannot read the {what}: {reason}")]
    Pem {
        /// What was being read, e.g. "CA certificate".
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate given as a CA is not marked as a certificate authority.
    #[error("the certificate {subject:?} is not a certificate authority (basicConstraints CA:TRUE missing)")]
    NotCa {
        /// Subject of the certificate that was given.
        subject: String,
    },
    /// The CA key does not belong to the CA certificate.
    #[error("the CA key does not match the public key of the CA certificate {subject:?}")]
    KeyMismatch {
        /// Subject of the CA certificate.
        subject: String,
    },
    /// Key generation or signing failed inside `rcgen`.
    #[error("cannot make the {what}: {source}")]
    Generate {
        /// What was being made.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: rcgen::Error,
    },
}

/// A certificate authority: its certificate and its private key (keep it on the controller side).
pub struct CertificateAuthority {
    cert_pem: String,
    key_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A certificate and its private key, both PEM, as issued by a [`CertificateAuthority`].
#[derive(Clone)]
pub struct IssuedCert {
    /// The certificate (PEM, one `CERTIFICATE` block).
    pub cert_pem: String,
    /// The private key (PEM, PKCS#8).
    pub key_pem: String,
    /// The end of the certificate's validity (`notAfter`), to the second.
    pub not_after: SystemTime,
}

impl fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("not_after", &self.not_after)
            .finish()
    }
}

impl CertificateAuthority {
    /// Makes a new CA with a fresh ECDSA P-256 key, self-signed, valid for `lifetime` from now.
    pub fn generate(common_name: &str, lifetime: Duration) -> Result<Self, CertError> {
        const WHAT: &str = "CA certificate";
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(WHAT, common_name)?;
        let (not_before, not_after) = validity(WHAT, lifetime)?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let key = new_key(WHAT)?;
        let cert = params.self_signed(&key).map_err(|source| CertError::Generate { what: WHAT, source })?;
        Ok(Self { cert_pem: cert.pem(), key_pem: key.serialize_pem(), issuer: Issuer::new(params, key) })
    }

    /// Loads a CA from its certificate and key (both PEM), as written by [`Self::cert_pem`] and
    /// [`Self::key_pem`]. The certificate must be a CA certificate and the key must be its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let der = first_certificate_der("CA certificate", cert_pem)?;
        let cert = parse_der("CA certificate", &der)?;
        let subject = cert.subject().to_string();
        let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|bc| bc.value.ca);
        if !is_ca {
            return Err(CertError::NotCa { subject });
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CertError::Pem { what: "CA private key", reason: e.to_string() })?;
        if key.public_key_raw() != cert.public_key().subject_public_key.data.as_ref() {
            return Err(CertError::KeyMismatch { subject });
        }
        let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key)
            .map_err(|e| CertError::Pem { what: "CA certificate", reason: e.to_string() })?;
        Ok(Self { cert_pem: cert_pem.to_owned(), key_pem: key_pem.to_owned(), issuer })
    }

    /// The CA certificate (PEM). This is what agents and clients trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key (PEM, PKCS#8). Never give this to an agent.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a server certificate for an agent.
    ///
    /// SANs: [`AGENT_SERVER_NAME`] plus each host (an IP address becomes an IP SAN, anything else
    /// must be a valid DNS name; duplicates are dropped). Common name: [`AGENT_SERVER_NAME`].
    /// Extended key usage: `serverAuth`.
    pub fn issue_server(&self, hosts: &[String], lifetime: Duration) -> Result<IssuedCert, CertError> {
        const WHAT: &str = "server certificate";
        let mut sans =
            vec![SanType::DnsName(AGENT_SERVER_NAME.try_into().expect("AGENT_SERVER_NAME is plain ASCII"))];
        for host in hosts {
            let san = host_san(host)?;
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(WHAT, AGENT_SERVER_NAME)?;
        params.subject_alt_names = sans;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue_leaf(WHAT, params, lifetime)
    }

    /// Issues a client certificate with common name `name`. Extended key usage: `clientAuth`.
    pub fn issue_client(&self, name: &str, lifetime: Duration) -> Result<IssuedCert, CertError> {
        const WHAT: &str = "client certificate";
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(WHAT, name)?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_leaf(WHAT, params, lifetime)
    }

    fn issue_leaf(
        &self,
        what: &'static str,
        mut params: CertificateParams,
        lifetime: Duration,
    ) -> Result<IssuedCert, CertError> {
        let (not_before, not_after) = validity(what, lifetime)?;
        params.not_before = not_before;
        params.not_after = not_after;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = new_key(what)?;
        let cert =
            params.signed_by(&key, &self.issuer).map_err(|source| CertError::Generate { what, source })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: to_system_time(not_after),
        })
    }
}

/// The `notAfter` of the first certificate in `cert_pem`.
pub fn not_after(cert_pem: &str) -> Result<SystemTime, CertError> {
    let der = first_certificate_der("certificate", cert_pem)?;
    let cert = parse_der("certificate", &der)?;
    Ok(to_system_time(cert.validity().not_after.to_datetime()))
}

/// The SHA-256 fingerprint of the first certificate in `cert_pem`, as
/// [`RevocationList`](crate::revocation::RevocationList) files take it (`AB:CD:…`).
pub fn fingerprint_pem(cert_pem: &str) -> Result<String, CertError> {
    let der = first_certificate_der("certificate", cert_pem)?;
    Ok(crate::revocation::fingerprint_hex(&crate::revocation::fingerprint(&der)))
}

/// The subject common name of a DER-encoded certificate, if it has one (the agent names peers by it in logs).
pub fn common_name_der(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    Some(cn)
}

fn new_key(what: &'static str) -> Result<KeyPair, CertError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| CertError::Generate { what, source })
}

fn distinguished_name(what: &'static str, common_name: &str) -> Result<DistinguishedName, CertError> {
    let invalid =
        |reason: &str| CertError::InvalidName { what, name: common_name.to_owned(), reason: reason.into() };
    if common_name.trim().is_empty() {
        return Err(invalid("it is empty"));
    }
    if common_name.len() > 64 {
        return Err(invalid("longer than the 64 bytes X.509 allows for a common name"));
    }
    if common_name.chars().any(char::is_control) {
        return Err(invalid("it contains control characters"));
    }
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    Ok(dn)
}

fn host_san(host: &str) -> Result<SanType, CertError> {
    let invalid = |reason: String| CertError::InvalidHost { host: host.to_owned(), reason };
    // Accept bracketed IPv6 as written in URLs.
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    rustls_pki_types::DnsName::try_from(host)
        .map_err(|_| invalid("neither an IP address nor a valid DNS name".into()))?;
    let ia5 = host.try_into().map_err(|e: rcgen::Error| invalid(e.to_string()))?;
    Ok(SanType::DnsName(ia5))
}

fn validity(what: &'static str, lifetime: Duration) -> Result<(OffsetDateTime, OffsetDateTime), CertError> {
    let invalid = |reason| CertError::InvalidLifetime { what, lifetime, reason };
    if lifetime.is_zero() {
        return Err(invalid("it must be longer than zero"));
    }
    // Whole seconds: certificates carry no fractions, and `IssuedCert::not_after` must match.
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).expect("0 is a valid nanosecond");
    let not_after = time::Duration::try_from(lifetime)
        .ok()
        .and_then(|d| now.checked_add(d))
        .and_then(|t| t.replace_nanosecond(0).ok())
        .filter(|t| t.year() <= 9999)
        .ok_or_else(|| invalid("the expiry date would be past the year 9999"))?;
    if not_after <= now {
        return Err(invalid("it must be at least one second"));
    }
    let not_before = now - CLOCK_SKEW_ALLOWANCE;
    Ok((not_before, not_after))
}

fn to_system_time(t: OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    if secs >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn first_certificate_der(what: &'static str, pem: &str) -> Result<Vec<u8>, CertError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let first = CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| CertError::Pem { what, reason: "no CERTIFICATE block found".into() })?
        .map_err(|e| CertError::Pem { what, reason: e.to_string() })?;
    Ok(first.to_vec())
}

fn parse_der<'a>(what: &'static str, der: &'a [u8]) -> Result<X509Certificate<'a>, CertError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::Pem { what, reason: format!("not a valid X.509 certificate: {e}") })?;
    if !rest.is_empty() {
        return Err(CertError::Pem { what, reason: "trailing bytes after the certificate".into() });
    }
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::extensions::GeneralName;

    const DAY: Duration = Duration::from_secs(86_400);

    fn parse(pem: &str) -> Vec<u8> {
        first_certificate_der("test", pem).unwrap()
    }

    #[test]
    fn ca_is_a_p256_ca_with_the_asked_lifetime() {
        let ca = CertificateAuthority::generate("test CA", 10 * DAY).unwrap();
        let der = parse(ca.cert_pem());
        let cert = parse_der("ca", &der).unwrap();
        let bc = cert.basic_constraints().unwrap().unwrap().value;
        assert!(bc.ca);
        assert_eq!(bc.path_len_constraint, Some(0));
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign());
        assert_eq!(cert.subject().iter_common_name().next().unwrap().as_str().unwrap(), "test CA");
        // id-ecPublicKey with prime256v1.
        assert_eq!(cert.public_key().algorithm.algorithm.to_id_string(), "1.2.840.10045.2.1");
        let params = cert.public_key().algorithm.parameters.as_ref().unwrap();
        assert_eq!(params.as_oid().unwrap().to_id_string(), "1.2.840.10045.3.1.7");
        let lifetime = cert.validity().not_after.timestamp() - OffsetDateTime::now_utc().unix_timestamp();
        assert!((10 * 86_400 - 5..=10 * 86_400).contains(&lifetime), "lifetime {lifetime}");
        assert!(cert.validity().not_before.timestamp() < OffsetDateTime::now_utc().unix_timestamp() - 60);
        assert!(ca.key_pem().contains("PRIVATE KEY"));
    }

    #[test]
    fn server_cert_has_name_hosts_and_server_auth() {
        let ca = CertificateAuthority::generate("test CA", DAY).unwrap();
        let hosts = ["127.0.0.1", "::1", "[fe80::1]", "agent.example.org", "127.0.0.1"].map(String::from);
        let issued = ca.issue_server(&hosts, DAY).unwrap();
        let der = parse(&issued.cert_pem);
        let cert = parse_der("server", &der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap().value;
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for name in &san.general_names {
            match name {
                GeneralName::DNSName(d) => dns.push(d.to_string()),
                GeneralName::IPAddress(ip) => ips.push(ip.to_vec()),
                other => panic!("unexpected SAN {other:?}"),
            }
        }
        assert_eq!(dns, [AGENT_SERVER_NAME, "agent.example.org"]);
        assert_eq!(
            ips,
            [
                vec![127, 0, 0, 1],
                "::1".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec(),
                "fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec()
            ]
        );
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
        assert_eq!(
            cert.issuer().to_string(),
            parse_der("ca", &parse(ca.cert_pem())).unwrap().subject().to_string()
        );
        assert_eq!(not_after(&issued.cert_pem).unwrap(), issued.not_after);
    }

    #[test]
    fn client_cert_has_cn_and_client_auth() {
        let ca = CertificateAuthority::generate("test CA", DAY).unwrap();
        let issued = ca.issue_client("controller-1", DAY).unwrap();
        let der = parse(&issued.cert_pem);
        let cert = parse_der("client", &der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(common_name_der(&der).as_deref(), Some("controller-1"));
        assert!(cert.subject_alternative_name().unwrap().is_none());
    }

    #[test]
    fn issued_certs_verify_against_the_ca_with_webpki() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime, pem::PemObject};
        let ca = CertificateAuthority::generate("test CA", DAY).unwrap();
        let server = ca.issue_server(&["10.1.2.3".to_owned()], DAY).unwrap();
        let client = ca.issue_client("c", DAY).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap()).unwrap();
        let roots = std::sync::Arc::new(roots);
        // The server certificate verifies for the fixed name and for its IP.
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                .build()
                .unwrap();
        let server_der = CertificateDer::from_pem_slice(server.cert_pem.as_bytes()).unwrap();
        for name in [AGENT_SERVER_NAME, "10.1.2.3"] {
            verifier
                .verify_server_cert(
                    &server_der,
                    &[],
                    &rustls_pki_types::ServerName::try_from(name).unwrap(),
                    &[],
                    UnixTime::now(),
                )
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        assert!(
            verifier
                .verify_server_cert(
                    &server_der,
                    &[],
                    &rustls_pki_types::ServerName::try_from("other.example").unwrap(),
                    &[],
                    UnixTime::now()
                )
                .is_err()
        );
        // The client certificate verifies as a client.
        let cv =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider).build().unwrap();
        let client_der = CertificateDer::from_pem_slice(client.cert_pem.as_bytes()).unwrap();
        cv.verify_client_cert(&client_der, &[], UnixTime::now()).unwrap();
        // And the server certificate does not (no clientAuth).
        assert!(cv.verify_client_cert(&server_der, &[], UnixTime::now()).is_err());
        // Keys parse as PKCS#8.
        PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap();
    }

    #[test]
    fn from_pem_round_trip_issues_under_the_same_ca() {
        let ca = CertificateAuthority::generate("round trip CA", DAY).unwrap();
        let loaded = CertificateAuthority::from_pem(ca.cert_pem(), ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.key_pem(), ca.key_pem());
        let issued = loaded.issue_client("x", DAY).unwrap();
        let ca_der = parse(ca.cert_pem());
        let ca_cert = parse_der("ca", &ca_der).unwrap();
        let leaf_der = parse(&issued.cert_pem);
        let leaf = parse_der("leaf", &leaf_der).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert!(!format!("{loaded:?}").contains("PRIVATE"));
        assert!(!format!("{issued:?}").contains("PRIVATE"));
    }

    #[test]
    fn from_pem_rejects_garbage_wrong_keys_and_leaves() {
        let ca = CertificateAuthority::generate("a", DAY).unwrap();
        let other = CertificateAuthority::generate("b", DAY).unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem("garbage", ca.key_pem()),
            Err(CertError::Pem { what: "CA certificate", .. })
        ));
        let bad_b64 = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        assert!(matches!(CertificateAuthority::from_pem(bad_b64, ca.key_pem()), Err(CertError::Pem { .. })));
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), "garbage"),
            Err(CertError::Pem { what: "CA private key", .. })
        ));
        assert!(matches!(
            CertificateAuthority::from_pem(ca.cert_pem(), other.key_pem()),
            Err(CertError::KeyMismatch { .. })
        ));
        let leaf = ca.issue_client("leaf", DAY).unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(CertError::NotCa { .. })
        ));
        assert!(matches!(not_after("not pem at all"), Err(CertError::Pem { .. })));
    }

    #[test]
    fn bad_input_gets_typed_errors() {
        assert!(matches!(
            CertificateAuthority::generate("ca", Duration::ZERO),
            Err(CertError::InvalidLifetime { what: "CA certificate", .. })
        ));
        assert!(matches!(
            CertificateAuthority::generate("ca", Duration::from_secs(u64::MAX)),
            Err(CertError::InvalidLifetime { .. })
        ));
        assert!(matches!(
            CertificateAuthority::generate("ca", Duration::from_millis(10)),
            Err(CertError::InvalidLifetime { .. })
        ));
        assert!(matches!(CertificateAuthority::generate("  ", DAY), Err(CertError::InvalidName { .. })));
        let ca = CertificateAuthority::generate("ca", DAY).unwrap();
        for host in ["", "bad host", "a..b", "-x-.example/", "ünïcode.example"] {
            let err = ca.issue_server(&[host.to_owned()], DAY).unwrap_err();
            assert!(matches!(&err, CertError::InvalidHost { host: h, .. } if h == host), "{host}: {err}");
        }
        assert!(matches!(ca.issue_client("", DAY), Err(CertError::InvalidName { .. })));
        assert!(matches!(ca.issue_client(&"x".repeat(65), DAY), Err(CertError::InvalidName { .. })));
        let msg = ca.issue_server(&["bad host".to_owned()], DAY).unwrap_err().to_string();
        assert!(msg.contains("\"bad host\""), "{msg}");
    }
}
