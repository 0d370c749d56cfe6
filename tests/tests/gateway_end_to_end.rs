//! The gateway end to end, every part a separate process: the gateway, the example WAF as a UDS
//! agent and as a gRPC agent (each blocking its own paths), both on one route, and an upstream.

use agentpool_tests::{
    Agent, Gateway, Transport, Upstream, agent_bin, base_config, gateway_bin, get, sample,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_asks_a_uds_agent_and_a_grpc_agent_and_reports_them() {
    let dir = tempfile::tempdir().unwrap();
    let app = Upstream::start("upstream ok\n").await;
    let uds = Agent::start(agent_bin!(), Transport::Uds, dir.path(), "waf-uds", &["/admin"]).await;
    let grpc = Agent::start(agent_bin!(), Transport::Grpc, dir.path(), "waf-grpc", &["/secret"]).await;
    let (listen, admin) = (agentpool_tests::free_addr(), agentpool_tests::free_addr());
    let config = format!(
        "{}[[agents]]\nname = \"waf-uds\"\nendpoints = [\"{}\"]\n\n\
         [[agents]]\nname = \"waf-grpc\"\nendpoints = [\"{}\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\nagents = [\"waf-uds\", \"waf-grpc\"]\nfailure_mode = \"closed\"\n",
        base_config(&listen, &admin, &[("app", app.addr)]),
        uds.endpoint,
        grpc.endpoint,
    );
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, config).unwrap();
    let gateway = Gateway::start(gateway_bin!(), &path, &listen, &admin).await;

    // Allowed by both: the upstream answers, with the agents' response header.
    let ok = get(&listen, "/hello").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body, "upstream ok\n");
    assert_eq!(ok.header("x-waf"), Some("checked"), "{ok:?}");
    assert_eq!(ok.header("x-agentpool-agent-status"), None, "both agents answered: {ok:?}");
    // Blocked by the UDS agent (asked first): the gRPC agent is not asked.
    let blocked = get(&listen, "/admin/users").await;
    assert_eq!(blocked.status, 403, "{blocked:?}");
    // Allowed by the UDS agent, blocked by the gRPC agent.
    let blocked = get(&listen, "/secret/plans").await;
    assert_eq!(blocked.status, 403, "{blocked:?}");
    assert_eq!(app.served(), 1, "only the allowed request reached the upstream");

    let metrics = gateway.metrics().await;
    assert_eq!(sample(&metrics, "agentpool_requests_total{agent=\"waf-uds\"}"), Some(3.0), "{metrics}");
    assert_eq!(sample(&metrics, "agentpool_requests_total{agent=\"waf-grpc\"}"), Some(2.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "gateway_requests_total{route=\"all\",status=\"200\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(&metrics, "gateway_requests_total{route=\"all\",status=\"403\"}"),
        Some(2.0),
        "{metrics}"
    );

    let status = gateway.status().await;
    let agents = status["agents"].as_array().unwrap();
    let mut listed: Vec<(&str, u64)> =
        agents.iter().map(|a| (a["id"].as_str().unwrap(), a["requests"].as_u64().unwrap())).collect();
    listed.sort();
    assert_eq!(listed, [("waf-grpc", 2), ("waf-uds", 3)], "{status}");
    for agent in agents {
        assert_eq!(agent["healthy"], true, "{status}");
        assert_eq!(agent["in_flight"], 0, "{status}");
    }
    assert_eq!(status["routes"][0]["agents"], serde_json::json!(["waf-uds", "waf-grpc"]), "{status}");

    let exit = gateway.stop().await;
    assert!(exit.success(), "a clean drain exits 0: {exit}");
    drop((uds, grpc));
}
