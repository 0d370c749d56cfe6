//! Configuration pushed to agents and asked for by them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::{allow_all, config};
use pool_api::{ConfigUpdateAnswer, ConfigUpdateKind, ConfigUpdateRequest};
use pool_core::{AgentPool, AgentSpec, ConfigPushConfig, PoolConfig, PushState};
use test_support::{BlockPath, ConfigBehaviour, MemoryAgent, MemoryConnector};
use tokio::time::Instant;

fn push_config() -> PoolConfig {
    PoolConfig {
        config_push: ConfigPushConfig {
            ack_timeout: Duration::from_secs(2),
            retries: 3,
            retry_interval: Duration::from_secs(1),
        },
        ..config()
    }
}

#[tokio::test(start_paused = true)]
async fn a_push_reaches_the_agent_and_is_acknowledged() {
    let agent = allow_all();
    agent.set_config_behaviour(ConfigBehaviour::Accept);
    let (pool, _c) = common::single(push_config(), &agent).await;
    let ids =
        pool.config_push().push("waf", "rules", Some("v2"), Bytes::from_static(b"deny /admin")).unwrap();
    assert_eq!(ids.len(), 1, "one push per endpoint");
    assert_eq!(pool.config_push().wait(ids[0]).await, Some(PushState::Acked));
    let pushes = agent.config_pushes();
    assert_eq!(pushes.len(), 1);
    assert_eq!((pushes[0].1.push_id, pushes[0].1.kind.as_str()), (ids[0], "rules"));
    assert_eq!(pushes[0].1.payload, Bytes::from_static(b"deny /admin"));
    assert_eq!(pool.config_push().counts().acked, 1);
}

#[tokio::test(start_paused = true)]
async fn a_rejected_push_carries_the_agents_message_and_is_not_retried() {
    let agent = allow_all();
    agent.set_config_behaviour(ConfigBehaviour::Reject("unknown rule syntax".into()));
    let (pool, _c) = common::single(push_config(), &agent).await;
    let id = pool.config_push().push("waf", "rules", None, Bytes::new()).unwrap()[0];
    assert_eq!(
        pool.config_push().wait(id).await,
        Some(PushState::Rejected { error: "unknown rule syntax".into() })
    );
    assert_eq!(agent.config_pushes().len(), 1);
    assert_eq!(pool.config_push().counts().rejected, 1);
}

#[tokio::test(start_paused = true)]
async fn a_push_never_acknowledged_is_retried_then_failed() {
    let agent = allow_all();
    agent.set_config_behaviour(ConfigBehaviour::Never);
    let (pool, _c) = common::single(push_config(), &agent).await;
    let start = Instant::now();
    let id = pool.config_push().push("waf", "rules", None, Bytes::new()).unwrap()[0];
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        pool.config_push().state(id),
        Some(PushState::Pending { attempts: 1 }),
        "waiting out the retry interval"
    );
    let PushState::Failed { error } = pool.config_push().wait(id).await.unwrap() else { panic!("must fail") };
    assert!(error.contains("no acknowledgement"), "{error}");
    // 4 attempts × 2 s ack time-out + 3 × 1 s between them.
    assert_eq!(start.elapsed(), Duration::from_secs(11));
    assert_eq!(agent.config_pushes().len(), 4, "the first attempt and three retries were sent");
    assert_eq!(pool.config_push().counts().failed, 1);
}

#[tokio::test(start_paused = true)]
async fn pushes_go_only_to_agents_that_support_them() {
    let (waf, plain) = (allow_all(), MemoryAgent::new(BlockPath::new("/x")));
    waf.set_config_behaviour(ConfigBehaviour::Accept);
    let connector = MemoryConnector::new();
    connector.register("mem://waf", &waf);
    connector.register("mem://plain", &plain);
    let pool = AgentPool::new(push_config(), connector).unwrap();
    pool.add_agent(AgentSpec::new("waf").endpoint("mem://waf")).await.unwrap();
    pool.add_agent(AgentSpec::new("plain").endpoint("mem://plain")).await.unwrap();
    assert!(pool.config_push().push("plain", "rules", None, Bytes::new()).unwrap().is_empty());
    let all = pool.config_push().push_to_all("rules", None, Bytes::new());
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, "waf");
    assert_eq!(pool.config_push().wait(all[0].1).await, Some(PushState::Acked));
    assert!(plain.config_pushes().is_empty());
    assert_eq!(pool.config_push().state(999_999), None);
}

#[tokio::test(start_paused = true)]
async fn agent_updates_go_to_the_handler_and_its_answer_goes_back() {
    let agent = allow_all();
    let (pool, _c) = common::single(config(), &agent).await;
    let seen: Arc<Mutex<Vec<(String, ConfigUpdateRequest)>>> = Arc::default();
    let log = seen.clone();
    pool.config_push().set_update_handler(Some(Arc::new(move |agent: String, req: ConfigUpdateRequest| {
        let log = log.clone();
        async move {
            let accepted = !matches!(req.kind, ConfigUpdateKind::RestartRequired { .. });
            log.lock().unwrap().push((agent, req.clone()));
            ConfigUpdateAnswer {
                request_id: req.request_id,
                accepted,
                error: (!accepted).then(|| "not now".to_owned()),
            }
        }
    })));
    let conn = agent.connection(0).unwrap();
    let reload = conn.request_config_update(ConfigUpdateKind::RequestReload).unwrap();
    let restart = conn
        .request_config_update(ConfigUpdateKind::RestartRequired { reason: "new model".into(), grace: None })
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let answers = agent.config_answers();
    assert_eq!(answers.len(), 2);
    assert!(answers.iter().all(|(label, _)| label == conn.label()), "answered on the connection asked on");
    let by_id = |id| answers.iter().find(|(_, a)| a.request_id == id).map(|(_, a)| a.clone()).unwrap();
    assert!(by_id(reload).accepted);
    assert_eq!(by_id(restart).error.as_deref(), Some("not now"));
    let seen = seen.lock().unwrap();
    assert!(seen.iter().all(|(a, _)| a == "waf"));
    assert_eq!(seen.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn without_a_handler_agent_updates_are_rejected() {
    let agent = allow_all();
    let (_pool, _c) = common::single(config(), &agent).await;
    let id = agent.connection(1).unwrap().request_config_update(ConfigUpdateKind::RequestReload).unwrap();
    tokio::time::sleep(Duration::from_millis(1)).await;
    let answers = agent.config_answers();
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0].1.request_id, id);
    assert!(!answers[0].1.accepted);
    assert!(answers[0].1.error.as_deref().unwrap().contains("no configuration update handler"));
}
