//! Flow control: an agent's pause / resume signals gate routing, and a paused agent is answered
//! by its flow-control mode.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{allow_all, config, request};
use pool_api::{BodyChunk, Capabilities, Event, EventKind};
use pool_core::{
    AgentOptions, AgentPool, AgentSpec, FlowControlConfig, FlowControlMode, PoolConfig, PoolError,
};
use test_support::MemoryConnector;
use tokio::time::Instant;

fn with_mode(mode: FlowControlMode) -> PoolConfig {
    PoolConfig {
        flow_control: FlowControlConfig { mode, wait: Duration::from_millis(500) },
        connections_per_endpoint: 2,
        ..config()
    }
}

fn body(id: &str) -> Event {
    Event::RequestBody(BodyChunk::new(id, 0, true, Bytes::from_static(b"x")))
}

#[tokio::test(start_paused = true)]
async fn fail_closed_rejects_at_once_for_every_event_kind() {
    let agent = allow_all();
    agent.set_capabilities(Capabilities::new("waf").with_events(EventKind::ALL));
    let (pool, _c) = common::single(with_mode(FlowControlMode::FailClosed), &agent).await;
    agent.pause_all();
    agent.settle().await;
    let start = Instant::now();
    for event in [request("h"), body("b")] {
        assert_eq!(
            pool.send("waf", &event).await.unwrap_err(),
            PoolError::FlowControlPaused { agent: "waf".into() }
        );
    }
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(agent.events_received(), 0);
}

#[tokio::test(start_paused = true)]
async fn fail_open_skips_the_agent_and_answers_allow() {
    let agent = allow_all();
    let (pool, _c) = common::single(with_mode(FlowControlMode::FailOpen), &agent).await;
    agent.pause_all();
    agent.settle().await;
    let d = pool.send("waf", &request("r")).await.unwrap();
    assert!(d.is_allow());
    assert!(d.audit.tags.iter().any(|t| t == "agentpool:flow-control-open"));
    assert_eq!(agent.events_received(), 0);
}

#[tokio::test(start_paused = true)]
async fn wait_and_retry_goes_on_when_the_agent_resumes_in_time() {
    let agent = allow_all();
    let (pool, _c) = common::single(with_mode(FlowControlMode::WaitAndRetry), &agent).await;
    agent.pause_all();
    agent.settle().await;
    let resumer = {
        let agent = agent.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            agent.resume_all();
        })
    };
    let start = Instant::now();
    assert!(pool.send("waf", &request("r")).await.unwrap().is_allow());
    assert_eq!(start.elapsed(), Duration::from_millis(200), "sent the moment the agent resumed");
    resumer.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn wait_and_retry_fails_when_the_wait_runs_out() {
    let agent = allow_all();
    let (pool, _c) = common::single(with_mode(FlowControlMode::WaitAndRetry), &agent).await;
    agent.pause_all();
    agent.settle().await;
    let start = Instant::now();
    let err = pool.send("waf", &request("r")).await.unwrap_err();
    assert_eq!(err, PoolError::FlowControlPaused { agent: "waf".into() });
    assert_eq!(start.elapsed(), Duration::from_millis(500));
}

#[tokio::test(start_paused = true)]
async fn wait_and_retry_never_waits_past_the_request_time_out() {
    let agent = allow_all();
    let mut cfg = with_mode(FlowControlMode::WaitAndRetry);
    cfg.flow_control.wait = Duration::from_secs(60);
    cfg.request_timeout = Duration::from_secs(2);
    let (pool, _c) = common::single(cfg, &agent).await;
    agent.pause_all();
    agent.settle().await;
    let start = Instant::now();
    assert!(matches!(pool.send("waf", &request("r")).await, Err(PoolError::Timeout { .. })));
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn the_mode_can_be_set_per_agent() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(with_mode(FlowControlMode::FailClosed), connector).unwrap();
    let open = AgentOptions { flow_control: Some(FlowControlMode::FailOpen), ..AgentOptions::default() };
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf").options(open)).await.unwrap();
    agent.pause_all();
    agent.settle().await;
    assert!(pool.send("waf", &request("r")).await.unwrap().is_allow());
}

#[tokio::test(start_paused = true)]
async fn resume_and_capacity_signals_reach_the_pool_without_polling() {
    let agent = allow_all();
    let (pool, _c) = common::single(with_mode(FlowControlMode::FailClosed), &agent).await;
    agent.pause_all();
    agent.settle().await;
    assert_eq!(pool.stats().totals.paused, 2);
    agent.resume_all();
    agent.settle().await;
    assert_eq!(pool.stats().totals.paused, 0);
    assert!(pool.send("waf", &request("r")).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn requests_a_paused_agent_refuses_or_lets_through_are_counted() {
    let agent = allow_all();
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &agent);
    let pool = AgentPool::new(with_mode(FlowControlMode::FailClosed), connector).unwrap();
    let mode = |m| AgentOptions { flow_control: Some(m), ..AgentOptions::default() };
    pool.add_agent(AgentSpec::new("closed").endpoint("mem://waf")).await.unwrap();
    let open = AgentSpec::new("open").endpoint("mem://waf").options(mode(FlowControlMode::FailOpen));
    pool.add_agent(open).await.unwrap();
    let wait = AgentSpec::new("wait").endpoint("mem://waf").options(mode(FlowControlMode::WaitAndRetry));
    pool.add_agent(wait).await.unwrap();
    agent.pause_all();
    agent.settle().await;

    for i in 0..2 {
        assert!(pool.send("closed", &request(format!("c{i}"))).await.is_err());
    }
    assert!(pool.try_reserve("closed", EventKind::RequestHeaders).is_err());
    for i in 0..3 {
        assert!(pool.send("open", &request(format!("o{i}"))).await.unwrap().is_allow());
    }
    let err = pool.send("wait", &request("w")).await.unwrap_err(); // the 500 ms wait runs out
    assert_eq!(err, PoolError::FlowControlPaused { agent: "wait".into() });

    let counts = |id| {
        let t = pool.agent_stats(id).unwrap().totals;
        (t.flow_control_rejected, t.flow_control_fail_open)
    };
    assert_eq!(counts("closed"), (3, 0));
    assert_eq!(counts("open"), (0, 3));
    assert_eq!(counts("wait"), (1, 0));
    let all = pool.stats().totals;
    assert_eq!((all.flow_control_rejected, all.flow_control_fail_open), (4, 3));
    assert_eq!((all.unavailable_rejected, all.fail_open), (0, 0), "paused is not unavailable");
    assert_eq!(agent.events_received(), 0);
}
