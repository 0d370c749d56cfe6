//! `DockerAgentPool` against real in-process agents over mTLS, in front of the real engine.

use std::net::SocketAddr;
use std::time::Duration;

use common::{Pki, client_of};
use docker_agent::acl::{AclConfig, Profile};
use docker_agent::certs::CertificateAuthority;
use docker_agent::client::AgentTls;
use docker_agent::config::AgentConfig;
use docker_agent::pool::{AddError, AgentEndpoint, AgentHealthState, DockerAgentPool, DockerAgentPoolConfig};
use docker_agent::server::{AgentServer, RunningDockerAgent};
use test_support::docker;

mod common;

const DEADLINE: Duration = Duration::from_secs(30);

async fn agent(pki: &Pki, name: &str, listen: SocketAddr, profile: Profile) -> RunningDockerAgent {
    let mut config = AgentConfig::new(name, listen, pki.server.clone());
    config.acl = AclConfig::profile(profile);
    config.shutdown_grace = Duration::from_secs(1);
    // The certificates live a day; only warn in the last hour (otherwise: degraded).
    config.expiry_warning = Duration::from_secs(3600);
    AgentServer::bind(config).await.expect("agent binds")
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn fast_checks() -> DockerAgentPoolConfig {
    DockerAgentPoolConfig {
        name: "pool-test".into(),
        check_interval: Duration::from_millis(200),
        request_timeout: Duration::from_secs(2),
        unhealthy_after: 1,
        backoff_min: Duration::from_millis(100),
        backoff_max: Duration::from_millis(500),
        ..DockerAgentPoolConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_lookup_duplicates_and_removal() {
    let Some(_engine) = docker::engine().await else { return };
    let pki = common::pki("pool test CA");
    let one = agent(&pki, "agent-one", any_port(), Profile::ReadOnly).await;
    let two = agent(&pki, "agent-two", any_port(), Profile::Lifecycle).await;
    let (addr_one, addr_two) = (one.local_addr().to_string(), two.local_addr().to_string());
    let pool = DockerAgentPool::new(DockerAgentPoolConfig {
        check_interval: Duration::from_secs(3600),
        ..fast_checks()
    });

    assert!(pool.add(AgentEndpoint::new("one", addr_one.clone(), pki.client.clone())).await.unwrap());
    assert!(
        pool.add(AgentEndpoint::new("two", format!("agent://{addr_two}"), pki.client.clone())).await.unwrap()
    );
    assert_eq!(pool.count(), 2);

    // Same address again (even under another name): kept, not replaced.
    assert!(!pool.add(AgentEndpoint::new("one-again", addr_one.clone(), pki.client.clone())).await.unwrap());
    assert_eq!(pool.get(&addr_one).unwrap().name(), "one");
    assert!(pool.get_by_name("one-again").is_none());
    // Same name at another address: refused.
    let three = agent(&pki, "agent-three", any_port(), Profile::ReadOnly).await;
    let err = pool
        .add(AgentEndpoint::new("two", three.local_addr().to_string(), pki.client.clone()))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AddError::DuplicateName { name, existing_address } if name == "two" && *existing_address == addr_two),
        "{err}"
    );
    assert_eq!(pool.count(), 2);

    // Lookups.
    assert!(pool.has(&addr_one) && pool.has(&format!("agent://{addr_two}")));
    assert!(!pool.has(&three.local_addr().to_string()));
    let by_host = pool.get_by_docker_host(&format!("agent://{addr_two}")).unwrap().unwrap();
    assert_eq!((by_host.name(), by_host.address()), ("two", addr_two.as_str()));
    assert_eq!(by_host.docker_host(), format!("agent://{addr_two}"));
    assert!(pool.get_by_docker_host("unix:///var/run/docker.sock").unwrap().is_none());
    assert!(pool.get_by_docker_host("ssh://box").is_err());
    assert_eq!(pool.get_by_name("one").unwrap().address(), addr_one);
    let names: Vec<_> = pool.list().iter().map(|a| a.name().to_owned()).collect();
    assert_eq!(names, ["one", "two"]);
    assert_eq!(pool.iter().count(), 2);

    // What the agents reported, cached; Docker through the pooled client.
    let agent_one = pool.get_by_name("one").unwrap();
    let info = agent_one.info().unwrap();
    assert_eq!((info.name.as_str(), info.runtime.as_str()), ("agent-one", "docker"));
    let status = agent_one.status();
    assert_eq!(status.health, AgentHealthState::Healthy);
    assert!(status.api_version.is_some());
    let version = agent_one.docker().version().await.unwrap();
    assert_eq!(version.api_version, status.api_version);
    let stats = pool.stats();
    assert_eq!((stats.total, stats.healthy, stats.degraded, stats.unhealthy), (2, 2, 0, 0));

    // Removal.
    let removed = pool.remove(&format!("agent://{addr_one}")).unwrap();
    assert_eq!(removed.name(), "one");
    assert!(pool.remove(&addr_one).is_none());
    assert!(pool.get(&addr_one).is_none() && pool.get_by_name("one").is_none());
    assert_eq!(pool.count(), 1);
    // The name is free again.
    assert!(
        pool.add(AgentEndpoint::new("one", three.local_addr().to_string(), pki.client.clone()))
            .await
            .unwrap()
    );
    pool.remove_all();
    assert_eq!(pool.count(), 0);
    assert!(pool.get_by_name("two").is_none());
    assert_eq!(pool.stats().total, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_errors_are_refused_at_add() {
    let Some(_engine) = docker::engine().await else { return };
    let pki = common::pki("pool test CA");
    let running = agent(&pki, "strict", any_port(), Profile::ReadOnly).await;
    let address = running.local_addr().to_string();
    let pool = DockerAgentPool::new(fast_checks());

    // A controller trusting another CA (and holding a client certificate from it).
    let stranger = client_of(&CertificateAuthority::generate("other CA", common::DAY).unwrap(), "someone");
    let err = pool.add(AgentEndpoint::new("a", address.clone(), stranger)).await.unwrap_err();
    assert!(matches!(err, AddError::Tls { .. }), "{err}");

    // A client certificate the agent does not accept (the right CA to check the server).
    let mut foreign =
        client_of(&CertificateAuthority::generate("foreign CA", common::DAY).unwrap(), "someone");
    foreign.ca_cert_pem = pki.ca.cert_pem().to_owned();
    let err = pool.add(AgentEndpoint::new("a", address.clone(), foreign)).await.unwrap_err();
    assert!(matches!(err, AddError::Tls { .. }), "{err}");

    // An engine older than required.
    let demanding =
        DockerAgentPool::new(DockerAgentPoolConfig { min_api_version: (1, 999), ..fast_checks() });
    let err = demanding.add(AgentEndpoint::new("a", address.clone(), pki.client.clone())).await.unwrap_err();
    assert!(matches!(&err, AddError::ApiTooOld { minimum: (1, 999), .. }), "{err}");
    assert!(err.to_string().contains("older than the minimum 1.999"), "{err}");

    // An agent whose ACL denies `GET /version`.
    let closed = agent(&pki, "closed", any_port(), Profile::None).await;
    let err = pool
        .add(AgentEndpoint::new("a", closed.local_addr().to_string(), pki.client.clone()))
        .await
        .unwrap_err();
    assert!(matches!(&err, AddError::Denied { message, .. } if message.contains("denied")), "{err}");

    // Bad input.
    assert!(matches!(
        pool.add(AgentEndpoint::new("", address.clone(), pki.client.clone())).await,
        Err(AddError::InvalidName { .. })
    ));
    assert!(matches!(
        pool.add(AgentEndpoint::new("a", "127.0.0.1", pki.client.clone())).await,
        Err(AddError::Address(_))
    ));
    assert!(matches!(
        pool.add(AgentEndpoint::new("a", "tcp://127.0.0.1:2375", pki.client.clone())).await,
        Err(AddError::Address(_))
    ));
    let broken = AgentTls { client_key_pem: "garbage".into(), ..pki.client.clone() };
    assert!(matches!(pool.add(AgentEndpoint::new("a", address, broken)).await, Err(AddError::Client { .. })));
    assert_eq!(pool.count(), 0);
}

async fn wait_health(pool: &DockerAgentPool, name: &str, want: AgentHealthState) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let status = pool.get_by_name(name).expect("in the pool").status();
        if status.health == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} not {want:?} within {DEADLINE:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_turns_unhealthy_and_back_when_restarted() {
    let Some(_engine) = docker::engine().await else { return };
    let pki = common::pki("pool test CA");
    let running = agent(&pki, "flaky", any_port(), Profile::ReadOnly).await;
    let listen = running.local_addr();
    let pool = DockerAgentPool::new(fast_checks());
    assert!(pool.add(AgentEndpoint::new("flaky", listen.to_string(), pki.client.clone())).await.unwrap());
    assert_eq!(pool.get_by_name("flaky").unwrap().status().health, AgentHealthState::Healthy);
    let mut changes = pool.get_by_name("flaky").unwrap().subscribe();

    running.shutdown().await;
    wait_health(&pool, "flaky", AgentHealthState::Unhealthy).await;
    let status = pool.get_by_name("flaky").unwrap().status();
    assert!(status.last_error.is_some() && status.consecutive_failures >= 1, "{status:?}");
    assert_eq!(pool.stats().unhealthy, 1);
    assert!(changes.has_changed().unwrap(), "subscribers see the change");
    changes.mark_unchanged();
    // The pool says so instead of handing out a client that cannot connect…
    let entry = pool.get_by_name("flaky").unwrap();
    let down = entry.ready_docker().expect_err("an unhealthy agent's client is withheld");
    let text = down.to_string();
    assert!(text.contains("\"flaky\"") && text.contains(&listen.to_string()), "{text}");
    // …and a call through the client anyway names the agent's address and the cause.
    let err = entry.docker().ping().await.expect_err("nothing listens").to_string();
    assert!(err.contains(&listen.to_string()) && err.contains("docker-agent at"), "{err}");
    assert!(!err.ends_with("client error (Connect)"), "{err}");

    // Back on the same port: found healthy again by the back-off retries.
    let restarted = agent(&pki, "flaky", listen, Profile::ReadOnly).await;
    wait_health(&pool, "flaky", AgentHealthState::Healthy).await;
    let status = pool.get_by_name("flaky").unwrap().status();
    assert_eq!((status.consecutive_failures, status.last_error.as_deref()), (0, None));
    assert!(status.api_version.is_some(), "version re-checked on recovery");
    assert_eq!(pool.stats().unhealthy, 0);
    pool.get_by_name("flaky").unwrap().docker().ping().await.expect("Docker through the agent again");
    let ready = pool.get_by_name("flaky").unwrap().ready_docker().expect("healthy again");
    ready.ping().await.expect("the checked client works");
    restarted.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_down_at_add_is_registered_unhealthy_and_recovers() {
    let Some(_engine) = docker::engine().await else { return };
    let pki = common::pki("pool test CA");
    // Reserve a port, then free it: nothing listens there yet.
    let listen = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pool = DockerAgentPool::new(fast_checks());
    assert!(pool.add(AgentEndpoint::new("late", listen.to_string(), pki.client.clone())).await.unwrap());
    let agent_entry = pool.get_by_name("late").unwrap();
    assert_eq!(agent_entry.status().health, AgentHealthState::Unhealthy);
    assert!(agent_entry.info().is_none());

    let running = agent(&pki, "late-agent", listen, Profile::ReadOnly).await;
    wait_health(&pool, "late", AgentHealthState::Healthy).await;
    assert_eq!(agent_entry.info().map(|i| i.name), Some("late-agent".to_owned()));
    running.shutdown().await;
}

/// A recorded series: name, labels, value.
type Series = (String, Vec<(String, String)>, metrics_util::debugging::DebugValue);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gauges_count_agents_and_the_unhealthy_ones() {
    use metrics_util::debugging::{DebugValue, DebuggingRecorder};
    let Some(_engine) = docker::engine().await else { return };
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The only test in this binary that installs a recorder; its pool name keeps its series apart.
    recorder.install().unwrap();

    let pki = common::pki("pool test CA");
    let up = agent(&pki, "gauged", any_port(), Profile::ReadOnly).await;
    // Holds its port and hangs up on everyone: unreachable as far as the pool can tell.
    let hang_up = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down = hang_up.local_addr().unwrap();
    let _hanging_up = tokio::spawn(async move {
        while let Ok((stream, _)) = hang_up.accept().await {
            drop(stream);
        }
    });
    let pool = DockerAgentPool::new(DockerAgentPoolConfig { name: "gauges".into(), ..fast_checks() });
    assert!(
        pool.add(AgentEndpoint::new("up", up.local_addr().to_string(), pki.client.clone())).await.unwrap()
    );
    assert!(pool.add(AgentEndpoint::new("down", down.to_string(), pki.client.clone())).await.unwrap());

    // A snapshot drains what it reads (gauges read as 0 afterwards), so wait for the state
    // through the pool's own stats, then read once.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while pool.stats().unhealthy != 1 {
        assert!(tokio::time::Instant::now() < deadline, "the down agent is never seen unhealthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let read = || -> Vec<Series> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(key, _, _, value)| {
                let labels = key.key().labels().map(|l| (l.key().to_owned(), l.value().to_owned())).collect();
                (key.key().name().to_owned(), labels, value)
            })
            .collect()
    };
    let ours = |all: &[Series], name: &str| {
        all.iter().find(|(n, labels, _)| n == name && labels.iter().any(|(_, v)| v == "gauges")).map(
            |(_, _, v)| match v {
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Counter(c) => *c as f64,
                DebugValue::Histogram(h) => h.len() as f64,
            },
        )
    };
    let first = read();
    assert_eq!(ours(&first, "docker_agent_pool_agents"), Some(2.0), "{first:?}");
    assert_eq!(ours(&first, "docker_agent_pool_agents_unhealthy"), Some(1.0));
    // The monitor's failed checks are counted (snapshots hand out counter increments since the
    // last one, so add them up).
    let mut failures = ours(&first, "docker_agent_pool_health_check_failures_total").unwrap_or(0.0);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while failures == 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "no failed health check was counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
        failures += ours(&read(), "docker_agent_pool_health_check_failures_total").unwrap_or(0.0);
    }
    // A removal republishes them.
    assert!(pool.remove(&up.local_addr().to_string()).is_some());
    let second = read();
    assert_eq!(ours(&second, "docker_agent_pool_agents"), Some(1.0), "{second:?}");
    pool.remove_all();
}
