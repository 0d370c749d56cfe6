//! A TLS listener, with certificates made by rcgen and a real rustls client.

use std::process::Stdio;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

mod common;
use common::free_port;

const BIN: &str = env!("CARGO_BIN_EXE_gateway");

async fn plain_get(addr: &str, target: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.ok()?;
    String::from_utf8_lossy(&raw).split(' ').nth(1)?.parse().ok()
}

#[tokio::test]
async fn a_tls_listener_serves_https_and_check_reports_a_missing_key() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf =
        rcgen::CertificateParams::new(vec!["gateway.test".to_owned()]).unwrap().signed_by(&key, &ca).unwrap();
    std::fs::write(dir.path().join("cert.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();

    // An upstream for the route: the gateway's own admin listener will do (it answers /healthz).
    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = |key_file: &str| {
        format!(
            r#"
            [[listeners]]
            name = "secure"
            bind = "{listen}"
            tls = {{ cert_chain = {{ file = "{cert}" }}, key = {{ file = "{key}" }} }}

            [admin]
            bind = "{admin}"

            [[upstreams]]
            name = "admin"
            urls = ["http://{admin}"]

            [[routes]]
            name = "all"
            upstream = "admin"
            "#,
            cert = dir.path().join("cert.pem").display(),
            key = dir.path().join(key_file).display(),
        )
    };
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, config("missing-key.pem")).unwrap();
    let out = Command::new(BIN).arg("--check").arg("--config").arg(&bad).output().await.unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("listeners[0] (secure).tls") && err.contains("missing-key.pem"), "{err}");

    let good = dir.path().join("good.toml");
    std::fs::write(&good, config("key.pem")).unwrap();
    let _gateway = Command::new(BIN)
        .arg("--config")
        .arg(&good)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    common::wait_ready(&admin).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let client = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = TcpStream::connect(&listen).await.unwrap();
    let mut tls = connector.connect(ServerName::try_from("gateway.test").unwrap(), tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("ok\n"), "{text}");
    assert_eq!(plain_get(&listen, "/healthz").await, None, "plain HTTP on the TLS listener gets no answer");
}
