//! Configuration reloads under load: clients send requests continuously while the gateway's
//! file is rewritten and reloaded (`POST /admin/reload`) again and again — an agent added and
//! removed, routes changed and added, upstreams swapped. No request may fail, each is answered
//! exactly once, and each reaches an upstream exactly once.

use agentpool_tests::{Agent, Gateway, Load, Transport, Upstream, agent_bin, base_config, gateway_bin, get};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_under_load_fail_no_request_and_answer_each_once() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (Upstream::start("one\n").await, Upstream::start("two\n").await);
    let uds = Agent::start(agent_bin!(), Transport::Uds, dir.path(), "waf-uds", &["/admin"]).await;
    let grpc = Agent::start(agent_bin!(), Transport::Grpc, dir.path(), "waf-grpc", &["/admin"]).await;
    let (listen, admin) = (agentpool_tests::free_addr(), agentpool_tests::free_addr());
    let base = base_config(&listen, &admin, &[("one", one.addr), ("two", two.addr)]);
    let agent = |name: &str, endpoint: &str| {
        format!("[[agents]]\nname = \"{name}\"\nendpoints = [\"{endpoint}\"]\n\n")
    };
    let route = |name: &str, prefix: &str, upstream: &str, agents: &str| {
        format!(
            "[[routes]]\nname = \"{name}\"\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\nagents = {agents}\n\n"
        )
    };
    // Each version, and where `/api/x` and `/x` go under it.
    let versions = [
        (
            format!(
                "{base}{}{}",
                agent("waf-uds", &uds.endpoint),
                route("all", "/", "one", r#"["waf-uds"]"#)
            ),
            ("one\n", "one\n"),
        ),
        (
            format!(
                "{base}{}{}{}",
                agent("waf-uds", &uds.endpoint),
                agent("waf-grpc", &grpc.endpoint),
                route("all", "/", "two", r#"["waf-uds", "waf-grpc"]"#)
            ),
            ("two\n", "two\n"),
        ),
        (
            format!(
                "{base}{}{}{}{}",
                agent("waf-grpc", &grpc.endpoint),
                agent("waf-uds", &uds.endpoint),
                route("api", "/api", "one", r#"["waf-grpc"]"#),
                route("all", "/", "two", r#"["waf-uds"]"#)
            ),
            ("one\n", "two\n"),
        ),
    ];
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, &versions[0].0).unwrap();
    let gateway = Gateway::start(gateway_bin!(), &path, &listen, &admin).await;

    let load = Load::start(&listen, &["/api/x", "/x"], 4);
    let mut checked = 0;
    // 1 → 2 → 3 → 1 → 3 → 2 → 1: agents added and removed, routes added, changed and removed.
    for next in [1, 2, 0, 2, 1, 0].repeat(2) {
        load.wait_for(100).await;
        std::fs::write(&path, &versions[next].0).unwrap();
        let summary = gateway.reload().await;
        // A reload answers once the new routes serve: new requests see them at once.
        let (api, other) = versions[next].1;
        assert_eq!(get(&listen, "/api/x").await.body, api, "after {summary}");
        assert_eq!(get(&listen, "/x").await.body, other, "after {summary}");
        checked += 2;
    }
    load.wait_for(100).await;
    let sent = load.stop().await;

    let failed: Vec<_> = sent
        .iter()
        .filter(|s| {
            let a = &s.answer;
            !(a.status == 200
                && a.status_lines == 1
                && a.complete
                && (a.body == "one\n" || a.body == "two\n")
                && a.header("x-waf") == Some("checked")
                && a.header("x-agentpool-agent-status").is_none())
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the reloads: {failed:#?}",
        failed.len(),
        sent.len()
    );
    eprintln!("{} requests under {} reloads", sent.len(), 12);
    assert!(sent.len() >= 1300, "the load ran throughout: {} requests", sent.len());
    assert_eq!(
        one.served() + two.served(),
        sent.len() as u64 + checked,
        "every request reached an upstream exactly once"
    );
    let status = gateway.status().await;
    assert_eq!(status["agents"].as_array().unwrap().len(), 1, "the last version has one agent: {status}");
    assert!(gateway.stop().await.success());
}

/// A reload that moves an agent to other endpoints (same name) under load, back and forth. The
/// gateway replaces the agent in the pool (`AgentPool::replace_agent`): the new endpoints connect
/// first and take the old ones' place at once, the old connections drain. No request may find
/// the agent unknown or unconnected (a fail-closed route would answer 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moving_an_agent_to_other_endpoints_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let app = Upstream::start("one\n").await;
    let a = Agent::start(agent_bin!(), Transport::Uds, dir.path(), "a", &["/admin"]).await;
    let b = Agent::start(agent_bin!(), Transport::Uds, dir.path(), "b", &["/admin"]).await;
    let (listen, admin) = (agentpool_tests::free_addr(), agentpool_tests::free_addr());
    let version = |endpoint: &str| {
        format!(
            "{}[[agents]]\nname = \"waf\"\nendpoints = [\"{endpoint}\"]\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"one\"\nagents = [\"waf\"]\nfailure_mode = \"closed\"\n",
            base_config(&listen, &admin, &[("one", app.addr)])
        )
    };
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, version(&a.endpoint)).unwrap();
    let gateway = Gateway::start(gateway_bin!(), &path, &listen, &admin).await;
    let load = Load::start(&listen, &["/x"], 4);
    for endpoint in [&b.endpoint, &a.endpoint, &b.endpoint, &a.endpoint] {
        load.wait_for(100).await;
        std::fs::write(&path, version(endpoint)).unwrap();
        gateway.reload().await;
    }
    load.wait_for(100).await;
    let sent = load.stop().await;
    let failed: Vec<_> = sent
        .iter()
        .filter(|s| s.answer.status != 200 || s.answer.header("x-waf") != Some("checked"))
        .map(|s| (s.answer.status, s.answer.header("x-agentpool-agent-status").map(str::to_owned)))
        .collect();
    assert!(failed.is_empty(), "{} of {} requests failed: {failed:?}", failed.len(), sent.len());
    assert_eq!(app.served(), sent.len() as u64);
}
