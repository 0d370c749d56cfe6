//! TLS and mutual TLS over real sockets with rcgen certificates: what is accepted, and what is
//! refused during the TLS handshake.

mod common;

use common::{Pair, TestCa, connect, request, serve};
use pool_api::{Connector, Endpoint, TransportError};
use transport_grpc::{GrpcClientTls, GrpcConnector, GrpcConnectorConfig, GrpcServerConfig, GrpcServerTls};

fn connector(tls: GrpcClientTls) -> GrpcConnector {
    GrpcConnector::new(GrpcConnectorConfig { tls: Some(tls), ..GrpcConnectorConfig::default() })
}

fn mutual_server(ca: &TestCa) -> GrpcServerConfig {
    let pair = ca.issue(&["agent.test"]);
    let tls = GrpcServerTls::mutual(pair.cert.as_bytes(), pair.key.as_bytes(), ca.pem.as_bytes()).unwrap();
    GrpcServerConfig { tls: Some(tls), ..GrpcServerConfig::default() }
}

fn client(ca: &TestCa, identity: Option<&Pair>) -> GrpcClientTls {
    let tls = GrpcClientTls::new(ca.pem.as_bytes()).unwrap().with_server_name("agent.test").unwrap();
    match identity {
        Some(pair) => tls.with_identity(pair.cert.as_bytes(), pair.key.as_bytes()).unwrap(),
        None => tls,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_a_certificate_from_the_ca_gets_decisions() {
    let ca = TestCa::new("agents");
    let agent = serve(test_support::Echo, mutual_server(&ca)).await;
    assert!(agent.endpoint.as_str().starts_with("grpcs://127.0.0.1:"), "{}", agent.endpoint);
    let proxy = ca.issue(&["proxy.test"]);
    let conn = connect(&connector(client(&ca, Some(&proxy))), &agent.endpoint).await.expect("mTLS handshake");
    let decision = conn.send(&request("over-tls")).await.expect("a decision");
    assert_eq!(decision.audit.reason.as_deref(), Some("over-tls"));
    assert_eq!(agent.handle.limit_stats().tls_handshakes_failed, 0);
}

/// The proxy is refused during the TLS handshake: connecting or the agent handshake fails
/// (with TLS 1.3 the client learns of the refusal on its first read), no call is served, and
/// the agent counts a failed TLS handshake.
async fn assert_refused(ca: &TestCa, client_tls: GrpcClientTls) {
    let agent = serve(test_support::Echo, mutual_server(ca)).await;
    let err =
        connect(&connector(client_tls), &agent.endpoint).await.map(|c| c.label().to_owned()).unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. } | TransportError::Handshake { .. }), "{err:?}");
    assert_eq!(agent.handle.session_count(), 0);
    // The agent counts the failure after sending its alert: the client can hear of it first.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while agent.handle.limit_stats().tls_handshakes_failed < 1 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(agent.handle.limit_stats().tls_handshakes_failed >= 1, "{:?}", agent.handle.limit_stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_without_a_client_certificate_is_refused_at_the_tls_handshake() {
    let ca = TestCa::new("agents");
    assert_refused(&ca, client(&ca, None)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_another_ca_is_refused_at_the_tls_handshake() {
    let ca = TestCa::new("agents");
    let other = TestCa::new("someone else");
    let stranger = other.issue(&["proxy.test"]);
    assert_refused(&ca, client(&ca, Some(&stranger))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_server_certificate_is_refused_by_the_connector() {
    let ca = TestCa::new("agents");
    let expired = ca.issue_with(&["agent.test"], |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let tls = GrpcServerTls::new(expired.cert.as_bytes(), expired.key.as_bytes()).unwrap();
    let agent =
        serve(test_support::Echo, GrpcServerConfig { tls: Some(tls), ..GrpcServerConfig::default() }).await;
    let err = connector(client(&ca, None)).connect(&agent.endpoint).await.map(drop).unwrap_err();
    let TransportError::Connect { message, .. } = &err else { panic!("{err:?}") };
    assert!(message.to_lowercase().contains("expired"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_for_another_name_is_refused_by_the_connector() {
    let ca = TestCa::new("agents");
    let pair = ca.issue(&["elsewhere.test"]);
    let tls = GrpcServerTls::new(pair.cert.as_bytes(), pair.key.as_bytes()).unwrap();
    let agent =
        serve(test_support::Echo, GrpcServerConfig { tls: Some(tls), ..GrpcServerConfig::default() }).await;
    let err = connector(client(&ca, None)).connect(&agent.endpoint).await.map(drop).unwrap_err();
    assert!(matches!(err, TransportError::Connect { .. }), "{err:?}");
}

#[test]
fn a_grpcs_endpoint_needs_tls_settings() {
    let endpoint = Endpoint::from("grpcs://agent.test:443");
    let err = GrpcConnector::default().validate_endpoint(&endpoint).unwrap_err();
    let TransportError::InvalidEndpoint { endpoint: named, message } = &err else { panic!("{err:?}") };
    assert_eq!(named, "grpcs://agent.test:443");
    assert!(message.contains("TLS"), "{message}");
    let ca = TestCa::new("agents");
    assert_eq!(connector(client(&ca, None)).validate_endpoint(&endpoint), Ok(()));
}

#[test]
fn bad_pem_is_a_typed_error() {
    assert!(matches!(GrpcClientTls::new(b"not pem"), Err(transport_grpc::GrpcTlsError::Certificates { .. })));
    let ca = TestCa::new("agents");
    let pair = ca.issue(&["agent.test"]);
    assert!(matches!(
        GrpcServerTls::new(pair.cert.as_bytes(), b"no key here"),
        Err(transport_grpc::GrpcTlsError::PrivateKey(_))
    ));
}
