//! `grpcs://` agents: transport-grpc's agent side with mutual TLS (rcgen certificates, in this
//! test process, on a real TCP socket), dialled by the gateway with the agent's TLS settings;
//! a wrong CA, and `--check` on bad TLS fields.

use test_support::BlockPath;
use test_support::tls::TestCa;
use transport_grpc::{GrpcAgentServer, GrpcServerConfig, GrpcServerTls};

mod common;
use common::{exchange, get};

/// A mutual-TLS agent (certificate for `agent.test`, client certificates from `ca` required)
/// that blocks `/admin`; its endpoint and the sender that stops it.
async fn mtls_agent(ca: &TestCa) -> (String, tokio::sync::oneshot::Sender<()>) {
    let pair = ca.issue(&["agent.test"]);
    let tls = GrpcServerTls::mutual(pair.cert.as_bytes(), pair.key.as_bytes(), ca.pem.as_bytes()).unwrap();
    let config = GrpcServerConfig { tls: Some(tls), ..GrpcServerConfig::default() };
    let server = GrpcAgentServer::bind_tcp(([127, 0, 0, 1], 0).into(), config).await.unwrap();
    let endpoint = server.endpoint().to_string();
    assert!(endpoint.starts_with("grpcs://"), "{endpoint}");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.serve(BlockPath::new("/admin"), async move {
        let _ = stopped.await;
    }));
    (endpoint, stop)
}

/// The configuration after the listener and admin: one route through agent `waf` at
/// `endpoint` with `tls`.
fn config(app: std::net::SocketAddr, endpoint: &str, tls: &str) -> String {
    format!(
        "[[upstreams]]\nname = \"app\"\nurls = [\"http://{app}\"]\n\n\
         [[agents]]\nname = \"waf\"\nendpoints = [\"{endpoint}\"]\ntls = {tls}\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\nagents = [\"waf\"]\n"
    )
}

fn write(dir: &std::path::Path, name: &str, pem: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path.display().to_string()
}

#[tokio::test]
async fn a_grpcs_agent_with_mutual_tls_decides_and_a_wrong_ca_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("agents");
    let (endpoint, _stop) = mtls_agent(&ca).await;
    let gateway_cert = ca.issue(&["gateway.test"]);
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let cert = write(dir.path(), "gateway.pem", &gateway_cert.cert);
    let key = write(dir.path(), "gateway.key", &gateway_cert.key);
    let app = common::ok_upstream().await;

    let tls = format!(
        "{{ ca = {{ file = \"{ca_file}\" }}, cert = {{ file = \"{cert}\" }}, key = {{ file = \"{key}\" }}, server_name = \"agent.test\" }}"
    );
    let good = dir.path().join("good");
    std::fs::create_dir(&good).unwrap();
    let gateway = common::start_gateway(&good, &config(app, &endpoint, &tls)).await;
    assert_eq!(exchange(&gateway.listen, &get("/page")).await.status, 200);
    assert_eq!(exchange(&gateway.listen, &get("/admin/x")).await.status, 403, "the agent decided");
    drop(gateway);

    // Another CA: the agent's certificate is not trusted; the route (failing closed) answers 503
    // and /status says why.
    let other = TestCa::new("someone else");
    let other_ca = write(dir.path(), "other-ca.pem", &other.pem);
    let tls = format!(
        "{{ ca = {{ file = \"{other_ca}\" }}, cert = {{ file = \"{cert}\" }}, key = {{ file = \"{key}\" }}, server_name = \"agent.test\" }}"
    );
    let bad = dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    let gateway = common::start_gateway(&bad, &config(app, &endpoint, &tls)).await;
    assert_eq!(exchange(&gateway.listen, &get("/page")).await.status, 503);
    let status = common::status(&gateway.admin).await;
    let error = status["agents"][0]["connections"][0]["last_error"].as_str().unwrap_or_default().to_owned();
    assert!(error.to_lowercase().contains("certificate") && error.contains("UnknownIssuer"), "{status}");
}

