//! A pool against in-process agents, under load, printing live statistics.
//!
//! Two agents: `waf` with two replicas, `auth` with one. Eight tasks send requests as fast as
//! the agents answer (0.2–2 ms each). After 2 s one `waf` replica crashes and stays down for a
//! second — watch its connections drop out and come back — and from 3 s to 4 s `auth` fails
//! every request, so its circuit breaker opens and the pool fails fast.
//!
//! `cargo run -p pool-core --example live_stats [seconds]` (default 6).

use std::process::ExitCode;
use std::time::Duration;

use http::{Method, Uri};
use pool_api::{Event, RequestHeaders};
use pool_core::{AgentPool, AgentSpec, BreakerStatus, PoolConfig};
use test_support::{AllowAll, BlockPath, MemoryAgent, MemoryConnector};
use tokio::time::Instant;

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("live_stats: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let seconds: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(6);

    let waf_a = MemoryAgent::new(BlockPath::new("/admin"));
    let waf_b = MemoryAgent::new(BlockPath::new("/admin"));
    let auth = MemoryAgent::new(AllowAll);
    for (agent, seed) in [(&waf_a, 1), (&waf_b, 2), (&auth, 3)] {
        agent.set_seed(seed);
        agent.set_latency_range(Duration::from_micros(200), Duration::from_millis(2));
    }
    let connector = MemoryConnector::new();
    connector.register("mem://waf-a", &waf_a);
    connector.register("mem://waf-b", &waf_b);
    connector.register("mem://auth", &auth);

    let mut config = PoolConfig::default();
    config.breaker.reset_timeout = Duration::from_millis(500);
    config.reconnect.base = Duration::from_millis(50);
    let pool = AgentPool::new(config, connector)?;
    pool.add_agent(AgentSpec::new("waf").endpoints(["mem://waf-a", "mem://waf-b"])).await?;
    pool.add_agent(AgentSpec::new("auth").endpoint("mem://auth")).await?;
    println!("agents: {:?}; running for {seconds} s\n", pool.agent_ids());

    let load: Vec<_> = (0..8)
        .map(|t| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    n += 1;
                    let path = if n.is_multiple_of(10) { "/admin/users" } else { "/index.html" };
                    let id = format!("{t}-{n}");
                    let request = |id: &str| {
                        Event::RequestHeaders(RequestHeaders::new(id, Method::GET, Uri::from_static(path)))
                    };
                    let _ = pool.send("waf", &request(&id)).await;
                    let _ = pool.send("auth", &request(&id)).await;
                }
            })
        })
        .collect();

    let start = Instant::now();
    let mut last = (0u64, 0u64);
    println!(
        "{:>5}  {:<5} {:>9} {:>8} {:>9} {:>9} {:>8}  breakers",
        "t", "agent", "conn/up", "in-fl", "req/s", "requests", "failed"
    );
    for second in 1..=seconds {
        tokio::time::sleep_until(start + Duration::from_secs(second)).await;
        match second {
            2 => {
                waf_a.refuse_connections(true);
                waf_a.disconnect_all();
                println!("       -- waf-a crashes --");
            }
            3 => {
                waf_a.refuse_connections(false);
                auth.set_failure_rate(1.0);
                println!("       -- waf-a is back; auth starts failing --");
            }
            4 => {
                auth.set_failure_rate(0.0);
                println!("       -- auth recovers --");
            }
            _ => {}
        }
        for stats in pool.all_agent_stats() {
            let previous = if stats.id == "auth" { &mut last.1 } else { &mut last.0 };
            let rate = stats.totals.requests - *previous;
            *previous = stats.totals.requests;
            let breakers: Vec<&str> = stats
                .endpoints
                .iter()
                .map(|e| match e.breaker {
                    BreakerStatus::Closed => "closed",
                    BreakerStatus::Open { .. } => "OPEN",
                    BreakerStatus::HalfOpen => "half-open",
                })
                .collect();
            println!(
                "{:>4}s  {:<5} {:>5}/{:<3} {:>8} {:>9} {:>9} {:>8}  {}",
                second,
                stats.id,
                stats.totals.connected,
                stats.totals.connections,
                stats.totals.in_flight,
                rate,
                stats.totals.requests,
                stats.totals.failures,
                breakers.join(" ")
            );
        }
    }
    for task in load {
        task.abort();
    }
    let report = pool.shutdown().await;
    println!(
        "\nshutdown: {} in-flight requests drained, {} cancelled, in {:?}",
        report.drained, report.forced, report.elapsed
    );
    Ok(())
}
