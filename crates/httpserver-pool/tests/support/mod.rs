//! Shared test helpers: free ports, a real hyper-util client (plain and TLS), rcgen certificates.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use httpserver_pool::{Handler, HttpServerConfig, PemSource, TlsConfig, full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// A port free on loopback right now, and never handed out before in this process: the kernel
/// may give a just-released ephemeral port to the next `bind(0)`, and two configs of one test
/// must not end up on the same port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Writes `request` raw to `addr` and reads until the server closes the connection (within
/// 30 s): the bytes read, and how the read ended (an error after some bytes keeps them).
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (Vec<u8>, std::io::Result<usize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut answer))
        .await
        .expect("the server closes the connection");
    (answer, read)
}

/// Waits until `cond` holds, polling every 10 ms; panics naming `what` after 10 s (a deadline
/// that only keeps a broken server from hanging a test, never a measure of speed).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Answers `name` to every request.
pub fn hello(name: &'static str) -> Handler {
    Handler::from_fn(move |_| async move { Response::new(full(name)) })
}

/// Sleeps `d`, then answers "slept".
pub fn sleeper(d: Duration) -> Handler {
    Handler::from_fn(move |_| async move {
        tokio::time::sleep(d).await;
        Response::new(full("slept"))
    })
}

pub fn config(name: &str, handler: Handler) -> HttpServerConfig {
    HttpServerConfig::new(name, free_addr()).with_handler(handler)
}

pub type PlainClient = Client<HttpConnector, Empty<Bytes>>;

pub fn client() -> PlainClient {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn get(client: &PlainClient, url: &str) -> Result<(StatusCode, String), String> {
    let resp = client.get(url.parse().unwrap()).await.map_err(|e| format!("{e:?}"))?;
    body_text(resp).await
}

pub async fn body_text<B>(resp: Response<B>) -> Result<(StatusCode, String), String>
where
    B: hyper::body::Body,
    B::Error: std::fmt::Debug,
{
    let status = resp.status();
    let bytes = resp.into_body().collect().await.map_err(|e| format!("{e:?}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

/// A CA and certificates it signs, made with rcgen at test time.
pub struct TestPki {
    pub ca_pem: String,
    ca: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl TestPki {
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "test ca");
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        TestPki { ca_pem: ca.pem(), ca }
    }

    pub fn issue(&self, names: &[&str]) -> Pair {
        let params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        Pair { cert: cert.pem(), key: key.serialize_pem() }
    }

    pub fn server_tls(&self) -> TlsConfig {
        let pair = self.issue(&["localhost"]);
        TlsConfig { cert_chain: PemSource::Pem(pair.cert), key: PemSource::Pem(pair.key), client_ca: None }
    }

    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(self.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }

    /// A rustls client config trusting this CA, optionally presenting a client certificate.
    pub fn client_config(&self, client_cert: Option<&Pair>, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let builder =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(self.roots());
        let mut cfg = match client_cert {
            Some(pair) => {
                let chain = rustls_pki_types::CertificateDer::pem_slice_iter(pair.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

use rustls_pki_types::pem::PemObject;

/// One TLS request over a fresh connection; returns status, body and the HTTP version.
pub async fn tls_get(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    path: &str,
) -> Result<(StatusCode, String, http::Version), String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(cfg);
    let tls = connector.connect("localhost".try_into().unwrap(), tcp).await.map_err(|e| e.to_string())?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(tls);
    let req = Request::get(format!("https://localhost{path}")).body(Empty::<Bytes>::new()).unwrap();
    let resp = if h2 {
        let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        send.send_request(req).await.map_err(|e| e.to_string())?
    };
    let version = resp.version();
    let (status, body) = body_text(resp).await?;
    Ok((status, body, version))
}
