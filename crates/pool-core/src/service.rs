//! A `tower::Service` over one agent, so tower middleware stacks on the pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pool_api::{BoxFuture, Decision, Event};
use tokio::time::Instant;

use crate::agent::Agent;
use crate::error::PoolError;
use crate::slot::InFlight;

type Reserving = Pin<Box<dyn Future<Output = Result<InFlight, Result<Decision, PoolError>>> + Send>>;

/// Sends events to one agent as a [`tower_service::Service`].
///
/// `poll_ready` reserves a permit on the connection the balancer picks, so readiness means
/// capacity: it is pending while every usable connection is full (and wakes when a permit is
/// released), and fails with [`PoolError::Unavailable`] when nothing can take a request
/// (every breaker open, nothing connected…) and the agent fails closed. That error is
/// transient: polling again later may succeed. With a fail-open agent, readiness succeeds and
/// the call answers allow. `call` then sends on the reserved connection — the same send path
/// as [`AgentPool::send`](crate::AgentPool::send). Calling without a successful `poll_ready`
/// sends with a fresh pick.
///
/// A clone starts without a reservation; dropping the service gives any reservation back.
pub struct AgentService {
    agent: Arc<Agent>,
    reserved: Option<InFlight>,
    fail_open: Option<Decision>,
    reserving: Option<Reserving>,
}

impl AgentService {
    pub(crate) fn new(agent: Arc<Agent>) -> Self {
        Self { agent, reserved: None, fail_open: None, reserving: None }
    }
}

impl Clone for AgentService {
    fn clone(&self) -> Self {
        Self::new(self.agent.clone())
    }
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("agent", &self.agent.id())
            .field("reserved", &self.reserved.is_some())
            .finish()
    }
}

impl tower_service::Service<Event> for AgentService {
    type Response = Decision;
    type Error = PoolError;
    type Future = BoxFuture<'static, Result<Decision, PoolError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PoolError>> {
        if self.reserved.is_some() || self.fail_open.is_some() {
            return Poll::Ready(Ok(()));
        }
        if self.reserving.is_none() {
            let agent = self.agent.clone();
            self.reserving = Some(Box::pin(async move {
                let deadline = Instant::now() + agent.shared.settings.request_timeout;
                agent.reserve(None, deadline).await
            }));
        }
        let reserving = self.reserving.as_mut().expect("set above");
        match reserving.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(r) => {
                self.reserving = None;
                match r {
                    Ok(guard) => {
                        self.reserved = Some(guard);
                        Poll::Ready(Ok(()))
                    }
                    Err(Ok(decision)) => {
                        self.fail_open = Some(decision);
                        Poll::Ready(Ok(()))
                    }
                    Err(Err(e)) => Poll::Ready(Err(e)),
                }
            }
        }
    }

    fn call(&mut self, event: Event) -> Self::Future {
        if let Some(decision) = self.fail_open.take() {
            return Box::pin(std::future::ready(Ok(decision)));
        }
        match self.reserved.take() {
            Some(guard) => {
                let shared = guard.slot.agent.clone();
                let start = Instant::now();
                Box::pin(async move { shared.dispatch(guard, event, start).await })
            }
            None => {
                let agent = self.agent.clone();
                Box::pin(async move { agent.send(event).await })
            }
        }
    }
}
