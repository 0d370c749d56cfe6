//! An agent process SIGKILLed under load, then started again on the same socket or port: the
//! fail-open route keeps serving (the answers say the agent was skipped), the fail-closed route
//! answers 503 within the agent time-out, and both are served through the agent again once it
//! is back. Over UDS and over gRPC.

use std::time::Duration;

use agentpool_tests::{
    Agent, Answer, Gateway, Load, Transport, Upstream, agent_bin, base_config, gateway_bin, get, wait_until,
};
use tokio::time::Instant;

/// The agent time-out of the gateway's pool.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// What a slow machine may add to it before a test calls an answer late.
const SLACK: Duration = Duration::from_secs(8);

/// Served by the upstream after the agent allowed it.
fn through_agent(a: &Answer) -> bool {
    a.status == 200
        && a.body == "upstream ok\n"
        && a.header("x-waf") == Some("checked")
        && a.header("x-agentpool-agent-status").is_none()
}

/// Served by the upstream without the agent: the fail-open route's answer while it is down.
fn failed_open(a: &Answer) -> bool {
    a.status == 200
        && a.body == "upstream ok\n"
        && a.header("x-agentpool-agent-status")
            .is_some_and(|s| s == "waf: unavailable, failing open" || s.starts_with("waf: skipped"))
}

/// The fail-closed route's answer while the agent is down.
fn failed_closed(a: &Answer) -> bool {
    a.status == 503 && a.header("x-agentpool-agent-status") == Some("waf: unavailable, failing closed")
}

async fn kill_and_restart_under_load(transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let app = Upstream::start("upstream ok\n").await;
    let mut agent = Agent::start(agent_bin!(), transport, dir.path(), "waf", &["/admin"]).await;
    let (listen, admin) = (agentpool_tests::free_addr(), agentpool_tests::free_addr());
    let config = format!(
        "{}[[agents]]\nname = \"waf\"\nendpoints = [\"{}\"]\n\n\
         [[routes]]\nname = \"closed\"\npath_prefix = \"/closed\"\nupstream = \"app\"\nagents = [\"waf\"]\nfailure_mode = \"closed\"\n\n\
         [[routes]]\nname = \"open\"\npath_prefix = \"/open\"\nupstream = \"app\"\nagents = [\"waf\"]\nfailure_mode = \"open\"\n\n\
         [pool]\nrequest_timeout = \"{}ms\"\nconnect_timeout = \"500ms\"\n\
         reconnect = {{ base = \"20ms\", cap = \"200ms\" }}\nbreaker = {{ reset_timeout = \"200ms\", max_reset_timeout = \"1s\" }}\n",
        base_config(&listen, &admin, &[("app", app.addr)]),
        agent.endpoint,
        REQUEST_TIMEOUT.as_millis(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let gateway = Gateway::start(gateway_bin!(), &path, &listen, &admin).await;
    let (open, closed) = (&listen, &listen);

    let load = Load::start(&listen, &["/open/x", "/closed/x"], 2);
    load.wait_for(50).await;
    agent.kill().await;
    wait_until("the fail-closed route answers 503", || async {
        failed_closed(&get(closed, "/closed/probe").await)
    })
    .await;
    wait_until("the fail-open route serves without the agent", || async {
        failed_open(&get(open, "/open/probe").await)
    })
    .await;
    load.wait_for(100).await;

    agent.restart().await;
    wait_until("the fail-closed route is served through the agent again", || async {
        through_agent(&get(closed, "/closed/probe").await)
    })
    .await;
    wait_until("the fail-open route is served through the agent again", || async {
        through_agent(&get(open, "/open/probe").await)
    })
    .await;
    wait_until("every connection to the agent is back", || async {
        let status = gateway.status().await;
        let connections = status["agents"][0]["connections"].as_array().cloned().unwrap_or_default();
        !connections.is_empty()
            && connections.iter().all(|c| c["connected"] == true && c["state"] == "Healthy")
    })
    .await;
    let recovered = Instant::now();
    load.wait_for(50).await;
    let sent = load.stop().await;

    let broken: Vec<_> = sent.iter().filter(|s| s.answer.status_lines != 1 || !s.answer.complete).collect();
    assert!(broken.is_empty(), "every request is answered, once: {broken:#?}");
    let (on_open, on_closed): (Vec<_>, Vec<_>) = sent.iter().partition(|s| s.target == "/open/x");
    let unexpected: Vec<_> =
        on_open.iter().filter(|s| !through_agent(&s.answer) && !failed_open(&s.answer)).collect();
    assert!(unexpected.is_empty(), "the fail-open route always serves: {unexpected:#?}");
    let unexpected: Vec<_> =
        on_closed.iter().filter(|s| !through_agent(&s.answer) && !failed_closed(&s.answer)).collect();
    assert!(unexpected.is_empty(), "the fail-closed route serves or answers 503: {unexpected:#?}");
    assert!(
        on_open.iter().any(|s| failed_open(&s.answer)),
        "the load saw the fail-open route without the agent"
    );
    assert!(on_closed.iter().any(|s| failed_closed(&s.answer)), "the load saw the fail-closed route's 503");
    let late: Vec<_> =
        on_closed.iter().filter(|s| failed_closed(&s.answer) && s.took > REQUEST_TIMEOUT + SLACK).collect();
    assert!(late.is_empty(), "a 503 comes within the agent time-out: {late:#?}");
    let after: Vec<_> = sent.iter().filter(|s| s.at > recovered).collect();
    assert!(!after.is_empty());
    let not_through: Vec<_> = after.iter().filter(|s| !through_agent(&s.answer)).collect();
    assert!(not_through.is_empty(), "once the agent is back, both routes go through it: {not_through:#?}");
    assert!(gateway.stop().await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uds_agent_killed_under_load_fails_open_or_closed_per_route_and_recovers() {
    kill_and_restart_under_load(Transport::Uds).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_agent_killed_under_load_fails_open_or_closed_per_route_and_recovers() {
    kill_and_restart_under_load(Transport::Grpc).await;
}
