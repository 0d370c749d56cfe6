//! A `tower::Service` over one agent, so tower middleware stacks on the pool.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use pool_api::{BoxFuture, Decision, Event};
use tokio::time::Instant;

use crate::agent::wait::Acquired;
use crate::agent::{Agent, InFlight};
use crate::error::PoolError;

type Reserving = Pin<Box<dyn Future<Output = Acquired> + Send>>;

/// Sends events to one agent as a [`tower_service::Service`].
///
/// `poll_ready` reserves a permit on the connection the balancer picks, so readiness means
/// capacity: it is pending while every usable connection is full, and wakes when a permit is
/// released. `call` then sends on the reserved connection — the same send path as
/// [`AgentPool::send`](crate::AgentPool::send). Calling without a successful `poll_ready`
/// sends with a fresh pick.
///
/// Tower's contract is that an error from `poll_ready` means the service has failed for good
/// and its caller must discard it (a balancer drops it, a buffer closes). So `poll_ready` fails
/// only when this service can never send again: the pool is shutting down
/// ([`PoolError::ShuttingDown`]) or the agent has been removed ([`PoolError::Unavailable`] with
/// [`Unavailable::Removed`](crate::Unavailable::Removed)). Anything that concerns one request
/// only — no connection can take it now (every breaker open, nothing connected, every
/// connection paused by flow control), the wait for a permit outlasted the request time-out,
/// or a fail-open agent's "allow" — makes the service ready instead, and the next `call`
/// answers with it without sending, exactly as `AgentPool::send` would have answered. The
/// `poll_ready` after that reserves afresh, so the same service recovers with the agent.
///
/// A clone starts without a reservation; dropping the service gives any reservation back.
pub struct AgentService {
    agent: Arc<Agent>,
    /// What the last successful `poll_ready` prepared for the next `call`.
    ready: Option<Ready>,
    reserving: Option<Reserving>,
}

/// What a successful `poll_ready` leaves for `call`.
enum Ready {
    /// A permit on a connection: `call` sends there.
    Reserved(InFlight),
    /// The request's answer, found without sending: an error that concerns this request only,
    /// or a fail-open "allow". Boxed: rare, and far larger than a permit.
    Answer(Box<Result<Decision, PoolError>>),
}

impl AgentService {
    pub(crate) fn new(agent: Arc<Agent>) -> Self {
        Self { agent, ready: None, reserving: None }
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
            .field("reserved", &matches!(self.ready, Some(Ready::Reserved(_))))
            .finish()
    }
}

impl tower_service::Service<Event> for AgentService {
    type Response = Decision;
    type Error = PoolError;
    type Future = BoxFuture<'static, Result<Decision, PoolError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), PoolError>> {
        if self.ready.is_some() {
            return Poll::Ready(Ok(()));
        }
        if let Some(closed) = self.agent.shared.closed() {
            self.reserving = None;
            return Poll::Ready(Err(closed.error(self.agent.id())));
        }
        let reserving = self.reserving.get_or_insert_with(|| {
            let agent = self.agent.clone();
            Box::pin(async move {
                let deadline = Instant::now() + agent.shared.settings.request_timeout;
                agent.reserve(None, deadline).await
            })
        });
        let Poll::Ready(reserved) = reserving.as_mut().poll(cx) else {
            return Poll::Pending;
        };
        self.reserving = None;
        // Whatever the reservation says, a closed pool or agent is the one permanent failure.
        if let Some(closed) = self.agent.shared.closed() {
            return Poll::Ready(Err(closed.error(self.agent.id())));
        }
        self.ready = Some(match reserved {
            Acquired::Permit(guard) => Ready::Reserved(guard),
            Acquired::Answer(answer) => Ready::Answer(answer),
        });
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, event: Event) -> Self::Future {
        match self.ready.take() {
            Some(Ready::Answer(answer)) => Box::pin(std::future::ready(*answer)),
            Some(Ready::Reserved(guard)) => {
                let shared = guard.slot.owner.clone();
                let start = Instant::now();
                Box::pin(async move { shared.dispatch(guard, &event, start).await })
            }
            None => {
                let agent = self.agent.clone();
                Box::pin(async move { agent.send(&event).await })
            }
        }
    }
}
