//! A TLS listener, with certificates made by rcgen and a real rustls client.

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
            allowed_hosts = ["gateway.test"]

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
    let _gateway = common::run_file(&good, &admin).await;

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

/// An HTTPS upstream answering `ok` and closing each connection (so every request is a new
/// handshake); the certificate it presents can be swapped while it runs.
async fn swappable_https_upstream(
    pair: &test_support::tls::Pair,
) -> (std::net::SocketAddr, impl Fn(&test_support::tls::Pair) + use<>) {
    use rustls::pki_types::pem::PemObject as _;
    fn acceptor(pair: &test_support::tls::Pair) -> tokio_rustls::TlsAcceptor {
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(pair.cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(chain, key)
                .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }
    let current = Arc::new(parking_lot::Mutex::new(acceptor(pair)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = current.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let acceptor = serving.lock().clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, move |pair: &test_support::tls::Pair| *current.lock() = acceptor(pair))
}

/// `POST /admin/reload`: the status code and the answer's text.
async fn reload(admin: &str) -> (u16, String) {
    let request = format!(
        "POST /admin/reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let reply = common::exchange(admin, request.as_bytes()).await;
    (reply.status, reply.text())
}

#[tokio::test]
async fn an_https_upstream_is_verified_with_its_ca_which_a_reload_rereads() {
    let dir = tempfile::tempdir().unwrap();
    let ca = test_support::tls::TestCa::new("upstreams");
    let (app, present) = swappable_https_upstream(&ca.issue(&["127.0.0.1"])).await;
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    // An upstream that takes the TCP connection and never says a word of TLS.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            open.push(s);
        }
    });
    let tls = format!("{{ ca = {{ file = {:?} }} }}", ca_file.display().to_string());
    let gateway = common::start_gateway(
        dir.path(),
        &format!(
            "[[upstreams]]\nname = \"app\"\nurls = [\"https://{app}\"]\ntls = {tls}\n\n\
             [[upstreams]]\nname = \"silent\"\nurls = [\"https://{silent_addr}\"]\ntimeout = \"1s\"\ntls = {tls}\n\n\
             [[routes]]\nname = \"silent\"\npath_prefix = \"/silent\"\nupstream = \"silent\"\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
        ),
    )
    .await;
    let reply = common::exchange(&gateway.listen, &common::get("/page")).await;
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok\n"));
    // A handshake that never comes is bounded by the upstream's time-out.
    assert_eq!(common::exchange(&gateway.listen, &common::get("/silent")).await.status, 504);

    // The upstream moves to a certificate of a new CA: not trusted yet.
    let renewed = test_support::tls::TestCa::new("upstreams, renewed");
    present(&renewed.issue(&["127.0.0.1"]));
    assert_eq!(common::exchange(&gateway.listen, &common::get("/page")).await.status, 502);

    // The CA file rewritten in place (same configuration text): a reload trusts the new CA.
    std::fs::write(&ca_file, &renewed.pem).unwrap();
    let (status, text) = reload(&gateway.admin).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(common::exchange(&gateway.listen, &common::get("/page")).await.status, 200);

    // A CA file that went bad: the reload is refused with where, and the running one stays.
    std::fs::write(&ca_file, "not a certificate\n").unwrap();
    let (status, text) = reload(&gateway.admin).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("tls.ca"), "{text}");
    assert_eq!(common::exchange(&gateway.listen, &common::get("/page")).await.status, 200);
}

