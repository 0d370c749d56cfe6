//! The pool's background maintenance: one task, started with the pool and stopped with it.
//!
//! Every health bucket (window / buckets, 1 s by default) it re-reads each connection's
//! success-rate window — so a connection that was unhealthy and has since seen no traffic
//! recovers as its bad buckets expire — and updates the healthy-connection gauges. Every
//! outlier interval it runs outlier detection on each agent with several replicas (configured
//! endpoints and reverse-connected replicas alike).
//! Connection pings run in each connection's own supervisor, not here, so one slow agent
//! never delays another.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::{Instant, MissedTickBehavior, interval};
use tokio_util::sync::CancellationToken;

use crate::agent::{Agent, Sticky};
use crate::context::PoolCtx;
use crate::directory::Directory;

/// What maintenance works on, held weakly: it ends when the pool is gone.
pub(crate) struct Targets {
    pub(crate) ctx: Arc<PoolCtx>,
    pub(crate) directory: Weak<Directory>,
    pub(crate) sticky: Weak<Sticky>,
}

impl Targets {
    fn agents(&self) -> Option<Vec<Arc<Agent>>> {
        let directory = self.directory.upgrade()?;
        Some(directory.load().values().map(|v| v.agent.clone()).collect())
    }

    /// Advances the pool's coarse clock and sweeps expired sticky sessions; false once the
    /// pool is gone.
    fn sweep_sessions(&self, now: Instant) -> bool {
        let Some(sticky) = self.sticky.upgrade() else { return false };
        self.ctx.clock.advance(now);
        sticky.sweep(self.ctx.clock.stamp(now));
        metrics::gauge!("agentpool_sticky_sessions").set(sticky.len() as f64);
        true
    }
}

pub(crate) async fn run(pool: Targets, cancel: CancellationToken) {
    let cfg = &pool.ctx.config;
    let bucket = cfg.health.window / u32::try_from(cfg.health.buckets).unwrap_or(u32::MAX);
    let mut refresh = interval(bucket.max(Duration::from_millis(10)));
    refresh.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut outliers = interval(cfg.outlier.interval.max(Duration::from_millis(10)));
    outliers.set_missed_tick_behavior(MissedTickBehavior::Delay);
    outliers.reset();
    loop {
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            _ = refresh.tick() => {
                let Some(agents) = pool.agents() else { break };
                let now = Instant::now();
                for agent in agents {
                    agent.refresh_health(now);
                }
                if !pool.sweep_sessions(now) {
                    break;
                }
            }
            _ = outliers.tick(), if cfg.outlier.enabled => {
                let Some(agents) = pool.agents() else { break };
                let now = Instant::now();
                for agent in agents {
                    agent.evaluate_outliers(now);
                }
            }
        }
    }
}
