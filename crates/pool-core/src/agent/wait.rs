//! Waiting for a permit: the one loop, for a request the balancer places and for one pinned to
//! a connection (correlation affinity, a sticky session).
//!
//! Each turn registers for the next release, then tries once. A full agent (or pinned
//! connection) is waited for until the request's deadline. A paused one is answered by the
//! flow-control mode — refused, let through, or, in mode wait-and-retry, waited for until the
//! flow-control wait runs out. Anything else that keeps the request out is answered at once
//! (see [`super::refuse`]). When the agent starts draining, a waiting request is refused like
//! a new one ([`PoolError::ShuttingDown`], or [`Unavailable::Removed`](crate::Unavailable)
//! for an agent being removed) as soon as it wakes; one still waiting when the drain cancels
//! what is left ends with [`PoolError::Cancelled`], as in-flight requests do.

use std::sync::Arc;

use pool_api::{Decision, EventKind};
use tokio::time::{Instant, sleep_until};

use super::refuse::Reject;
use super::{Agent, InFlight, Slot};
use crate::error::{PoolError, Unavailable};

/// What a request waits for.
pub(crate) enum Target {
    /// Any usable connection the balancer picks, for an event of this kind (`None`: any kind).
    Balanced(Option<EventKind>),
    /// This slot, while it holds the connection of this generation.
    Pinned(Arc<Slot>, u64),
}

/// How a wait ended.
pub(crate) enum Waited {
    /// A permit.
    Permit(InFlight),
    /// The request's answer, found without sending: an error, or an "allow" of a mode that
    /// fails open. Boxed: rare, and far larger than a permit.
    Answer(Box<Result<Decision, PoolError>>),
    /// The pinned slot no longer holds the connection waited for (a pinned target only).
    Lost,
}

/// What reserving ends with: a permit, or the request's answer without sending.
pub(crate) enum Acquired {
    /// A permit.
    Permit(InFlight),
    /// An error, or an "allow" of a mode that fails open. Boxed: rare, and far larger than a
    /// permit.
    Answer(Box<Result<Decision, PoolError>>),
}

/// One try.
enum Attempt {
    Permit(InFlight),
    Full,
    Paused,
    Lost,
    Refused(Reject),
}

impl Agent {
    /// A permit for `target`, waiting until `deadline` if it must.
    pub(crate) async fn wait(&self, target: Target, deadline: Instant) -> Waited {
        let shared = &self.shared;
        let kind = match target {
            Target::Balanced(kind) => kind,
            Target::Pinned(..) => None,
        };
        // Waiting for a resume is bounded by the flow-control wait; for a permit, by the
        // request's deadline only.
        let resume_by = deadline.min(Instant::now() + shared.ctx.config.flow_control.wait);
        let _waiter = shared.waiters.register();
        let mut waiting_for_resume = false;
        loop {
            let notified = shared.capacity.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A drain admits nothing new, and a request still waiting has not been admitted:
            // it is refused like one arriving now. One still waiting when the drain's deadline
            // cancels what is left is cancelled with the rest (below).
            if let Some(closed) = shared.closed() {
                return Waited::Answer(Box::new(Err(closed.error(&shared.id))));
            }
            let paused = match self.attempt(&target) {
                Attempt::Permit(guard) => return Waited::Permit(guard),
                Attempt::Lost => return Waited::Lost,
                Attempt::Full => false,
                Attempt::Paused if waiting_for_resume => true,
                Attempt::Paused => {
                    if let Some(answer) = shared.paused() {
                        return Waited::Answer(Box::new(answer));
                    }
                    shared.metrics.flow_waited.increment(1);
                    waiting_for_resume = true;
                    true
                }
                Attempt::Refused(reject) => return Waited::Answer(Box::new(shared.answer(reject, kind))),
            };
            let until = if paused { resume_by } else { deadline };
            tokio::select! {
                () = &mut notified => {}
                () = sleep_until(until) => {
                    if paused && until < deadline {
                        return Waited::Answer(Box::new(Err(shared.refuse_paused(true))));
                    }
                    shared.metrics.timeouts.increment(1);
                    let after = shared.settings.request_timeout;
                    return Waited::Answer(Box::new(Err(PoolError::Timeout { agent: shared.id.to_string(), after })));
                }
                () = shared.abort.cancelled() => return Waited::Answer(Box::new(Err(shared.drained()))),
            }
        }
    }

    fn attempt(&self, target: &Target) -> Attempt {
        match target {
            Target::Balanced(kind) => match self.try_reserve(*kind) {
                Ok(guard) => Attempt::Permit(guard),
                Err(Reject::Full) => Attempt::Full,
                // Waited for in mode wait-and-retry only; the others answer at once.
                Err(Reject::Paused) => Attempt::Paused,
                Err(reject) => Attempt::Refused(reject),
            },
            Target::Pinned(slot, generation) => {
                if slot.generation() != *generation || !slot.is_connected() {
                    Attempt::Lost
                } else if slot.is_paused() {
                    Attempt::Paused
                } else if slot.permits.try_acquire() {
                    Attempt::Permit(InFlight::pinned(slot.clone()))
                } else {
                    Attempt::Full
                }
            }
        }
    }

    /// A permit on the balancer's choice for an event of `kind` (`None`: any), waiting until
    /// `deadline` if every usable connection is full. A balanced wait has no pinned
    /// connection to lose; were it ever to end so, no connection was found, and it is
    /// answered as such.
    pub(crate) async fn reserve(&self, kind: Option<EventKind>, deadline: Instant) -> Acquired {
        if let Err(closed) = self.shared.admitting() {
            return Acquired::Answer(Box::new(Err(closed)));
        }
        if let Ok(guard) = self.try_reserve(kind) {
            return Acquired::Permit(guard);
        }
        match self.wait(Target::Balanced(kind), deadline).await {
            Waited::Permit(guard) => Acquired::Permit(guard),
            Waited::Answer(answer) => Acquired::Answer(answer),
            Waited::Lost => Acquired::Answer(Box::new(
                self.shared.answer(Reject::Unavailable(Unavailable::NoConnections), kind),
            )),
        }
    }

    /// A permit on `slot`, the connection a request is pinned to by correlation affinity,
    /// waiting until `deadline` if it must; if the slot loses that connection meanwhile, the
    /// pin goes and the request fails with [`PoolError::PinLost`] — its state at the agent is
    /// gone.
    pub(crate) async fn reserve_pinned(&self, slot: Arc<Slot>, key: &str, deadline: Instant) -> Acquired {
        let generation = slot.generation();
        match self.wait(Target::Pinned(slot, generation), deadline).await {
            Waited::Permit(guard) => Acquired::Permit(guard),
            Waited::Answer(answer) => Acquired::Answer(answer),
            Waited::Lost => {
                self.shared.metrics.pin_lost.increment(1);
                self.shared.affinity.remove(key);
                Acquired::Answer(Box::new(Err(PoolError::PinLost {
                    agent: self.id().to_owned(),
                    key: key.to_owned(),
                })))
            }
        }
    }
}