/// HTTP/2 "rapid reset" (CVE-2023-44487): a client that opens streams and resets them at once,
/// thousands of times, on one TLS connection. Streams reset before the gateway takes them cost
/// it nothing (hyper's HTTP/2 drops them); streams reset while their request is on its way to
/// the upstream are counted, and the connection is closed once they pass the listener's
/// `max_abandoned_requests` (100 by default). The gateway keeps serving others.
#[tokio::test]
async fn an_http2_rapid_reset_flood_costs_the_upstream_little_and_is_cut_off() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let ca = test_support::tls::TestCa::new("listeners");
    let pair = ca.issue(&["gateway.test"]);
    std::fs::write(dir.path().join("cert.pem"), &pair.cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &pair.key).unwrap();

    // The upstream counts the requests it gets; it answers `/hold/…` never, the rest at once.
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = upstream.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let counted = requests.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = upstream.accept().await else { continue };
            let counted = counted.clone();
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                let mut seen = Vec::new();
                loop {
                    let n = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    seen.extend_from_slice(&buf[..n]);
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        let hold = seen.starts_with(b"GET /hold/");
                        seen.drain(..end + 4);
                        counted.fetch_add(1, Ordering::SeqCst);
                        if !hold
                            && s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });

    let (listen, admin) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[[listeners]]\nname = \"secure\"\nbind = \"{listen}\"\n\
             tls = {{ cert_chain = {{ file = \"{cert}\" }}, key = {{ file = \"{key}\" }} }}\n\n\
             [admin]\nbind = \"{admin}\"\n\n\
             [[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
            cert = dir.path().join("cert.pem").display(),
            key = dir.path().join("key.pem").display(),
        ),
    )
    .unwrap();
    let _gateway = common::run_file(&config, &admin).await;

    let connect = || async {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca.pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut tls =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(&listen).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(ServerName::try_from("gateway.test").unwrap(), tcp)
            .await
            .unwrap();
        let (client, conn) = h2::client::handshake(stream).await.unwrap();
        (client, tokio::spawn(conn))
    };
    let request = |path: &str| http::Request::get(format!("https://gateway.test{path}")).body(()).unwrap();
    let served = async || {
        let (mut client, _conn) = connect().await;
        let (answer, _) = client.send_request(request("/x"), true).unwrap();
        answer.await.unwrap().status()
    };
    assert_eq!(served().await, 200, "a request on HTTP/2");

    // 1. Streams reset as fast as they are opened: most never reach the gateway's handler.
    const FLOOD: usize = 5_000;
    let before = requests.load(Ordering::SeqCst);
    let (client, conn) = connect().await;
    let mut next = Some(client);
    let mut opened = 0;
    while let Some(client) = next.take()
        && opened < FLOOD
    {
        let Ok(mut client) = client.ready().await else { break };
        let Ok((answer, _)) = client.send_request(request("/x"), true) else { break };
        // The connection's task writes the HEADERS; the drop then resets the stream.
        tokio::task::yield_now().await;
        drop(answer);
        opened += 1;
        next = Some(client);
    }
    drop(next);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(20), conn).await;
    let reached = requests.load(Ordering::SeqCst) - before;
    assert!(reached <= 150, "{reached} of {opened} streams reset at once reached the upstream");

    // 2. Streams reset once their request is at the upstream (the costly kind): the connection
    // is closed after about `max_abandoned_requests` of them.
    let (client, conn) = connect().await;
    let mut next = Some(client);
    let mut opened = 0;
    while let Some(client) = next.take()
        && opened < 1_000
    {
        let Ok(mut client) = client.ready().await else { break };
        let at = requests.load(Ordering::SeqCst);
        let Ok((answer, _)) = client.send_request(request("/hold/x"), true) else { break };
        let arrived = tokio::time::timeout(std::time::Duration::from_secs(20), async {
            while requests.load(Ordering::SeqCst) == at {
                if conn.is_finished() {
                    return false;
                }
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            true
        })
        .await
        .expect("a request neither reached the upstream nor ended the connection");
        drop(answer);
        if !arrived {
            // The gateway closed the connection.
            break;
        }
        opened += 1;
        next = Some(client);
    }
    drop(next);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(20), conn).await;
    assert!(ended.is_ok(), "the flooded connection is still open");
    assert!((100..=110).contains(&opened), "closed after {opened} requests reset at the upstream");

    assert_eq!(served().await, 200, "others are still served");
}
