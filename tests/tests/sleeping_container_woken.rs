//! A Docker container upstream that idlewatch puts to sleep when idle, woken by a request through
//! the gateway process (and an agent process on the route): the real engine, the busybox test
//! image of test-support. Under `CI=true` a missing engine fails the test; elsewhere it skips
//! with the reason.

use agentpool_tests::{
    Agent, Gateway, Transport, agent_bin, base_config, free_addr, gateway_bin, get, wait_until,
};
use test_support::docker::{self, INDEX_HTML, TestContainer};

async fn running(engine: &bollard::Docker, name: &str) -> bool {
    let inspect = engine.inspect_container(name, None).await.unwrap();
    inspect.state.and_then(|s| s.running).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_container_is_put_to_sleep_and_woken_by_a_request_through_an_agent() {
    let Some(engine) = docker::engine().await else { return };
    docker::cleanup_leftovers(&engine).await;
    let dir = tempfile::tempdir().unwrap();
    let published = free_addr();
    let port: u16 = published.rsplit(':').next().unwrap().parse().unwrap();
    let container =
        TestContainer::builder("itest-wake").publish(port).create(&engine).await.expect("container");
    assert!(running(&engine, container.name()).await, "started awake");
    let agent = Agent::start(agent_bin!(), Transport::Uds, dir.path(), "waf", &["/admin"]).await;
    let (listen, admin) = (free_addr(), free_addr());
    let config = format!(
        "{}[[agents]]\nname = \"waf\"\nendpoints = [\"{}\"]\n\n\
         [[workloads]]\nname = \"site\"\nloading_page = false\n\n\
         [workloads.watch]\nworkload = {{ container = \"{}\" }}\nidle_timeout = \"2s\"\nwake_timeout = \"60s\"\n\n\
         [[routes]]\nname = \"site\"\nupstream = \"site\"\nworkload = \"site\"\nagents = [\"waf\"]\nfailure_mode = \"closed\"\n",
        base_config(&listen, &admin, &[("site", format!("127.0.0.1:{port}").parse().unwrap())]),
        agent.endpoint,
        container.name(),
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let gateway = Gateway::start(gateway_bin!(), &path, &listen, &admin).await;

    // No requests: idlewatch stops it after the idle time-out.
    wait_until("the idle container is stopped", || async { !running(&engine, container.name()).await }).await;
    let status = gateway.status().await;
    assert_eq!(status["workloads"][0]["name"], "site", "{status}");

    // A request wakes it, is held until it is healthy, and gets its answer, through the agent.
    let woken = get(&listen, "/index.html").await;
    assert_eq!(woken.status, 200, "{woken:?}");
    assert_eq!(woken.body, INDEX_HTML);
    assert_eq!(woken.header("x-waf"), Some("checked"), "{woken:?}");
    assert!(running(&engine, container.name()).await, "awake after the request");
    let status = gateway.status().await;
    assert_eq!(status["workloads"][0]["state"], "Ready", "{status}");
    let metrics = gateway.metrics().await;
    assert_eq!(
        agentpool_tests::sample(&metrics, "agentpool_requests_total{agent=\"waf\"}"),
        Some(1.0),
        "the agent was asked once: {metrics}"
    );
    assert!(gateway.stop().await.success());
}
