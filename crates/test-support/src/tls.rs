//! A test certificate authority (feature `tls`): rcgen certificates, PEM, for TLS tests over
//! real sockets.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A CA that issues certificates, PEM.
pub struct TestCa {
    /// The CA's own certificate, PEM.
    pub pem: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Pair {
    /// The certificate, PEM.
    pub cert: String,
    /// Its private key, PEM.
    pub key: String,
}

impl TestCa {
    /// A new self-signed CA whose common name is `name`.
    ///
    /// # Panics
    ///
    /// If rcgen cannot generate a key or sign (a test set-up failure).
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key")).expect("CA");
        TestCa { pem: ca.pem(), ca }
    }

    /// A certificate for `names` (DNS names or IP addresses), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Pair {
        self.issue_with(names, |_| {})
    }

    /// [`issue`](Self::issue), with the parameters changed by `edit` first.
    ///
    /// # Panics
    ///
    /// If a name is not valid or rcgen cannot sign.
    pub fn issue_with(&self, names: &[&str], edit: impl FnOnce(&mut CertificateParams)) -> Pair {
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("certificate parameters");
        edit(&mut params);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("signed certificate");
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }
}