#[tokio::test]
async fn check_reports_bad_agent_tls_fields_with_their_location() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("agents");
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let not_pem = write(dir.path(), "not.pem", "this is no certificate\n");
    let head = "[[listeners]]\nname = \"m\"\nbind = \"127.0.0.1:1\"\n\n";
    let app: std::net::SocketAddr = ([127, 0, 0, 1], 2).into();
    let cases = [
        (
            config(
                app,
                "grpcs://127.0.0.1:9",
                &format!("{{ ca = {{ file = \"{}/missing.pem\" }} }}", dir.path().display()),
            ),
            "agents[0] (waf).tls.ca:",
        ),
        (
            config(app, "grpcs://127.0.0.1:9", &format!("{{ ca = {{ file = \"{not_pem}\" }} }}")),
            "agents[0] (waf).tls.ca: CA: no certificate",
        ),
        (
            config(
                app,
                "grpcs://127.0.0.1:9",
                &format!("{{ ca = {{ file = \"{ca_file}\" }}, cert = {{ file = \"{ca_file}\" }} }}"),
            ),
            "agents[0] (waf).tls.key: a client certificate needs its key",
        ),
        (
            config(
                app,
                "grpcs://127.0.0.1:9",
                &format!(
                    "{{ ca = {{ file = \"{ca_file}\" }}, cert = {{ file = \"{not_pem}\" }}, key = {{ file = \"{not_pem}\" }} }}"
                ),
            ),
            "agents[0] (waf).tls.cert:",
        ),
        (
            config(
                app,
                "grpcs://127.0.0.1:9",
                &format!("{{ ca = {{ file = \"{ca_file}\" }}, server_name = \"not a name!\" }}"),
            ),
            "agents[0] (waf).tls.server_name:",
        ),
        (
            config(app, "grpc://127.0.0.1:9", &format!("{{ ca = {{ file = \"{ca_file}\" }} }}")),
            "agents[0] (waf).tls: only grpcs:// endpoints use TLS",
        ),
    ];
    for (rest, expected) in cases {
        let (ok, err) = common::check(dir.path(), &format!("{head}{rest}")).await;
        assert!(!ok && err.contains(expected), "expected {expected:?} in:\n{err}");
    }
    // grpcs:// without TLS settings.
    let rest = "[[upstreams]]\nname = \"app\"\nurls = [\"http://127.0.0.1:2\"]\n\n\
                [[agents]]\nname = \"waf\"\nendpoints = [\"grpcs://127.0.0.1:9\"]\n\n\
                [[routes]]\nname = \"r\"\nupstream = \"app\"\nagents = [\"waf\"]\n";
    let (ok, err) = common::check(dir.path(), &format!("{head}{rest}")).await;
    assert!(!ok && err.contains("agents[0] (waf).tls: grpcs:// endpoints need tls.ca"), "{err}");
}

/// `POST /admin/reload`: the status code and the answer's text.
async fn reload(admin: &str) -> (u16, String) {
    let request = format!(
        "POST /admin/reload HTTP/1.1\r\nHost: {admin}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    let reply = exchange(admin, request.as_bytes()).await;
    (reply.status, reply.text())
}

#[tokio::test]
async fn a_client_certificate_renewed_at_the_same_path_is_taken_by_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("agents");
    let (endpoint, _stop) = mtls_agent(&ca).await;
    let app = common::ok_upstream().await;
    // The gateway's certificate is from a CA the agent does not accept (an expired or revoked
    // one would do the same): the route, failing closed, answers 503.
    let stale = TestCa::new("last year's CA").issue(&["gateway.test"]);
    let ca_file = write(dir.path(), "ca.pem", &ca.pem);
    let cert = write(dir.path(), "gateway.pem", &stale.cert);
    let key = write(dir.path(), "gateway.key", &stale.key);
    let tls = format!(
        "{{ ca = {{ file = \"{ca_file}\" }}, cert = {{ file = \"{cert}\" }}, key = {{ file = \"{key}\" }}, server_name = \"agent.test\" }}"
    );
    let gateway = common::start_gateway(dir.path(), &config(app, &endpoint, &tls)).await;
    assert_eq!(exchange(&gateway.listen, &get("/page")).await.status, 503);

    // An unchanged file set: nothing is replaced.
    let (status, text) = reload(&gateway.admin).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("replaced []"), "{text}");

    // The certificate renewed in place (same paths, same configuration text): the reload sees
    // the new bytes, replaces the agent, and the route works.
    let renewed = ca.issue(&["gateway.test"]);
    write(dir.path(), "gateway.pem", &renewed.cert);
    write(dir.path(), "gateway.key", &renewed.key);
    let (status, text) = reload(&gateway.admin).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("replaced [\"waf\"]"), "{text}");
    common::eventually("the renewed certificate is accepted", async || {
        exchange(&gateway.listen, &get("/page")).await.status == 200
    })
    .await;
    assert_eq!(exchange(&gateway.listen, &get("/admin/x")).await.status, 403, "the agent decided");

    // A renewed file that is broken: the reload is refused with the field, the agent stays.
    write(dir.path(), "gateway.key", "not a key\n");
    let (status, text) = reload(&gateway.admin).await;
    assert_eq!(status, 422, "{text}");
    assert!(text.contains("tls.key"), "{text}");
    assert_eq!(exchange(&gateway.listen, &get("/page")).await.status, 200);
}
